// Launchers of the CUDA AdaRound kernels (pdquant::adaround_soft, its backward, adaround_hard).
//
// Raw pointers, sizes and a stream; no torch headers (glue: csrc/cuda/calib_ops.cpp). Weights
// are float32 [channels, inner] contiguous (axis 0 = output channel); delta / zero_point are
// [channels]; beta / grad_reg are 0-d on the device (read in the kernel, no host sync). Math and
// operation order: pdquant_fast/ops/reference.py (adaround_*_reference).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pdquant {
namespace calib {

struct AdaRoundArgs {
  const float* w_floor = nullptr;
  const float* alpha = nullptr;
  const float* delta = nullptr;       // [channels] (soft forward / backward)
  const float* zero_point = nullptr;  // [channels]
  const float* beta = nullptr;        // 0-d (soft forward / backward)
  int64_t channels = 1;
  int64_t inner = 1;
  int bits = 8;
  bool aligned16 = false;  // every float pointer 16-byte aligned: float4 path allowed
};

// float64 partials adaround_soft needs (channels * blocks per channel).
int64_t adaround_soft_partials(const AdaRoundArgs& args);

// w_q [channels, inner] and reg (0-d float32, via `partials`). Reads 8 bytes/element, writes 4.
cudaError_t adaround_soft(const AdaRoundArgs& args, float* w_q, double* partials, float* reg,
                          cudaStream_t stream);

// grad_alpha [channels, inner] from grad_wq (same shape) and grad_reg (0-d, on the device).
// Reads 12 bytes/element, writes 4.
cudaError_t adaround_soft_backward(const AdaRoundArgs& args, const float* grad_wq,
                                   const float* grad_reg, float* grad_alpha, cudaStream_t stream);

// uint8 codes clamp(w_floor + [alpha >= 0] + z, 0, n). Reads 8 bytes/element, writes 1.
cudaError_t adaround_hard(const AdaRoundArgs& args, uint8_t* codes, cudaStream_t stream);

}  // namespace calib
}  // namespace pdquant
