// qconv2d_cpu: packed low-bit 2-D convolution with int32 accumulation and fused requantisation.
//
// Contract (pdquant_fast/ops/library.py, deployment section):
//   acc[n,o,p] = sum over the receptive field of (x - x_zp) * w        int32, exact
//   y = float(acc) * scale[o] + bias[o]; (+ residual); act; float32 out or uint8 codes
// residual: float32 values, or uint8 codes read as (float(q) - res_zp) * res_scale.
// padding = x_zp in code space. x: uint8 [N,C,H,W]; w: int8 (or int16 for 8-bit weights)
// offsets w_code - w_zp, [O, C/groups, KH, KW].
//
// Entry points (pdquant_fast._C):
//   qconv2d_cpu(x, x_zp, w, scale, bias, stride, padding, groups, act, residual, out_scale,
//               out_zp, out_bits, res_scale = 0, res_zp = 0)
//       w an int8/int16 tensor: prepacks on every call (correct, slower);
//       w a QConvPackedCpu from qconv2d_prepack_cpu: uses it (what the packed runtime does)
//   qconv2d_prepack_cpu(w, groups) -> QConvPackedCpu   once, at load time
//   qconv2d_packed_cpu(...)                            the same as qconv2d_cpu with a blob
//
// Layout: x is NCHW-contiguous, or channels_last (torch.channels_last, still shape [N,C,H,W]);
// the output takes x's memory format (channels_last in, channels_last out: no conversions).
//
// How it runs (AVX-512 VNNI; the AVX2 and scalar levels run the NHWC GEMM and the NHWC depthwise
// kernel with the same panels):
//   * NCHW-native implicit GEMM (NCHW x, one group, int8 weights, stride 1; 1x1 convs unless
//     the input is deep and the plane small, KxK from 32 output columns): 4 input channels
//     interleaved per dword over the padded plane, 16 consecutive outputs per zmm, weights
//     broadcast; writes NCHW rows directly (nchw_gemm_t).
//   * NHWC implicit GEMM (everything else with C/groups > 1): a zero-point-padded NHWC copy of
//     x (skipped for channels_last x with no padding and C % 4 == 0; made image by image into a
//     per-thread buffer, just before that image's tiles, when the tiles run image after image:
//     one weight panel covers every output channel, or the panels are small enough for
//     pixel-major order, every superblock of a tile before the next tile). Rows = 16 output
//     pixels (two 8-row micro-kernel calls, or 6 + 6 + 4 for a 64-channel superblock),
//     columns = a superblock of up to 48 (or exactly 64) output channels, reduction = taps x
//     channel groups, weights prepacked into [kgroup][16 ch][4] panels (qgemm.h). Any kernel
//     size and stride. Output rows whose top or bottom kernel rows fall in the vertical
//     padding skip those kernel rows, and where it pays (tiling_cost in run()) the left and
//     right columns skip their kernel columns too (tiles stay within such a block of pixels;
//     the epilogue's zero-point term uses the sum of the taps that ran). The epilogue writes
//     NHWC directly or NCHW through 16x16 in-register transposes.
//   * depthwise (groups == C == O): NCHW x with VBMI: planar kernel (one vpermb + vpdpbusd per
//     kernel row and 4 taps for 16 outputs); otherwise vectors along 16 channels of an NHWC
//     copy, tap pairs with vpdpwssd (AVX2/scalar: int32 multiply-add per tap).
//   * 8-bit weights (offsets beyond int8) whose per-channel range spans <= 256 values, one
//     group: shifted into int8 at prepack (w - s[o]), the u8 x s8 NHWC GEMM runs, and the
//     epilogue adds s[o] * (receptive-field sum of x - x_zp * K) back through its off/sx terms
//     (exact); other int16 weights run the int16 kernels (vpdpwssd), about 2x slower.
//   * every epilogue requantises in registers, the contract's formula op for op (qgemm.h).
// Reads x once (plus one re-laid copy), the weights once per tile (from L1/L2), writes the
// output once (float32: 4 bytes, codes: 1 byte per element).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cpu/qgemm.h"
#include "cpu/qsimd.h"
#include "registry.h"

namespace pdquant::qk {
namespace {

// Pixel-major tile order (run(), NHWC implicit GEMM) for one-group weight panels up to this size
// in bytes: every superblock's panel stays in L2 (1 MB per core on Zen 4) next to the image.
constexpr int64_t kPixMajorPanel = 256 * 1024;


// Weights prepacked for this file's kernels (the blob qconv2d_prepack_cpu returns).
struct PackedConv {
  int64_t O = 0, Cg = 0, KH = 0, KW = 0, groups = 1, Og = 0;
  bool depthwise = false;
  KMode mode = KMode::kU8S8;
  int64_t cpg = 0;      // padded channels per group in the NHWC activation buffer (elements)
  int64_t cgroups = 0;  // 4-byte groups per tap (dense: per kernel row)
  // Dense kernel rows (one group, int8 panel, Cg < 4, KW > 1: the 3-channel stems): the buffer
  // holds exactly Cg channels per pixel and the panel orders k = (kw, c) densely within each
  // kernel row, ceil(KW * Cg / 4) groups of 4 bytes per row instead of KW groups of 4 (ResNet's
  // 7x7 stem: 6 instead of 7; the 3 bytes after a row's last tap meet zero weights).
  bool dense = false;
  // Im2col (dense stems where it saves k-groups: 7x7x3 = 147 bytes are 37 groups instead of the
  // 42 of dense rows, 3x3x3 = 27 bytes 7 instead of 9): the panel orders k = (kh, kw, c) densely
  // over the whole window as one tap of cgroups groups, and run() copies each tile pixel's KH
  // row segments (KW * Cg bytes each) into a per-tile buffer the micro-kernel reads instead.
  bool im2col = false;
  std::vector<int> sb;  // superblock sizes (blocks of 16 channels), the same for every group
  std::vector<int64_t> sb_block0;  // first block of each superblock
  std::vector<int64_t> sb_off;     // byte offset of each superblock in a group's panel
  int64_t group_bytes = 0;
  int32_t max_abs_w = 0;
  at::Tensor panel;  // int8 bytes: [groups][superblock panels]
  at::Tensor sumw;   // int32 [O]: sum of w over C/groups x KH x KW (of the shifted w, below)
  at::Tensor tapsumw;  // int32 [KH][KW][O]: the same sum per kernel tap (edges, run())
  // Shifted int8 mode (one group, weights beyond int8 whose per-channel offsets span at most
  // 256 values: 8-bit weights, offsets w_code - w_zp in [-zp, 255 - zp]): the panel holds
  // w - s[o] in [-128, 127] and the epilogue adds s[o] * (sum of the receptive field's
  // x - x_zp * K) back through its off/sx terms (off = -s). The u8 x s8 kernels then run
  // instead of the int16 ones.
  at::Tensor off;    // int32 [O] = -s[o], or undefined
  at::Tensor dw;     // depthwise: int32 [KH*KW][round_up(C, 16)]
  at::Tensor dw2;    // depthwise: int16 pairs (w[2i][c], w[2i+1][c]) [ceil(KH*KW/2)][...] as int32
  at::Tensor dwq;    // depthwise, planar path: int8 quads (w[kh][4g..4g+3][c], 0 past KW) as
                     // int32 [C][KH][ceil(KW/4)] (only when w fits int8)
  at::Tensor wn;     // NCHW-native path (one group, int8): int8 quads of 4 input channels as
                     // int32 [ceil(O/4)][KH*KW][ceil(C/4)][4 output channels]

