// Shared integer GEMM micro-kernels, requantisation epilogue and layout helpers (see qgemm.h).
// SIMD functions carry their own target attributes and are picked at run time (qsimd.h).
#include "cpu/qgemm.h"
#include "cpu/qsimd.h"

#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>


namespace pdquant::qk {

// ------------------------------------------------------------------------------------------
// ISA choice

namespace {
std::atomic<int> g_forced{-1};

Isa parse_isa(const std::string& name, const char* where) {
  if (name == "scalar") return Isa::kScalar;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "avx512vnni" || name == "vnni" || name == "avx512") return Isa::kAvx512Vnni;
  throw std::invalid_argument(std::string(where) + "=" + name +
                              " is not a CPU ISA level; allowed: scalar, avx2, avx512vnni "
                              "(or auto)");
}

Isa checked(Isa want, const char* where) {
  if (static_cast<int>(want) > static_cast<int>(best_isa())) {
    throw std::invalid_argument(std::string(where) + " asks for " + isa_name(want) +
                                " but this CPU only supports up to " + isa_name(best_isa()) +
                                "; allowed: scalar .. " + isa_name(best_isa()));
  }
  return want;
}
}  // namespace

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

void check_codes_input(const at::Tensor& x, const char* op) {
  if (x.scalar_type() != at::kByte)
    throw std::invalid_argument(std::string(op) + ": x must be uint8 activation codes, got " +
                                std::string(c10::toString(x.scalar_type())));
  if (!x.device().is_cpu())
    throw std::invalid_argument(std::string(op) + ": x must be a CPU tensor");
}

void check_requant_args(int64_t x_zp, int64_t act, double out_scale, int64_t out_bits,
                        int64_t out_zp, const at::Tensor& scale, const at::Tensor& bias,
                        int64_t O, const char* op) {
  auto check = [op](bool ok, const std::string& msg) {
    if (!ok) throw std::invalid_argument(std::string(op) + ": " + msg);
  };
  check(0 <= x_zp && x_zp <= 255, "x_zp must be a uint8 code 0..255, got " + std::to_string(x_zp));
  check(act >= 0 && act <= 2, "act must be 0 (none), 1 (ReLU) or 2 (ReLU6), got " +
                                  std::to_string(act));
  check(out_bits == 0 || (out_bits >= 2 && out_bits <= 8),
        "out_bits must be 0 (float32 output) or 2..8 (uint8 codes), got " +
            std::to_string(out_bits));
  if (out_bits > 0)
    check(std::isfinite(out_scale) && out_scale > 0,
          "out_scale must be finite and > 0 for code output, got " + std::to_string(out_scale));
  if (out_bits > 0)
    check(0 <= out_zp && out_zp <= (int64_t{1} << out_bits) - 1,
          "out_zp must be in 0.." + std::to_string((1 << out_bits) - 1) + " for out_bits = " +
              std::to_string(out_bits) + ", got " + std::to_string(out_zp));
  for (const auto& [t, name] : {std::pair{&scale, "scale"}, std::pair{&bias, "bias"}}) {
    check(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == O &&
              t->is_contiguous() && t->device().is_cpu(),
          std::string(name) + " must be a contiguous float32 CPU tensor [O = " +
              std::to_string(O) + "], got " + c10::toString(t->scalar_type()) + " " +
              shape_str(*t));
  }
}

void set_requant(Epilogue& e, int64_t x_zp, const at::Tensor& sumw, const at::Tensor& scale,
                 const at::Tensor& bias, int64_t act, double out_scale, int64_t out_zp,
                 int64_t out_bits, const at::Tensor& out) {
  e.x_zp = static_cast<int32_t>(x_zp);
  e.sumw = sumw.data_ptr<int32_t>();
  e.scale = scale.data_ptr<float>();
  e.bias = bias.data_ptr<float>();
  e.act = static_cast<int>(act);
  e.out_scale = static_cast<float>(out_scale);
  e.out_zp = static_cast<float>(out_zp);
  e.out_bits = static_cast<int>(out_bits);
  e.qmax = out_bits ? static_cast<float>((1 << out_bits) - 1) : 0.f;
  e.out = out.data_ptr();
}

void bind_residual(Epilogue& e, const std::optional<at::Tensor>& residual, const at::Tensor& out,
                   at::MemoryFormat fmt, double res_scale, int64_t res_zp, at::Tensor* keep,
                   const char* op) {
  if (!residual.has_value()) return;
  auto check = [op](bool ok, const std::string& msg) {
    if (!ok) throw std::invalid_argument(std::string(op) + ": " + msg);
  };
  const at::Tensor& r = *residual;
  const bool codes = r.scalar_type() == at::kByte;
  check((r.scalar_type() == at::kFloat || codes) && r.device().is_cpu(),
        "residual must be a float32 (values) or uint8 (codes) CPU tensor, got " +
            std::string(c10::toString(r.scalar_type())));
  check(r.sizes() == out.sizes(),
        "residual must have the output's shape " + shape_str(out) + ", got " + shape_str(r));
  if (codes) {
    check(std::isfinite(res_scale) && res_scale > 0,
          "uint8 residual codes need res_scale finite and > 0, got " + std::to_string(res_scale));
    check(0 <= res_zp && res_zp <= 255,
          "res_zp must be a uint8 code 0..255, got " + std::to_string(res_zp));
  }
  *keep = r.contiguous(fmt);
  if (codes) {
    e.residual_q = keep->data_ptr<uint8_t>();
    e.res_scale = static_cast<float>(res_scale);
    e.res_zp = static_cast<float>(res_zp);
  } else {
    e.residual = keep->data_ptr<float>();
  }
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512Vnni:
      return "avx512vnni";
  }
  return "?";
}

