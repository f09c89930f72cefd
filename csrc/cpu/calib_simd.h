// Run-time chosen SIMD for the calibration kernels: AVX-512, AVX2+FMA, or plain scalar C++.
//
// A kernel is written once, as a template over a vector type V (Avx512, Avx2 or Scalar below),
// and compiled three times, each time inside a `#pragma GCC target` region, by including its
// file again through simd_foreach.h (the "foreach target" pattern of Google Highway). Which copy
// runs is decided per call from `__builtin_cpu_supports` (active_isa()); a test hook can pin a
// lower ISA so that every path is tested on one machine.
//
// Every V op is one IEEE operation (true division, round half to even, no reciprocal
// estimates), and the op files are compiled with fp-contract off, so that a multiply and an add
// written separately are never fused: all three paths give bit-identical results. `fmadd` is an
// explicit fused multiply-add (std::fmaf on the scalar path), used only inside our own
// approximations (exp, pow), never where the reference does a separate multiply and add.
#pragma once

#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

// Separate multiply and add stay separate in every function defined from here on (the op files
// include torch first, then this header): the reference rounds after each op.
#pragma GCC optimize("fp-contract=off")


namespace pdquant {
namespace calib_simd {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

// The best path this CPU can run (AVX-512 needs F, BW, VL and DQ; AVX2 needs FMA as well).
inline Isa detected_isa() {
  static const Isa isa = [] {
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
    return Isa::kScalar;
  }();
  return isa;
}

// -1: use detected_isa(); else an Isa pinned by set_isa_override (tests, benchmarks).
inline std::atomic<int>& isa_override() {
  static std::atomic<int> value{-1};
  return value;
}

inline Isa active_isa() {
  const int pinned = isa_override().load(std::memory_order_relaxed);
  return pinned >= 0 ? static_cast<Isa>(pinned) : detected_isa();
}

// Pin "scalar", "avx2" or "avx512" (must be supported by this CPU), or "auto" to unpin.
inline void set_isa_override(const std::string& name) {
  int value;
  if (name == "auto") {
    value = -1;
  } else if (name == "scalar") {
    value = static_cast<int>(Isa::kScalar);
  } else if (name == "avx2") {
    value = static_cast<int>(Isa::kAvx2);
  } else if (name == "avx512") {
    value = static_cast<int>(Isa::kAvx512);
  } else {
    throw std::invalid_argument("calib_cpu_isa: unknown ISA '" + name +
                                "'; choose auto, scalar, avx2 or avx512");
  }
  if (value > static_cast<int>(detected_isa()))
    throw std::invalid_argument(std::string("calib_cpu_isa: this CPU cannot run '") + name +
                                "' (best: " + isa_name(detected_isa()) + ")");
  isa_override().store(value, std::memory_order_relaxed);
}

// --------------------------------------------------------------------------------------------
// Scalar: one lane. Mirrors the x86 semantics of the vector ops (max_/min_ return the second
// operand when either is NaN, like maxps/minps), so that all paths agree bit for bit.

struct Scalar {
  static constexpr int W = 1;
  using F = float;
  using M = bool;
  using U = uint32_t;  // 32-bit integer lanes (hash, exponent bits)