  int64_t nbytes() const {
    return (panel.defined() ? panel.nbytes() : 0) + (dw.defined() ? dw.nbytes() : 0) +
           (dw2.defined() ? dw2.nbytes() : 0) + (dwq.defined() ? dwq.nbytes() : 0) +
           (wn.defined() ? wn.nbytes() : 0) + (off.defined() ? off.nbytes() : 0) +
           sumw.nbytes() + tapsumw.nbytes();
  }
};

void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("qconv2d: " + msg);
}

std::shared_ptr<PackedConv> prepack(const at::Tensor& w_in, int64_t groups) {
  check(w_in.dim() == 4, "w must be 4-d [O, C/groups, KH, KW], got " + shape_str(w_in));
  check(w_in.scalar_type() == at::kChar || w_in.scalar_type() == at::kShort,
        std::string("w must be int8 (weight bits <= 7) or int16 (8-bit weights) offsets "
                    "w_code - w_zp, got ") +
            std::string(c10::toString(w_in.scalar_type())));
  check(w_in.device().is_cpu(), "w must be a CPU tensor");
  check(groups >= 1, "groups must be >= 1, got " + std::to_string(groups));
  at::Tensor w = w_in.to(at::kInt).contiguous();
  auto pk = std::make_shared<PackedConv>();
  pk->O = w.size(0);
  pk->Cg = w.size(1);
  pk->KH = w.size(2);
  pk->KW = w.size(3);
  pk->groups = groups;
  check(pk->O > 0 && pk->Cg > 0 && pk->KH > 0 && pk->KW > 0, "w has an empty dimension");
  check(pk->O % groups == 0, "O = " + std::to_string(pk->O) + " is not divisible by groups = " +
                                 std::to_string(groups));
  pk->Og = pk->O / groups;
  const int32_t* wp = w.data_ptr<int32_t>();
  const int64_t K = pk->Cg * pk->KH * pk->KW;
  const int64_t ntaps = pk->KH * pk->KW;
  pk->sumw = at::empty({pk->O}, at::kInt);
  int32_t* sw = pk->sumw.data_ptr<int32_t>();
  int32_t mx = 0, lo = 0, hi = 0;
  for (int64_t o = 0; o < pk->O; ++o) {
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int32_t v = wp[o * K + k];
      s += v;
      mx = std::max(mx, std::abs(v));
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    sw[o] = s;
  }
  pk->max_abs_w = mx;
  const bool fits_int8 = lo >= -128 && hi <= 127;  // int16 offsets of 8-bit weights often do
  pk->depthwise = pk->Cg == 1 && pk->Og == 1;
  if (pk->depthwise) {
    const int64_t ct = round_up(pk->O, kBlock);
    pk->dw = at::zeros({ntaps, ct}, at::kInt);
    int32_t* d = pk->dw.data_ptr<int32_t>();
    for (int64_t c = 0; c < pk->O; ++c)
      for (int64_t t = 0; t < ntaps; ++t) d[t * ct + c] = wp[c * ntaps + t];
    pk->dw2 = at::zeros({(ntaps + 1) / 2, ct}, at::kInt);
    int32_t* d2 = pk->dw2.data_ptr<int32_t>();
    for (int64_t c = 0; c < pk->O; ++c)
      for (int64_t t = 0; t < ntaps; ++t) {
        const int16_t v = static_cast<int16_t>(wp[c * ntaps + t]);
        std::memcpy(reinterpret_cast<int16_t*>(d2 + (t / 2) * ct + c) + (t % 2), &v, 2);
      }
    if (fits_int8) {
      const int64_t ntg = (pk->KW + 3) / 4;
      pk->dwq = at::zeros({pk->O, pk->KH, ntg}, at::kInt);
      int8_t* q = reinterpret_cast<int8_t*>(pk->dwq.data_ptr<int32_t>());
      for (int64_t c = 0; c < pk->O; ++c)
        for (int64_t kh = 0; kh < pk->KH; ++kh)
          for (int64_t kw = 0; kw < pk->KW; ++kw)
            q[((c * pk->KH + kh) * ntg + kw / 4) * 4 + kw % 4] =
                static_cast<int8_t>(wp[(c * pk->KH + kh) * pk->KW + kw]);
    }
    return pk;
  }
  if (!fits_int8 && groups == 1) {
    // Shifted int8 mode when every channel's offsets span <= 256 values: s = ceil((lo + hi) / 2)
    // puts them in [-128, 127] (hi - s <= 127 and lo - s >= -128 follow from hi - lo <= 255).
    std::vector<int32_t> shift(pk->O);
    bool ok = true;
    for (int64_t o = 0; o < pk->O && ok; ++o) {
      int32_t clo = wp[o * K], chi = wp[o * K];
      for (int64_t k = 1; k < K; ++k) {
        clo = std::min(clo, wp[o * K + k]);
        chi = std::max(chi, wp[o * K + k]);
      }
      ok = chi - clo <= 255;
      shift[o] = (clo + chi + 1) >> 1;
    }
    if (ok) {
      w = w.clone();
      int32_t* ww = w.data_ptr<int32_t>();
      pk->off = at::empty({pk->O}, at::kInt);
      int32_t* of = pk->off.data_ptr<int32_t>();
      mx = 0;
      for (int64_t o = 0; o < pk->O; ++o) {
        int32_t s = 0;
        for (int64_t k = 0; k < K; ++k) {
          ww[o * K + k] -= shift[o];
          s += ww[o * K + k];
          mx = std::max(mx, std::abs(ww[o * K + k]));
        }
        sw[o] = s;
        of[o] = -shift[o];
      }
      pk->max_abs_w = mx;
      wp = ww;
    }
  }
  pk->mode = fits_int8 || pk->off.defined() ? KMode::kU8S8 : KMode::kS16;
  pk->tapsumw = at::zeros({pk->KH, pk->KW, pk->O}, at::kInt);
  int32_t* tsw = pk->tapsumw.data_ptr<int32_t>();
  for (int64_t o = 0; o < pk->O; ++o)
    for (int64_t c = 0; c < pk->Cg; ++c)
      for (int64_t t = 0; t < ntaps; ++t) tsw[t * pk->O + o] += wp[(o * pk->Cg + c) * ntaps + t];
  if (groups == 1 && fits_int8) {
    const int64_t c4n = (pk->Cg + 3) / 4, ob = (pk->O + 3) / 4;
    pk->wn = at::zeros({ob, ntaps, c4n, 4}, at::kInt);
    int8_t* q = reinterpret_cast<int8_t*>(pk->wn.data_ptr<int32_t>());
    for (int64_t o = 0; o < pk->O; ++o)
      for (int64_t t = 0; t < ntaps; ++t)
        for (int64_t c = 0; c < pk->Cg; ++c)
          q[(((o / 4) * ntaps + t) * c4n + c / 4) * 16 + (o % 4) * 4 + c % 4] =
              static_cast<int8_t>(wp[(o * pk->Cg + c) * ntaps + t]);
  }
  const int64_t per = pk->mode == KMode::kU8S8 ? 4 : 2;  // channels per 4-byte group
  pk->cpg = round_up(pk->Cg, per);
  pk->cgroups = pk->cpg / per;
  pk->dense = groups == 1 && per == 4 && pk->Cg < 4 && pk->KW > 1;
  if (pk->dense) {
    pk->cpg = pk->Cg;
    pk->cgroups = (pk->KW * pk->Cg + 3) / 4;
  }
  // Im2col where the micro-kernel work it saves (k-groups x the 16-channel blocks of a call)
  // outweighs its copies (KH per pixel, counted as two groups each): ResNet-18's 7x7 stem, 64
  // channels: 5 groups x 4 blocks against 7 copies, in the model (batch 8) 6.85 / 6.73 ->
  // 6.61 / 6.59 ms; ResNet-20's 3x3 stem, 16 channels (2 x 1 against 3) was 10% slower with it.
  const int64_t kwin = pk->KH * pk->KW * pk->Cg;  // bytes of a whole window
  const int64_t jb_call = std::min<int64_t>(4, (pk->Og + kBlock - 1) / kBlock);
  pk->im2col = pk->dense && pk->KH > 1 &&
               (pk->KH * pk->cgroups - (kwin + 3) / 4) * jb_call >= 2 * pk->KH;
  if (pk->im2col) pk->cgroups = (kwin + 3) / 4;
  // taps of the panel (dense: kernel rows; im2col: one)
  const int64_t ptaps = pk->im2col ? 1 : pk->dense ? pk->KH : ntaps;
  const int64_t nblocks = (pk->Og + kBlock - 1) / kBlock;
  pk->sb = superblocks(nblocks, /*allow4=*/true);
  int64_t off = 0, b0 = 0;
  for (int s : pk->sb) {
    pk->sb_block0.push_back(b0);
    pk->sb_off.push_back(off);
    off += ptaps * pk->cgroups * 64 * s;
    b0 += s;
  }
  pk->group_bytes = off;
  pk->panel = at::zeros({groups * off}, at::kChar);
  int8_t* panel = pk->panel.data_ptr<int8_t>();
  for (int64_t g = 0; g < groups; ++g)
    for (size_t s = 0; s < pk->sb.size(); ++s) {
      int8_t* dst = panel + g * off + pk->sb_off[s];
      const int jb = pk->sb[s];
      for (int64_t t = 0; t < ptaps; ++t)
        for (int64_t cgi = 0; cgi < pk->cgroups; ++cgi)
          for (int j = 0; j < jb; ++j)
            for (int oo = 0; oo < kBlock; ++oo) {
              const int64_t og = (pk->sb_block0[s] + j) * kBlock + oo;  // channel in group
              int8_t* d = dst + ((t * pk->cgroups + cgi) * jb + j) * 64 + oo * 4;
              for (int e = 0; e < per; ++e) {
                int32_t v = 0;
                if (pk->im2col) {  // k = (kh * KW + kw) * Cg + c over the window
                  const int64_t k = cgi * 4 + e, kt = k / pk->Cg, c = k % pk->Cg;
                  if (og < pk->Og && k < kwin) v = wp[(og * pk->Cg + c) * ntaps + kt];
                } else if (pk->dense) {  // t = kh; k = kw * Cg + c within the row
                  const int64_t k = cgi * 4 + e, kw = k / pk->Cg, c = k % pk->Cg;
                  if (og < pk->Og && kw < pk->KW)
                    v = wp[(og * pk->Cg + c) * ntaps + t * pk->KW + kw];
                } else {
                  const int64_t c = cgi * per + e;
                  if (og < pk->Og && c < pk->Cg)
                    v = wp[((g * pk->Og + og) * pk->Cg + c) * ntaps + t];
                }
                if (per == 4) {
                  d[e] = static_cast<int8_t>(v);
                } else {
                  const int16_t v16 = static_cast<int16_t>(v);
                  std::memcpy(d + 2 * e, &v16, 2);
                }
              }
            }
    }
  return pk;
}

// ---------------------------------------------------------------------------------------------
// depthwise: c[r][0..16) = sum_t x[pixel r + tap t][16 channels] * w[t][16 channels]

void dw_tile_scalar(const uint8_t* const* a, int64_t c0, const int64_t* toff, int ntaps,
                    const int32_t* w, int64_t wstride, int32_t* c) {
  for (int r = 0; r < kTileRows; ++r)
    for (int i = 0; i < kBlock; ++i) {
      int32_t s = 0;
      for (int t = 0; t < ntaps; ++t) s += int32_t(a[r][c0 + toff[t] + i]) * w[t * wstride + i];
      c[r * kBlock + i] = s;
    }
}

#ifdef PDQ_X86
// Taps in pairs with vpdpwssd: the bytes of taps t and t+1 for 16 channels are interleaved
// (punpcklbw/punpckhbw) and zero-extended to int16 pairs, so one vpdpwssd does 32 MACs against
// the prepacked int16 weight pairs (w[t][c], w[t+1][c]). Measured on Zen 4 (EfficientNet-Lite0
// 144-channel 56x56 layer, 1 thread): 2x faster than vpmovzxbd + vpmulld + vpaddd per tap.
PDQ_VNNI void dw_tile_vnni(const uint8_t* const* a, int64_t c0, const int64_t* toff, int ntaps,
                           const int32_t* w2, int64_t wstride, int32_t* c) {
  __m512i acc[kTileRows];
#pragma GCC unroll 16
  for (int r = 0; r < kTileRows; ++r) acc[r] = _mm512_setzero_si512();
  for (int t = 0; t < ntaps; t += 2) {
    const __m512i wv = _mm512_loadu_si512(w2 + (t / 2) * wstride);
    const int64_t o0 = c0 + toff[t];
    const int64_t o1 = c0 + toff[t + 1 < ntaps ? t + 1 : t];  // odd count: weight 0
#pragma GCC unroll 16
    for (int r = 0; r < kTileRows; ++r) {
      const __m128i x0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a[r] + o0));
      const __m128i x1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a[r] + o1));
      const __m256i xi =
          _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(x0, x1)),
                                  _mm_unpackhi_epi8(x0, x1), 1);
      acc[r] = _mm512_dpwssd_epi32(acc[r], _mm512_cvtepu8_epi16(xi), wv);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kTileRows; ++r) _mm512_storeu_si512(c + r * kBlock, acc[r]);
}

