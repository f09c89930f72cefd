// adaround_soft_cpu / adaround_soft_backward_cpu / adaround_hard_cpu: AdaRound's soft weight,
// its rounding regulariser, their gradient, and the final integer codes, each in one pass.
//
// Math and operation order: pdquant_fast/ops/reference.py (adaround_*_reference). Per element,
// with d, z the output channel's step and zero point (axis 0), n = 2^bits - 1,
// zeta - gamma = 1.2f, gamma = -0.1f:
//
//   s = sigmoid(alpha) = 1 / (1 + e^(0 - alpha))     u = s * 1.2f + (-0.1f)     h = clamp(u, 0, 1)
//   soft:  w_q = (clamp(w_floor + h + z, 0, n) - z) * d      reg = sum(1 - |2h - 1|^beta)
//   grad:  dh = 0 <= u <= 1 ? 1.2f * s * (1 - s) : 0          k = w_floor + h + z
//          grad_alpha = (0 <= k <= n ? grad_wq * d : 0) * dh
//                     + (-grad_reg) * beta * |2h - 1|^(beta - 1) * sign(2h - 1) * 2 * dh
//   hard:  codes = uint8(clamp(w_floor + [alpha >= 0] + z, 0, n))
//
// Every operation is the reference's IEEE float32 op in its order, except e^x and |v|^p (our
// polynomials, cpu/calib_simd_math.inc): our sigmoid is within 3 ulp of the correctly rounded
// value, torch's within 2 (and not the same in its vector body and its tail), so soft values and
// gradients have an error budget (stated and measured in tests/test_ops_cpu.py); hard codes are
// exact. reg sums float terms in double
// per chunk, chunks added in a fixed order, rounded once to float.
// Reads 8 B/element (w_floor, alpha) and writes 4 B (w_q), or 1 B (codes); backward reads 12 B
// (grad_wq, w_floor, alpha) and writes 4 B (grad_alpha).
//
// Compiled once normally (glue) and once per ISA pass (kernels, #else branch): see
// cpu/calib_simd_foreach.h.
#ifndef PDQ_ISA_PASS

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/calib_simd.h"
#include "registry.h"

namespace pdquant {
namespace calib_cpu {

// One call's inputs as raw pointers; weights viewed as [C, inner] (C output channels, axis 0).
struct AdaRoundArgs {
  const float* w_floor = nullptr;
  const float* alpha = nullptr;
  const float* grad_wq = nullptr;  // soft backward
  const float* delta = nullptr;
  const float* zero_point = nullptr;
  float* out = nullptr;      // w_q or grad_alpha
  uint8_t* codes = nullptr;  // hard
  int64_t numel = 0, C = 1, inner = 1;
  float n = 0.0f;
  float beta = 0.0f;
  float grad_reg_beta = 0.0f;  // (-grad_reg) * beta, as the reference's 0-d tensors compute it
};

}  // namespace calib_cpu
}  // namespace pdquant

#define PDQ_ISA_FILE "cpu/adaround.cpp"
#include "cpu/calib_simd_foreach.h"