  static F load(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static F set1(float v) { return v; }
  static F zero() { return 0.0f; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F sqrt_(F a) { return std::sqrt(a); }
  static F fmadd(F a, F b, F c) { return std::fmaf(a, b, c); }
  static F max_(F a, F b) { return a > b ? a : b; }
  static F min_(F a, F b) { return a < b ? a : b; }
  static F round_even(F a) { return std::nearbyintf(a); }  // default mode: half to even
  static F floor_(F a) { return std::floor(a); }
  static F abs(F a) { return std::fabs(a); }
  static F neg(F a) { return -a; }
  static M ge(F a, F b) { return a >= b; }
  static M le(F a, F b) { return a <= b; }
  static M lt(F a, F b) { return a < b; }
  static M gt(F a, F b) { return a > b; }
  static M mand(M a, M b) { return a && b; }
  static M mor(M a, M b) { return a || b; }
  static M mnot(M a) { return !a; }
  static M mfirst(int n) { return n > 0; }  // lanes [0, n) set
  static M ne(F a, F b) { return a != b; }
  static bool any(M m) { return m; }
  static uint32_t bitmask(M m) { return m ? 1u : 0u; }  // bit l = lane l
  static F select(M m, F a, F b) { return m ? a : b; }

  static U u_set1(uint32_t v) { return v; }
  static U u_iota(uint32_t base) { return base; }
  static U u_xor(U a, U b) { return a ^ b; }
  static U u_and(U a, U b) { return a & b; }
  static U u_or(U a, U b) { return a | b; }
  static U u_add(U a, U b) { return a + b; }
  template <int S>
  static U u_shr(U a) {
    return a >> S;
  }
  template <int S>
  static U u_shl(U a) {
    return a << S;
  }
  static U u_mul(U a, U b) { return a * b; }
  static M u_lt(U a, U b) { return a < b; }
  static U bits(F a) {
    U u;
    std::memcpy(&u, &a, 4);
    return u;
  }
  static F from_bits(U u) {
    F a;
    std::memcpy(&a, &u, 4);
    return a;
  }
  static F i32_to_f(U u) { return static_cast<float>(static_cast<int32_t>(u)); }
  static U f_to_i32(F a) { return static_cast<U>(static_cast<int32_t>(std::nearbyintf(a))); }

  static M load_bool(const bool* p) { return *p; }
  static void store_u8(uint8_t* p, F v) { *p = static_cast<uint8_t>(static_cast<int32_t>(v)); }

  // Double accumulation of exact float*float products.
  struct DAcc {
    double s;
  };
  static DAcc dzero() { return {0.0}; }
  static void dacc(DAcc& acc, F a, F b) { acc.s += static_cast<double>(a) * b; }
  static void dacc1(DAcc& acc, F a) { acc.s += a; }
  static double dsum(const DAcc& acc) { return acc.s; }
  static void dacc_to(double* p, F a, F b) { *p += static_cast<double>(a) * b; }
};

}  // namespace calib_simd
}  // namespace pdquant

// --------------------------------------------------------------------------------------------
// AVX2 + FMA: 8 lanes; masks are all-ones/all-zeros float vectors.

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")
namespace pdquant {
namespace calib_simd {

struct Avx2 {
  static constexpr int W = 8;
  using F = __m256;
  using M = __m256;
  using U = __m256i;

  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F zero() { return _mm256_setzero_ps(); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F sqrt_(F a) { return _mm256_sqrt_ps(a); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F max_(F a, F b) { return _mm256_max_ps(a, b); }
  static F min_(F a, F b) { return _mm256_min_ps(a, b); }
  static F round_even(F a) {
    return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static F floor_(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static F abs(F a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static F neg(F a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
  static M ge(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static M le(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
  static M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static M gt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M mand(M a, M b) { return _mm256_and_ps(a, b); }
  static M mor(M a, M b) { return _mm256_or_ps(a, b); }
  static M mnot(M a) { return _mm256_xor_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(-1))); }
  static M mfirst(int n) {
    return _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  }
  static M ne(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_NEQ_UQ); }
  static bool any(M m) { return _mm256_movemask_ps(m) != 0; }
  static uint32_t bitmask(M m) { return static_cast<uint32_t>(_mm256_movemask_ps(m)); }
  static F select(M m, F a, F b) { return _mm256_blendv_ps(b, a, m); }

  static U u_set1(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
  static U u_iota(uint32_t base) {
    return _mm256_add_epi32(u_set1(base), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static U u_xor(U a, U b) { return _mm256_xor_si256(a, b); }
  static U u_and(U a, U b) { return _mm256_and_si256(a, b); }
  static U u_or(U a, U b) { return _mm256_or_si256(a, b); }
  static U u_add(U a, U b) { return _mm256_add_epi32(a, b); }
  template <int S>
  static U u_shr(U a) {
    return _mm256_srli_epi32(a, S);
  }
  template <int S>
  static U u_shl(U a) {
    return _mm256_slli_epi32(a, S);
  }
  static U u_mul(U a, U b) { return _mm256_mullo_epi32(a, b); }
  static M u_lt(U a, U b) {  // unsigned a < b via the sign-flip trick (AVX2 has signed cmpgt only)
    const U flip = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(u_xor(b, flip), u_xor(a, flip)));
  }
  static U bits(F a) { return _mm256_castps_si256(a); }
  static F from_bits(U u) { return _mm256_castsi256_ps(u); }
  static F i32_to_f(U u) { return _mm256_cvtepi32_ps(u); }
  static U f_to_i32(F a) { return _mm256_cvtps_epi32(a); }

  static M load_bool(const bool* p) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(b), _mm256_setzero_si256()));
  }
  static void store_u8(uint8_t* p, F v) {
    const __m256i i = _mm256_cvttps_epi32(v);
    const __m128i w =
        _mm_packus_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
  }

  struct DAcc {
    __m256d lo, hi;
  };
  static DAcc dzero() { return {_mm256_setzero_pd(), _mm256_setzero_pd()}; }
  static void dacc(DAcc& acc, F a, F b) {
    acc.lo = _mm256_add_pd(acc.lo, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)),
                                                 _mm256_cvtps_pd(_mm256_castps256_ps128(b))));
    acc.hi = _mm256_add_pd(acc.hi, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)),
                                                 _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1))));
  }
  static void dacc1(DAcc& acc, F a) {
    acc.lo = _mm256_add_pd(acc.lo, _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
    acc.hi = _mm256_add_pd(acc.hi, _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
  }
  static double dsum(const DAcc& acc) {
    alignas(32) double t[4];
    _mm256_store_pd(t, _mm256_add_pd(acc.lo, acc.hi));
    return (t[0] + t[1]) + (t[2] + t[3]);
  }
  static void dacc_to(double* p, F a, F b) {
    const __m256d lo = _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)),
                                     _mm256_cvtps_pd(_mm256_castps256_ps128(b)));
    const __m256d hi = _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)),
                                     _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1)));
    _mm256_storeu_pd(p, _mm256_add_pd(_mm256_loadu_pd(p), lo));
    _mm256_storeu_pd(p + 4, _mm256_add_pd(_mm256_loadu_pd(p + 4), hi));
  }
};

}  // namespace calib_simd
}  // namespace pdquant
#pragma GCC pop_options