PDQ_AVX2 void dw_tile_avx2(const uint8_t* const* a, int64_t c0, const int64_t* toff, int ntaps,
                           const int32_t* w, int64_t wstride, int32_t* c) {
  for (int half = 0; half < 2; ++half) {
    __m256i acc[kTileRows];
    for (int r = 0; r < kTileRows; ++r) acc[r] = _mm256_setzero_si256();
    for (int t = 0; t < ntaps; ++t) {
      const __m256i wv =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + t * wstride + 8 * half));
      const int64_t o = c0 + toff[t] + 8 * half;
      for (int r = 0; r < kTileRows; ++r) {
        const __m256i xv =
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a[r] + o)));
        acc[r] = _mm256_add_epi32(acc[r], _mm256_mullo_epi32(xv, wv));
      }
    }
    for (int r = 0; r < kTileRows; ++r)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * kBlock + 8 * half), acc[r]);
  }
}
#endif

#ifdef PDQ_X86
// Planar depthwise (NCHW input), requantisation fused: channels c0 .. c0 + nch - 1 (nch <= 4)
// of one image, 16 consecutive outputs of a row per zmm. For kernel row kh one 64-byte load
// covers the 16 receptive fields (15 * sw + KW <= 64); vpermb spreads it into 4-tap windows
// (dword j = bytes j * sw + 4g .. + 3 = taps 4g .. 4g + 3) and one vpdpbusd against the
// broadcast int8 taps adds 16 x 4 MACs. A 3x3 layer takes 3 x (load, vpermb, vpdpbusd) per 16
// outputs (the NHWC kernel: 5 tap pairs x 7 instructions) and writes NCHW without transposes.
// planes[ci]: zero-point-padded [Hp][wb] bytes (+64 bytes of slack after the last row).
template <bool CODES, bool RES, int ACT>
PDQ_VBMI void dw_planar_t(const uint8_t* const* planes, int nch, int64_t wb, int64_t sh,
                          int64_t sw, int KH, int ntg, const uint8_t* idx, const int32_t* wq,
                          const Epilogue& e, int64_t c0, int64_t out0, int64_t P, int64_t Ho,
                          int64_t Wo) {
  __m512i ix[4];
  for (int g = 0; g < ntg; ++g) ix[g] = _mm512_loadu_si512(idx + 64 * g);
  __m512i zs[4];
  __m512 sc[4], bi[4];
  const uint8_t* pl[4];
  const int32_t* w[4];
  for (int ci = 0; ci < 4; ++ci) {
    const int cc = ci < nch ? ci : nch - 1;  // a short block repeats its last channel
    zs[ci] = _mm512_set1_epi32(e.x_zp * e.sumw[c0 + cc]);
    sc[ci] = _mm512_set1_ps(e.scale[c0 + cc]);
    bi[ci] = _mm512_set1_ps(e.bias[c0 + cc]);
    pl[ci] = planes[cc];
    w[ci] = wq + cc * KH * ntg;
  }
  const QOut qo = qout(e);
  for (int64_t oh = 0; oh < Ho; ++oh)
    for (int64_t ow0 = 0; ow0 < Wo; ow0 += 16) {
      const int64_t npix = std::min<int64_t>(16, Wo - ow0);
      const __mmask16 k = npix == 16 ? 0xFFFF : static_cast<__mmask16>((1u << npix) - 1);
      const int64_t row0 = oh * sh * wb + ow0 * sw;
      const int64_t o = out0 + oh * Wo + ow0;  // channel c0's output index
      __m512i acc[4];
#pragma GCC unroll 4
      for (int ci = 0; ci < 4; ++ci) acc[ci] = _mm512_setzero_si512();
      for (int kh = 0; kh < KH; ++kh)
#pragma GCC unroll 4
        for (int ci = 0; ci < 4; ++ci) {
          const __m512i xv = _mm512_loadu_si512(pl[ci] + row0 + kh * wb);
          for (int g = 0; g < ntg; ++g)
            acc[ci] = _mm512_dpbusd_epi32(acc[ci], _mm512_permutexvar_epi8(ix[g], xv),
                                          _mm512_set1_epi32(w[ci][kh * ntg + g]));
        }
      __m512 y[4];
#pragma GCC unroll 4
      for (int ci = 0; ci < 4; ++ci)
        y[ci] = yvec<RES, ACT>(_mm512_sub_epi32(acc[ci], zs[ci]), sc[ci], bi[ci], e,
                               o + (ci < nch ? ci : nch - 1) * P, k);
      if constexpr (CODES) {
        store_lanes(static_cast<uint8_t*>(e.out) + o, P,
                    narrow4(qcode(y[0], qo), qcode(y[1], qo), qcode(y[2], qo), qcode(y[3], qo)),
                    nch, k);
      } else {
        for (int ci = 0; ci < nch; ++ci)
          store_f32(static_cast<float*>(e.out) + o + ci * P, y[ci], k);
      }
    }
}

void dw_planar(const uint8_t* const* planes, int nch, int64_t wb, int64_t sh, int64_t sw, int KH,
               int ntg, const uint8_t* idx, const int32_t* wq, const Epilogue& e, int64_t c0,
               int64_t out0, int64_t P, int64_t Ho, int64_t Wo) {
  PDQ_EPI_DISPATCH(dw_planar_t, planes, nch, wb, sh, sw, KH, ntg, idx, wq, e, c0, out0, P, Ho,
                   Wo);
}
#endif

#ifdef PDQ_X86
// NCHW-native implicit GEMM (stride 1, one group, int8 weights). The image is re-laid as
// x4[c4][p][4]: 4 input channels interleaved per dword over the zero-point-padded plane (Hp x Wp
// row-major, p = h * Wp + w, + slack), so that output p' = oh * Wp + ow reads
// x4[c4][p' + kh * Wp + kw] for tap (kh, kw): 16 consecutive outputs are one 64-byte load.
// Weights are broadcast: 4 output channels x 4 vectors of 16 outputs per tile, 16 vpdpbusd per
// (tap, channel quad) for 4 loads + 4 broadcasts. Columns ow >= Wo of the padded width are
// computed and dropped (vpcompressd before the stores), Wp / Wo extra work: used for 1x1 convs
// (none) and Wo >= 16. Writes NCHW rows directly: no transposes on either side (on an
// EfficientNet-Lite0 1x1 16->96 at 112x112 the NHWC path spent ~40% in them).
// Re-layout cost: one SSE2 pass over x (4 x 16 input bytes -> 64 output bytes, 8 unpacks).
void to_x4(const uint8_t* x, int64_t C, int64_t H, int64_t W, int64_t ph, int64_t pw,
           int64_t Wp, int64_t L, uint8_t x_zp, uint8_t* dst) {
  const int64_t c4n = (C + 3) / 4;
  for (int64_t c4 = 0; c4 < c4n; ++c4) {
    uint8_t* plane = dst + c4 * L * 4;
    const uint8_t* row[4];
    for (int64_t h = 0; h < H + 2 * ph; ++h) {
      uint8_t* d = plane + h * Wp * 4;
      if (h < ph || h >= ph + H) {
        std::memset(d, x_zp, Wp * 4);
        continue;
      }
      for (int i = 0; i < 4; ++i) {
        const int64_t c = std::min(4 * c4 + i, C - 1);  // padded channels: any value (w = 0)
        row[i] = x + (c * H + (h - ph)) * W;
      }
      std::memset(d, x_zp, pw * 4);
      std::memset(d + (pw + W) * 4, x_zp, pw * 4);
      d += pw * 4;
      int64_t w0 = 0;
      for (; w0 + 16 <= W; w0 += 16) {
        const __m128i a0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[0] + w0));
        const __m128i a1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[1] + w0));
        const __m128i a2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[2] + w0));
        const __m128i a3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[3] + w0));
        const __m128i t0 = _mm_unpacklo_epi8(a0, a1), t1 = _mm_unpackhi_epi8(a0, a1);
        const __m128i t2 = _mm_unpacklo_epi8(a2, a3), t3 = _mm_unpackhi_epi8(a2, a3);
        __m128i* o = reinterpret_cast<__m128i*>(d + w0 * 4);
        _mm_storeu_si128(o, _mm_unpacklo_epi16(t0, t2));
        _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(t0, t2));
        _mm_storeu_si128(o + 2, _mm_unpacklo_epi16(t1, t3));
        _mm_storeu_si128(o + 3, _mm_unpackhi_epi16(t1, t3));
      }
      for (; w0 < W; ++w0)
        for (int i = 0; i < 4; ++i) d[w0 * 4 + i] = row[i][w0];
    }
    std::memset(plane + (H + 2 * ph) * Wp * 4, x_zp, (L - (H + 2 * ph) * Wp) * 4);
  }
}

struct NchwGeom {
  int64_t L, c4n, ntaps, O, P, Ho, Wo, Wp;
  const int64_t* toff;  // kh * Wp + kw, in pixels
};

