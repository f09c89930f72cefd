// fake_quant_act_cpu / fake_quant_act_backward_cpu: learnable-step fake-quant with QDrop, fused.
//
// Math and operation order: pdquant_fast/ops/reference.py (fake_quant_act_reference and its
// backward). Per element, with d, z the channel's step and zero point and n = 2^bits - 1:
//
//   t = x / d  (IEEE division)   r = round_half_even(t)   k = r + z   c = clamp(k, 0, n)
//   forward:  y = keep ? (c - z) * d : x
//   backward: grad_x = keep && !(0 <= k <= n) ? 0 : g
//             grad_delta += keep ? g * (0 <= k <= n ? r - t : k < 0 ? -z : n - z) : 0
//
// keep is the QDrop mask: `mask[i]`, or lowbias32(i ^ key) < floor(keep_prob 2^32) from the seed,
// or always true. Forward reads 4 B/element (x; +1 B with a mask) and writes 4 B (y); backward
// reads 8 B (grad, x) and writes 4 B (grad_x) in the same pass that reduces grad_delta. Everything
// but grad_delta is bit-exact with the reference; grad_delta sums exact float*float products in
// double (per chunk, chunks added in a fixed order, so it is deterministic for a given shape) and
// is rounded once to float.
//
// This file is compiled four times: once normally (the torch glue at the end), and once per ISA
// pass (AVX-512, AVX2, scalar) through cpu/calib_simd_foreach.h, which includes it again with
// PDQ_ISA_PASS defined (the kernels in the #else branch).
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

enum class Drop { kNone, kSeed, kMask };

// One call's inputs, as raw pointers; x viewed as [outer, C, inner] (per tensor: C = 1).
struct FakeQuantArgs {
  const float* x = nullptr;
  const float* grad = nullptr;  // backward only
  float* out = nullptr;         // y (forward) or grad_x (backward)
  const float* delta = nullptr;
  const float* zero_point = nullptr;
  int64_t numel = 0, C = 1, inner = 1;
  float n = 0.0f;  // 2^bits - 1
  Drop drop = Drop::kNone;
  uint32_t key = 0, thresh = 0;  // seed mode: keep = lowbias32(i ^ key) < thresh
  const bool* mask = nullptr;    // mask mode
};

}  // namespace calib_cpu
}  // namespace pdquant

#define PDQ_ISA_FILE "cpu/fake_quant.cpp"
#include "cpu/calib_simd_foreach.h"

