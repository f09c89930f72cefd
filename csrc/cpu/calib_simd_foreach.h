// Compiles the kernels of one op file three times: AVX-512, AVX2+FMA and scalar (no include
// guard: included once per op file). Before including it, an op file defines PDQ_ISA_FILE as its
// own path; that file is then included again with PDQ_ISA_PASS defined, inside a
// `#pragma GCC target` region and the namespace pdquant::calib_cpu::<isa>, where `V` names that
// path's vector type (cpu/calib_simd.h). The op file's kernels are written once, over V.
// (`#pragma GCC target` takes string literals only, hence the repeated feature lists.)
#ifndef PDQ_ISA_FILE
#error "define PDQ_ISA_FILE (the op file's own path) before including cpu/calib_simd_foreach.h"
#endif

#define PDQ_ISA_PASS 1

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,popcnt")
namespace pdquant {
namespace calib_cpu {
namespace avx512 {
using V = ::pdquant::calib_simd::Avx512;
#include "cpu/calib_simd_math.inc"
#include PDQ_ISA_FILE
}  // namespace avx512
}  // namespace calib_cpu
}  // namespace pdquant
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")
namespace pdquant {
namespace calib_cpu {
namespace avx2 {
using V = ::pdquant::calib_simd::Avx2;
#include "cpu/calib_simd_math.inc"
#include PDQ_ISA_FILE
}  // namespace avx2
}  // namespace calib_cpu
}  // namespace pdquant
#pragma GCC pop_options

namespace pdquant {
namespace calib_cpu {
namespace scalar {
using V = ::pdquant::calib_simd::Scalar;
#include "cpu/calib_simd_math.inc"
#include PDQ_ISA_FILE
}  // namespace scalar
}  // namespace calib_cpu
}  // namespace pdquant

#undef PDQ_ISA_PASS
#undef PDQ_ISA_FILE

// Calls calib_cpu::<isa>::FN(args...) for the active ISA (FN exists in all three passes).
#ifndef PDQ_ISA_DISPATCH
#define PDQ_ISA_DISPATCH(FN, ...)                         \
  do {                                                    \
    switch (::pdquant::calib_simd::active_isa()) {        \
      case ::pdquant::calib_simd::Isa::kAvx512:           \
        ::pdquant::calib_cpu::avx512::FN(__VA_ARGS__);    \
        break;                                            \
      case ::pdquant::calib_simd::Isa::kAvx2:             \
        ::pdquant::calib_cpu::avx2::FN(__VA_ARGS__);      \
        break;                                            \
      default:                                            \
        ::pdquant::calib_cpu::scalar::FN(__VA_ARGS__);    \
    }                                                     \
  } while (0)
#endif
