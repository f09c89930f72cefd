// SIMD helpers shared by the packed low-bit CPU kernels (qgemm.cpp, qconv.cpp): target
// attributes, the AVX-512 pieces of the requantisation epilogue, and its specialisation
// dispatch. Internal header: include only from csrc/cpu/*.cpp.
//
// Every SIMD function carries its own __attribute__((target(...))): the extension is compiled
// for baseline x86-64 (setup.py passes no -m flags) and the path is picked at run time with
// __builtin_cpu_supports, so one binary runs on any x86-64 CPU.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/qgemm.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PDQ_X86 1
#endif

#define PDQ_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define PDQ_VBMI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi")))
#define PDQ_AVX2 __attribute__((target("avx2")))

namespace pdquant::qk {

static inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Keeps the compiler from contracting float(acc) * scale + bias into an FMA (the contract rounds
// twice; GCC's default -ffp-contract=fast would fuse the vector intrinsics) and from folding a
// narrowing into a slow memory-destination form.
template <typename T>
static inline T opaque(T v) {
  asm volatile("" : "+x"(v));
  return v;
}

#ifdef PDQ_X86
#define PDQ_VNNI_INLINE PDQ_VNNI __attribute__((always_inline)) static inline

// The residual at flat output indices idx .. idx + 15 (mask k): float32 as stored, or uint8
// codes dequantized as (float(q) - res_zp) * res_scale (a sub and a mul, each rounded; kept out
// of an FMA with the following add).
PDQ_VNNI_INLINE __m512 res_vec(const Epilogue& e, int64_t idx, __mmask16 k) {
  if (e.residual != nullptr) return _mm512_maskz_loadu_ps(k, e.residual + idx);
  const __m512 q =
      _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, e.residual_q + idx)));
  return opaque(_mm512_mul_ps(_mm512_sub_ps(q, _mm512_set1_ps(e.res_zp)),
                              _mm512_set1_ps(e.res_scale)));
}

// y = float(v) * sc + bi (two roundings), + the residual at ridx (RES), activation: the
// contract's float part.
template <bool RES, int ACT>
PDQ_VNNI_INLINE __m512 yvec(__m512i v, __m512 sc, __m512 bi, const Epilogue& e, int64_t ridx,
                            __mmask16 k) {
  __m512 y = opaque(_mm512_mul_ps(_mm512_cvtepi32_ps(v), sc));
  y = _mm512_add_ps(y, bi);
  if constexpr (RES) y = _mm512_add_ps(y, res_vec(e, ridx, k));
  if constexpr (ACT == 1) y = _mm512_max_ps(y, _mm512_setzero_ps());
  if constexpr (ACT == 2)
    y = _mm512_min_ps(_mm512_max_ps(y, _mm512_setzero_ps()), _mm512_set1_ps(6.f));
  return y;
}

// clamp(round_half_even(y / out_scale) + out_zp, 0, qmax) as int32 (true IEEE division).
PDQ_VNNI_INLINE __m512i qvec(__m512 y, __m512 s, __m512 zp, __m512 qmax) {
  __m512 v = _mm512_roundscale_ps(_mm512_div_ps(y, s),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, zp), _mm512_setzero_ps()), qmax);
  return _mm512_cvttps_epi32(v);
}

// The epilogue's output codes, clamp(round_half_even(y / s) + zp, 0, qmax), as
// round_half_even(min(y / s, qmax - zp)) + zp in int32 (vcvtps2dq with static round-to-nearest-
// even), three vector ops where qvec takes five. The same codes: rounding is monotone and keeps
// the integer bound, below 2^24 the contract's float add of zp is exact and beyond it both clamp
// to the same bound; the lower clamp is left to narrow4, whose saturating packs turn every
// negative int32 (down to INT32_MIN, what vcvtps2dq gives for -inf and values below -2^31) into
// code 0. So every caller narrows these through narrow4. Needs 0 <= zp <= qmax
// (check_requant_args).
struct QOut {
  __m512 s, hi;
  __m512i zp;
};
PDQ_VNNI_INLINE QOut qout(const Epilogue& e) {
  return {_mm512_set1_ps(e.out_scale), _mm512_set1_ps(e.qmax - e.out_zp),
          _mm512_set1_epi32(static_cast<int32_t>(e.out_zp))};
}
PDQ_VNNI_INLINE __m512i qcode(__m512 y, const QOut& p) {
  const __m512 v = _mm512_min_ps(_mm512_div_ps(y, p.s), p.hi);
  return _mm512_add_epi32(
      _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), p.zp);
}