namespace pdquant {
namespace calib_cpu {
namespace {

constexpr int64_t kGrain = 1 << 15;   // elements per task: 128 KB of x, amortises the fork
constexpr int64_t kMaxChunks = 64;    // partial-sum buffers for grad_delta
// Per channel, the backward streams whole rows (each chunk with its own [C] partial sums) once
// there are this many rows, even with more channels than rows: an activation [32, 64, 56, 56]
// per channel took 4.06 ms walking one channel's 32 strided blocks at a time, 2.5 ms row by row
// (the per-tensor speed). Fewer rows (weights, axis 0: one row) go channel by channel.
constexpr int64_t kMinRowChunks = 8;

uint32_t lowbias32_scalar(uint32_t v) {
  v ^= v >> 16;
  v *= 0x7FEB352Du;
  v ^= v >> 15;
  v *= 0x846CA68Bu;
  v ^= v >> 16;
  return v;
}

FakeQuantArgs make_args(const at::Tensor& x, const at::Tensor& delta,
                        const at::Tensor& zero_point, int64_t bits, int64_t axis,
                        double keep_prob, const c10::optional<at::Tensor>& seed,
                        const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "fake_quant_act_cpu: x must be a contiguous float32 CPU tensor");
  TORCH_CHECK(delta.scalar_type() == at::kFloat && zero_point.scalar_type() == at::kFloat &&
                  delta.is_contiguous() && zero_point.is_contiguous() && delta.device().is_cpu() &&
                  zero_point.device().is_cpu(),
              "fake_quant_act_cpu: delta and zero_point must be contiguous float32 CPU tensors");
  TORCH_CHECK(bits >= 2 && bits <= 8, "fake_quant_act_cpu: bits must be in 2..8, got ", bits);
  TORCH_CHECK(delta.sizes() == zero_point.sizes() && delta.dim() <= 1,
              "fake_quant_act_cpu: delta and zero_point must both be [] or both be [C]");
  TORCH_CHECK(x.numel() < (int64_t(1) << 32),
              "fake_quant_act_cpu: at most 2^32 - 1 elements (the QDrop hash index is uint32)");
  FakeQuantArgs a;
  a.x = x.data_ptr<float>();
  a.delta = delta.data_ptr<float>();
  a.zero_point = zero_point.data_ptr<float>();
  a.numel = x.numel();
  a.n = static_cast<float>((1 << bits) - 1);
  if (delta.dim() == 1) {
    TORCH_CHECK(x.dim() > 0, "fake_quant_act_cpu: per-channel qparams need x with an axis");
    const int64_t ax = c10::maybe_wrap_dim(axis, x.dim());
    TORCH_CHECK(delta.size(0) == x.size(ax), "fake_quant_act_cpu: delta has ", delta.size(0),
                " entries but x.shape[", axis, "] is ", x.size(ax));
    a.C = x.size(ax);
    a.inner = 1;
    for (int64_t i = ax + 1; i < x.dim(); ++i) a.inner *= x.size(i);
  } else {
    a.C = 1;
    a.inner = std::max<int64_t>(a.numel, 1);
  }
  TORCH_CHECK(!(seed.has_value() && mask.has_value()),
              "fake_quant_act_cpu: give either seed or mask, not both");
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() &&
                    mask->device().is_cpu() && mask->sizes() == x.sizes(),
                "fake_quant_act_cpu: mask must be a contiguous bool CPU tensor of x's shape");
    a.drop = Drop::kMask;
    a.mask = mask->data_ptr<bool>();
  } else if (seed.has_value() && keep_prob < 1.0) {
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1 && seed->device().is_cpu(),
                "fake_quant_act_cpu: seed must be a 0-d int64 CPU tensor");
    TORCH_CHECK(keep_prob > 0.0, "fake_quant_act_cpu: keep_prob must be in (0, 1]");
    a.drop = Drop::kSeed;
    const uint32_t s = static_cast<uint32_t>(static_cast<uint64_t>(seed->item<int64_t>()));
    a.key = lowbias32_scalar(s ^ 0x9E3779B9u);
    // floor(keep_prob * 2^32) in float64, < 2^32 because keep_prob < 1
    a.thresh = static_cast<uint32_t>(static_cast<uint64_t>(keep_prob * 4294967296.0));
  }
  return a;
}

at::Tensor fake_quant_act_cpu(const at::Tensor& x, const at::Tensor& delta,
                              const at::Tensor& zero_point, int64_t bits, int64_t axis,
                              double keep_prob, const c10::optional<at::Tensor>& seed,
                              const c10::optional<at::Tensor>& mask) {
  FakeQuantArgs a = make_args(x, delta, zero_point, bits, axis, keep_prob, seed, mask);
  at::Tensor y = at::empty_like(x);
  a.out = y.data_ptr<float>();
  at::parallel_for(0, a.numel, kGrain,
                   [&](int64_t b, int64_t e) { PDQ_ISA_DISPATCH(fq_forward_range, a, b, e); });
  return y;
}