// Output tiles of 4 channels x 64 positions p' in [p_begin, p_end) (multiples of 64).
template <bool CODES, bool RES, int ACT>
PDQ_VNNI void nchw_gemm_t(const uint8_t* x4, const int32_t* wn, const NchwGeom& g,
                          const Epilogue& e, int64_t n, int64_t p_begin, int64_t p_end) {
  const int64_t pvalid = g.Ho * g.Wp;
  const QOut qo = qout(e);
  for (int64_t p0 = p_begin; p0 < p_end; p0 += 64) {
    // Per 16-lane vector: valid lanes (p' < Ho * Wp, ow < Wo), first output index, count.
    __mmask16 m[4];
    int64_t start[4];
    int cnt[4];
    if (g.Wp == g.Wo) {  // no dropped columns: output index = p'
      for (int j = 0; j < 4; ++j) {
        const int64_t p = p0 + 16 * j;
        cnt[j] = static_cast<int>(std::clamp<int64_t>(pvalid - p, 0, 16));
        m[j] = static_cast<__mmask16>((1u << cnt[j]) - 1);
        start[j] = p;
      }
    } else {
      int64_t r = p0 / g.Wp, c = p0 % g.Wp;  // (row, column) of lane 0, walked without divides
      for (int j = 0; j < 4; ++j) {
        uint32_t bits = 0;
        start[j] = -1;
        for (int l = 0; l < 16; ++l) {
          if (r < g.Ho && c < g.Wo) {
            bits |= 1u << l;
            if (start[j] < 0) start[j] = r * g.Wo + c;
          }
          if (++c == g.Wp) {
            c = 0;
            ++r;
          }
        }
        m[j] = static_cast<__mmask16>(bits);
        cnt[j] = __builtin_popcount(bits);
      }
    }
    for (int64_t ob = 0; ob * 4 < g.O; ++ob) {
      __m512i acc[4][4];
#pragma GCC unroll 4
      for (int o = 0; o < 4; ++o)
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[o][j] = _mm512_setzero_si512();
      const int32_t* w = wn + ob * g.ntaps * g.c4n * 4;
      for (int64_t t = 0; t < g.ntaps; ++t) {
        const uint8_t* base = x4 + (p0 + g.toff[t]) * 4;
        for (int64_t c4 = 0; c4 < g.c4n; ++c4, w += 4) {
          const uint8_t* a = base + c4 * g.L * 4;
          __m512i xv[4];
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) xv[j] = _mm512_loadu_si512(a + 64 * j);
#pragma GCC unroll 4
          for (int o = 0; o < 4; ++o) {
            const __m512i b = _mm512_set1_epi32(w[o]);
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) acc[o][j] = _mm512_dpbusd_epi32(acc[o][j], xv[j], b);
          }
        }
      }
      const int no = static_cast<int>(std::min<int64_t>(4, g.O - ob * 4));
      __m512i zs[4];
      __m512 sc[4], bi[4];
      for (int o = 0; o < 4; ++o) {
        const int64_t oc = ob * 4 + (o < no ? o : no - 1);
        zs[o] = _mm512_set1_epi32(e.x_zp * e.sumw[oc]);
        sc[o] = _mm512_set1_ps(e.scale[oc]);
        bi[o] = _mm512_set1_ps(e.bias[oc]);
      }
      for (int j = 0; j < 4; ++j) {
        if (cnt[j] == 0) continue;
        const __mmask16 kc = static_cast<__mmask16>((1u << cnt[j]) - 1);  // compacted lanes
        const bool dense = m[j] == kc;  // no dropped columns inside this vector
        __m512 y[4];
#pragma GCC unroll 4
        for (int o = 0; o < 4; ++o) {
          const int64_t oc = ob * 4 + (o < no ? o : no - 1);
          const int64_t idx = (n * g.O + oc) * g.P + start[j];
          __m512 r = _mm512_setzero_ps();
          if constexpr (RES) {
            r = res_vec(e, idx, kc);
            if (!dense) r = _mm512_maskz_expand_ps(m[j], r);
          }
          // the activation comes after the residual add: applied below when RES
          y[o] = yvec<false, RES ? 0 : ACT>(_mm512_sub_epi32(acc[o][j], zs[o]), sc[o], bi[o], e,
                                            0, m[j]);
          if constexpr (RES) {
            y[o] = _mm512_add_ps(y[o], r);  // the contract's order: (acc*scale + bias) + res
            if constexpr (ACT == 1) y[o] = _mm512_max_ps(y[o], _mm512_setzero_ps());
            if constexpr (ACT == 2)
              y[o] = _mm512_min_ps(_mm512_max_ps(y[o], _mm512_setzero_ps()), _mm512_set1_ps(6.f));
          }
        }
        const int64_t out0 = (n * g.O + ob * 4) * g.P + start[j];
        if constexpr (CODES) {
          __m512i q[4];
#pragma GCC unroll 4
          for (int o = 0; o < 4; ++o) {
            q[o] = qcode(y[o], qo);
            if (!dense) q[o] = _mm512_maskz_compress_epi32(m[j], q[o]);
          }
          store_lanes(static_cast<uint8_t*>(e.out) + out0, g.P, narrow4(q[0], q[1], q[2], q[3]),
                      no, kc);
        } else {
          for (int o = 0; o < no; ++o) {
            const __m512 yo = dense ? y[o] : _mm512_maskz_compress_ps(m[j], y[o]);
            store_f32(static_cast<float*>(e.out) + out0 + o * g.P, yo, kc);
          }
        }
      }
    }
  }
}

void nchw_gemm(const uint8_t* x4, const int32_t* wn, const NchwGeom& g, const Epilogue& e,
               int64_t n, int64_t p_begin, int64_t p_end) {
  PDQ_EPI_DISPATCH(nchw_gemm_t, x4, wn, g, e, n, p_begin, p_end);
}
#endif

// w: int32 [ntaps][wstride]; w2: int16 pairs [ceil(ntaps / 2)][wstride] (AVX-512 path).
void dw_tile(Isa isa, const uint8_t* const* a, int64_t c0, const int64_t* toff, int ntaps,
             const int32_t* w, const int32_t* w2, int64_t wstride, int32_t* c) {
#ifdef PDQ_X86
  if (isa == Isa::kAvx512Vnni) return dw_tile_vnni(a, c0, toff, ntaps, w2, wstride, c);
  if (isa == Isa::kAvx2) return dw_tile_avx2(a, c0, toff, ntaps, w, wstride, c);
#endif
  dw_tile_scalar(a, c0, toff, ntaps, w, wstride, c);
}

// ---------------------------------------------------------------------------------------------

// Pointers of tile rows r = pixels p0 + r (rows >= `rows` repeat the last valid one), without a
// division per row: (oh, ow) walks the output row-major.
template <typename F>
inline void row_pointers(const uint8_t** ptr, int rows, int64_t p0, int64_t Wo, F&& at) {
  int64_t oh = p0 / Wo, ow = p0 % Wo;
  for (int r = 0; r < kTileRows; ++r) {
    ptr[r] = r < rows ? at(oh, ow) : ptr[rows - 1];
    if (++ow == Wo) {
      ow = 0;
      ++oh;
    }
  }
}

// Im2col rows of a tile (PackedConv::im2col): row r of col (ldk bytes) gets the KH segments of
// krow bytes that start at rowp[r], rowp[r] + rstride, ..., back to back. Segments of up to 32
// bytes are copied 32 bytes at a time (one load and store each with AVX-512; col and the source
// need 32 bytes of slack): the bytes past a segment are overwritten by the next segment or the
// next row, or lie past the window, where the panel holds zero weights.
#ifdef PDQ_X86
PDQ_VNNI void im2col_rows_vnni(const uint8_t* const* rowp, int rows, int64_t KH, int64_t rstride,
                               int64_t krow, int64_t ldk, uint8_t* col) {
  for (int r = 0; r < rows; ++r) {
    uint8_t* d = col + r * ldk;
    for (int64_t kh = 0; kh < KH; ++kh)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + kh * krow),
                          _mm256_loadu_si256(
                              reinterpret_cast<const __m256i*>(rowp[r] + kh * rstride)));
  }
}
#endif

void im2col_rows(Isa isa, const uint8_t* const* rowp, int rows, int64_t KH, int64_t rstride,
                 int64_t krow, int64_t ldk, uint8_t* col) {
#ifdef PDQ_X86
  if (krow <= 32 && isa == Isa::kAvx512Vnni)
    return im2col_rows_vnni(rowp, rows, KH, rstride, krow, ldk, col);
#endif
  for (int r = 0; r < rows; ++r) {
    uint8_t* d = col + r * ldk;
    for (int64_t kh = 0; kh < KH; ++kh) {
      if (krow <= 32) {  // a constant size: inlined moves
        std::memcpy(d + kh * krow, rowp[r] + kh * rstride, 32);
      } else {
        std::memcpy(d + kh * krow, rowp[r] + kh * rstride, krow);
      }
    }
  }
}

// Receptive-field sums of one padded NHWC image (the shifted int8 weights' correction):
// sx[oh * Wo + ow] = sum over kh < KH, kw < KW, c < Cg of
// img[((oh sh + kh) Wp + ow sw + kw) ct + c] - zk. Separable, in three passes that vectorise
// along the pixels: per-pixel channel sums S, KW-wide sums along each padded row R, KH-tall sums
// of R (the loops before were ordered
// reduction-innermost and ran scalar: 22% of the ResNet-20 integer stem). Exact in int32: a sum
// is at most 255 * K, far inside the op's int32 accumulator bound on K.
struct ReceptiveSums {
  int64_t Hp, Wp, ct, Cg, KH, KW, sh, sw, Ho, Wo;
  int32_t zk;
  bool simd = false;  // AVX-512 passes (VNNI ISA with VBMI)
  int64_t scratch() const { return Hp * Wp + Hp * Wo; }
  void operator()(const uint8_t* img, int32_t* tmp, int32_t* sx) const;
  void scalar(const uint8_t* img, int32_t* tmp, int32_t* sx) const {
    int32_t* S = tmp;
    int32_t* R = tmp + Hp * Wp;
    const int64_t np = Hp * Wp;
    if (ct == 3 && Cg == 3) {  // the dense 3-channel stems
      for (int64_t i = 0; i < np; ++i)
        S[i] = static_cast<int32_t>(img[3 * i]) + img[3 * i + 1] + img[3 * i + 2];
    } else {
      for (int64_t i = 0; i < np; ++i) S[i] = img[i * ct];
      for (int64_t c = 1; c < Cg; ++c)
        for (int64_t i = 0; i < np; ++i) S[i] += img[i * ct + c];
    }
    for (int64_t h = 0; h < Hp; ++h) {
      const int32_t* srow = S + h * Wp;
      int32_t* r = R + h * Wo;
      if (sw == 1) {
        for (int64_t ow = 0; ow < Wo; ++ow) r[ow] = srow[ow];
        for (int64_t kw = 1; kw < KW; ++kw)
          for (int64_t ow = 0; ow < Wo; ++ow) r[ow] += srow[ow + kw];
      } else {
        for (int64_t ow = 0; ow < Wo; ++ow) r[ow] = srow[ow * sw];
        for (int64_t kw = 1; kw < KW; ++kw)
          for (int64_t ow = 0; ow < Wo; ++ow) r[ow] += srow[ow * sw + kw];
      }
    }
    for (int64_t oh = 0; oh < Ho; ++oh) {
      int32_t* o = sx + oh * Wo;
      for (int64_t ow = 0; ow < Wo; ++ow) o[ow] = -zk;
      for (int64_t kh = 0; kh < KH; ++kh) {
        const int32_t* r = R + (oh * sh + kh) * Wo;
        for (int64_t ow = 0; ow < Wo; ++ow) o[ow] += r[ow];
      }
    }
  }
};

