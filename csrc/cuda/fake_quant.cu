// CUDA fake-quant with QDrop, forward and backward (see fake_quant.cuh for the launchers).
//
// Grid (channels, P), kThreads threads: block (c, p) walks channel c's outer * inner elements in
// tiles of kTile = 1024, tiles p, p + P, ... (grid-stride); delta[c] and zero_point[c] are two
// loads per block. Per element (reference order; round half to even; IEEE division):
//
//     t = x / d     r = rint(t)     k = r + z     y = (clamp(k, 0, n) - z) * d
//     QDrop: y = keep ? y : x,  keep = mask[flat] or lowbias32(uint32(flat) ^ key) < threshold
//
// Backward per element: grad_x = keep ? (0 <= k <= n ? g : 0) : g, and the grad_delta term
// (round(t) - t inside, -z below, n - z above, 0 when not kept) times g, summed in double (each
// product float * float is exact in double) per thread, then block_sum into partials[c, p], then
// sum_partials_kernel in a fixed order: deterministic, no atomics.
//
// float4 path when the 4 consecutive channel-local indices j..j+3 are 4 consecutive addresses,
// 16-byte aligned (per tensor; or inner % 4 == 0). The seed is read on the device: no host sync.
#include "calib_common.cuh"
#include "fake_quant.cuh"

namespace pdquant {
namespace calib {
namespace {

enum Drop { kDropNone = 0, kDropSeed = 1, kDropMask = 2 };
enum Layout { kContig = 0, kLast = 1, kGeneral = 2 };

struct Qp {
  float d, z, n;
};

// Flat index into x of channel c's element j (j < outer * inner < 2**32).
template <int LAYOUT>
__device__ __forceinline__ uint64_t flat_index(uint32_t j, uint32_t c, uint32_t channels,
                                               uint32_t inner, const FastDivmod& inner_div) {
  if (LAYOUT == kContig) return static_cast<uint64_t>(c) * inner + j;
  if (LAYOUT == kLast) return static_cast<uint64_t>(j) * channels + c;
  const uint32_t o = inner_div.div(j);
  return (static_cast<uint64_t>(o) * channels + c) * inner + (j - o * inner);
}

// One element: the forward value, or (backward) grad_x with the grad_delta term added to acc.
template <bool BACKWARD>
__device__ __forceinline__ float element(float x, float g, bool keep, const Qp& q, double& acc) {
  const float t = __fdiv_rn(x, q.d);
  const float r = rintf(t);
  const float k = __fadd_rn(r, q.z);
  if (!BACKWARD) {
    const float y = __fmul_rn(__fsub_rn(clamp_nan(k, 0.f, q.n), q.z), q.d);
    return keep ? y : x;
  }
  const bool inside = k >= 0.f && k <= q.n;
  float term = inside ? __fsub_rn(r, t) : (k < 0.f ? -q.z : __fsub_rn(q.n, q.z));
  float gx = inside ? g : 0.f;
  if (!keep) {
    gx = g;
    term = 0.f;
  }
  // float * float is exact in double, so a contracted DFMA gives the same bits as mul + add.
  acc += static_cast<double>(g) * static_cast<double>(term);
  return gx;
}

template <int DROP>
__device__ __forceinline__ bool keep_of(const FakeQuantArgs& a, uint64_t flat, uint32_t key) {
  if (DROP == kDropSeed) return qdrop_keep(flat, key, a.keep_threshold);
  if (DROP == kDropMask) return a.mask[flat] != 0;
  return true;
}

template <int DROP, bool BACKWARD, int LAYOUT, bool VEC>
__global__ void __launch_bounds__(kThreads)
    fake_quant_kernel(FakeQuantArgs a, FastDivmod inner_div, uint32_t per_channel,
                      double* __restrict__ partials) {
  const uint32_t c = blockIdx.x;
  const uint32_t num_p = gridDim.y;
  const Qp q{a.delta[c], a.zero_point[c], static_cast<float>((1u << a.bits) - 1u)};
  const uint32_t key = DROP == kDropSeed ? qdrop_key(*a.seed) : 0u;
  const uint32_t channels = static_cast<uint32_t>(a.channels);
  const uint32_t inner = static_cast<uint32_t>(a.inner);
  double acc = 0.0;
  for (uint64_t base = static_cast<uint64_t>(blockIdx.y) * kTile; base < per_channel;
       base += static_cast<uint64_t>(num_p) * kTile) {
    if (VEC) {
      const uint64_t j = base + threadIdx.x * kVec;
      if (j + kVec <= per_channel) {
        const uint64_t f =
            flat_index<LAYOUT>(static_cast<uint32_t>(j), c, channels, inner, inner_div);
        const float4 xv = *reinterpret_cast<const float4*>(a.x + f);
        float4 gv = make_float4(0.f, 0.f, 0.f, 0.f);
        if (BACKWARD) gv = *reinterpret_cast<const float4*>(a.grad + f);
        bool kp[kVec] = {true, true, true, true};
        if (DROP == kDropMask) {
          const uchar4 m = *reinterpret_cast<const uchar4*>(a.mask + f);
          kp[0] = m.x != 0;
          kp[1] = m.y != 0;
          kp[2] = m.z != 0;
          kp[3] = m.w != 0;
        } else if (DROP == kDropSeed) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) kp[e] = qdrop_keep(f + e, key, a.keep_threshold);
        }
        float4 ov;
        ov.x = element<BACKWARD>(xv.x, gv.x, kp[0], q, acc);
        ov.y = element<BACKWARD>(xv.y, gv.y, kp[1], q, acc);
        ov.z = element<BACKWARD>(xv.z, gv.z, kp[2], q, acc);
        ov.w = element<BACKWARD>(xv.w, gv.w, kp[3], q, acc);
        *reinterpret_cast<float4*>(a.out + f) = ov;
      } else {  // ragged end of a channel (per tensor only): element by element
        for (uint64_t jj = j; jj < per_channel && jj < j + kVec; ++jj) {
          const uint64_t f =
              flat_index<LAYOUT>(static_cast<uint32_t>(jj), c, channels, inner, inner_div);
          const float g = BACKWARD ? a.grad[f] : 0.f;
          a.out[f] = element<BACKWARD>(a.x[f], g, keep_of<DROP>(a, f, key), q, acc);
        }
      }
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const uint64_t j = base + static_cast<uint64_t>(e) * kThreads + threadIdx.x;
        if (j < per_channel) {
          const uint64_t f =
              flat_index<LAYOUT>(static_cast<uint32_t>(j), c, channels, inner, inner_div);
          const float g = BACKWARD ? a.grad[f] : 0.f;
          a.out[f] = element<BACKWARD>(a.x[f], g, keep_of<DROP>(a, f, key), q, acc);
        }
      }
    }
  }
  if (BACKWARD) {
    acc = block_sum(acc);
    if (threadIdx.x == 0) partials[static_cast<uint64_t>(c) * num_p + blockIdx.y] = acc;
  }
}