namespace pdquant {
namespace calib_cpu {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per task (sigmoid/pow make them ~4x dearer)
constexpr int64_t kMaxChunks = 64;   // partial sums of reg

AdaRoundArgs make_args(const char* op, const at::Tensor& w_floor, const at::Tensor* alpha,
                       const at::Tensor* delta, const at::Tensor& zero_point, int64_t bits) {
  auto ok = [&](const at::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous();
  };
  TORCH_CHECK(ok(w_floor) && w_floor.dim() >= 1, op,
              ": w_floor must be a contiguous float32 CPU tensor [C_out, ...]");
  TORCH_CHECK(bits >= 2 && bits <= 8, op, ": bits must be in 2..8, got ", bits);
  const int64_t C = w_floor.size(0);
  TORCH_CHECK(ok(zero_point) && zero_point.dim() == 1 && zero_point.size(0) == C, op,
              ": zero_point must be a contiguous float32 CPU tensor [", C, "]");
  AdaRoundArgs a;
  a.w_floor = w_floor.data_ptr<float>();
  a.zero_point = zero_point.data_ptr<float>();
  if (alpha != nullptr) {
    TORCH_CHECK(ok(*alpha) && alpha->sizes() == w_floor.sizes(), op,
                ": alpha must be a contiguous float32 CPU tensor of w_floor's shape");
    a.alpha = alpha->data_ptr<float>();
  }
  if (delta != nullptr) {
    TORCH_CHECK(ok(*delta) && delta->dim() == 1 && delta->size(0) == C, op,
                ": delta must be a contiguous float32 CPU tensor [", C, "]");
    a.delta = delta->data_ptr<float>();
  }
  a.numel = w_floor.numel();
  a.C = C;
  a.inner = C > 0 ? a.numel / C : 1;
  if (a.inner == 0) a.inner = 1;
  a.n = static_cast<float>((1 << bits) - 1);
  return a;
}

float scalar_of(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == 1, op, ": ",
              name, " must be a 0-d float32 CPU tensor");
  return t.item<float>();
}

std::tuple<at::Tensor, at::Tensor> adaround_soft_cpu(const at::Tensor& w_floor,
                                                     const at::Tensor& alpha,
                                                     const at::Tensor& delta,
                                                     const at::Tensor& zero_point, int64_t bits,
                                                     const at::Tensor& beta) {
  AdaRoundArgs a = make_args("adaround_soft_cpu", w_floor, &alpha, &delta, zero_point, bits);
  a.beta = scalar_of("adaround_soft_cpu", "beta", beta);
  at::Tensor wq = at::empty_like(w_floor);
  a.out = wq.data_ptr<float>();
  // Chunks depend on the size only, so reg is reproducible for a given shape.
  const int64_t nchunks =
      std::clamp<int64_t>((a.numel + kGrain - 1) / kGrain, 1, kMaxChunks);
  std::vector<double> partial(nchunks, 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      const int64_t b = a.numel * ch / nchunks, e = a.numel * (ch + 1) / nchunks;
      PDQ_ISA_DISPATCH(ada_soft_range, a, b, e, &partial[ch]);
    }
  });
  double reg = 0.0;
  for (double p : partial) reg += p;
  return {wq, at::scalar_tensor(static_cast<float>(reg), w_floor.options())};
}

at::Tensor adaround_soft_backward_cpu(const at::Tensor& grad_wq, const at::Tensor& grad_reg,
                                      const at::Tensor& w_floor, const at::Tensor& alpha,
                                      const at::Tensor& delta, const at::Tensor& zero_point,
                                      int64_t bits, const at::Tensor& beta) {
  const char* op = "adaround_soft_backward_cpu";
  AdaRoundArgs a = make_args(op, w_floor, &alpha, &delta, zero_point, bits);
  TORCH_CHECK(grad_wq.device().is_cpu() && grad_wq.scalar_type() == at::kFloat &&
                  grad_wq.is_contiguous() && grad_wq.sizes() == w_floor.sizes(),
              op, ": grad_wq must be a contiguous float32 CPU tensor of w_floor's shape");
  a.grad_wq = grad_wq.data_ptr<float>();
  a.beta = scalar_of(op, "beta", beta);
  const float gr = scalar_of(op, "grad_reg", grad_reg);
  a.grad_reg_beta = (-gr) * a.beta;
  at::Tensor ga = at::empty_like(alpha);
  a.out = ga.data_ptr<float>();
  at::parallel_for(0, a.numel, kGrain, [&](int64_t b, int64_t e) {
    PDQ_ISA_DISPATCH(ada_soft_backward_range, a, b, e);
  });
  return ga;
}

at::Tensor adaround_hard_cpu(const at::Tensor& w_floor, const at::Tensor& alpha,
                             const at::Tensor& zero_point, int64_t bits) {
  AdaRoundArgs a = make_args("adaround_hard_cpu", w_floor, &alpha, nullptr, zero_point, bits);
  at::Tensor codes = at::empty(w_floor.sizes(), w_floor.options().dtype(at::kByte));
  a.codes = codes.data_ptr<uint8_t>();
  at::parallel_for(0, a.numel, 4 * kGrain,
                   [&](int64_t b, int64_t e) { PDQ_ISA_DISPATCH(ada_hard_range, a, b, e); });
  return codes;
}

// Test hooks: our sigmoid and pow on the active ISA, elementwise over a float32 tensor, so that
// their ulp / relative error budgets are measured directly (tests/test_ops_cpu.py).
at::Tensor calib_sigmoid_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "_calib_sigmoid_cpu: x must be a contiguous float32 CPU tensor");
  at::Tensor y = at::empty_like(x);
  PDQ_ISA_DISPATCH(math_sigmoid, x.data_ptr<float>(), y.data_ptr<float>(), x.numel());
  return y;
}