#ifdef PDQ_X86
// The same three passes with AVX-512 (the baseline build vectorises the scalar ones with SSE2
// at best, and the strided and 3-byte-pixel loops not at all: they took 0.55 ms of the 7.1 ms
// ResNet-18 stem at batch 8). 16 pixels per vector: the 3-channel pixels deinterleaved with
// vpermb, stride-2 windows gathered from two vectors with vpermt2d, every load masked to the
// pixels that exist. Integer sums: the same values as scalar().
inline __mmask16 lanes(int64_t n) {  // mask of the first n lanes (none for n <= 0)
  return static_cast<__mmask16>(n >= 16 ? 0xFFFF : n <= 0 ? 0 : (1u << n) - 1);
}

PDQ_VBMI static inline __m512i bytes16_epi32(__m512i idx, __m512i v) {  // bytes idx[0..15] of v
  return _mm512_cvtepu8_epi32(_mm512_castsi512_si128(_mm512_permutexvar_epi8(idx, v)));
}

PDQ_VBMI void receptive_sums_simd(const ReceptiveSums& g, const uint8_t* img, int32_t* tmp,
                                  int32_t* sx) {
  int32_t* S = tmp;
  int32_t* R = tmp + g.Hp * g.Wp;
  const int64_t np = g.Hp * g.Wp;
  if (g.ct == 3 && g.Cg == 3) {
    alignas(64) uint8_t ib[3][64] = {};
    for (int c = 0; c < 3; ++c)
      for (int i = 0; i < 16; ++i) ib[c][i] = static_cast<uint8_t>(3 * i + c);
    const __m512i i0 = _mm512_load_si512(ib[0]), i1 = _mm512_load_si512(ib[1]),
                  i2 = _mm512_load_si512(ib[2]);
    for (int64_t i = 0; i < np; i += 16) {
      const int64_t nl = std::min<int64_t>(16, np - i);
      const __mmask64 kb = nl == 16 ? 0xFFFFFFFFFFFFull : (1ull << (3 * nl)) - 1;
      const __m512i v = _mm512_maskz_loadu_epi8(kb, img + 3 * i);
      const __m512i t = _mm512_add_epi32(
          _mm512_add_epi32(bytes16_epi32(i0, v), bytes16_epi32(i1, v)), bytes16_epi32(i2, v));
      _mm512_mask_storeu_epi32(S + i, lanes(nl), t);
    }
  } else {
    for (int64_t i = 0; i < np; ++i) S[i] = img[i * g.ct];
    for (int64_t c = 1; c < g.Cg; ++c)
      for (int64_t i = 0; i < np; ++i) S[i] += img[i * g.ct + c];
  }
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                         28, 30);
  for (int64_t h = 0; h < g.Hp; ++h) {
    const int32_t* srow = S + h * g.Wp;
    int32_t* r = R + h * g.Wo;
    for (int64_t ow = 0; ow < g.Wo; ow += 16) {
      const int64_t nl = std::min<int64_t>(16, g.Wo - ow);
      __m512i acc = _mm512_setzero_si512();
      if (g.sw == 1) {
        for (int64_t kw = 0; kw < g.KW; ++kw)
          acc = _mm512_add_epi32(acc, _mm512_maskz_loadu_epi32(lanes(nl), srow + ow + kw));
      } else if (g.sw == 2) {  // elements 2j, j < nl, of srow + 2 ow + kw
        const __mmask16 klo = lanes(2 * nl - 1), khi = lanes(2 * nl - 17);
        for (int64_t kw = 0; kw < g.KW; ++kw) {
          const int32_t* b = srow + 2 * ow + kw;
          acc = _mm512_add_epi32(acc, _mm512_permutex2var_epi32(
                                          _mm512_maskz_loadu_epi32(klo, b), even,
                                          _mm512_maskz_loadu_epi32(khi, b + 16)));
        }
      } else {
        alignas(64) int32_t t[16] = {};
        for (int64_t j = 0; j < nl; ++j)
          for (int64_t kw = 0; kw < g.KW; ++kw) t[j] += srow[(ow + j) * g.sw + kw];
        acc = _mm512_load_si512(t);
      }
      _mm512_mask_storeu_epi32(r + ow, lanes(nl), acc);
    }
  }
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    int32_t* o = sx + oh * g.Wo;
    for (int64_t ow = 0; ow < g.Wo; ow += 16) {
      const __mmask16 k = lanes(g.Wo - ow);
      __m512i acc = _mm512_set1_epi32(-g.zk);
      for (int64_t kh = 0; kh < g.KH; ++kh)
        acc = _mm512_add_epi32(acc,
                               _mm512_maskz_loadu_epi32(k, R + (oh * g.sh + kh) * g.Wo + ow));
      _mm512_mask_storeu_epi32(o + ow, k, acc);
    }
  }
}
#endif

void ReceptiveSums::operator()(const uint8_t* img, int32_t* tmp, int32_t* sx) const {
#ifdef PDQ_X86
  if (simd) return receptive_sums_simd(*this, img, tmp, sx);
#endif
  scalar(img, tmp, sx);
}

std::vector<int64_t> pair_arg(const std::vector<int64_t>& v, const char* name) {
  check(v.size() == 2 || v.size() == 1, std::string(name) + " must have 2 entries, got " +
                                            std::to_string(v.size()));
  return v.size() == 2 ? v : std::vector<int64_t>{v[0], v[0]};
}

at::Tensor run(const PackedConv& pk, const at::Tensor& x_in, int64_t x_zp, const at::Tensor& scale,
               const at::Tensor& bias, const std::vector<int64_t>& stride_in,
               const std::vector<int64_t>& padding_in, int64_t groups, int64_t act,
               const std::optional<at::Tensor>& residual, double out_scale, int64_t out_zp,
               int64_t out_bits, double res_scale, int64_t res_zp) {
  check(x_in.dim() == 4, "x must be 4-d [N, C, H, W] uint8 codes, got " + shape_str(x_in));
  check_codes_input(x_in, "qconv2d");
  check(groups == pk.groups, "groups = " + std::to_string(groups) +
                                 " but the weights were prepacked for groups = " +
                                 std::to_string(pk.groups));
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  check(C == pk.Cg * groups, "x has C = " + std::to_string(C) + " channels but w expects " +
                                 std::to_string(pk.Cg) + " x groups " + std::to_string(groups));
  check_requant_args(x_zp, act, out_scale, out_bits, out_zp, scale, bias, pk.O, "qconv2d");
  const auto stride = pair_arg(stride_in, "stride");
  const auto padding = pair_arg(padding_in, "padding");
  const int64_t sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1];
  check(sh >= 1 && sw >= 1, "stride must be >= 1");
  check(ph >= 0 && pw >= 0, "padding must be >= 0");
  const int64_t Ho = (H + 2 * ph - pk.KH) / sh + 1, Wo = (W + 2 * pw - pk.KW) / sw + 1;
  check(H + 2 * ph >= pk.KH && W + 2 * pw >= pk.KW,
        "the padded input is smaller than the kernel");

  const bool nhwc = x_in.is_contiguous(at::MemoryFormat::ChannelsLast) && !x_in.is_contiguous();
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  if (!nhwc && pk.KH == 1 && pk.KW == 1 && ph == 0 && pw == 0 && (sh > 1 || sw > 1)) {
    // A strided 1x1 conv reads every sh-th row and sw-th column only: subsample them (a quarter
    // of x at stride 2) and run a stride-1 1x1 conv, which the NCHW-native GEMM takes without a
    // padded NHWC copy of all of x. The same sums in the same order: bit-identical.
    const at::Tensor xs = x.slice(2, 0, H, sh).slice(3, 0, W, sw).contiguous();
    return run(pk, xs, x_zp, scale, bias, {1, 1}, {0, 0}, groups, act, residual, out_scale,
               out_zp, out_bits, res_scale, res_zp);
  }
  const int64_t O = pk.O, P = Ho * Wo;
  at::Tensor out = at::empty({N, O, Ho, Wo},
                             x.options().dtype(out_bits ? at::kByte : at::kFloat), fmt);
  Epilogue e;
  at::Tensor res;  // keeps the bound residual alive
  bind_residual(e, residual, out, fmt, res_scale, res_zp, &res, "qconv2d");
  if (N == 0 || P == 0) return out;

  const Isa isa = active_isa();
  set_requant(e, x_zp, pk.sumw, scale, bias, act, out_scale, out_zp, out_bits, out);

  // Output addressing of a tile: (row r = pixel p0 + r, channel o0 + j).
  auto dst = [&](int64_t n, int64_t p0, int64_t o0, int rows, int cols) {
    TileDst d;
    if (nhwc) {
      d = {(n * P + p0) * O + o0, O, 1, o0, rows, cols, n * P + p0};
    } else {
      d = {(n * O + o0) * P + p0, 1, P, o0, rows, cols, n * P + p0};
    }
    return d;
  };
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  const int64_t ntaps = pk.KH * pk.KW;
  const int64_t ntiles = (P + kTileRows - 1) / kTileRows;

