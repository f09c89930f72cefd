// Launchers of the CUDA fake-quant kernels (pdquant::fake_quant_act and its backward).
//
// Raw pointers, sizes and a stream: no torch headers, so nvcc compiles fake_quant.cu in seconds.
// The torch glue (checks, allocation, stream) is csrc/cuda/calib_ops.cpp. Math and operation
// order: pdquant_fast/ops/reference.py (fake_quant_act_reference / ..._backward_reference).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pdquant {
namespace calib {

// One fake-quant call. x is viewed as [outer, channels, inner] around the channel axis
// (per tensor: outer = channels = 1, inner = numel); delta / zero_point hold `channels` floats.
struct FakeQuantArgs {
  const float* x = nullptr;
  const float* grad = nullptr;        // backward only
  float* out = nullptr;               // y (forward) or grad_x (backward), x's shape
  const float* delta = nullptr;       // [channels], on the device
  const float* zero_point = nullptr;  // [channels], on the device
  const uint8_t* mask = nullptr;      // bool mask, x's shape (or null)
  const int64_t* seed = nullptr;      // 0-d int64 on the device (or null): read in the kernel
  uint64_t keep_threshold = 0;        // floor(keep_prob * 2**32), used with `seed`
  int64_t outer = 1;
  int64_t channels = 1;
  int64_t inner = 1;
  int bits = 8;
  bool aligned16 = false;             // x, grad, out 16-byte aligned: float4 path allowed
};

// float64 partials the backward needs (channels * blocks per channel).
int64_t fake_quant_backward_partials(const FakeQuantArgs& args);

// y = fake_quant(x). Reads 4 N (+ N mask) bytes, writes 4 N.
cudaError_t fake_quant_forward(const FakeQuantArgs& args, cudaStream_t stream);

// grad_x (into args.out) and grad_delta [channels] (float32), via `partials`
// (fake_quant_backward_partials(args) doubles). Reads 8 N (+ N) bytes, writes 4 N.
cudaError_t fake_quant_backward(const FakeQuantArgs& args, double* partials, float* grad_delta,
                                cudaStream_t stream);

}  // namespace calib
}  // namespace pdquant