std::tuple<at::Tensor, at::Tensor> fake_quant_act_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& delta,
    const at::Tensor& zero_point, int64_t bits, int64_t axis, double keep_prob,
    const c10::optional<at::Tensor>& seed, const c10::optional<at::Tensor>& mask) {
  FakeQuantArgs a = make_args(x, delta, zero_point, bits, axis, keep_prob, seed, mask);
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.device().is_cpu() &&
                  grad.sizes() == x.sizes(),
              "fake_quant_act_backward_cpu: grad must be a contiguous float32 CPU tensor of x's "
              "shape");
  at::Tensor gx = at::empty_like(x);
  a.grad = grad.data_ptr<float>();
  a.out = gx.data_ptr<float>();
  const int64_t C = a.C, inner = a.inner, numel = a.numel;
  const int64_t outer = C * inner > 0 ? numel / (C * inner) : 0;
  std::vector<double> acc(C, 0.0);
  // Chunks depend on the shape only (not on the thread count), so the sum is reproducible.
  if (numel > 0 && (C == 1 || outer >= std::min(C, kMinRowChunks))) {
    // Chunks of whole rows (per tensor: of elements), each with its own [C] partial sums,
    // added in chunk order.
    const int64_t units = C == 1 ? numel : outer;
    const int64_t unit_elems = C == 1 ? 1 : C * inner;
    const int64_t nchunks =
        std::clamp<int64_t>(std::min(units, (numel + kGrain - 1) / kGrain), 1, kMaxChunks);
    std::vector<double> partial(nchunks * C, 0.0);
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t ch = cb; ch < ce; ++ch) {
        const int64_t u0 = units * ch / nchunks, u1 = units * (ch + 1) / nchunks;
        PDQ_ISA_DISPATCH(fq_backward_range, a, u0 * unit_elems, u1 * unit_elems,
                         partial.data() + ch * C);
      }
    });
    for (int64_t ch = 0; ch < nchunks; ++ch)
      for (int64_t c = 0; c < C; ++c) acc[c] += partial[ch * C + c];
  } else if (numel > 0) {
    // Few rows and more channels (e.g. weights, axis 0): chunks of channels, each summing its
    // own channels over the rows in order, straight into acc.
    const int64_t nchunks =
        std::clamp<int64_t>(std::min(C, (numel + kGrain - 1) / kGrain), 1, kMaxChunks);
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t ch = cb; ch < ce; ++ch) {
        const int64_t c0 = C * ch / nchunks, c1 = C * (ch + 1) / nchunks;
        for (int64_t o = 0; o < outer; ++o)
          PDQ_ISA_DISPATCH(fq_backward_range, a, (o * C + c0) * inner, (o * C + c1) * inner,
                           acc.data());
      }
    });
  }
  at::Tensor gd = at::empty_like(delta);
  float* gdp = gd.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) gdp[c] = static_cast<float>(acc[c]);
  return {gx, gd};
}

std::string calib_cpu_isa(const std::string& pin) {
  if (!pin.empty()) calib_simd::set_isa_override(pin);
  return calib_simd::isa_name(calib_simd::active_isa());
}

void register_fake_quant(pybind11::module_& m) {
  m.def("fake_quant_act_cpu", &fake_quant_act_cpu,
        "fused fake-quant with QDrop (see pdquant_fast.ops.reference.fake_quant_act_reference)",
        pybind11::arg("x"), pybind11::arg("delta"), pybind11::arg("zero_point"),
        pybind11::arg("bits"), pybind11::arg("axis"), pybind11::arg("keep_prob"),
        pybind11::arg("seed"), pybind11::arg("mask"));
  m.def("fake_quant_act_backward_cpu", &fake_quant_act_backward_cpu,
        "(grad_x, grad_delta) of fake_quant_act_cpu in one pass", pybind11::arg("grad"),
        pybind11::arg("x"), pybind11::arg("delta"), pybind11::arg("zero_point"),
        pybind11::arg("bits"), pybind11::arg("axis"), pybind11::arg("keep_prob"),
        pybind11::arg("seed"), pybind11::arg("mask"));
  m.def("calib_cpu_isa", &calib_cpu_isa,
        "SIMD path of the calibration kernels: returns the active one ('avx512', 'avx2' or "
        "'scalar'); pin='auto'|'scalar'|'avx2'|'avx512' changes it first (tests, benchmarks)",
        pybind11::arg("pin") = "");
}

}  // namespace

PDQ_REGISTER(register_fake_quant);

}  // namespace calib_cpu
}  // namespace pdquant

#else  // PDQ_ISA_PASS: the kernels, compiled once per ISA (V = this pass's vector type)