#ifdef PDQ_X86
  const int64_t ntg = (pk.KW + 3) / 4;
  if (pk.depthwise && !nhwc && isa == Isa::kAvx512Vnni && has_vbmi() && pk.dwq.defined() &&
      15 * sw + 4 * ntg <= 64) {
    // Zero-point-padded planes; 64 bytes of slack after the last row for the 64-byte loads
    // (a load past a row's end reads the next row: lanes that are discarded).
    const int64_t wb = Wp, plane = Hp * wb + 64;
    std::vector<uint8_t> idx(64 * ntg);
    for (int64_t g = 0; g < ntg; ++g)
      for (int64_t j = 0; j < 16; ++j)
        for (int64_t q = 0; q < 4; ++q) idx[64 * g + 4 * j + q] = (j * sw + 4 * g + q) & 63;
    const int32_t* wq = pk.dwq.data_ptr<int32_t>();
    const uint8_t* xs = x.data_ptr<uint8_t>();
    const int64_t ncb = (C + 3) / 4;
    at::parallel_for(0, N * ncb, 1, [&](int64_t b, int64_t en) {
      std::vector<uint8_t> buf(4 * plane);
      for (int64_t it = b; it < en; ++it) {
        const int64_t n = it / ncb, c0 = (it % ncb) * 4;
        const int nch = static_cast<int>(std::min<int64_t>(4, C - c0));
        const uint8_t* planes[4];
        for (int ci = 0; ci < nch; ++ci) {
          uint8_t* pl = buf.data() + ci * plane;
          const uint8_t* src = xs + ((n * C + c0 + ci) * H) * W;
          if (ph > 0) std::memset(pl, static_cast<int>(x_zp), ph * wb);
          for (int64_t h = 0; h < H; ++h) {
            uint8_t* row = pl + (h + ph) * wb;
            if (pw > 0) {
              std::memset(row, static_cast<int>(x_zp), pw);
              std::memset(row + pw + W, static_cast<int>(x_zp), pw);
            }
            std::memcpy(row + pw, src + h * W, W);
          }
          std::memset(pl + (H + ph) * wb, static_cast<int>(x_zp), plane - (H + ph) * wb);
          planes[ci] = pl;
        }
        dw_planar(planes, nch, wb, sh, sw, static_cast<int>(pk.KH), static_cast<int>(ntg),
                  idx.data(), wq + c0 * pk.KH * ntg, e, c0, (n * C + c0) * P, P, Ho, Wo);
      }
    });
    return out;
  }
#endif
  if (pk.depthwise) {
    const int64_t ct = round_up(C, kBlock);
    at::Tensor buf = at::empty({N, Hp, Wp, ct}, at::kByte);
    uint8_t* xp = buf.data_ptr<uint8_t>();
    const uint8_t* xs = x.data_ptr<uint8_t>();
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t en) {
      for (int64_t n = b; n < en; ++n)
        pad_to_nhwc(xs + n * C * H * W, nhwc, C, H, W, ph, pw, C, C, ct,
                    static_cast<uint8_t>(x_zp), false, xp + n * Hp * Wp * ct);
    });
    std::vector<int64_t> toff(ntaps);
    for (int64_t kh = 0; kh < pk.KH; ++kh)
      for (int64_t kw = 0; kw < pk.KW; ++kw) toff[kh * pk.KW + kw] = (kh * Wp + kw) * ct;
    const int64_t ncb = ct / kBlock;
    const int32_t* dww = pk.dw.data_ptr<int32_t>();
    const int32_t* dw2 = pk.dw2.data_ptr<int32_t>();
    at::parallel_for(0, N * ntiles, 1, [&](int64_t b, int64_t en) {
      alignas(64) int32_t cbuf[kTileRows * kBlock];
      const uint8_t* a[kTileRows];
      for (int64_t it = b; it < en; ++it) {
        const int64_t tile = it % ntiles, n = it / ntiles;
        const int64_t p0 = tile * kTileRows;
        const int rows = static_cast<int>(std::min<int64_t>(kTileRows, P - p0));
        row_pointers(a, rows, p0, Wo, [&](int64_t oh, int64_t ow) {
          return xp + ((n * Hp + oh * sh) * Wp + ow * sw) * ct;
        });
        for (int64_t cb = 0; cb < ncb; ++cb) {
          dw_tile(isa, a, cb * kBlock, toff.data(), static_cast<int>(ntaps), dww + cb * kBlock,
                  dw2 + cb * kBlock, ct, cbuf);
          const int cols = static_cast<int>(std::min<int64_t>(kBlock, C - cb * kBlock));
          epilogue(isa, e, cbuf, kBlock, dst(n, p0, cb * kBlock, rows, cols));
        }
      }
    });
    return out;
  }

#ifdef PDQ_X86
  // When the NCHW-native GEMM beats the NHWC one (single thread, Zen 4, see the comment at
  // to_x4): 1x1 convs unless the input is deep and the plane small (672/1152 channels at 7x7
  // were ~1.2-1.4x faster on NHWC); KxK only from 32 columns (Wp/Wo <= 1.06; at 28 and 16
  // columns the dropped padding columns cost more than the transposes they save).
  const bool nchw_native = Wp == Wo ? (C <= 256 || Wo >= 28) : Wo >= 32;
  if (!nhwc && pk.wn.defined() && isa == Isa::kAvx512Vnni && sh == 1 && sw == 1 &&
      nchw_native) {
    const int64_t c4n = (C + 3) / 4;
    // Slack: the last 64-output block reads up to 63 + (KW - 1) positions past Ho * Wp + taps.
    const int64_t L = Hp * Wp + 64 + pk.KW;
    at::Tensor buf = at::empty({N, c4n, L, 4}, at::kByte);
    uint8_t* x4 = buf.data_ptr<uint8_t>();
    const uint8_t* xs = x.data_ptr<uint8_t>();
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t en) {
      for (int64_t n = b; n < en; ++n)
        to_x4(xs + n * C * H * W, C, H, W, ph, pw, Wp, L, static_cast<uint8_t>(x_zp),
              x4 + n * c4n * L * 4);
    });
    std::vector<int64_t> toffp(ntaps);
    for (int64_t kh = 0; kh < pk.KH; ++kh)
      for (int64_t kw = 0; kw < pk.KW; ++kw) toffp[kh * pk.KW + kw] = kh * Wp + kw;
    const NchwGeom geo{L, c4n, ntaps, O, P, Ho, Wo, Wp, toffp.data()};
    const int64_t nblk = (Ho * Wp + 63) / 64;
    const int32_t* wn = pk.wn.data_ptr<int32_t>();
    at::parallel_for(0, N * nblk, 1, [&](int64_t b, int64_t en) {
      for (int64_t it = b; it < en;) {  // runs of blocks of one image per call
        const int64_t n = it / nblk, blk = it % nblk;
        const int64_t last = std::min(en, (n + 1) * nblk);
        nchw_gemm(x4 + n * c4n * L * 4, wn, geo, e, n, blk * 64, (blk + last - it) * 64);
        it = last;
      }
    });
    return out;
  }
