// CUDA 2-D L2.4 initialisation search (mse_search.cuh), spec §1.3.
//
// Kernel 1, grid (channels, steps): block (c, i) finds row c's range R = max(x_max, 0) -
// min(x_min, 0) (block min/max, exact; or the given bounds x_min[c], x_max[c]), the step
// d_i = max(R * i / steps / n, 1e-8) (IEEE divisions, the reference's order), then scores the
// n + 1 zero points kZ at a time: each thread computes the code rint(x / d_i) once per element
// and pass and keeps kZ float accumulators of
// |x - clamp(code, -z, n - z) * d_i| ** 2.4 (powf); one block reduction per pass (fixed order).
// It keeps the first zero point with the lowest mean (strict <) and writes score[c, i - 1],
// zbest[c, i - 1].
// Kernel 2, grid (channels): the first range with the lowest score wins; calculate_qparams of its
// interval [-z d_i, R i / steps - z d_i] in the reference's float32 operations, so a row that
// picks the reference's candidate returns the reference's bits. Scores are float32 sums in
// another order than the reference's (and powf may differ from SLEEF's by an ulp): a near-tie may
// pick another candidate; the contract is a budget on the chosen candidate's float64 score.
//
// Work: channels * steps * (n + 1) * k powf (brute force, as the reference); reads each row
// steps * (1 + (n + 1) / kZ) times, from L2 for layer-sized rows.
#include "calib_common.cuh"
#include "mse_search.cuh"