Isa best_isa() {
  static const Isa best = [] {
#ifdef PDQ_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni"))
      return Isa::kAvx512Vnni;
    if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
#endif
    return Isa::kScalar;
  }();
  return best;
}

Isa active_isa() {
  const int forced = g_forced.load(std::memory_order_relaxed);
  if (forced >= 0) return static_cast<Isa>(forced);
  const char* env = std::getenv("PDQUANT_CPU_ISA");
  if (env == nullptr || env[0] == '\0' || std::string(env) == "auto") return best_isa();
  return checked(parse_isa(env, "PDQUANT_CPU_ISA"), "PDQUANT_CPU_ISA");
}

void set_isa(const std::string& name) {
  if (name.empty() || name == "auto") {
    g_forced.store(-1);
    return;
  }
  g_forced.store(static_cast<int>(checked(parse_isa(name, "isa"), "set_isa")));
}

std::vector<int> superblocks(int64_t nblocks, bool allow4) {
  // Exactly 4 blocks (64 channels) with allow4: one 4-block superblock (6 rows per call), so
  // the pixels stream once instead of twice as 2 + 2.
  if (allow4 && nblocks == 4) return {4};
  std::vector<int> sizes;
  int64_t left = nblocks;
  while (left > 0) {
    // 4 -> 2+2 and 1 left after 3s -> borrow: ... 3, 2, 2 (a 1-block call has 8 accumulators).
    int take = left == 4 ? 2 : static_cast<int>(std::min<int64_t>(left, kStdJB));
    sizes.push_back(take);
    left -= take;
  }
  return sizes;
}

// ------------------------------------------------------------------------------------------
// helpers

// ------------------------------------------------------------------------------------------
// scalar micro-kernels (any CPU; also the reference structure of the SIMD ones)

static void uk_scalar(const UkArgs& g) {
  const int ncol = kBlock * g.jb;
  const int64_t kstride = 64 * g.jb;  // panel bytes per k-group
  for (int m = 0; m < g.mr; ++m) {
    int32_t* c = g.c + m * g.ldc;
    for (int o = 0; o < ncol; ++o) c[o] = 0;
    const int8_t* w = g.w;
    for (int t = 0; t < g.ntaps; ++t, w += g.wskip) {
      const uint8_t* a = g.a[m] + g.toff[t];
      for (int64_t k = 0; k < g.cgroups; ++k, w += kstride) {
        if (g.mode == KMode::kU8S8) {
          const int32_t a0 = a[4 * k], a1 = a[4 * k + 1], a2 = a[4 * k + 2], a3 = a[4 * k + 3];
          for (int o = 0; o < ncol; ++o) {
            const int8_t* wo = w + (o / kBlock) * 64 + (o % kBlock) * 4;
            c[o] += a0 * wo[0] + a1 * wo[1] + a2 * wo[2] + a3 * wo[3];
          }
        } else {
          int16_t a2[2];
          std::memcpy(a2, a + 4 * k, 4);
          for (int o = 0; o < ncol; ++o) {
            int16_t w2[2];
            std::memcpy(w2, w + (o / kBlock) * 64 + (o % kBlock) * 4, 4);
            c[o] += int32_t(a2[0]) * w2[0] + int32_t(a2[1]) * w2[1];
          }
        }
      }
    }
  }
}

static void ukp_scalar(const UkPackedArgs& g) {
  const int ncol = kBlock * g.jb;
  const int per = 8 / g.bits;
  const int mask = (1 << g.bits) - 1;
  for (int m = 0; m < g.mr; ++m) {
    int32_t* c = g.c + m * g.ldc;
    for (int o = 0; o < ncol; ++o) c[o] = 0;
    const uint8_t* w = g.w;
    for (int64_t k = 0; k < g.kgroups; k += per, w += 64 * g.jb) {
      for (int s = 0; s < per; ++s) {
        const uint8_t* a = g.a[m] + 4 * (k + s);
        for (int o = 0; o < ncol; ++o) {
          const uint8_t* wo = w + (o / kBlock) * 64 + (o % kBlock) * 4;
          int32_t sum = 0;
          for (int e = 0; e < 4; ++e) sum += int32_t(a[e]) * ((wo[e] >> (s * g.bits)) & mask);
          c[o] += sum;
        }
      }
    }
  }
}

#ifdef PDQ_X86
// ------------------------------------------------------------------------------------------
// AVX-512 VNNI: vpdpbusd (u8 x s8, 4 products per int32 lane) / vpdpwssd (s16 x s16, 2)
//
// Per k-group: jb 64-byte weight loads, mr 4-byte broadcasts of A, mr*jb dot instructions.
// At mr=8, jb=3: 24 vpdpbusd per 11 loads, so the one-per-cycle vpdpbusd port is the limit
// (KERNEL_ANCHORS.md 3.1: 1 zmm vpdpbusd per cycle per Zen 4 core, 2-3 loads per cycle).