#endif
  // Implicit GEMM over a padded NHWC buffer.
  const bool s16 = pk.mode == KMode::kS16;
  const int64_t elem = s16 ? 2 : 1;
  const int64_t ct = groups * pk.cpg;  // elements per buffer pixel
  const uint8_t* xp = nullptr;
  at::Tensor buf;
  const int64_t nsb = static_cast<int64_t>(pk.sb.size());
  int64_t img_bytes = Hp * Wp * ct * elem;
  // dense rows read up to 3 bytes past the last pixel, im2col copies up to 32 - KW * Cg
  const int64_t slack = pk.dense ? 64 : 0;
  const uint8_t* xs = x.data_ptr<uint8_t>();
  const bool direct = nhwc && ph == 0 && pw == 0 && !s16 && ct == C && !pk.dense;
  // Pixel-major order (one group, several superblocks whose panels fit in L2 together, the
  // kPixMajorPanel bound): each tile of 16 pixels runs every superblock before the next tile, so
  // its rows are read from memory once and then from L1, instead of once per superblock. In a
  // model a layer runs about as slowly as with its input evicted from every cache (ResNet-18 at
  // batch 8, one thread: the strided 1x1 downsample 64->128 took 0.42 ms with a warm input,
  // 0.91 ms after a 64 MB sweep and 0.89 ms in the model). Larger panels keep superblock-major
  // order (a panel stays in L2 while the pixels stream).
  const bool pix_major = groups == 1 && nsb > 1 && pk.group_bytes <= kPixMajorPanel;
  // Per-image padding: when the tiles run image after image (one superblock, or pixel-major
  // order) each thread pads the image it is about to work on into its own small buffer
  // (L2-resident for CIFAR/ImageNet-body sizes) instead of padding the whole batch first: the
  // batch crosses memory once instead of three times (read x, write the padded copy, read it
  // back). Shifted 8-bit weights then get their per-pixel sums (below) per image too, from the
  // same buffer.
  const bool per_image = !direct && groups == 1 && (nsb == 1 || pix_major) && !s16;
  const bool shifted = pk.off.defined();
  // With one group a kernel row's KW taps are contiguous in the buffer (pixel after pixel, ct
  // channels each) and in the panel's k order (kh, kw, c): one "tap" per kernel row then.
  const bool merge_kw = groups == 1;
  const int64_t cgroups_eff = pk.dense ? pk.cgroups : merge_kw ? pk.cgroups * pk.KW : pk.cgroups;
  std::vector<int64_t> toff(ntaps);
  for (int64_t kh = 0; kh < pk.KH; ++kh)
    for (int64_t kw = 0; kw < pk.KW; ++kw) toff[kh * pk.KW + kw] = (kh * Wp + kw) * ct * elem;
  if (merge_kw)
    for (int64_t kh = 0; kh < pk.KH; ++kh) toff[kh] = kh * Wp * ct * elem;
  const int8_t* panel = pk.panel.data_ptr<int8_t>();
  const bool wide = pk.max_abs_w > 64;
  constexpr int64_t ldc = kBlock * kMaxJB;
  // Edges: an output pixel whose kernel window reaches into the padding skips the kernel rows
  // (top, bottom) and, for deep inputs on small outputs, the kernel columns (left, right) that
  // read only padding: the micro-kernel runs the kernel rows [kh_lo, kh_lo + nkh) and, in each,
  // the columns [kw_lo, kw_lo + nkw) (one contiguous run of bytes per kernel row; the panel's
  // other columns skipped by wskip), and the epilogue subtracts x_zp times the weight sum of
  // those taps instead of all of them. The skipped padding would have added x_zp * w and the
  // full sum subtracted it again: the same accumulator, exactly. Pixels with the same window
  // form one block (a range of output rows times a range of columns); tiles (up to 16 pixels)
  // do not cross blocks. Rows alone keep tiles of consecutive pixels. With columns, a block
  // that is not whole rows gives tiles of scattered pixels (outputs through TileDst::row_off, so
  // NHWC output only, and not for dense rows or shifted 8-bit weights), and small blocks give
  // short micro-kernel calls: columns are used only where a count of the micro-kernel's work
  // (tiling_cost) says they save at least 5%. Where tiles need not run image by image, a
  // block's tiles run through its pixels in every image, so calls are full (ResNet-18 at 7x7,
  // batch 8: a corner block is one 8-row call, not eight 1-row ones; with per-image blocks the
  // 7x7 layers had stayed on rows and took 4.0 ms, with batch blocks 3.55 ms, in the model).
  // Per-image layers (one superblock, or pixel-major) keep blocks per image. A 3x3 conv with
  // padding 1 spends a third of the work of its first and last rows and columns on padding.
  // One group only (kernel rows merged), not int16.
  struct Span {
    int64_t end, lo, n;  // output indices [previous end, end) read kernel taps [lo, lo + n)
  };
  auto spans = [](int64_t nout, int64_t stride, int64_t pad, int64_t K, int64_t in, bool on) {
    std::vector<Span> v;
    for (int64_t i = 0; i < nout; ++i) {
      int64_t lo = 0, hi = K - 1;
      if (on) {
        lo = std::max<int64_t>(0, pad - i * stride);
        hi = std::min<int64_t>(K - 1, in - 1 + pad - i * stride);
      }
      const int64_t n = std::max<int64_t>(0, hi - lo + 1);
      if (!v.empty() && v.back().lo == lo && v.back().n == n) {
        v.back().end = i + 1;
      } else {
        v.push_back({i + 1, lo, n});
      }
    }
    return v;
  };
  const bool edge_rows = merge_kw && !s16 && ph > 0 && !pk.im2col;
  const std::vector<Span> vsp = spans(Ho, sh, ph, pk.KH, H, edge_rows);
  // Tiles of a tiling (rows vsp x columns cs; the same for every image): up to 16 pixels within
  // one block (block vi * cs.size() + ci). With whole rows (one column span) the pixels are
  // consecutive; otherwise each tile is a run of pix, the block's pixels (image * P + pixel) in
  // raster order over nimg images (1: one tile list per image; N: one for the batch).
  struct Tile {
    int64_t p0;  // first pixel, or (scattered) first index into pix
    int rows;
    int block;
    bool scattered;
  };
  auto make_tiles = [&](const std::vector<Span>& cs, int64_t nimg, std::vector<Tile>& tiles,
                        std::vector<int64_t>& pix) {
    for (size_t vi = 0; vi < vsp.size(); ++vi) {
      const int64_t oh0 = vi == 0 ? 0 : vsp[vi - 1].end, oh1 = vsp[vi].end;
      if (cs.size() == 1) {  // whole rows: consecutive pixels
        for (int64_t p = oh0 * Wo; p < oh1 * Wo; p += kTileRows)
          tiles.push_back({p, static_cast<int>(std::min<int64_t>(kTileRows, oh1 * Wo - p)),
                           static_cast<int>(vi), false});
        continue;
      }
      for (size_t ci = 0; ci < cs.size(); ++ci) {
        const int64_t ow0 = ci == 0 ? 0 : cs[ci - 1].end, ow1 = cs[ci].end;
        const int blk = static_cast<int>(vi * cs.size() + ci);
        const int64_t first = static_cast<int64_t>(pix.size());
        for (int64_t n = 0; n < nimg; ++n)
          for (int64_t oh = oh0; oh < oh1; ++oh)
            for (int64_t ow = ow0; ow < ow1; ++ow) pix.push_back(n * P + oh * Wo + ow);
        const int64_t last = static_cast<int64_t>(pix.size());
        for (int64_t q = first; q < last; q += kTileRows)
          tiles.push_back({q, static_cast<int>(std::min<int64_t>(kTileRows, last - q)), blk, true});
      }
    }
  };
  // Micro-kernel work of a tiling, in row x tap units: its tiles' calls of up to 8 rows, rounded
  // up to 1, 2, 4 or 8 as the kernel runs them, 1-2-row calls counted twice (too few
  // accumulators to hide the vpdpbusd latency).
  auto tiling_cost = [&](const std::vector<Span>& cs, int64_t nimg) {
    std::vector<Tile> tiles;
    std::vector<int64_t> pix;
    make_tiles(cs, nimg, tiles, pix);
    int64_t cost = 0;
    for (const Tile& tl : tiles) {
      const int64_t taps = vsp[tl.block / cs.size()].n * cs[tl.block % cs.size()].n;
      for (int r0 = 0; r0 < tl.rows; r0 += kMR) {
        const int m = std::min(kMR, tl.rows - r0);
        const int64_t run = m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : 8;
        cost += run * taps * (m <= 2 ? 2 : 1);
      }
    }
    return cost;
  };
  std::vector<Span> csp = spans(Wo, sw, pw, pk.KW, W, false);
  // Edge blocks across the batch where tiles need not run image by image (not per_image): a
  // 7x7 output's left column at batch 8 is 40 pixels, five full 8-row calls, instead of a
  // 5-row call per image; a corner one 8-row call instead of eight 1-row ones.
  const int64_t nimg_cols = per_image ? 1 : N;
  if (edge_rows && nhwc && pw > 0 && !pk.dense && !shifted) {
    std::vector<Span> cols = spans(Wo, sw, pw, pk.KW, W, true);
    // Scattered tiles cost more outside the micro-kernel, a cost that weighs less the more
    // work each pixel carries: columns must save 5%, or 1% from 64 input channels on (in the
    // model, ResNet-18 at batch 8: the 64-channel 56x56 and 128-channel 28x28 convs, 1.2% and
    // 2.4% of padding work, ran 1-2.5% faster with columns; ResNet-20's 16- and 32-channel
    // convs at 32x32 and 16x16 ran 20% and 11% slower).
    const int64_t keep = pk.Cg >= 64 ? 99 : 95;
    if (cols.size() > 1 &&
        100 * tiling_cost(cols, nimg_cols) * (N / nimg_cols) < keep * tiling_cost(csp, 1) * N)
      csp = std::move(cols);
  }
  const bool edge_cols = csp.size() > 1;
  const int64_t nimg = edge_cols ? nimg_cols : 1;  // images per tile list
  // No padded copy at all where no tap reads padding: with the edge rows and (where there is
  // horizontal padding) the edge columns, every block runs only in-bounds taps, so
  // channels_last codes with C % 4 == 0 are read in place (window offsets from the unpadded
  // origin, row stride W). The copy it saves wrote and read the whole input once more.
  const bool unpadded = !direct && merge_kw && nhwc && !s16 && ct == C && !pk.dense &&
                        !shifted && (ph == 0 || edge_rows) && (pw == 0 || edge_cols);
  const int64_t RS = unpadded ? W : Wp, oph = unpadded ? ph : 0, opw = unpadded ? pw : 0;
  const bool pad_image = per_image && !unpadded;  // per-thread, per-image padded copies
  if (unpadded) {
    img_bytes = H * W * ct * elem;
    for (int64_t kh = 0; kh < pk.KH; ++kh) toff[kh] = kh * RS * ct * elem;
  }
  if (direct || unpadded) {
    xp = xs;  // channels_last, C % 4 == 0: use x directly
  } else if (!pad_image) {
    buf = at::empty({N * img_bytes + slack}, at::kByte);
    uint8_t* bp = buf.data_ptr<uint8_t>();
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t en) {
      for (int64_t n = b; n < en; ++n)
        pad_to_nhwc(xs + n * C * H * W, nhwc, C, H, W, ph, pw, pk.Cg, pk.cpg, ct,
                    static_cast<uint8_t>(x_zp), s16, bp + n * Hp * Wp * ct * elem);
    });
    xp = bp;
  }
  // Shifted int8 weights (see PackedConv::off): the epilogue needs, per output pixel p, the sum
  // of the codes over its receptive field (padding holds x_zp) minus x_zp * K.
  const ReceptiveSums rs{Hp, Wp, ct, pk.Cg, pk.KH, pk.KW, sh, sw, Ho, Wo,
                         static_cast<int32_t>(x_zp * pk.Cg * ntaps),
                         isa == Isa::kAvx512Vnni && has_vbmi()};
  std::vector<int32_t> sx;
  if (shifted) {
    e.off = pk.off.data_ptr<int32_t>();
    if (!pad_image) {  // sums of the whole (padded or direct) batch first
      sx.resize(N * P);
      at::parallel_for(0, N, 1, [&](int64_t b, int64_t en) {
        std::vector<int32_t> tmp(rs.scratch());
        for (int64_t n = b; n < en; ++n) rs(xp + n * img_bytes, tmp.data(), sx.data() + n * P);
      });
      e.sx = sx.data();
    }
  }
  struct Block {
    std::vector<int64_t> toff;  // per kernel row of the run, from the first one
    int64_t first = 0;          // byte offset of the run's first tap in a pixel's window
    bool none = false;          // no taps (rows or columns reading only padding)
    int64_t kg0 = 0, cgroups = 0, kgskip = 0;  // panel k-groups: first, per tap, skipped after
    std::vector<int32_t> sumw;  // empty: all taps (e.sumw)
  };
  std::vector<Block> blocks(vsp.size() * csp.size());
  const int32_t* tsw = pk.tapsumw.data_ptr<int32_t>();
  for (size_t vi = 0; vi < vsp.size(); ++vi)
    for (size_t ci = 0; ci < csp.size(); ++ci) {
      Block& bl = blocks[vi * csp.size() + ci];
      const Span &vs = vsp[vi], &cs = csp[ci];
      if (!merge_kw) {
        bl.toff = toff;
        bl.cgroups = cgroups_eff;
        continue;
      }
      if (pk.im2col) {  // one tap: the tile's im2col rows
        bl.toff = {0};
        bl.cgroups = pk.cgroups;
        continue;
      }
      bl.none = vs.n == 0 || cs.n == 0;
      if (!bl.none) bl.first = toff[vs.lo] + cs.lo * ct * elem;
      for (int64_t kh = vs.lo; kh < vs.lo + vs.n; ++kh)
        bl.toff.push_back(toff[kh] - toff[vs.lo]);
      if (edge_cols) {
        bl.kg0 = (vs.lo * pk.KW + cs.lo) * pk.cgroups;
        bl.cgroups = cs.n * pk.cgroups;
        bl.kgskip = (pk.KW - cs.n) * pk.cgroups;
      } else {
        bl.kg0 = vs.lo * cgroups_eff;
        bl.cgroups = cgroups_eff;
      }
      if (vs.n != pk.KH || cs.n != pk.KW) {
        bl.sumw.assign(O, 0);
        for (int64_t kh = vs.lo; kh < vs.lo + vs.n; ++kh)
          for (int64_t kw = cs.lo; kw < cs.lo + cs.n; ++kw)
            for (int64_t o = 0; o < O; ++o) bl.sumw[o] += tsw[(kh * pk.KW + kw) * O + o];
      }
    }
  std::vector<Tile> tiles;
  std::vector<int64_t> pix;  // pixels of the scattered tiles
  make_tiles(csp, nimg, tiles, pix);
  const int64_t ntl = static_cast<int64_t>(tiles.size());
  const int64_t nit = N / nimg;  // tile lists per (group, superblock)
  // Items: (image, tile) with every superblock inside in pixel-major order; otherwise ordered
  // (group, superblock) outermost, so each thread works through whole weight panels (<= 48
  // channels x K bytes, L2-resident) while the pixels stream.
  const int64_t nsb_in = pix_major ? nsb : 1;  // superblocks per item
  at::parallel_for(0, groups * (nsb / nsb_in) * nit * ntl, 1, [&](int64_t b, int64_t en) {
    alignas(64) int32_t cbuf[kTileRows * ldc];
    const uint8_t* rowp[kTileRows];
    // im2col rows (ldk bytes each, + 32 bytes of slack for the last row's 32-byte copies)
    const int64_t krow = pk.KW * pk.Cg, ldk = pk.cgroups * 4;
    std::vector<uint8_t> col(pk.im2col ? kTileRows * ldk + 32 : 0);
    int64_t row_off[kTileRows];
    std::vector<uint8_t> scratch(pad_image ? img_bytes + slack : 0);
    // per-image shifted weights: this image's receptive-field sums, read at row p0 + r
    const bool own_sx = pad_image && shifted;
    std::vector<int32_t> sx_img(own_sx ? P : 0), sx_tmp(own_sx ? rs.scratch() : 0);
    Epilogue el = e;
    if (own_sx) el.sx = sx_img.data();
    int64_t padded = -1;  // the image in scratch
    for (int64_t it = b; it < en; ++it) {
      const Tile& tl = tiles[it % ntl];
      const Block& bl = blocks[tl.block];
      const int64_t n = (it / ntl) % nit;  // 0 with tiles across the batch
      const int64_t s_item = pix_major ? 0 : (it / (ntl * nit)) % nsb;
      const int64_t g = pix_major ? 0 : it / (ntl * nit * nsb);
      const int64_t p0 = tl.p0;
      const int rows = tl.rows;
      el.sumw = bl.sumw.empty() ? e.sumw : bl.sumw.data();
      const uint8_t* img;
      if (pad_image) {
        if (padded != n) {
          pad_to_nhwc(xs + n * C * H * W, nhwc, C, H, W, ph, pw, pk.Cg, pk.cpg, ct,
                      static_cast<uint8_t>(x_zp), false, scratch.data());
          if (own_sx) rs(scratch.data(), sx_tmp.data(), sx_img.data());
          padded = n;
        }
        img = scratch.data();
      } else {
        img = xp + n * img_bytes;
      }
      auto window = [&](int64_t oh, int64_t ow) {  // output pixel -> its run's first tap
        if (bl.none) return img;  // never read
        return img + (((oh * sh - oph) * RS + ow * sw - opw) * ct + g * pk.cpg) * elem + bl.first;
      };
      if (tl.scattered) {
        for (int r = 0; r < kTileRows; ++r) {  // pix: image * P + pixel
          const int64_t q = pix[p0 + std::min(r, rows - 1)], p = q % P;
          rowp[r] = window(p / Wo, p % Wo) + (q / P) * img_bytes;
        }
      } else {
        row_pointers(rowp, rows, p0, Wo, window);
      }
      if (pk.im2col) {
        im2col_rows(isa, rowp, rows, pk.KH, RS * ct, krow, ldk, col.data());
        for (int r = 0; r < rows; ++r) rowp[r] = col.data() + r * ldk;
        for (int r = rows; r < kTileRows; ++r) rowp[r] = rowp[rows - 1];
      }
      for (int64_t s = s_item; s < s_item + nsb_in; ++s) {
        UkArgs u;
        u.jb = pk.sb[s];
        u.toff = bl.toff.data();
        u.ntaps = static_cast<int>(bl.toff.size());
        u.cgroups = bl.cgroups;
        u.w = panel + g * pk.group_bytes + pk.sb_off[s] + bl.kg0 * 64 * u.jb;
        u.wskip = bl.kgskip * 64 * u.jb;
        u.ldc = ldc;
        u.mode = pk.mode;
        u.wide = wide;
        const int step = u.jb == 4 ? kMR4 : kMR;  // rows per micro-kernel call
        for (int r0 = 0; r0 < rows; r0 += step) {
          u.mr = std::min(step, rows - r0);
          for (int m = 0; m < kMR; ++m) u.a[m] = rowp[r0 + (m < u.mr ? m : 0)];
          u.c = cbuf + r0 * ldc;
          ukernel(isa, u);
        }
        const int64_t oc0 = pk.sb_block0[s] * kBlock;  // channel within the group
        const int cols = static_cast<int>(std::min<int64_t>(kBlock * u.jb, pk.Og - oc0));
        TileDst d;
        if (tl.scattered) {  // NHWC output (edge_cols)
          for (int r = 0; r < rows; ++r) row_off[r] = (n * P + pix[p0 + r]) * O + g * pk.Og + oc0;
          d = {0, O, 1, g * pk.Og + oc0, rows, cols, 0, row_off};
        } else {
          d = dst(n, p0, g * pk.Og + oc0, rows, cols);
          if (own_sx) d.sx_row0 = p0;
        }
        epilogue(isa, el, cbuf, ldc, d);
      }
    }
  });
  return out;
}

