// Shared device helpers of the calibration kernels (fake-quant, AdaRound, MSE search).
//
// Plain CUDA C++, no torch headers. Bit-exactness rules of pdquant_fast/ops/reference.py:
//  * IEEE division: __fdiv_rn (round-to-nearest whatever -prec-div / --use_fast_math say);
//  * round half to even: rintf (cvt.rni.f32.f32);
//  * no fused multiply-add where the reference multiplies then adds: __fmul_rn / __fadd_rn,
//    which nvcc never contracts (nvcc contracts a * b + c into an FMA by default);
//  * exp / pow: expf / powf (libdevice __nv_expf / __nv_powf, not the __expf intrinsics), what
//    torch's own CUDA sigmoid and pow kernels call.
// Reductions are deterministic: fixed-size blocks, a fixed shuffle tree, no atomics.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pdquant {
namespace calib {

constexpr int kThreads = 256;             // 8 warps per block
constexpr int kVec = 4;                   // float4 accesses
constexpr int kTile = kThreads * kVec;    // elements per block per grid-stride step
constexpr int kTargetBlocks = 2048;       // over all channels; shape-only (see programs_per_channel)
constexpr uint32_t kHashKeyXor = 0x9E3779B9u;

// Blocks along grid.y for each channel: a function of the shape only (never of the device), so
// the float64 partial sums, and therefore grad_delta's bits, are the same on every GPU. The same
// formula as kernels/_common.py:programs_per_channel.
inline int64_t programs_per_channel(int64_t channels, int64_t per_channel) {
  const int64_t tiles = (per_channel + kTile - 1) / kTile;
  const int64_t c = channels > 0 ? channels : 1;
  int64_t want = (kTargetBlocks + c - 1) / c;
  if (want < 1) want = 1;
  int64_t p = tiles < want ? tiles : want;
  if (p > 65535) p = 65535;
  return p < 1 ? 1 : p;
}

// C. Wellons' lowbias32 (multiplications modulo 2**32): the QDrop hash of the reference.
__host__ __device__ __forceinline__ uint32_t lowbias32(uint32_t v) {
  v ^= v >> 16;
  v *= 0x7FEB352Du;
  v ^= v >> 15;
  v *= 0x846CA68Bu;
  v ^= v >> 16;
  return v;
}

// Key of a QDrop seed: lowbias32(uint32(seed) ^ 0x9E3779B9) (low 32 bits of the int64 seed).
__host__ __device__ __forceinline__ uint32_t qdrop_key(int64_t seed) {
  return lowbias32(static_cast<uint32_t>(static_cast<uint64_t>(seed)) ^ kHashKeyXor);
}

// Element `flat` is quantized (kept) when its hash is below floor(keep_prob * 2**32).
__host__ __device__ __forceinline__ bool qdrop_keep(uint64_t flat, uint32_t key,
                                                     uint64_t threshold) {
  return static_cast<uint64_t>(lowbias32(static_cast<uint32_t>(flat) ^ key)) < threshold;
}

// torch.clamp(v, lo, hi) with NaN propagation (comparisons with NaN are false; fminf would not).
__host__ __device__ __forceinline__ float clamp_nan(float v, float lo, float hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Unsigned 32-bit division by a runtime constant with a multiply-high and a shift (Granlund &
// Montgomery, round-up variant; exact for every n < 2**32): 3 instructions instead of ~20 for a
// hardware-less integer division, on the per-element index path of per-channel layouts.
struct FastDivmod {
  uint32_t divisor = 1;
  uint32_t multiplier = 1;
  uint32_t shift = 0;

  FastDivmod() = default;
  __host__ explicit FastDivmod(uint32_t d) : divisor(d) {
    shift = 0;
    while ((uint64_t{1} << shift) < d) ++shift;
    multiplier = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  __host__ __device__ __forceinline__ uint32_t div(uint32_t n) const {
#ifdef __CUDA_ARCH__
    const uint32_t t = __umulhi(n, multiplier);
#else
    const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(n) * multiplier) >> 32);
#endif
    return static_cast<uint32_t>((static_cast<uint64_t>(t) + n) >> shift);
  }
};

#ifdef __CUDACC__

// Deterministic reduction of one value per thread over a block of kThreads threads with the
// associative `op`; the result is returned to EVERY thread. Fixed shuffle tree within warps, then
// warp 0 combines the warp results in a fixed order: the same bits on every run.
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, Op op, T identity) {
  __shared__ T warp_vals[kThreads / 32];
  __shared__ T result;
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_vals[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_vals[lane] : identity;
    for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, off));
    if (lane == 0) result = v;
  }
  __syncthreads();
  v = result;
  __syncthreads();  // the shared slots may be reused by a following call
  return v;
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MinOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fminf(a, b); }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

__device__ __forceinline__ double block_sum(double v) {
  return block_allreduce(v, SumOp{}, 0.0);
}

// out[c] = float(sum_p partials[c * P + p]): the fixed-order second stage of every reduction.
// One block per output; reads 8 P bytes, writes 4. `static`: each .cu that includes this header
// gets its own copy (no duplicate symbols at link time).
static __global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const double* __restrict__ partials, int64_t P, float* __restrict__ out) {
  const int64_t c = blockIdx.x;
  double acc = 0.0;
  for (int64_t p = threadIdx.x; p < P; p += kThreads) acc += partials[c * P + p];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[c] = static_cast<float>(acc);
}

#endif  // __CUDACC__

}  // namespace calib
}  // namespace pdquant