// --------------------------------------------------------------------------------------------
// AVX-512 (F, BW, VL, DQ): 16 lanes; masks are __mmask16.

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,popcnt")
namespace pdquant {
namespace calib_simd {

struct Avx512 {
  static constexpr int W = 16;
  using F = __m512;
  using M = __mmask16;
  using U = __m512i;

  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F zero() { return _mm512_setzero_ps(); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F sqrt_(F a) { return _mm512_sqrt_ps(a); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F max_(F a, F b) { return _mm512_max_ps(a, b); }
  static F min_(F a, F b) { return _mm512_min_ps(a, b); }
  static F round_even(F a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static F floor_(F a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  }
  static F abs(F a) { return _mm512_abs_ps(a); }
  static F neg(F a) { return _mm512_xor_ps(a, _mm512_set1_ps(-0.0f)); }
  static M ge(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static M le(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
  static M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static M gt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M mand(M a, M b) { return static_cast<M>(a & b); }
  static M mor(M a, M b) { return static_cast<M>(a | b); }
  static M mnot(M a) { return static_cast<M>(~a); }
  static M mfirst(int n) { return n >= 16 ? M(0xFFFF) : static_cast<M>((1u << n) - 1u); }
  static M ne(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_UQ); }
  static bool any(M m) { return m != 0; }
  static uint32_t bitmask(M m) { return static_cast<uint32_t>(m); }
  static F select(M m, F a, F b) { return _mm512_mask_blend_ps(m, b, a); }

  static U u_set1(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
  static U u_iota(uint32_t base) {
    return _mm512_add_epi32(
        u_set1(base), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  }
  static U u_xor(U a, U b) { return _mm512_xor_si512(a, b); }
  static U u_and(U a, U b) { return _mm512_and_si512(a, b); }
  static U u_or(U a, U b) { return _mm512_or_si512(a, b); }
  static U u_add(U a, U b) { return _mm512_add_epi32(a, b); }
  template <int S>
  static U u_shr(U a) {
    return _mm512_srli_epi32(a, S);
  }
  template <int S>
  static U u_shl(U a) {
    return _mm512_slli_epi32(a, S);
  }
  static U u_mul(U a, U b) { return _mm512_mullo_epi32(a, b); }
  static M u_lt(U a, U b) { return _mm512_cmplt_epu32_mask(a, b); }
  static U bits(F a) { return _mm512_castps_si512(a); }
  static F from_bits(U u) { return _mm512_castsi512_ps(u); }
  static F i32_to_f(U u) { return _mm512_cvtepi32_ps(u); }
  static U f_to_i32(F a) { return _mm512_cvtps_epi32(a); }

  static M load_bool(const bool* p) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm_test_epi8_mask(b, b);
  }
  static void store_u8(uint8_t* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v)));
  }

  struct DAcc {
    __m512d lo, hi;
  };
  static DAcc dzero() { return {_mm512_setzero_pd(), _mm512_setzero_pd()}; }
  static __m512d lo_pd(F a) { return _mm512_cvtps_pd(_mm512_castps512_ps256(a)); }
  static __m512d hi_pd(F a) {
    return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  }
  static void dacc(DAcc& acc, F a, F b) {
    acc.lo = _mm512_add_pd(acc.lo, _mm512_mul_pd(lo_pd(a), lo_pd(b)));
    acc.hi = _mm512_add_pd(acc.hi, _mm512_mul_pd(hi_pd(a), hi_pd(b)));
  }
  static void dacc1(DAcc& acc, F a) {
    acc.lo = _mm512_add_pd(acc.lo, lo_pd(a));
    acc.hi = _mm512_add_pd(acc.hi, hi_pd(a));
  }
  static double dsum(const DAcc& acc) {
    alignas(64) double t[8];
    _mm512_store_pd(t, _mm512_add_pd(acc.lo, acc.hi));
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
  }
  static void dacc_to(double* p, F a, F b) {
    _mm512_storeu_pd(p, _mm512_add_pd(_mm512_loadu_pd(p), _mm512_mul_pd(lo_pd(a), lo_pd(b))));
    _mm512_storeu_pd(p + 8,
                     _mm512_add_pd(_mm512_loadu_pd(p + 8), _mm512_mul_pd(hi_pd(a), hi_pd(b))));
  }
};

}  // namespace calib_simd
}  // namespace pdquant
#pragma GCC pop_options
