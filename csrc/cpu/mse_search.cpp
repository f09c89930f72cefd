// mse_search_2d_cpu: the official 2-D L2.4 initialisation search, one row (channel) per task.
//
// The search (pdquant_fast/ops/reference.py, mse_search_2d_reference): for a row x[K], R =
// max(x_max, 0) - min(x_min, 0); for ranges i = 1..steps and zero points z = 0..n, with
// d_i = max(R * i / steps / n, 1e-8) and codes k_j = round(x_j / d_i), candidate (i, z) scores
// S(i, z) = sum_j |x_j - clamp(k_j, -z, n - z) d_i|^2.4; the row keeps the lowest score (first
// in (i, z) order on ties) and returns calculate_qparams of its interval [-z d_i, r_i - z d_i].
// That is steps * (n + 1) candidates (25,600 at 8 bits) over K elements each. With x_min and
// x_max given ([C]), R comes from them instead of the row (the range of the tensor the row was
// subsampled from; they must contain the row, which keeps the error scaling below valid).
//
// How this kernel avoids scoring every candidate over every element (exact, not sampled):
//
//  * Sort the row once. For range i the codes k_j are then non-decreasing, so for every z the
//    elements split into three contiguous blocks: clamped low (k < -z, error x + z d), inside
//    (-z <= k <= n - z, error x - k d, the same for every z) and clamped high (k > n - z, error
//    x - (n - z) d). One vector pass over the row per range gives the codes, the inside costs
//    |x - k d|^2.4 and their prefix sums, so the inside part of S(i, z) is a difference of two
//    prefix sums, and the block bounds of every z come from the points where the codes change.
//  * The clamped tails depend on z element by element. Lower bounds for them come from prefix
//    sums of x and x^2 (computed once per row): a clamped error is at least d/2, so
//    |e|^2.4 >= e^2 (d/2)^0.4 (no power per candidate), and by the power-mean inequality
//    sum |e|^2.4 >= N (sum e^2 / N)^1.2 (one power, only for candidates the first bound keeps).
//    A candidate is scored exactly (tails summed element by element) only when its bound can
//    beat the best score so far; ranges are visited from i = steps down, each range's
//    candidates in order of their bound. On real weights about one candidate per range is
//    scored exactly (100 of 25,600 at 8 bits), so the cost is the per-range pass over the row:
//    O(steps * K) powers instead of O(steps * (n + 1) * K).
//
// Scores are computed in float with our pow (cpu/calib_simd_math.inc, relative error ~4e-7) on
// errors scaled by a power of two (no overflow for |x| up to FLT_MAX, the argmin unchanged) and
// summed in double, so each score is within ~1e-6 of its float64 value and the chosen
// candidate's float64 score is within 1e-5 of the best (tests/test_ops_cpu.py checks this
// against the reference's choice). Ties and near-ties (within that margin) may pick another
// candidate than the reference, whose own float32 scores are less accurate. Where the
// reference's float32 scores are all NaN (R * i overflows float) it keeps [x_min, x_max], and so
// does this kernel. The (delta, zero_point) of a candidate are computed with the reference's
// float32 operations, so the same candidate gives the same bits.
//
// Compiled once normally (glue) and once per ISA pass (kernels, #else branch): see
// cpu/calib_simd_foreach.h.
#ifndef PDQ_ISA_PASS

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "cpu/calib_simd.h"
#include "registry.h"