at::Tensor calib_pow_cpu(const at::Tensor& x, double p) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "_calib_pow_cpu: x must be a contiguous float32 CPU tensor");
  at::Tensor y = at::empty_like(x);
  PDQ_ISA_DISPATCH(math_pow, x.data_ptr<float>(), static_cast<float>(p), y.data_ptr<float>(),
                   x.numel());
  return y;
}

void register_adaround(pybind11::module_& m) {
  m.def("_calib_sigmoid_cpu", &calib_sigmoid_cpu, "test hook: the kernels' sigmoid",
        pybind11::arg("x"));
  m.def("_calib_pow_cpu", &calib_pow_cpu, "test hook: the kernels' pow for x >= 0",
        pybind11::arg("x"), pybind11::arg("p"));
  m.def("adaround_soft_cpu", &adaround_soft_cpu,
        "(w_q, reg): AdaRound soft weight and regulariser in one pass",
        pybind11::arg("w_floor"), pybind11::arg("alpha"), pybind11::arg("delta"),
        pybind11::arg("zero_point"), pybind11::arg("bits"), pybind11::arg("beta"));
  m.def("adaround_soft_backward_cpu", &adaround_soft_backward_cpu,
        "grad_alpha of adaround_soft_cpu", pybind11::arg("grad_wq"), pybind11::arg("grad_reg"),
        pybind11::arg("w_floor"), pybind11::arg("alpha"), pybind11::arg("delta"),
        pybind11::arg("zero_point"), pybind11::arg("bits"), pybind11::arg("beta"));
  m.def("adaround_hard_cpu", &adaround_hard_cpu, "final AdaRound codes (uint8)",
        pybind11::arg("w_floor"), pybind11::arg("alpha"), pybind11::arg("zero_point"),
        pybind11::arg("bits"));
}

}  // namespace

PDQ_REGISTER(register_adaround);

}  // namespace calib_cpu
}  // namespace pdquant

#else  // PDQ_ISA_PASS: the kernels, compiled once per ISA (V = this pass's vector type)

namespace ada_detail {

constexpr int W = V::W;

// Runs f(i, len, d, z, c_vec) over [b, e): channel params as vectors (broadcast, or per lane when
// a weight row has one element).
template <class Fn>
inline void for_runs(const AdaRoundArgs& a, int64_t b, int64_t e, Fn&& f) {
  walk_segments(
      a.C, a.inner, b, e,
      [&](int64_t i, int64_t len, int64_t c) { f(i, len, c, false); },
      [&](int64_t i, int64_t len, int64_t c) { f(i, len, c, true); });
}

// Loads W lanes (or r < W lanes, rest = pad) of p + i.
inline F load_lanes(const float* p, int64_t i, int r, float pad) {
  if (r == W) return V::load(p + i);
  alignas(64) float buf[W];
  for (int l = 0; l < W; ++l) buf[l] = l < r ? p[i + l] : pad;
  return V::load(buf);
}

inline void store_lanes(float* p, int64_t i, int r, F v) {
  if (r == W) return V::store(p + i, v);
  alignas(64) float buf[W];
  V::store(buf, v);
  for (int l = 0; l < r; ++l) p[i + l] = buf[l];
}

// Per-lane channel params for lanes [j, j + r) of a run starting at channel c.
inline void params(const AdaRoundArgs& a, int64_t c, int64_t j, int r, bool vec, F& d, F& z) {
  if (vec) {
    if (a.delta != nullptr) d = load_lanes(a.delta, c + j, r, 1.0f);
    z = load_lanes(a.zero_point, c + j, r, 0.0f);
  }
}

inline F rect_sigmoid_u(F s) { return V::add(V::mul(s, V::set1(1.2f)), V::set1(-0.1f)); }

inline F clamp01(F u) { return V::min_(V::set1(1.0f), V::max_(V::zero(), u)); }

}  // namespace ada_detail

// w_q[b:e] and sum(1 - |2h - 1|^beta) over [b, e) added to *reg.
inline void ada_soft_range(const AdaRoundArgs& a, int64_t b, int64_t e, double* reg) {
  using namespace ada_detail;
  const F n = V::set1(a.n), beta = V::set1(a.beta), one = V::set1(1.0f), two = V::set1(2.0f);
  typename V::DAcc s = V::dzero();
  for_runs(a, b, e, [&](int64_t i, int64_t len, int64_t c, bool vec) {
    F d = V::set1(a.delta[c]), z = V::set1(a.zero_point[c]);
    for (int64_t j = 0; j < len; j += W) {
      const int r = static_cast<int>(std::min<int64_t>(W, len - j));
      params(a, c, j, r, vec, d, z);
      const F h = clamp01(rect_sigmoid_u(sigmoid_(load_lanes(a.alpha, i + j, r, 0.0f))));
      const F k = V::add(V::add(load_lanes(a.w_floor, i + j, r, 0.0f), h), z);
      const F wq = V::mul(V::sub(V::min_(n, V::max_(V::zero(), k)), z), d);
      store_lanes(a.out, i + j, r, wq);
      const F term = V::sub(one, pow_(V::abs(V::sub(V::mul(two, h), one)), beta));
      V::dacc1(s, V::select(V::mfirst(r), term, V::zero()));
    }
  });
  *reg += V::dsum(s);
}