template <int MR, int JB, bool S16>
PDQ_VNNI static void uk_vnni_t(const UkArgs& g) {
  __m512i acc[MR][JB];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < JB; ++j) acc[m][j] = _mm512_setzero_si512();
  const int8_t* w = g.w;
  for (int t = 0; t < g.ntaps; ++t, w += g.wskip) {
    const uint8_t* a[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) a[m] = g.a[m] + g.toff[t];
    for (int64_t k = 0; k < g.cgroups; ++k) {
      __m512i wv[JB];
#pragma GCC unroll 4
      for (int j = 0; j < JB; ++j) wv[j] = _mm512_loadu_si512(w + 64 * j);
      w += 64 * JB;
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m512i b = _mm512_set1_epi32(load_i32(a[m] + 4 * k));
#pragma GCC unroll 4
        for (int j = 0; j < JB; ++j)
          acc[m][j] = S16 ? _mm512_dpwssd_epi32(acc[m][j], b, wv[j])
                          : _mm512_dpbusd_epi32(acc[m][j], b, wv[j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < JB; ++j) _mm512_storeu_si512(g.c + m * g.ldc + 16 * j, acc[m][j]);
}

template <int MR, int JB, int BITS>
PDQ_VNNI static void ukp_vnni_t(const UkPackedArgs& g) {
  constexpr int PER = 8 / BITS;
  __m512i acc[MR][JB];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 3
    for (int j = 0; j < JB; ++j) acc[m][j] = _mm512_setzero_si512();
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << BITS) - 1));
  const uint8_t* w = g.w;
  for (int64_t k = 0; k < g.kgroups; k += PER, w += 64 * JB) {
    __m512i pk[JB];
#pragma GCC unroll 3
    for (int j = 0; j < JB; ++j) pk[j] = _mm512_loadu_si512(w + 64 * j);
#pragma GCC unroll 4
    for (int s = 0; s < PER; ++s) {
      __m512i wv[JB];
#pragma GCC unroll 3
      for (int j = 0; j < JB; ++j)
        wv[j] = _mm512_and_si512(s == 0 ? pk[j] : _mm512_srli_epi16(pk[j], s * BITS), mask);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m512i b = _mm512_set1_epi32(load_i32(g.a[m] + 4 * (k + s)));
#pragma GCC unroll 3
        for (int j = 0; j < JB; ++j) acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], b, wv[j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 3
    for (int j = 0; j < JB; ++j) _mm512_storeu_si512(g.c + m * g.ldc + 16 * j, acc[m][j]);
}

// ------------------------------------------------------------------------------------------
// AVX2: vpmaddubsw (u8 x s8 -> saturating int16 pairs) + vpmaddwd(ones) (-> int32 quads).
// A pair sum saturates only if |x0*w0 + x1*w1| > 32767, impossible for max|w| <= 64 (2*255*64
// = 32640). For larger weights (`wide`) x is split into nibbles, x = 16*xh + xl, each product
// pair is then <= 2*15*128 = 3840, and the two halves are recombined exactly with vpmaddwd by 16
// and by 1. s16: vpmaddwd directly (int16 x int16 pairs into int32, exact).
// 16 ymm registers: a 4-row x 1-block (2 ymm) tile, 8 accumulators.

template <int MODE>  // 0: u8s8, 1: u8s8 wide, 2: s16
PDQ_AVX2 static void uk_avx2_tile(const UkArgs& g, int m0, int j) {
  __m256i acc[4][2];
#pragma GCC unroll 4
  for (int m = 0; m < 4; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i sixteen = _mm256_set1_epi16(16);
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  const int64_t kstride = 64 * g.jb;
  const int8_t* w = g.w + 64 * j;
  for (int t = 0; t < g.ntaps; ++t, w += g.wskip) {
    const uint8_t* a[4];
#pragma GCC unroll 4
    for (int m = 0; m < 4; ++m) a[m] = g.a[m0 + m] + g.toff[t];
    for (int64_t k = 0; k < g.cgroups; ++k, w += kstride) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
#pragma GCC unroll 4
      for (int m = 0; m < 4; ++m) {
        const __m256i b = _mm256_set1_epi32(load_i32(a[m] + 4 * k));
        if constexpr (MODE == 0) {
          acc[m][0] = _mm256_add_epi32(acc[m][0],
                                       _mm256_madd_epi16(_mm256_maddubs_epi16(b, w0), ones));
          acc[m][1] = _mm256_add_epi32(acc[m][1],
                                       _mm256_madd_epi16(_mm256_maddubs_epi16(b, w1), ones));
        } else if constexpr (MODE == 1) {
          const __m256i bl = _mm256_and_si256(b, lo4);
          const __m256i bh = _mm256_and_si256(_mm256_srli_epi16(b, 4), lo4);
          acc[m][0] = _mm256_add_epi32(
              acc[m][0],
              _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(bl, w0), ones),
                               _mm256_madd_epi16(_mm256_maddubs_epi16(bh, w0), sixteen)));
          acc[m][1] = _mm256_add_epi32(
              acc[m][1],
              _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(bl, w1), ones),
                               _mm256_madd_epi16(_mm256_maddubs_epi16(bh, w1), sixteen)));
        } else {
          acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(b, w0));
          acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(b, w1));
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < 4; ++m) {
    int32_t* c = g.c + (m0 + m) * g.ldc + 16 * j;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c), acc[m][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 8), acc[m][1]);
  }
}