namespace pdquant {
namespace calib_cpu {

// One row, prepared once and then only read: sorted values, prefix sums of the scaled values,
// their squares and magnitudes (all [K + 1], double), the range R and the power-of-two scale s.
struct MseRow {
  std::vector<float> xs;
  std::vector<double> px, px2, pax;
  int64_t K = 0;
  float x_min = 0.0f, x_max = 0.0f, R = 0.0f, s = 1.0f;
  void resize(int64_t k) {
    K = k;
    xs.resize(k);
    for (auto* v : {&px, &px2, &pax}) v->resize(k + 1);
  }
};

// Per-task buffers for the ranges of one row (K elements, nz = n + 1 zero points).
struct MseScratch {
  std::vector<float> codes, cost;
  std::vector<double> pcost;
  std::vector<int64_t> first;  // first[v + n + 2]: index of the first element with code >= v
  std::vector<double> cheap;
  std::vector<std::pair<double, int64_t>> todo;
  void resize(int64_t K, int64_t nz, int W) {
    codes.resize(K + 1 + W);
    cost.resize(K);
    pcost.resize(K + 1);
    first.resize(2 * nz + 3);
    cheap.resize(nz);
    todo.reserve(nz);
  }
};

// The best candidate so far: lowest score, then lowest (i, z) (the reference's first minimum).
struct MseBest {
  double score = std::numeric_limits<double>::infinity();
  int64_t i = -1, z = -1;
  bool better(double sc, int64_t ci, int64_t cz) const {
    return sc < score || (sc == score && (ci < i || (ci == i && cz < z)));
  }
  void consider(double sc, int64_t ci, int64_t cz) {
    if (better(sc, ci, cz)) *this = MseBest{sc, ci, cz};
  }
};

// The candidate step of range i, in the reference's float32 operations: r = R * i / steps,
// d = max(r / n, 1e-8).
inline void range_step(float R, int64_t i, int64_t steps, float n, float* r, float* d) {
  *r = R * static_cast<float>(i) / static_cast<float>(steps);
  *d = std::max(*r / n, 1e-8f);
}

// calculate_qparams of the interval [lo, hi] (pdquant_fast/quant.py), float32 op for op.
inline void calculate_qparams(float lo, float hi, float n, float* delta, float* zp) {
  const float mn = std::min(lo, 0.0f);
  const float mx = std::max(hi, 0.0f);
  *delta = std::max((mx - mn) / n, 1e-8f);
  *zp = std::min(std::max(-std::nearbyint(mn / *delta), 0.0f), n);
}

// The row's clip bounds [lo, hi] (before clamping to 0): the given ones, checked against the
// row, or the row's own extremes.
inline void mse_row_bounds(const float* xs_sorted, int64_t K, const float* x_min,
                           const float* x_max, int64_t c, float* lo, float* hi) {
  *lo = xs_sorted[0];
  *hi = xs_sorted[K - 1];
  if (x_min == nullptr) return;
  TORCH_CHECK(x_min[c] <= *lo && x_max[c] >= *hi, "mse_search_2d_cpu: row ", c,
              " has elements outside [x_min, x_max] = [", x_min[c], ", ", x_max[c],
              "]; the range must contain its row");
  *lo = x_min[c];
  *hi = x_max[c];
}

}  // namespace calib_cpu
}  // namespace pdquant

#define PDQ_ISA_FILE "cpu/mse_search.cpp"
#include "cpu/calib_simd_foreach.h"