namespace fq_detail {

constexpr int W = V::W;

// QDrop keep mask for the W elements starting at flat index i.
template <Drop kDrop>
inline M keep_at(const FakeQuantArgs& a, int64_t i) {
  if constexpr (kDrop == Drop::kSeed) {
    const U h = lowbias32(V::u_xor(V::u_iota(static_cast<uint32_t>(i)), V::u_set1(a.key)));
    return V::u_lt(h, V::u_set1(a.thresh));
  } else if constexpr (kDrop == Drop::kMask) {
    return V::load_bool(a.mask + i);
  } else {
    return V::mfirst(W);
  }
}

// y for one vector: the reference's operation order, op for op.
template <Drop kDrop>
inline F forward_vec(F x, F d, F z, F n, M keep) {
  const F zero = V::zero();
  const F k = V::add(V::round_even(V::div(x, d)), z);
  const F c = V::min_(n, V::max_(zero, k));  // clamp; NaN passes through like torch.clamp
  const F y = V::mul(V::sub(c, z), d);
  if constexpr (kDrop == Drop::kNone) return y;
  return V::select(keep, y, x);
}

// grad_x and the grad_delta term for one vector.
template <Drop kDrop>
inline void backward_vec(F g, F x, F d, F z, F n, M keep, F& gx, F& term) {
  const F zero = V::zero();
  const F t = V::div(x, d);
  const F r = V::round_even(t);
  const F k = V::add(r, z);
  const M inside = V::mand(V::ge(k, zero), V::le(k, n));
  term = V::select(inside, V::sub(r, t), V::select(V::lt(k, zero), V::neg(z), V::sub(n, z)));
  gx = V::select(inside, g, zero);
  if constexpr (kDrop != Drop::kNone) {
    gx = V::select(keep, gx, g);
    term = V::select(keep, term, zero);
  }
}

// Elements [i, i + len) with one channel (kVec = false: d, z = delta[c], zero_point[c]) or with
// channel c + j for element i + j (kVec = true).
template <bool kVec, Drop kDrop>
void forward_run(const FakeQuantArgs& a, int64_t i, int64_t len, int64_t c) {
  const F n = V::set1(a.n);
  F d = V::set1(a.delta[c]), z = V::set1(a.zero_point[c]);
  const float* x = a.x + i;  // locals: the stores cannot alias them (they could alias `a`)
  float* out = a.out + i;
  const float *dp = a.delta + c, *zp = a.zero_point + c;
  int64_t j = 0;
  for (; j + W <= len; j += W) {
    if constexpr (kVec) {
      d = V::load(dp + j);
      z = V::load(zp + j);
    }
    const M keep = keep_at<kDrop>(a, i + j);
    V::store(out + j, forward_vec<kDrop>(V::load(x + j), d, z, n, keep));
  }
  if (j < len) {  // tail: through lane buffers (padding lanes are computed and discarded)
    const int r = static_cast<int>(len - j);
    alignas(64) float xb[W] = {}, yb[W], db[W], zb[W];
    alignas(16) bool mb[W < 16 ? 16 : W] = {};
    for (int l = 0; l < W; ++l) {
      db[l] = kVec ? 1.0f : a.delta[c];
      zb[l] = kVec ? 0.0f : a.zero_point[c];
    }
    for (int l = 0; l < r; ++l) {
      xb[l] = a.x[i + j + l];
      if constexpr (kVec) {
        db[l] = a.delta[c + j + l];
        zb[l] = a.zero_point[c + j + l];
      }
      if constexpr (kDrop == Drop::kMask) mb[l] = a.mask[i + j + l];
    }
    M keep;
    if constexpr (kDrop == Drop::kMask)
      keep = V::load_bool(mb);
    else
      keep = keep_at<kDrop>(a, i + j);
    V::store(yb, forward_vec<kDrop>(V::load(xb), V::load(db), V::load(zb), n, keep));
    for (int l = 0; l < r; ++l) a.out[i + j + l] = yb[l];
  }
}

template <bool kVec, Drop kDrop>
void backward_run(const FakeQuantArgs& a, int64_t i, int64_t len, int64_t c, double* acc) {
  const F n = V::set1(a.n);
  F d = V::set1(a.delta[c]), z = V::set1(a.zero_point[c]);
  typename V::DAcc s = V::dzero();
  const float *x = a.x + i, *grad = a.grad + i;
  float* out = a.out + i;
  const float *dp = a.delta + c, *zp = a.zero_point + c;
  int64_t j = 0;
  for (; j + W <= len; j += W) {
    if constexpr (kVec) {
      d = V::load(dp + j);
      z = V::load(zp + j);
    }
    F gx, term;
    const F g = V::load(grad + j);
    backward_vec<kDrop>(g, V::load(x + j), d, z, n, keep_at<kDrop>(a, i + j), gx, term);
    V::store(out + j, gx);
    if constexpr (kVec)
      V::dacc_to(acc + c + j, g, term);
    else
      V::dacc(s, g, term);
  }
  if (j < len) {
    const int r = static_cast<int>(len - j);
    alignas(64) float gb[W] = {}, xb[W] = {}, ob[W], db[W], zb[W];
    alignas(64) double ab[W] = {};
    alignas(16) bool mb[W < 16 ? 16 : W] = {};
    for (int l = 0; l < W; ++l) {
      db[l] = kVec ? 1.0f : a.delta[c];
      zb[l] = kVec ? 0.0f : a.zero_point[c];
    }
    for (int l = 0; l < r; ++l) {
      gb[l] = a.grad[i + j + l];
      xb[l] = a.x[i + j + l];
      if constexpr (kVec) {
        db[l] = a.delta[c + j + l];
        zb[l] = a.zero_point[c + j + l];
      }
      if constexpr (kDrop == Drop::kMask) mb[l] = a.mask[i + j + l];
    }
    M keep;
    if constexpr (kDrop == Drop::kMask)
      keep = V::load_bool(mb);
    else
      keep = keep_at<kDrop>(a, i + j);
    F gx, term;
    const F g = V::load(gb);
    backward_vec<kDrop>(g, V::load(xb), V::load(db), V::load(zb), n, keep, gx, term);
    V::store(ob, gx);
    for (int l = 0; l < r; ++l) a.out[i + j + l] = ob[l];
    // padding lanes must not reach the sum (their term can be inf/NaN, e.g. with z = inf)
    const M valid = V::mfirst(r);
    const F g0 = V::select(valid, g, V::zero()), t0 = V::select(valid, term, V::zero());
    if constexpr (kVec) {
      V::dacc_to(ab, g0, t0);
      for (int l = 0; l < r; ++l) acc[c + j + l] += ab[l];
    } else {
      V::dacc(s, g0, t0);
    }
  }
  if constexpr (!kVec) acc[c] += V::dsum(s);
}

template <Drop kDrop>
void forward_range_t(const FakeQuantArgs& a, int64_t b, int64_t e) {
  walk_segments(
      a.C, a.inner, b, e,
      [&](int64_t i, int64_t len, int64_t c) { forward_run<false, kDrop>(a, i, len, c); },
      [&](int64_t i, int64_t len, int64_t c) { forward_run<true, kDrop>(a, i, len, c); });
}

template <Drop kDrop>
void backward_range_t(const FakeQuantArgs& a, int64_t b, int64_t e, double* acc) {
  walk_segments(
      a.C, a.inner, b, e,
      [&](int64_t i, int64_t len, int64_t c) { backward_run<false, kDrop>(a, i, len, c, acc); },
      [&](int64_t i, int64_t len, int64_t c) { backward_run<true, kDrop>(a, i, len, c, acc); });
}

}  // namespace fq_detail

// y[b:e] of fake_quant_act (flat element range).
inline void fq_forward_range(const FakeQuantArgs& a, int64_t b, int64_t e) {
  switch (a.drop) {
    case Drop::kSeed:
      return fq_detail::forward_range_t<Drop::kSeed>(a, b, e);
    case Drop::kMask:
      return fq_detail::forward_range_t<Drop::kMask>(a, b, e);
    default:
      return fq_detail::forward_range_t<Drop::kNone>(a, b, e);
  }
}

// grad_x[b:e], and the grad_delta terms of [b:e) added to acc[channel].
inline void fq_backward_range(const FakeQuantArgs& a, int64_t b, int64_t e, double* acc) {
  switch (a.drop) {
    case Drop::kSeed:
      return fq_detail::backward_range_t<Drop::kSeed>(a, b, e, acc);
    case Drop::kMask:
      return fq_detail::backward_range_t<Drop::kMask>(a, b, e, acc);
    default:
      return fq_detail::backward_range_t<Drop::kNone>(a, b, e, acc);
  }
}

#endif  // PDQ_ISA_PASS