template <int MODE>
static void uk_avx2(const UkArgs& g) {
  // Rows beyond mr repeat row 0 (valid memory); compute whole quads.
  UkArgs h = g;
  for (int m = g.mr; m < kMR; ++m) h.a[m] = g.a[0];
  for (int m0 = 0; m0 < g.mr; m0 += 4)
    for (int j = 0; j < g.jb; ++j) uk_avx2_tile<MODE>(h, m0, j);
}

template <int BITS>
PDQ_AVX2 static void ukp_avx2_tile(const UkPackedArgs& g, int m0, int j) {
  constexpr int PER = 8 / BITS;
  __m256i acc[4][2];
#pragma GCC unroll 4
  for (int m = 0; m < 4; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << BITS) - 1));
  const uint8_t* w = g.w + 64 * j;
  for (int64_t k = 0; k < g.kgroups; k += PER, w += 64 * g.jb) {
    const __m256i p0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i p1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
#pragma GCC unroll 4
    for (int s = 0; s < PER; ++s) {
      const __m256i w0 = _mm256_and_si256(_mm256_srli_epi16(p0, s * BITS), mask);
      const __m256i w1 = _mm256_and_si256(_mm256_srli_epi16(p1, s * BITS), mask);
#pragma GCC unroll 4
      for (int m = 0; m < 4; ++m) {
        // u <= 15, x <= 255: pair sums <= 7650, no saturation.
        const __m256i b = _mm256_set1_epi32(load_i32(g.a[m0 + m] + 4 * (k + s)));
        acc[m][0] = _mm256_add_epi32(acc[m][0],
                                     _mm256_madd_epi16(_mm256_maddubs_epi16(b, w0), ones));
        acc[m][1] = _mm256_add_epi32(acc[m][1],
                                     _mm256_madd_epi16(_mm256_maddubs_epi16(b, w1), ones));
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < 4; ++m) {
    int32_t* c = g.c + (m0 + m) * g.ldc + 16 * j;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c), acc[m][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 8), acc[m][1]);
  }
}

template <int BITS>
static void ukp_avx2(const UkPackedArgs& g) {
  UkPackedArgs h = g;
  for (int m = g.mr; m < kMR; ++m) h.a[m] = g.a[0];
  for (int m0 = 0; m0 < g.mr; m0 += 4)
    for (int j = 0; j < g.jb; ++j) ukp_avx2_tile<BITS>(h, m0, j);
}

// Dispatch to the <MR, JB> instantiation.
template <bool S16>
static void uk_vnni(const UkArgs& g) {
#define PDQ_UK_CASE(MR_, JB_) \
  if (mr == MR_ && g.jb == JB_) return uk_vnni_t<MR_, JB_, S16>(g);
  if (g.jb == 4) {  // at most kMR4 rows
    const int mr = g.mr <= 1 ? 1 : g.mr <= 2 ? 2 : g.mr <= 4 ? 4 : 6;
    PDQ_UK_CASE(6, 4) PDQ_UK_CASE(4, 4) PDQ_UK_CASE(2, 4) PDQ_UK_CASE(1, 4)
  }
  const int mr = g.mr <= 1 ? 1 : g.mr <= 2 ? 2 : g.mr <= 4 ? 4 : 8;
  PDQ_UK_CASE(8, 3) PDQ_UK_CASE(8, 2) PDQ_UK_CASE(8, 1)
  PDQ_UK_CASE(4, 3) PDQ_UK_CASE(4, 2) PDQ_UK_CASE(4, 1)
  PDQ_UK_CASE(2, 3) PDQ_UK_CASE(2, 2) PDQ_UK_CASE(2, 1)
  PDQ_UK_CASE(1, 3) PDQ_UK_CASE(1, 2) PDQ_UK_CASE(1, 1)
#undef PDQ_UK_CASE
  throw std::logic_error("uk_vnni: bad jb");
}

template <int BITS>
static void ukp_vnni(const UkPackedArgs& g) {
#define PDQ_UK_CASE(MR_, JB_) \
  if (mr == MR_ && g.jb == JB_) return ukp_vnni_t<MR_, JB_, BITS>(g);
  const int mr = g.mr <= 1 ? 1 : g.mr <= 2 ? 2 : g.mr <= 4 ? 4 : 8;
  PDQ_UK_CASE(8, 3) PDQ_UK_CASE(8, 2) PDQ_UK_CASE(8, 1)
  PDQ_UK_CASE(4, 3) PDQ_UK_CASE(4, 2) PDQ_UK_CASE(4, 1)
  PDQ_UK_CASE(2, 3) PDQ_UK_CASE(2, 2) PDQ_UK_CASE(2, 1)
  PDQ_UK_CASE(1, 3) PDQ_UK_CASE(1, 2) PDQ_UK_CASE(1, 1)
#undef PDQ_UK_CASE
  throw std::logic_error("ukp_vnni: bad jb");
}
#endif  // PDQ_X86