namespace pdquant {
namespace calib_cpu {
namespace {

// Rows at least this long are split over threads by ranges when there are fewer rows than
// 2 x threads (below it the per-range work, ~1 us, does not pay for a fork per row).
constexpr int64_t kSplitRowElems = 1 << 14;

// The result of a row: calculate_qparams of the best candidate's interval
// [-z d_i, r_i - z d_i] in the reference's float32 operations; [x_min, x_max] where no candidate
// has a finite score (the reference's scores are all NaN when R * i overflows float).
void mse_finish_row(const MseRow& row, const MseBest& best, int64_t steps, float n,
                    float* delta, float* zp) {
  if (best.i < 0) {
    calculate_qparams(row.x_min, row.x_max, n, delta, zp);
    return;
  }
  float r, d;
  range_step(row.R, best.i, steps, n, &r, &d);
  const float cand_min = -static_cast<float>(best.z) * d;
  const float cand_max = r + cand_min;
  calculate_qparams(cand_min, cand_max, n, delta, zp);
}

std::tuple<at::Tensor, at::Tensor> mse_search_2d_cpu(const at::Tensor& x, int64_t bits,
                                                     int64_t steps,
                                                     const std::optional<at::Tensor>& x_min_t,
                                                     const std::optional<at::Tensor>& x_max_t) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                  x.dim() == 2 && x.size(0) > 0 && x.size(1) > 0,
              "mse_search_2d_cpu: x must be a non-empty contiguous float32 CPU tensor [C, K]");
  TORCH_CHECK(bits >= 2 && bits <= 8, "mse_search_2d_cpu: bits must be in 2..8, got ", bits);
  TORCH_CHECK(steps >= 1, "mse_search_2d_cpu: steps must be >= 1, got ", steps);
  const int64_t C = x.size(0), K = x.size(1);
  const float* xp = x.data_ptr<float>();
  for (int64_t j = 0; j < C * K; ++j)
    TORCH_CHECK(std::isfinite(xp[j]), "mse_search_2d_cpu: x contains NaN or Inf");
  TORCH_CHECK(x_min_t.has_value() == x_max_t.has_value(),
              "mse_search_2d_cpu: give both x_min and x_max, or neither");
  const float* rmin = nullptr;
  const float* rmax = nullptr;
  if (x_min_t.has_value()) {
    for (const at::Tensor* t : {&*x_min_t, &*x_max_t}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                      t->dim() == 1 && t->size(0) == C,
                  "mse_search_2d_cpu: x_min and x_max must be contiguous float32 CPU [C] = [", C,
                  "] tensors");
      for (int64_t c = 0; c < C; ++c)
        TORCH_CHECK(std::isfinite(t->data_ptr<float>()[c]),
                    "mse_search_2d_cpu: x_min/x_max contain NaN or Inf");
    }
    rmin = x_min_t->data_ptr<float>();
    rmax = x_max_t->data_ptr<float>();
  }
  at::Tensor delta = at::empty({C}, x.options());
  at::Tensor zp = at::empty({C}, x.options());
  float* dp = delta.data_ptr<float>();
  float* zpp = zp.data_ptr<float>();
  const int64_t nz = int64_t(1) << bits;
  const float n = static_cast<float>(nz - 1);
  const int64_t threads = at::get_num_threads();
  if (C >= 2 * threads || K < kSplitRowElems || threads == 1) {
    // One row per task: a row is at least steps * K powers.
    at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
      MseRow row;
      row.resize(K);
      MseScratch scratch;
      scratch.resize(K, nz, 16);
      for (int64_t c = cb; c < ce; ++c) {
        MseBest best;
        PDQ_ISA_DISPATCH(mse_prepare_row, xp + c * K, K, n, rmin, rmax, c, row);
        PDQ_ISA_DISPATCH(mse_search_ranges, row, bits, steps, steps, 1, scratch, best);
        mse_finish_row(row, best, steps, n, dp + c, zpp + c);
      }
    });
  } else {
    // Few long rows (a per-tensor search is one row): the ranges of each row are split over
    // the threads (task t takes i = steps - t, steps - t - T, ...), each with its own best,
    // merged by the same rule.
    const int64_t T = std::min<int64_t>(threads, steps);
    MseRow row;
    row.resize(K);
    std::vector<MseBest> bests(T);
    for (int64_t c = 0; c < C; ++c) {
      PDQ_ISA_DISPATCH(mse_prepare_row, xp + c * K, K, n, rmin, rmax, c, row);
      at::parallel_for(0, T, 1, [&](int64_t tb, int64_t te) {
        MseScratch scratch;
        scratch.resize(K, nz, 16);
        for (int64_t t = tb; t < te; ++t) {
          bests[t] = MseBest{};
          PDQ_ISA_DISPATCH(mse_search_ranges, row, bits, steps, steps - t, T, scratch, bests[t]);
        }
      });
      MseBest best;
      for (const MseBest& b : bests) best.consider(b.score, b.i, b.z);
      mse_finish_row(row, best, steps, n, dp + c, zpp + c);
    }
  }
  return {delta, zp};
}

void register_mse_search(pybind11::module_& m) {
  m.def("mse_search_2d_cpu", &mse_search_2d_cpu,
        "(delta [C], zero_point [C]): the official 2-D L2.4 search per row of x [C, K]",
        pybind11::arg("x"), pybind11::arg("bits"), pybind11::arg("steps"),
        pybind11::arg("x_min") = pybind11::none(), pybind11::arg("x_max") = pybind11::none());
}

}  // namespace