struct Plan {
  int drop, layout;
  bool vec;
  uint32_t per_channel;
  dim3 grid;
  FastDivmod inner_div;
};

Plan plan_of(const FakeQuantArgs& a) {
  Plan p{};
  p.drop = a.mask != nullptr ? kDropMask : (a.seed != nullptr ? kDropSeed : kDropNone);
  p.layout = a.outer == 1 ? kContig : (a.inner == 1 ? kLast : kGeneral);
  p.vec = a.aligned16 && ((p.layout == kContig && (a.channels == 1 || a.inner % 4 == 0)) ||
                          (p.layout == kGeneral && a.inner % 4 == 0));
  p.per_channel = static_cast<uint32_t>(a.outer * a.inner);
  p.grid = dim3(static_cast<unsigned>(a.channels),
                static_cast<unsigned>(programs_per_channel(a.channels, a.outer * a.inner)));
  p.inner_div = FastDivmod(static_cast<uint32_t>(a.inner > 0 ? a.inner : 1));
  return p;
}

template <bool BACKWARD>
cudaError_t launch(const FakeQuantArgs& a, double* partials, cudaStream_t stream) {
  const Plan p = plan_of(a);
#define PDQ_FQ_LAUNCH(DROP, LAYOUT, VEC)                                              \
  fake_quant_kernel<DROP, BACKWARD, LAYOUT, VEC>                                      \
      <<<p.grid, kThreads, 0, stream>>>(a, p.inner_div, p.per_channel, partials)
#define PDQ_FQ_LAYOUTS(DROP)                          \
  switch (p.layout) {                                 \
    case kContig:                                     \
      if (p.vec) PDQ_FQ_LAUNCH(DROP, kContig, true);  \
      else PDQ_FQ_LAUNCH(DROP, kContig, false);       \
      break;                                          \
    case kLast:                                       \
      PDQ_FQ_LAUNCH(DROP, kLast, false);              \
      break;                                          \
    default:                                          \
      if (p.vec) PDQ_FQ_LAUNCH(DROP, kGeneral, true); \
      else PDQ_FQ_LAUNCH(DROP, kGeneral, false);      \
  }
  switch (p.drop) {
    case kDropSeed:
      PDQ_FQ_LAYOUTS(kDropSeed);
      break;
    case kDropMask:
      PDQ_FQ_LAYOUTS(kDropMask);
      break;
    default:
      PDQ_FQ_LAYOUTS(kDropNone);
  }
#undef PDQ_FQ_LAYOUTS
#undef PDQ_FQ_LAUNCH
  return cudaGetLastError();
}

}  // namespace

int64_t fake_quant_backward_partials(const FakeQuantArgs& a) {
  return a.channels * programs_per_channel(a.channels, a.outer * a.inner);
}

cudaError_t fake_quant_forward(const FakeQuantArgs& a, cudaStream_t stream) {
  if (a.outer * a.channels * a.inner == 0) return cudaSuccess;
  return launch<false>(a, nullptr, stream);
}

cudaError_t fake_quant_backward(const FakeQuantArgs& a, double* partials, float* grad_delta,
                                cudaStream_t stream) {
  if (a.outer * a.channels * a.inner == 0) return cudaSuccess;
  cudaError_t err = launch<true>(a, partials, stream);
  if (err != cudaSuccess) return err;
  const int64_t num_p = programs_per_channel(a.channels, a.outer * a.inner);
  sum_partials_kernel<<<static_cast<unsigned>(a.channels), kThreads, 0, stream>>>(partials, num_p,
                                                                               grad_delta);
  return cudaGetLastError();
}

}  // namespace calib
}  // namespace pdquant