at::Tensor qconv2d_cpu(const at::Tensor& x, int64_t x_zp, const at::Tensor& w,
                       const at::Tensor& scale, const at::Tensor& bias,
                       const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                       int64_t groups, int64_t act, const std::optional<at::Tensor>& residual,
                       double out_scale, int64_t out_zp, int64_t out_bits, double res_scale,
                       int64_t res_zp) {
  const auto pk = prepack(w, groups);
  return run(*pk, x, x_zp, scale, bias, stride, padding, groups, act, residual, out_scale,
             out_zp, out_bits, res_scale, res_zp);
}

at::Tensor qconv2d_packed_cpu(const at::Tensor& x, int64_t x_zp, const PackedConv& pk,
                              const at::Tensor& scale, const at::Tensor& bias,
                              const std::vector<int64_t>& stride,
                              const std::vector<int64_t>& padding, int64_t groups, int64_t act,
                              const std::optional<at::Tensor>& residual, double out_scale,
                              int64_t out_zp, int64_t out_bits, double res_scale, int64_t res_zp) {
  return run(pk, x, x_zp, scale, bias, stride, padding, groups, act, residual, out_scale, out_zp,
             out_bits, res_scale, res_zp);
}

void register_qconv(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<PackedConv, std::shared_ptr<PackedConv>>(
      m, "QConvPackedCpu",
      "Conv weights prepacked by qconv2d_prepack_cpu for qconv2d_packed_cpu (opaque).")
      .def_readonly("out_channels", &PackedConv::O)
      .def_readonly("in_channels_per_group", &PackedConv::Cg)
      .def_readonly("kh", &PackedConv::KH)
      .def_readonly("kw", &PackedConv::KW)
      .def_readonly("groups", &PackedConv::groups)
      .def_readonly("depthwise", &PackedConv::depthwise)
      .def_property_readonly("int16", [](const PackedConv& p) { return p.mode == KMode::kS16; })
      .def_property_readonly("shifted", [](const PackedConv& p) { return p.off.defined(); })
      .def_readonly("dense_rows", &PackedConv::dense)
      .def_readonly("im2col", &PackedConv::im2col)
      .def_property_readonly("nbytes", &PackedConv::nbytes)
      .def("__repr__", [](const PackedConv& p) {
        return "QConvPackedCpu(O=" + std::to_string(p.O) + ", C/g=" + std::to_string(p.Cg) +
               ", k=" + std::to_string(p.KH) + "x" + std::to_string(p.KW) +
               ", groups=" + std::to_string(p.groups) +
               (p.depthwise                ? ", depthwise"
                : p.mode == KMode::kS16    ? ", int16"
                : p.off.defined()          ? ", shifted int8"
                                           : ", int8") +
               ")";
      });
  m.def("qconv2d_cpu", &qconv2d_cpu, py::arg("x"), py::arg("x_zp"), py::arg("w"),
        py::arg("scale"), py::arg("bias"), py::arg("stride"), py::arg("padding"),
        py::arg("groups"), py::arg("act"), py::arg("residual"), py::arg("out_scale"),
        py::arg("out_zp"), py::arg("out_bits"),
        py::arg("res_scale") = 0.0, py::arg("res_zp") = 0,
        "pdquant::qconv2d on CPU (prepacks w on every call; use qconv2d_prepack_cpu + "
        "qconv2d_packed_cpu at load time / run time)");
  // The packed runtime (pdquant_fast.deploy.runtime) passes the prepacked blob in place of w to
  // qconv2d_cpu itself: the same name accepts either.
  m.def("qconv2d_cpu", &qconv2d_packed_cpu, py::arg("x"), py::arg("x_zp"), py::arg("w"),
        py::arg("scale"), py::arg("bias"), py::arg("stride"), py::arg("padding"),
        py::arg("groups"), py::arg("act"), py::arg("residual"), py::arg("out_scale"),
        py::arg("out_zp"), py::arg("out_bits"), py::arg("res_scale") = 0.0,
        py::arg("res_zp") = 0);
  m.def("qconv2d_prepack_cpu", &prepack, py::arg("w"), py::arg("groups"),
        "prepack int8/int16 conv weight offsets [O, C/groups, KH, KW] for qconv2d_packed_cpu");
  m.def("qconv2d_packed_cpu", &qconv2d_packed_cpu, py::arg("x"), py::arg("x_zp"),
        py::arg("packed"), py::arg("scale"), py::arg("bias"), py::arg("stride"),
        py::arg("padding"), py::arg("groups"), py::arg("act"), py::arg("residual"),
        py::arg("out_scale"), py::arg("out_zp"), py::arg("out_bits"),
        py::arg("res_scale") = 0.0, py::arg("res_zp") = 0,
        "qconv2d_cpu with weights from qconv2d_prepack_cpu (same arguments, w -> packed)");
}

}  // namespace
}  // namespace pdquant::qk

PDQ_REGISTER(pdquant::qk::register_qconv);