PDQ_REGISTER(register_mse_search);

}  // namespace calib_cpu
}  // namespace pdquant

#else  // PDQ_ISA_PASS: the kernels, compiled once per ISA (V = this pass's vector type)

namespace mse_detail {

constexpr int W = V::W;

inline F load_pad(const float* p, int64_t j, int r) {
  if (r == W) return V::load(p + j);
  alignas(64) float buf[W] = {};
  for (int l = 0; l < r; ++l) buf[l] = p[j + l];
  return V::load(buf);
}

// codes[j] = clamp(round(x[j] / d), -n - 1, n + 1) (the clamp keeps every comparison with a
// window bound -z or n - z); cost[j] = |(x[j] - round(x[j] / d) d) s|^2.4 where that code is in
// [-n, n] (it is inside some zero point's window), else 0. The error x - k d is one FMA.
inline void codes_and_costs(const float* xs, int64_t K, float d, float n, float s, float* codes,
                            float* cost) {
  const F dv = V::set1(d), nv = V::set1(n), sv = V::set1(s), p24 = V::set1(2.4f);
  const F lo = V::set1(-n - 1.0f), hi = V::set1(n + 1.0f);
  for (int64_t j = 0; j < K; j += W) {
    const int r = static_cast<int>(std::min<int64_t>(W, K - j));
    const F x = load_pad(xs, j, r);
    const F k = V::round_even(V::div(x, dv));
    const F e = V::mul(V::abs(V::fmadd(V::neg(k), dv, x)), sv);
    const F c = V::select(V::le(V::abs(k), nv), pow_(e, p24), V::zero());
    const F kc = V::min_(hi, V::max_(lo, k));
    if (r == W) {
      V::store(codes + j, kc);
      V::store(cost + j, c);
    } else {
      alignas(64) float kb[W], cb[W];
      V::store(kb, kc);
      V::store(cb, c);
      for (int l = 0; l < r; ++l) {
        codes[j + l] = kb[l];
        cost[j + l] = cb[l];
      }
    }
  }
}

// first[v + off] = #(codes < v) for every integer v in [-n - 2, n + 2], from the points where
// the sorted codes change (found W at a time). codes[-1] must be -n - 2 and codes[K .. K + W)
// must repeat codes[K - 1].
inline void code_starts(const float* codes, int64_t K, int64_t off, int64_t vmax,
                        int64_t* first) {
  int64_t v = -off;  // next value whose start is unknown
  first[0] = 0;
  for (int64_t j = 0; j < K; j += W) {
    uint32_t bits = V::bitmask(V::ne(V::load(codes + j), V::load(codes + j - 1)));
    while (bits != 0) {
      const int64_t p = j + __builtin_ctz(bits);
      bits &= bits - 1;
      if (p >= K) break;
      const int64_t c = static_cast<int64_t>(codes[p]);
      for (++v; v <= c; ++v) first[v + off] = p;
      --v;
    }
  }
  for (++v; v <= vmax; ++v) first[v + off] = K;
}

// Prefix sums pc[j] = sum(c[0:j]) in double with four independent chains (a single chain is
// bound by the 4-cycle add latency: 1.3 us per 1280-element row on Zen 4, a third of a range).
inline void prefix_sums(const float* c, int64_t K, double* pc) {
  const int64_t q = (K + 3) / 4;
  int64_t len[4];
  for (int t = 0; t < 4; ++t) len[t] = std::clamp<int64_t>(K - t * q, 0, q);
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  pc[0] = 0.0;
  for (int64_t j = 0; j < q; ++j) {
    s0 += c[j];
    pc[j + 1] = s0;
    if (j < len[1]) {
      s1 += c[q + j];
      pc[q + j + 1] = s1;
    }
    if (j < len[2]) {
      s2 += c[2 * q + j];
      pc[2 * q + j + 1] = s2;
    }
    if (j < len[3]) {
      s3 += c[3 * q + j];
      pc[3 * q + j + 1] = s3;
    }
  }
  const double off1 = s0, off2 = s0 + s1, off3 = s0 + s1 + s2;
  for (int64_t j = 0; j < len[1]; ++j) pc[q + j + 1] += off1;
  for (int64_t j = 0; j < len[2]; ++j) pc[2 * q + j + 1] += off2;
  for (int64_t j = 0; j < len[3]; ++j) pc[3 * q + j + 1] += off3;
}

// sum over j in [b, e) of |(x[j] - v d) s|^2.4, in double.
inline double tail_cost(const float* xs, int64_t b, int64_t e, float v, float d, float s) {
  const F mvd = V::set1(-v), dv = V::set1(d), sv = V::set1(s), p24 = V::set1(2.4f);
  typename V::DAcc acc = V::dzero();
  for (int64_t j = b; j < e; j += W) {
    const int r = static_cast<int>(std::min<int64_t>(W, e - j));
    const F err = V::mul(V::abs(V::fmadd(mvd, dv, load_pad(xs, j, r))), sv);
    V::dacc1(acc, V::select(V::mfirst(r), pow_(err, p24), V::zero()));
  }
  return V::dsum(acc);
}

}  // namespace mse_detail