namespace pdquant {
namespace calib {
namespace {

constexpr int kZ = 8;  // zero points per pass: 8 accumulators per thread

// (min(x_min, 0), max(x_max, 0)) of row c, in every thread: the given bounds when x_min is not
// null (the glue checked that they contain the row), else the row's own.
__device__ __forceinline__ float2 row_range(const float* __restrict__ row, int64_t k, int64_t c,
                                            const float* __restrict__ x_min,
                                            const float* __restrict__ x_max) {
  if (x_min != nullptr) return make_float2(fminf(x_min[c], 0.f), fmaxf(x_max[c], 0.f));
  float lo = 0.f, hi = 0.f;
  for (int64_t kk = threadIdx.x; kk < k; kk += kThreads) {
    const float v = row[kk];
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  lo = block_allreduce(lo, MinOp{}, 0.f);
  hi = block_allreduce(hi, MaxOp{}, 0.f);
  return make_float2(lo, hi);
}

// (r_i, d_i): r_i = R * i / steps, d_i = max(r_i / n, 1e-8).
__device__ __forceinline__ float2 step_of(float2 range, int64_t i, int64_t steps, float n) {
  const float rng = __fsub_rn(range.y, range.x);
  const float r = __fdiv_rn(__fmul_rn(rng, static_cast<float>(i)), static_cast<float>(steps));
  const float d = __fdiv_rn(r, n);
  return make_float2(r, d < 1e-8f ? 1e-8f : d);
}

// Scores the n + 1 zero points of one step d; thread 0 writes the best (first lowest) to *score,
// *zbest.
__device__ __forceinline__ void score_range(const float* __restrict__ row, int64_t k, int n,
                                            float nf, float d, float* score, int32_t* zbest) {
  float best_s = __int_as_float(0x7f800000);  // +inf
  int best_z = 0;
  for (int z0 = 0; z0 <= n; z0 += kZ) {
    float acc[kZ];
#pragma unroll
    for (int e = 0; e < kZ; ++e) acc[e] = 0.f;
    for (int64_t kk = threadIdx.x; kk < k; kk += kThreads) {
      const float xv = row[kk];
      const float code = rintf(__fdiv_rn(xv, d));
#pragma unroll
      for (int e = 0; e < kZ; ++e) {
        const float z = static_cast<float>(z0 + e);
        const float v = clamp_nan(code, -z, __fsub_rn(nf, z));
        const float err = fabsf(__fsub_rn(xv, __fmul_rn(v, d)));
        acc[e] = __fadd_rn(acc[e], powf(err, 2.4f));
      }
    }
#pragma unroll
    for (int e = 0; e < kZ; ++e) {
      const float s = block_allreduce(acc[e], SumOp{}, 0.f);
      if (z0 + e <= n) {
        const float mean = __fdiv_rn(s, static_cast<float>(k));
        if (mean < best_s) {
          best_s = mean;
          best_z = z0 + e;
        }
      }
    }
  }
  if (threadIdx.x == 0) {
    *score = best_s;
    *zbest = best_z;
  }
}

__global__ void __launch_bounds__(kThreads)
    mse_range_kernel(const float* __restrict__ x, int64_t k, int n, int64_t steps,
                     const float* __restrict__ x_min, const float* __restrict__ x_max,
                     float* __restrict__ score, int32_t* __restrict__ zbest) {
  const int64_t c = blockIdx.x;
  const float* row = x + c * k;
  const float nf = static_cast<float>(n);
  const float2 range = row_range(row, k, c, x_min, x_max);
  for (int64_t i = static_cast<int64_t>(blockIdx.y) + 1; i <= steps; i += gridDim.y) {
    score_range(row, k, n, nf, step_of(range, i, steps, nf).y, score + c * steps + (i - 1),
                zbest + c * steps + (i - 1));
  }
}

__global__ void __launch_bounds__(kThreads)
    mse_pick_kernel(const float* __restrict__ x, int64_t k, int n, int64_t steps,
                    const float* __restrict__ x_min, const float* __restrict__ x_max,
                    const float* __restrict__ score, const int32_t* __restrict__ zbest,
                    float* __restrict__ delta, float* __restrict__ zero_point) {
  const int64_t c = blockIdx.x;
  const float nf = static_cast<float>(n);
  const float2 range = row_range(x + c * k, k, c, x_min, x_max);
  if (threadIdx.x != 0) return;
  float best_s = __int_as_float(0x7f800000);
  int64_t best_i = 0;
  for (int64_t i = 0; i < steps; ++i) {
    const float s = score[c * steps + i];
    if (s < best_s) {
      best_s = s;
      best_i = i;
    }
  }
  float lo = range.x, hi = range.y;
  if (best_s < __int_as_float(0x7f800000)) {  // else: the reference keeps [x_min, x_max]
    const float z = static_cast<float>(zbest[c * steps + best_i]);
    const float2 rd = step_of(range, best_i + 1, steps, nf);
    lo = __fmul_rn(-z, rd.y);
    hi = __fadd_rn(rd.x, lo);
  }
  // calculate_qparams(lo, hi)
  lo = lo > 0.f ? 0.f : lo;
  hi = hi < 0.f ? 0.f : hi;
  float dl = __fdiv_rn(__fsub_rn(hi, lo), nf);
  dl = dl < 1e-8f ? 1e-8f : dl;
  delta[c] = dl;
  zero_point[c] = clamp_nan(-rintf(__fdiv_rn(lo, dl)), 0.f, nf);
}

}  // namespace

cudaError_t mse_search_2d(const float* x, int64_t channels, int64_t k, int bits, int64_t steps,
                          const float* x_min, const float* x_max, float* score, int32_t* zbest,
                          float* delta, float* zero_point, cudaStream_t stream) {
  if (channels == 0) return cudaSuccess;
  const int n = (1 << bits) - 1;
  const unsigned grid_y = static_cast<unsigned>(steps < 65535 ? steps : 65535);
  mse_range_kernel<<<dim3(static_cast<unsigned>(channels), grid_y), kThreads, 0, stream>>>(
      x, k, n, steps, x_min, x_max, score, zbest);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  mse_pick_kernel<<<static_cast<unsigned>(channels), kThreads, 0, stream>>>(
      x, k, n, steps, x_min, x_max, score, zbest, delta, zero_point);
  return cudaGetLastError();
}

}  // namespace calib
}  // namespace pdquant