void ukernel(Isa isa, const UkArgs& g) {
#ifdef PDQ_X86
  if (isa == Isa::kAvx512Vnni) return g.mode == KMode::kS16 ? uk_vnni<true>(g) : uk_vnni<false>(g);
  if (isa == Isa::kAvx2) {
    if (g.mode == KMode::kS16) return uk_avx2<2>(g);
    return g.wide ? uk_avx2<1>(g) : uk_avx2<0>(g);
  }
#endif
  (void)isa;
  uk_scalar(g);
}

void ukernel_packed(Isa isa, const UkPackedArgs& g) {
#ifdef PDQ_X86
  if (isa == Isa::kAvx512Vnni) return g.bits == 2 ? ukp_vnni<2>(g) : ukp_vnni<4>(g);
  if (isa == Isa::kAvx2) return g.bits == 2 ? ukp_avx2<2>(g) : ukp_avx2<4>(g);
#endif
  (void)isa;
  ukp_scalar(g);
}

// ------------------------------------------------------------------------------------------
// epilogue

// round_half_even for a float, without libm (baseline x86-64 has no roundss: nearbyint is a
// call): |v| < 2^23 plus 2^23 lands where the spacing of floats is 1, so the addition rounds
// to an integer in the current (nearest-even) mode; larger |v| are integers already. RNE is
// symmetric, so the sign is put back after rounding |v|.
static inline float round_half_even(float v) {
  const float a = std::fabs(v);
  if (!(a < 8388608.f)) return v;
  float t = opaque(a + 8388608.f);
  t = t - 8388608.f;
  return std::copysign(t, v);
}

// One element of the epilogue (scalar reference structure; used by the AVX2 / scalar levels).
template <bool CODES, bool RES, int ACT>
static inline void requant_one(const Epilogue& e, int32_t raw, int64_t o, int64_t row,
                               int64_t idx) {
  int32_t acc = raw - e.x_zp * e.sumw[o];
  if (e.off != nullptr) acc -= e.off[o] * e.sx[row];
  float y = opaque(static_cast<float>(acc) * e.scale[o]);
  y = y + e.bias[o];
  if constexpr (RES) {
    float r;
    if (e.residual != nullptr) {
      r = e.residual[idx];
    } else {
      r = opaque((static_cast<float>(e.residual_q[idx]) - e.res_zp) * e.res_scale);
    }
    y = y + r;
  }
  if constexpr (ACT == 1) y = std::max(y, 0.f);
  if constexpr (ACT == 2) y = std::min(std::max(y, 0.f), 6.f);
  if constexpr (CODES) {
    float q = round_half_even(y / e.out_scale) + e.out_zp;
    q = std::min(std::max(q, 0.f), e.qmax);
    static_cast<uint8_t*>(e.out)[idx] = static_cast<uint8_t>(static_cast<int32_t>(q));
  } else {
    static_cast<float*>(e.out)[idx] = y;
  }
}

template <bool CODES, bool RES, int ACT>
static void epilogue_scalar_t(const Epilogue& e, const int32_t* c, int64_t ldc,
                              const TileDst& d) {
  for (int r = 0; r < d.rows; ++r)
    for (int j = 0; j < d.cols; ++j)
      requant_one<CODES, RES, ACT>(e, c[r * ldc + j], d.o0 + j, d.sx_row0 + r,
                                   row_at(d, r) + j * d.ch_stride);
}

template <bool CODES, bool RES, int ACT>
static void epilogue_cols_scalar_t(const Epilogue& e, const int32_t* c, int64_t ldc, int64_t o0,
                                   int nch, int64_t base, int64_t ch_stride, int npix) {
  for (int i = 0; i < nch; ++i)
    for (int px = 0; px < npix; ++px)
      requant_one<CODES, RES, ACT>(e, c[i * ldc + px], o0 + i, 0, base + i * ch_stride + px);
}

static void epilogue_scalar(const Epilogue& e, const int32_t* c, int64_t ldc, const TileDst& d) {
  PDQ_EPI_DISPATCH(epilogue_scalar_t, e, c, ldc, d);
}

#ifdef PDQ_X86
// In-register transpose of 16 rows of 16 int32 (rows[i] = row i) into columns.
PDQ_VNNI static inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // r[4i + q] now holds, in each 128-bit lane L, rows 4i..4i+3 of column 4L + q.
  for (int i = 0; i < 2; ++i)
    for (int q = 0; q < 4; ++q) {
      t[8 * i + q] = _mm512_shuffle_i32x4(r[8 * i + q], r[8 * i + 4 + q], 0x88);
      t[8 * i + 4 + q] = _mm512_shuffle_i32x4(r[8 * i + q], r[8 * i + 4 + q], 0xDD);
    }
  // t[8i + q]: lanes = (rows 8i..8i+3 col q, rows 8i+4.. col q, rows 8i.. col 8+q, rows 8i+4..
  // col 8+q); t[8i+4+q]: the same for columns 4+q and 12+q.
  for (int q = 0; q < 4; ++q) {
    r[q] = _mm512_shuffle_i32x4(t[q], t[8 + q], 0x88);
    r[q + 8] = _mm512_shuffle_i32x4(t[q], t[8 + q], 0xDD);
    r[q + 4] = _mm512_shuffle_i32x4(t[4 + q], t[12 + q], 0x88);
    r[q + 12] = _mm512_shuffle_i32x4(t[4 + q], t[12 + q], 0xDD);
  }
}