// Sorts row c and fills its prefix sums, range (its own, or [x_min[c], x_max[c]] when given)
// and scale.
inline void mse_prepare_row(const float* x, int64_t K, float n, const float* x_min,
                            const float* x_max, int64_t c, MseRow& row) {
  float* xs = row.xs.data();
  std::copy(x, x + K, xs);
  std::sort(xs, xs + K);
  float lo, hi;
  mse_row_bounds(xs, K, x_min, x_max, c, &lo, &hi);
  row.x_min = std::min(lo, 0.0f);
  row.x_max = std::max(hi, 0.0f);
  row.R = row.x_max - row.x_min;
  // Power-of-two scale so that every scaled error is below 1 (errors are below R + n d_steps).
  int e2 = 0;
  std::frexp(static_cast<double>(row.R) + static_cast<double>(n) * std::max(row.R / n, 1e-8f),
             &e2);
  row.s = std::isfinite(row.R) ? std::ldexp(1.0f, -e2) : 1.0f;
  const double sd = row.s;
  double *px = row.px.data(), *px2 = row.px2.data(), *pax = row.pax.data();
  px[0] = px2[0] = pax[0] = 0.0;
  for (int64_t j = 0; j < K; ++j) {
    const double v = xs[j] * sd;
    px[j + 1] = px[j] + v;
    px2[j + 1] = px2[j] + v * v;
    pax[j + 1] = pax[j] + std::fabs(v);
  }
}

