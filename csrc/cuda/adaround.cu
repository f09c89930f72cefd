// CUDA AdaRound kernels: soft weight + regulariser, its backward, hard codes (adaround.cuh).
//
// Grid (channels, P), kThreads threads; block (c, p) walks row c in tiles p, p + P, ... of kTile
// elements (float4 when the row length is a multiple of 4 and the pointers are aligned). Per
// element, in the reference's order (AdaRound eq. 22-24, spec §7.2):
//
//     s = 1 / (1 + expf(-alpha))    u = s * float(zeta - gamma) + float(gamma)    h = clamp(u, 0, 1)
//     w_q = (clamp(w_floor + h + z, 0, n) - z) * d          reg += 1 - powf(|2h - 1|, beta)
//
// (torch's CUDA sigmoid is exactly `1 / (1 + std::exp(-a))`; Python scalars meet float32
// tensors as float32, hence the float casts of zeta - gamma and gamma.) The regulariser sums in
// double per thread, block_sum into partials[c, p], then one fixed-order sum_partials_kernel.
#include "adaround.cuh"
#include "calib_common.cuh"

namespace pdquant {
namespace calib {
namespace {

constexpr float kZetaMinusGamma = static_cast<float>(1.1 - (-0.1));
constexpr float kGamma = static_cast<float>(-0.1);

struct Rect {
  float s, u, h;
};

// sigmoid, the stretched value u and h = clamp(u, 0, 1); no FMA (__fmul_rn / __fadd_rn).
__device__ __forceinline__ Rect rectified(float a) {
  const float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-a)));
  const float u = __fadd_rn(__fmul_rn(s, kZetaMinusGamma), kGamma);
  return {s, u, clamp_nan(u, 0.f, 1.f)};
}

struct Qp {
  float d, z, n;
};

__device__ __forceinline__ float soft_element(float wf, float a, const Qp& q, float beta,
                                              double& reg) {
  const Rect r = rectified(a);
  const float k = __fadd_rn(__fadd_rn(wf, r.h), q.z);
  const float v = __fsub_rn(__fmul_rn(2.f, r.h), 1.f);
  reg += static_cast<double>(__fsub_rn(1.f, powf(fabsf(v), beta)));
  return __fmul_rn(__fsub_rn(clamp_nan(k, 0.f, q.n), q.z), q.d);
}

// grad_alpha of one element; reg_scale = (-grad_reg) * beta, beta_m1 = beta - 1.
__device__ __forceinline__ float backward_element(float wf, float a, float gwq, const Qp& q,
                                                  float reg_scale, float beta_m1) {
  const Rect r = rectified(a);
  const float dh = (r.u >= 0.f && r.u <= 1.f)
                       ? __fmul_rn(__fmul_rn(kZetaMinusGamma, r.s), __fsub_rn(1.f, r.s))
                       : 0.f;
  const float k = __fadd_rn(__fadd_rn(wf, r.h), q.z);
  const bool inside = k >= 0.f && k <= q.n;
  const float g_q = __fmul_rn(inside ? __fmul_rn(gwq, q.d) : 0.f, dh);
  const float v = __fsub_rn(__fmul_rn(2.f, r.h), 1.f);
  const float sign = v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f);
  float g_r = __fmul_rn(reg_scale, powf(fabsf(v), beta_m1));
  g_r = __fmul_rn(__fmul_rn(__fmul_rn(g_r, sign), 2.f), dh);
  return __fadd_rn(g_q, g_r);
}

__device__ __forceinline__ uint8_t hard_element(float wf, float a, float z, float n) {
  const float up = a >= 0.f ? 1.f : 0.f;
  return static_cast<uint8_t>(clamp_nan(__fadd_rn(__fadd_rn(wf, up), z), 0.f, n));
}

enum Kind { kSoft = 0, kBackward = 1, kHard = 2 };