// Four int32 code vectors -> 128-bit lane i holds the 16 bytes of q_i. vpackssdw + vpackuswb +
// vpermd: 1.1 cycles per vector against 2.0 for one vpmovdb each (Zen 4, measured in a throughput
// loop). The packs saturate: values in 0..255 pass unchanged, negative ones become 0 (qcode
// relies on that), values above 255 would become 255 (callers clamp to qmax <= 255 first).
PDQ_VNNI_INLINE __m512i narrow4(__m512i q0, __m512i q1, __m512i q2, __m512i q3) {
  const __m512i b = _mm512_packus_epi16(_mm512_packs_epi32(q0, q1), _mm512_packs_epi32(q2, q3));
  return _mm512_permutexvar_epi32(
      _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), b);
}

PDQ_VNNI_INLINE void store_lane(uint8_t* p, __m128i b, __mmask16 k) {
  if (k == 0xFFFF) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), b);
  } else {
    _mm_mask_storeu_epi8(p, k, b);
  }
}

PDQ_VNNI_INLINE void store_f32(float* p, __m512 y, __mmask16 k) {
  if (k == 0xFFFF) {
    _mm512_storeu_ps(p, y);
  } else {
    _mm512_mask_storeu_ps(p, k, y);
  }
}

// Stores the first nv 128-bit lanes of b (narrow4's output) at p, p + stride, ... (mask k).
PDQ_VNNI_INLINE void store_lanes(uint8_t* p, int64_t stride, __m512i b, int nv, __mmask16 k) {
  store_lane(p, _mm512_castsi512_si128(b), k);
  if (nv > 1) store_lane(p + stride, opaque(_mm512_extracti32x4_epi32(b, 1)), k);
  if (nv > 2) store_lane(p + 2 * stride, opaque(_mm512_extracti32x4_epi32(b, 2)), k);
  if (nv > 3) store_lane(p + 3 * stride, opaque(_mm512_extracti32x4_epi32(b, 3)), k);
}
#endif  // PDQ_X86

// Calls FN<CODES, RES, ACT>(args...) for the Epilogue `e` in scope: the per-vector work is
// specialised on output kind (codes / float32), residual and activation.
#define PDQ_EPI_DISPATCH(FN, ...)                                                           \
  do {                                                                                      \
    const bool codes_ = e.out_bits > 0,                                                     \
               res_ = e.residual != nullptr || e.residual_q != nullptr;                     \
    if (codes_ && !res_ && e.act == 0) return FN<true, false, 0>(__VA_ARGS__);              \
    if (codes_ && !res_ && e.act == 1) return FN<true, false, 1>(__VA_ARGS__);              \
    if (codes_ && !res_ && e.act == 2) return FN<true, false, 2>(__VA_ARGS__);              \
    if (codes_ && res_ && e.act == 0) return FN<true, true, 0>(__VA_ARGS__);                \
    if (codes_ && res_ && e.act == 1) return FN<true, true, 1>(__VA_ARGS__);                \
    if (codes_ && res_ && e.act == 2) return FN<true, true, 2>(__VA_ARGS__);                \
    if (!codes_ && !res_ && e.act == 0) return FN<false, false, 0>(__VA_ARGS__);            \
    if (!codes_ && !res_ && e.act == 1) return FN<false, false, 1>(__VA_ARGS__);            \
    if (!codes_ && !res_ && e.act == 2) return FN<false, false, 2>(__VA_ARGS__);            \
    if (!codes_ && res_ && e.act == 0) return FN<false, true, 0>(__VA_ARGS__);              \
    if (!codes_ && res_ && e.act == 1) return FN<false, true, 1>(__VA_ARGS__);              \
    if (!codes_ && res_ && e.act == 2) return FN<false, true, 2>(__VA_ARGS__);              \
  } while (0)

}  // namespace pdquant::qk