// Vectors along pixels (NCHW): r[i] holds channel o0 + i for up to 16 consecutive pixels
// (mask k), stored at base + i * ch_stride. Four channels at a time for narrow4.
template <bool CODES, bool RES, int ACT>
PDQ_VNNI_INLINE void cols_vnni_t(const Epilogue& e, const __m512i* r, int n, int64_t o0,
                                 int64_t base0, int64_t ch_stride, __mmask16 k, __m512i sxv) {
  const QOut qo = qout(e);
  for (int i0 = 0; i0 < n; i0 += 4) {
    const int nv = std::min(4, n - i0);
    __m512 y[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const int i = i0 + (q < nv ? q : nv - 1);
      const int64_t o = o0 + i;
      __m512i v = _mm512_sub_epi32(r[i], _mm512_set1_epi32(e.x_zp * e.sumw[o]));
      if (e.off) v = _mm512_sub_epi32(v, _mm512_mullo_epi32(_mm512_set1_epi32(e.off[o]), sxv));
      y[q] = yvec<RES, ACT>(v, _mm512_set1_ps(e.scale[o]), _mm512_set1_ps(e.bias[o]), e,
                            base0 + i * ch_stride, k);
    }
    const int64_t base = base0 + i0 * ch_stride;
    if constexpr (CODES) {
      uint8_t* outb = static_cast<uint8_t*>(e.out) + base;
      const __m512i b = narrow4(qcode(y[0], qo), qcode(y[1], qo), qcode(y[2], qo), qcode(y[3], qo));
      store_lanes(outb, ch_stride, b, nv, k);
    } else {
      float* outf = static_cast<float*>(e.out) + base;
      for (int q = 0; q < nv; ++q) store_f32(outf + q * ch_stride, y[q], k);
    }
  }
}

// The AVX-512 epilogue, specialised on the flags that change the per-vector work.
// NHWC / linear (ch_stride 1): vectors along channels, per-channel parameters are vectors.
// NCHW (row_stride 1): each 16 x 16 block is transposed so that vectors run along pixels.
// Rows/channels are handled four vectors at a time (for narrow4); a short group repeats its
// last vector and stores only the valid ones.
template <bool CODES, bool RES, int ACT>
PDQ_VNNI static void epilogue_vnni_t(const Epilogue& e, const int32_t* c, int64_t ldc,
                                     const TileDst& d) {
  const QOut qo = qout(e);
  float* outf = static_cast<float*>(e.out);
  uint8_t* outb = static_cast<uint8_t*>(e.out);
  if (d.ch_stride == 1) {
    for (int j0 = 0; j0 < d.cols; j0 += 16) {
      const int n = std::min(16, d.cols - j0);
      const __mmask16 k = n == 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
      const int64_t o = d.o0 + j0;
      const __m512i zs =
          _mm512_mullo_epi32(_mm512_set1_epi32(e.x_zp), _mm512_maskz_loadu_epi32(k, e.sumw + o));
      const __m512 sc = _mm512_maskz_loadu_ps(k, e.scale + o);
      const __m512 bi = _mm512_maskz_loadu_ps(k, e.bias + o);
      const __m512i of = e.off ? _mm512_maskz_loadu_epi32(k, e.off + o) : _mm512_setzero_si512();
      for (int r0 = 0; r0 < d.rows; r0 += 4) {
        const int nv = std::min(4, d.rows - r0);
        __m512 y[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const int r = r0 + (i < nv ? i : nv - 1);
          __m512i v = _mm512_sub_epi32(_mm512_loadu_si512(c + r * ldc + j0), zs);
          if (e.off)
            v = _mm512_sub_epi32(v,
                                 _mm512_mullo_epi32(of, _mm512_set1_epi32(e.sx[d.sx_row0 + r])));
          y[i] = yvec<RES, ACT>(v, sc, bi, e, row_at(d, r) + j0, k);
        }
        if constexpr (CODES) {
          const __m512i b =
              narrow4(qcode(y[0], qo), qcode(y[1], qo), qcode(y[2], qo), qcode(y[3], qo));
          if (d.row_off != nullptr) {
            const __m128i lane[4] = {_mm512_castsi512_si128(b),
                                     opaque(_mm512_extracti32x4_epi32(b, 1)),
                                     opaque(_mm512_extracti32x4_epi32(b, 2)),
                                     opaque(_mm512_extracti32x4_epi32(b, 3))};
            for (int i = 0; i < nv; ++i) store_lane(outb + d.row_off[r0 + i] + j0, lane[i], k);
          } else {
            uint8_t* p = outb + d.base + r0 * d.row_stride + j0;
            if (nv == 4 && k == 0xFFFF && d.row_stride == 16) {
              _mm512_storeu_si512(p, b);  // 16-channel rows: four rows are 64 contiguous bytes
            } else {
              store_lanes(p, d.row_stride, b, nv, k);
            }
          }
        } else {
          for (int i = 0; i < nv; ++i) store_f32(outf + row_at(d, r0 + i) + j0, y[i], k);
        }
      }
    }
    return;
  }
  const __mmask16 k = d.rows == 16 ? 0xFFFF : static_cast<__mmask16>((1u << d.rows) - 1);
  const __m512i sxv =
      e.off ? _mm512_maskz_loadu_epi32(k, e.sx + d.sx_row0) : _mm512_setzero_si512();
  for (int j0 = 0; j0 < d.cols; j0 += 16) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i)
      r[i] = i < d.rows ? _mm512_loadu_si512(c + i * ldc + j0) : _mm512_setzero_si512();
    transpose16(r);
    cols_vnni_t<CODES, RES, ACT>(e, r, std::min(16, d.cols - j0), d.o0 + j0,
                                 d.base + j0 * d.ch_stride, d.ch_stride, k, sxv);
  }
}