// Searches ranges i = i_first, i_first - i_stride, ... >= 1 of a prepared row (the algorithm at
// the top of this file), updating `best`.
inline void mse_search_ranges(const MseRow& row, int64_t bits, int64_t steps, int64_t i_first,
                              int64_t i_stride, MseScratch& sc, MseBest& best) {
  using namespace mse_detail;
  if (!std::isfinite(row.R)) return;  // all NaN in the reference: it keeps [x_min, x_max]
  const int64_t K = row.K, nz = int64_t(1) << bits;
  const float n = static_cast<float>(nz - 1), s = row.s;
  const double sd = s;
  const float* xs = row.xs.data();
  const double *px = row.px.data(), *px2 = row.px2.data(), *pax = row.pax.data();
  // The tails' sums of squared errors are sum (x + c)^2 = S2 + 2 c S1 + N c^2 from the prefix
  // sums; the rounding error of that expression in double, at most kEps (S2 + 2 |c| S|x| + N c^2),
  // is subtracted so that the bounds stay bounds.
  const double kEps = 4.0 * std::numeric_limits<double>::epsilon() * static_cast<double>(K + 4);
  // A candidate is skipped when its lower bound times (1 - kSlack) exceeds the best score. The
  // bounds are exact up to the float pow's ~1e-6 relative error, well inside kSlack.
  constexpr double kSlack = 1e-5;
  float* codes = sc.codes.data() + 1;  // codes[-1] is the sentinel
  codes[-1] = -n - 2.0f;
  double* pc = sc.pcost.data();
  const int64_t off = nz + 1;  // first[v + off], v in [-(n + 2), n + 2]
  int64_t* first = sc.first.data();
  double* cheap = sc.cheap.data();
  for (int64_t i = i_first; i >= 1; i -= i_stride) {
    float r_i, d;
    range_step(row.R, i, steps, n, &r_i, &d);
    if (!std::isfinite(r_i) || !std::isfinite(d)) continue;  // NaN scores in the reference
    codes_and_costs(xs, K, d, n, s, codes, sc.cost.data());
    for (int l = 0; l < W; ++l) codes[K + l] = codes[K - 1];
    code_starts(codes, K, off, nz + 1, first);
    prefix_sums(sc.cost.data(), K, pc);
    // For zero point z: low tail [0, first[-z]), inside, high tail [first[n - z + 1], K).
    // Cheap bound: a clamped element's error is at least d/2, so |e|^2.4 >= e^2 (d s / 2)^0.4.
    const double ds = static_cast<double>(d) * sd;
    const double c0 = std::pow(0.5 * ds, 0.4);
    // Sums of squared scaled errors of the low tail [0, lo) and the high tail [hi, K) of z.
    auto tails = [&](int64_t z, int64_t lo, int64_t hi, double* sl,
                     double* sh) __attribute__((always_inline)) {
      const double c = static_cast<double>(z) * ds, nl = static_cast<double>(lo);
      const double c2 = static_cast<double>(nz - 1 - z) * ds, nh = static_cast<double>(K - hi);
      *sl = std::max(px2[lo] + 2.0 * c * px[lo] + nl * c * c -
                         kEps * (px2[lo] + 2.0 * c * pax[lo] + nl * c * c),
                     0.0);
      *sh = std::max((px2[K] - px2[hi]) - 2.0 * c2 * (px[K] - px[hi]) + nh * c2 * c2 -
                         kEps * (px2[K] + 2.0 * c2 * pax[K] + nh * c2 * c2),
                     0.0);
    };
    int64_t zc = 0;
    for (int64_t z = 0; z < nz; ++z) {
      const int64_t lo = first[off - z], hi = first[off + nz - z];
      double sl, sh;
      tails(z, lo, hi, &sl, &sh);
      cheap[z] = (pc[hi] - pc[lo]) + c0 * (sl + sh);
      if (cheap[z] < cheap[zc]) zc = z;
    }
    auto score = [&](int64_t z) {
      const int64_t lo = first[off - z], hi = first[off + nz - z];
      const float zf = static_cast<float>(z);
      return (pc[hi] - pc[lo]) + tail_cost(xs, 0, lo, -zf, d, s) +
             tail_cost(xs, hi, K, n - zf, d, s);
    };
    if (best.i < 0) best.consider(score(zc), i, zc);
    // Survivors of the cheap bound get the power-mean bound
    // sum |e|^2.4 >= N (sum e^2 / N)^1.2, then are scored exactly, most promising first.
    sc.todo.clear();
    for (int64_t z = 0; z < nz; ++z) {
      if (cheap[z] * (1.0 - kSlack) > best.score) continue;
      const int64_t lo = first[off - z], hi = first[off + nz - z];
      double sl, sh;
      tails(z, lo, hi, &sl, &sh);
      const double nl = static_cast<double>(lo), nh = static_cast<double>(K - hi);
      double lb = pc[hi] - pc[lo];
      if (lo > 0) lb += nl * std::pow(sl / nl, 1.2);
      if (hi < K) lb += nh * std::pow(sh / nh, 1.2);
      lb = std::max(lb, cheap[z]);
      if (lb * (1.0 - kSlack) <= best.score) sc.todo.emplace_back(lb, z);
    }
    std::sort(sc.todo.begin(), sc.todo.end());
    for (const auto& [lb, z] : sc.todo) {
      if (lb * (1.0 - kSlack) > best.score) break;
      best.consider(score(z), i, z);
    }
  }
}

#endif  // PDQ_ISA_PASS
