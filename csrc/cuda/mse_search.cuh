// Launcher of the CUDA 2-D L2.4 initialisation search (pdquant::mse_search_2d), spec §1.3.
//
// Raw pointers, sizes and a stream; no torch headers (glue: csrc/cuda/calib_ops.cpp). Math:
// pdquant_fast/ops/reference.py (mse_search_2d_reference).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pdquant {
namespace calib {

// x float32 [channels, k] contiguous. x_min, x_max: null (each row's own range) or float32
// [channels] bounds that contain their rows. `score` (float32) and `zbest` (int32) are scratch of
// channels * steps entries each. Writes delta [channels] and zero_point [channels] (float32).
cudaError_t mse_search_2d(const float* x, int64_t channels, int64_t k, int bits, int64_t steps,
                          const float* x_min, const float* x_max, float* score, int32_t* zbest, float* delta, float* zero_point,
                          cudaStream_t stream);

}  // namespace calib
}  // namespace pdquant