template <bool CODES, bool RES, int ACT>
PDQ_VNNI static void epilogue_cols_vnni_t(const Epilogue& e, const int32_t* c, int64_t ldc,
                                          int64_t o0, int nch, int64_t base, int64_t ch_stride,
                                          int npix) {
  const __mmask16 k = npix >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << npix) - 1);
  for (int i0 = 0; i0 < nch; i0 += 16) {
    __m512i r[16];
    const int n = std::min(16, nch - i0);
    for (int i = 0; i < n; ++i) r[i] = _mm512_loadu_si512(c + (i0 + i) * ldc);
    cols_vnni_t<CODES, RES, ACT>(e, r, n, o0 + i0, base + i0 * ch_stride, ch_stride, k,
                                 _mm512_setzero_si512());
  }
}


static void epilogue_vnni(const Epilogue& e, const int32_t* c, int64_t ldc, const TileDst& d) {
  if (d.ch_stride != 1 && (d.row_stride != 1 || d.row_off != nullptr))
    return epilogue_scalar(e, c, ldc, d);
  PDQ_EPI_DISPATCH(epilogue_vnni_t, e, c, ldc, d);
}

static void epilogue_cols_vnni(const Epilogue& e, const int32_t* c, int64_t ldc, int64_t o0,
                               int nch, int64_t base, int64_t ch_stride, int npix) {
  PDQ_EPI_DISPATCH(epilogue_cols_vnni_t, e, c, ldc, o0, nch, base, ch_stride, npix);
}
#endif  // PDQ_X86

void epilogue_cols(Isa isa, const Epilogue& e, const int32_t* c, int64_t ldc, int64_t o0,
                   int nch, int64_t base, int64_t ch_stride, int npix) {
#ifdef PDQ_X86
  if (isa == Isa::kAvx512Vnni) return epilogue_cols_vnni(e, c, ldc, o0, nch, base, ch_stride, npix);
#endif
  (void)isa;
  PDQ_EPI_DISPATCH(epilogue_cols_scalar_t, e, c, ldc, o0, nch, base, ch_stride, npix);
}

bool has_vbmi() {
#ifdef PDQ_X86
  static const bool yes = [] {
    __builtin_cpu_init();
    return static_cast<bool>(__builtin_cpu_supports("avx512vbmi"));
  }();
  return yes;
#else
  return false;
#endif
}

void epilogue(Isa isa, const Epilogue& e, const int32_t* c, int64_t ldc, const TileDst& d) {
#ifdef PDQ_X86
  if (isa == Isa::kAvx512Vnni) return epilogue_vnni(e, c, ldc, d);
#endif
  (void)isa;
  epilogue_scalar(e, c, ldc, d);
}

// ------------------------------------------------------------------------------------------
// NCHW / NHWC -> zero-point-padded NHWC

#ifdef PDQ_X86
// 16 rows of 16 bytes (row stride ss) -> 16 rows of 16 bytes (stride ds), transposed. SSE2.
static inline void transpose16x16_u8(const uint8_t* s, int64_t ss, uint8_t* d, int64_t ds) {
  __m128i a[16], b[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i * ss));
  for (int i = 0; i < 8; ++i) {  // b[i]: rows 2i,2i+1 cols 0-7; b[8+i]: cols 8-15
    b[i] = _mm_unpacklo_epi8(a[2 * i], a[2 * i + 1]);
    b[i + 8] = _mm_unpackhi_epi8(a[2 * i], a[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h)  // a[8h + 4*half + i]: rows 4i..4i+3, cols 8h + 4*half .. +3
    for (int i = 0; i < 4; ++i) {
      a[8 * h + i] = _mm_unpacklo_epi16(b[8 * h + 2 * i], b[8 * h + 2 * i + 1]);
      a[8 * h + 4 + i] = _mm_unpackhi_epi16(b[8 * h + 2 * i], b[8 * h + 2 * i + 1]);
    }
  for (int q = 0; q < 4; ++q)  // b[4q + 2i + x]: rows 8i..8i+7, cols 4q + 2x, 4q + 2x + 1
    for (int i = 0; i < 2; ++i) {
      b[4 * q + 2 * i] = _mm_unpacklo_epi32(a[4 * q + 2 * i], a[4 * q + 2 * i + 1]);
      b[4 * q + 2 * i + 1] = _mm_unpackhi_epi32(a[4 * q + 2 * i], a[4 * q + 2 * i + 1]);
    }
  for (int q = 0; q < 4; ++q)
    for (int x = 0; x < 2; ++x) {
      const __m128i lo = b[4 * q + x], hi = b[4 * q + 2 + x];
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + (4 * q + 2 * x) * ds),
                       _mm_unpacklo_epi64(lo, hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + (4 * q + 2 * x + 1) * ds),
                       _mm_unpackhi_epi64(lo, hi));
    }
}
#endif