// grad_alpha[b:e].
inline void ada_soft_backward_range(const AdaRoundArgs& a, int64_t b, int64_t e) {
  using namespace ada_detail;
  const F n = V::set1(a.n), one = V::set1(1.0f), two = V::set1(2.0f), zero = V::zero();
  const F bm1 = V::set1(a.beta - 1.0f), grb = V::set1(a.grad_reg_beta);
  for_runs(a, b, e, [&](int64_t i, int64_t len, int64_t c, bool vec) {
    F d = V::set1(a.delta[c]), z = V::set1(a.zero_point[c]);
    for (int64_t j = 0; j < len; j += W) {
      const int r = static_cast<int>(std::min<int64_t>(W, len - j));
      params(a, c, j, r, vec, d, z);
      const F s = sigmoid_(load_lanes(a.alpha, i + j, r, 0.0f));
      const F u = rect_sigmoid_u(s);
      const F h = clamp01(u);
      const F dh = V::select(V::mand(V::ge(u, zero), V::le(u, one)),
                             V::mul(V::mul(V::set1(1.2f), s), V::sub(one, s)), zero);
      const F k = V::add(V::add(load_lanes(a.w_floor, i + j, r, 0.0f), h), z);
      const M inside = V::mand(V::ge(k, zero), V::le(k, n));
      const F gq =
          V::mul(V::select(inside, V::mul(load_lanes(a.grad_wq, i + j, r, 0.0f), d), zero), dh);
      const F v = V::sub(V::mul(two, h), one);
      const F sign = V::select(V::gt(v, zero), one, V::select(V::lt(v, zero), V::neg(one), zero));
      const F gr = V::mul(V::mul(V::mul(V::mul(grb, pow_(V::abs(v), bm1)), sign), two), dh);
      store_lanes(a.out, i + j, r, V::add(gq, gr));
    }
  });
}

// codes[b:e].
inline void ada_hard_range(const AdaRoundArgs& a, int64_t b, int64_t e) {
  using namespace ada_detail;
  const F n = V::set1(a.n), one = V::set1(1.0f), zero = V::zero();
  for_runs(a, b, e, [&](int64_t i, int64_t len, int64_t c, bool vec) {
    F d = zero, z = V::set1(a.zero_point[c]);
    for (int64_t j = 0; j < len; j += W) {
      const int r = static_cast<int>(std::min<int64_t>(W, len - j));
      params(a, c, j, r, vec, d, z);
      const F up = V::select(V::ge(load_lanes(a.alpha, i + j, r, 0.0f), zero), one, zero);
      const F k = V::add(V::add(load_lanes(a.w_floor, i + j, r, 0.0f), up), z);
      const F code = V::min_(n, V::max_(zero, k));
      if (r == W) {
        V::store_u8(a.codes + i + j, code);
      } else {
        alignas(64) uint8_t buf[W < 16 ? 16 : W];
        V::store_u8(buf, code);
        for (int l = 0; l < r; ++l) a.codes[i + j + l] = buf[l];
      }
    }
  });
}

// Test hooks (see calib_sigmoid_cpu): y[j] = sigmoid(x[j]), y[j] = x[j]^p.
inline void math_sigmoid(const float* x, float* y, int64_t n) {
  using namespace ada_detail;
  for (int64_t j = 0; j < n; j += W) {
    const int r = static_cast<int>(std::min<int64_t>(W, n - j));
    store_lanes(y, j, r, sigmoid_(load_lanes(x, j, r, 0.0f)));
  }
}

inline void math_pow(const float* x, float p, float* y, int64_t n) {
  using namespace ada_detail;
  for (int64_t j = 0; j < n; j += W) {
    const int r = static_cast<int>(std::min<int64_t>(W, n - j));
    store_lanes(y, j, r, pow_(load_lanes(x, j, r, 0.0f), V::set1(p)));
  }
}

#endif  // PDQ_ISA_PASS