// Row c: grid-stride over tiles; KIND picks the element function and the outputs.
template <int KIND, bool VEC>
__global__ void __launch_bounds__(kThreads)
    adaround_kernel(AdaRoundArgs a, const float* __restrict__ grad_wq,
                    const float* __restrict__ grad_reg, float* __restrict__ out_f,
                    uint8_t* __restrict__ out_u8, double* __restrict__ partials) {
  const uint32_t c = blockIdx.x;
  const uint32_t num_p = gridDim.y;
  const uint64_t inner = static_cast<uint64_t>(a.inner);
  const Qp q{KIND == kHard ? 0.f : a.delta[c], a.zero_point[c],
             static_cast<float>((1u << a.bits) - 1u)};
  const float beta = KIND == kHard ? 0.f : *a.beta;
  const float reg_scale = KIND == kBackward ? __fmul_rn(-*grad_reg, beta) : 0.f;
  const float beta_m1 = __fsub_rn(beta, 1.f);
  const uint64_t row = static_cast<uint64_t>(c) * inner;
  double reg = 0.0;
  for (uint64_t base = static_cast<uint64_t>(blockIdx.y) * kTile; base < inner;
       base += static_cast<uint64_t>(num_p) * kTile) {
    if (VEC) {  // inner % 4 == 0: the 4 elements are in row c, 16-byte aligned
      const uint64_t j = base + threadIdx.x * kVec;
      if (j < inner) {
        const uint64_t f = row + j;
        const float4 w4 = *reinterpret_cast<const float4*>(a.w_floor + f);
        const float4 a4 = *reinterpret_cast<const float4*>(a.alpha + f);
        if (KIND == kSoft) {
          float4 o;
          o.x = soft_element(w4.x, a4.x, q, beta, reg);
          o.y = soft_element(w4.y, a4.y, q, beta, reg);
          o.z = soft_element(w4.z, a4.z, q, beta, reg);
          o.w = soft_element(w4.w, a4.w, q, beta, reg);
          *reinterpret_cast<float4*>(out_f + f) = o;
        } else if (KIND == kBackward) {
          const float4 g4 = *reinterpret_cast<const float4*>(grad_wq + f);
          float4 o;
          o.x = backward_element(w4.x, a4.x, g4.x, q, reg_scale, beta_m1);
          o.y = backward_element(w4.y, a4.y, g4.y, q, reg_scale, beta_m1);
          o.z = backward_element(w4.z, a4.z, g4.z, q, reg_scale, beta_m1);
          o.w = backward_element(w4.w, a4.w, g4.w, q, reg_scale, beta_m1);
          *reinterpret_cast<float4*>(out_f + f) = o;
        } else {
          uchar4 o;
          o.x = hard_element(w4.x, a4.x, q.z, q.n);
          o.y = hard_element(w4.y, a4.y, q.z, q.n);
          o.z = hard_element(w4.z, a4.z, q.z, q.n);
          o.w = hard_element(w4.w, a4.w, q.z, q.n);
          *reinterpret_cast<uchar4*>(out_u8 + f) = o;
        }
      }
    } else {  // element by element, coalesced: thread t takes base + e * kThreads + t
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const uint64_t j = base + static_cast<uint64_t>(e) * kThreads + threadIdx.x;
        if (j >= inner) break;
        const uint64_t f = row + j;
        if (KIND == kSoft) {
          out_f[f] = soft_element(a.w_floor[f], a.alpha[f], q, beta, reg);
        } else if (KIND == kBackward) {
          out_f[f] = backward_element(a.w_floor[f], a.alpha[f], grad_wq[f], q, reg_scale, beta_m1);
        } else {
          out_u8[f] = hard_element(a.w_floor[f], a.alpha[f], q.z, q.n);
        }
      }
    }
  }
  if (KIND == kSoft) {
    reg = block_sum(reg);
    if (threadIdx.x == 0) partials[static_cast<uint64_t>(c) * num_p + blockIdx.y] = reg;
  }
}

template <int KIND>
cudaError_t launch(const AdaRoundArgs& a, const float* grad_wq, const float* grad_reg,
                   float* out_f, uint8_t* out_u8, double* partials, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.channels),
                  static_cast<unsigned>(programs_per_channel(a.channels, a.inner)));
  if (a.aligned16 && a.inner % 4 == 0) {
    adaround_kernel<KIND, true>
        <<<grid, kThreads, 0, stream>>>(a, grad_wq, grad_reg, out_f, out_u8, partials);
  } else {
    adaround_kernel<KIND, false>
        <<<grid, kThreads, 0, stream>>>(a, grad_wq, grad_reg, out_f, out_u8, partials);
  }
  return cudaGetLastError();
}

}  // namespace

int64_t adaround_soft_partials(const AdaRoundArgs& a) {
  return a.channels * programs_per_channel(a.channels, a.inner);
}

cudaError_t adaround_soft(const AdaRoundArgs& a, float* w_q, double* partials, float* reg,
                          cudaStream_t stream) {
  if (a.channels * a.inner == 0) return cudaSuccess;
  cudaError_t err = launch<kSoft>(a, nullptr, nullptr, w_q, nullptr, partials, stream);
  if (err != cudaSuccess) return err;
  sum_partials_kernel<<<1, kThreads, 0, stream>>>(partials, adaround_soft_partials(a), reg);
  return cudaGetLastError();
}

cudaError_t adaround_soft_backward(const AdaRoundArgs& a, const float* grad_wq,
                                   const float* grad_reg, float* grad_alpha, cudaStream_t stream) {
  if (a.channels * a.inner == 0) return cudaSuccess;
  return launch<kBackward>(a, grad_wq, grad_reg, grad_alpha, nullptr, nullptr, stream);
}

cudaError_t adaround_hard(const AdaRoundArgs& a, uint8_t* codes, cudaStream_t stream) {
  if (a.channels * a.inner == 0) return cudaSuccess;
  return launch<kHard>(a, nullptr, nullptr, nullptr, codes, nullptr, stream);
}

}  // namespace calib
}  // namespace pdquant