void pad_to_nhwc(const uint8_t* x, bool x_nhwc, int64_t C, int64_t H, int64_t W, int64_t ph,
                 int64_t pw, int64_t cg, int64_t cpg, int64_t ct, uint8_t x_zp, bool s16,
                 void* dst) {
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  const bool identity = cg == cpg || cg == C;  // slot(c) == c
  if (s16) {
    int16_t* d = static_cast<int16_t*>(dst);
    std::fill(d, d + Hp * Wp * ct, static_cast<int16_t>(x_zp));
    for (int64_t c = 0; c < C; ++c) {
      const int64_t slot = (c / cg) * cpg + c % cg;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w)
          d[((h + ph) * Wp + w + pw) * ct + slot] =
              x_nhwc ? x[(h * W + w) * C + c] : x[(c * H + h) * W + w];
    }
    return;
  }
  uint8_t* d = static_cast<uint8_t*>(dst);
  if (identity && ct == C) {  // every interior byte is written below: fill only the border
    std::memset(d, x_zp, ph * Wp * ct);
    std::memset(d + (ph + H) * Wp * ct, x_zp, ph * Wp * ct);
    for (int64_t h = ph; h < ph + H; ++h) {
      std::memset(d + h * Wp * ct, x_zp, pw * ct);
      std::memset(d + (h * Wp + pw + W) * ct, x_zp, pw * ct);
    }
  } else {
    std::memset(d, x_zp, Hp * Wp * ct);
  }
  if (x_nhwc) {
    if (ct == C && identity) {  // whole rows are contiguous on both sides
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(d + ((h + ph) * Wp + pw) * ct, x + h * W * C, W * C);
      return;
    }
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const uint8_t* s = x + (h * W + w) * C;
        uint8_t* o = d + ((h + ph) * Wp + w + pw) * ct;
        if (identity) {
          std::memcpy(o, s, C);
        } else {
          for (int64_t c = 0; c < C; ++c) o[(c / cg) * cpg + c % cg] = s[c];
        }
      }
    return;
  }
  const int64_t HW = H * W;
  if (!identity) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t slot = (c / cg) * cpg + c % cg;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w)
          d[((h + ph) * Wp + w + pw) * ct + slot] = x[c * HW + h * W + w];
    }
    return;
  }
  for (int64_t h = 0; h < H; ++h) {
    uint8_t* row = d + ((h + ph) * Wp + pw) * ct;
    int64_t c0 = 0;
#ifdef PDQ_X86
    for (; c0 + 16 <= C; c0 += 16) {
      int64_t w0 = 0;
      for (; w0 + 16 <= W; w0 += 16)
        transpose16x16_u8(x + c0 * HW + h * W + w0, HW, row + w0 * ct + c0, ct);
      for (; w0 < W; ++w0)
        for (int64_t c = c0; c < c0 + 16; ++c) row[w0 * ct + c] = x[c * HW + h * W + w0];
    }
#endif
    for (int64_t c = c0; c < C; ++c) {
      const uint8_t* s = x + c * HW + h * W;
      for (int64_t w = 0; w < W; ++w) row[w * ct + c] = s[w];
    }
  }
}

// ------------------------------------------------------------------------------------------
// debug entry points: which ISA runs, and forcing one (tests compare paths)

namespace {
void register_isa(pybind11::module_& m) {
  m.def(
      "qkernels_isa_cpu", [] { return std::string(isa_name(active_isa())); },
      "ISA level the packed low-bit CPU kernels use now: avx512vnni, avx2 or scalar "
      "(set_isa override, else $PDQUANT_CPU_ISA, else the best this CPU has)");
  m.def(
      "qkernels_best_isa_cpu", [] { return std::string(isa_name(best_isa())); },
      "best ISA level this CPU supports for the packed low-bit kernels");
  m.def(
      "qkernels_set_isa_cpu", [](const std::string& name) { set_isa(name); },
      pybind11::arg("name"),
      "force the ISA level of the packed low-bit CPU kernels: scalar, avx2, avx512vnni; '' or "
      "'auto' goes back to $PDQUANT_CPU_ISA / the best. Raises if this CPU lacks it.");
}
}  // namespace

}  // namespace pdquant::qk

#include "registry.h"
PDQ_REGISTER(pdquant::qk::register_isa);
