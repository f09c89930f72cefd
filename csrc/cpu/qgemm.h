// Shared integer GEMM machinery for the packed low-bit CPU kernels (qconv.cpp, qlinear.cpp).
//
// What is shared:
//   * run-time ISA choice: AVX-512 VNNI, AVX2, scalar (PDQUANT_CPU_ISA / set_isa force one);
//   * the u8 x s8 (and int16 x int16) micro-kernel over a prepacked weight panel;
//   * the fused requantisation epilogue (zero-point correction, scale, bias, residual, act,
//     output codes), vectorised, bit-exact with the reference formula op for op.
//
// The GEMM is C[m][o] = sum_k A[m][k] * B[k][o], with m = output pixel (conv, NHWC implicit
// GEMM) or batch row (linear) and o = output channel. A rows are given as byte pointers; the
// reduction walks `ntaps` taps (conv kernel positions, byte offset toff[t] from the row pointer)
// times `cgroups` 4-byte groups (4 uint8 channels, or 2 int16 channels) per tap.
//
// Weight panel layout (B), one "superblock" of jb <= 3 blocks of 16 output channels:
//
//     panel[kgroup][jb][16 channels][4 bytes]          kgroup = tap * cgroups + cgroup
//       u8s8: 4 bytes = int8 weights of channels 4*cgroup + 0..3 (the VNNI dword)
//       s16 : 4 bytes = int16 weights of channels 2*cgroup + 0..1
//
// so one 64-byte load is one zmm of weights for 16 output channels and one k-group, and the
// panel is read strictly sequentially. Padded channels/rows hold 0.
//
// Zero points: A holds raw activation codes x (not x - x_zp). The epilogue applies
//     acc = raw - x_zp * sumw[o] - off[o] * sx[m]
// sumw[o] = sum_k w[o][k]; `off`/`sx` only for nibble-packed linear weights (qlinear.cpp).
// Spatial padding holds x_zp, which then contributes x_zp*w - x_zp*w = 0, as the contract asks.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>

namespace pdquant::qk {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };

const char* isa_name(Isa isa);
// Best ISA this CPU runs (AVX-512 F/BW/VL/VNNI, else AVX2, else scalar).
Isa best_isa();
// The ISA the kernels use now: set_isa() if called, else $PDQUANT_CPU_ISA, else best_isa().
// Throws if the forced ISA is unknown or not supported by this CPU.
Isa active_isa();
// "" or "auto" clears the override; otherwise one of "scalar", "avx2", "avx512vnni".
void set_isa(const std::string& name);

constexpr int kBlock = 16;     // output channels per weight block (16 int32 lanes of a zmm)
constexpr int kMR = 8;         // A rows per micro-kernel call (8 x 3 zmm accumulators = 24)
constexpr int kStdJB = 3;      // blocks per superblock: 24 acc + 3 weights + 1 broadcast <= 32 zmm
constexpr int kMaxJB = 4;      // 4-block superblocks (64-channel convs) run 6 rows per call:
constexpr int kMR4 = 6;        //   24 acc + 4 weights + 1 broadcast = 29 zmm
constexpr int kTileRows = 16;  // rows per epilogue tile (a 16x16 int32 transpose for NCHW out)

enum class KMode : int {
  kU8S8 = 0,  // A uint8, B int8, 4 per k-group (vpdpbusd)
  kS16 = 1,   // A int16, B int16, 2 per k-group (vpdpwssd / vpmaddwd): 8-bit weight offsets
};

// Arguments of one micro-kernel call: C[0..mr)[0..16*jb) = sum over taps/groups of A x B.
struct UkArgs {
  const uint8_t* a[kMR];  // row base pointers (rows >= mr may repeat row 0; results ignored)
  const int64_t* toff;    // byte offset of each tap from the row pointer
  int ntaps;
  int64_t cgroups;  // 4-byte groups per tap
  int64_t wskip = 0;  // panel bytes skipped after each tap (a conv tile that reads only some
                      // kernel columns: the groups of the others)
  const int8_t* w;  // superblock panel
  int jb;           // 1..kMaxJB
  int mr;           // rows computed: 1, 2, 4 or 8 (rounded up by the caller)
  int32_t* c;       // [kMR][ldc] int32, written (not accumulated)
  int64_t ldc;
  KMode mode;
  bool wide;  // AVX2 u8s8 only: max|w| > 64, so vpmaddubsw could saturate; split x in nibbles
};
void ukernel(Isa isa, const UkArgs& args);

// Nibble/crumb-packed weights (qlinear): panel[kgroup / per][jb][64 bytes], `per` = 8 / bits
// consecutive k-groups share one 64-byte line, k-group kg sits at bit (kg % per) * bits of each
// byte. Values are unsigned u = w + off[o] in [0, 2^bits - 1].
struct UkPackedArgs {
  const uint8_t* a[kMR];
  int64_t kgroups;  // multiple of 8 / bits
  const uint8_t* w;
  int bits;  // 2 or 4
  int jb;
  int mr;
  int32_t* c;
  int64_t ldc;
};
void ukernel_packed(Isa isa, const UkPackedArgs& args);

// Requantisation of an int32 tile, exactly the contract's formula:
//   acc = raw - x_zp * sumw[o] (- off[o] * sx[r])
//   y = float(acc) * scale[o] + bias[o]      (two roundings, no FMA)
//   y = y + r                                 (if residual: r = residual[idx], or for uint8
//                                              residual codes r = (float(q) - res_zp) * res_scale)
//   y = relu(y) / min(max(y, 0), 6)           (act 1 / 2)
//   out = y (float32)  or  clamp(round_half_even(y / out_scale) + out_zp, 0, 2^bits - 1) (uint8)
struct Epilogue {
  int32_t x_zp = 0;
  const int32_t* sumw = nullptr;  // [O]
  const int32_t* off = nullptr;   // [O] or null
  const int32_t* sx = nullptr;    // per row (indexed by the tile's row index + sx_row0) or null
  const float* scale = nullptr;   // [O]
  const float* bias = nullptr;    // [O]
  const float* residual = nullptr;      // same layout as out, or null
  const uint8_t* residual_q = nullptr;  // or uint8 codes in that layout (residual null)
  float res_scale = 0.f;                // their step and zero point
  float res_zp = 0.f;
  int act = 0;
  float out_scale = 1.f;
  float out_zp = 0.f;
  float qmax = 0.f;  // 2^out_bits - 1
  int out_bits = 0;  // 0: float32 output
  void* out = nullptr;
};

// Where a tile goes: element (row r, channel o0 + j) of the output sits at flat index
//   base + r * row_stride + j * ch_stride
// (NCHW conv: row_stride 1, ch_stride H*W; NHWC conv and linear: row_stride O, ch_stride 1).
struct TileDst {
  int64_t base;
  int64_t row_stride;
  int64_t ch_stride;
  int64_t o0;       // first channel (indexes sumw/off/scale/bias)
  int rows;         // valid rows, <= kTileRows
  int cols;         // valid channels, <= kBlock * kMaxJB
  int64_t sx_row0;  // index of row 0 in Epilogue::sx
  // If set (NHWC / ch_stride 1 only; not with Epilogue::sx): row r's element (r, o0) sits at
  // flat index row_off[r] instead of base + r * row_stride (tiles of scattered pixels).
  const int64_t* row_off = nullptr;
};
inline int64_t row_at(const TileDst& d, int r) {
  return d.row_off != nullptr ? d.row_off[r] : d.base + r * d.row_stride;
}
void epilogue(Isa isa, const Epilogue& e, const int32_t* c, int64_t ldc, const TileDst& d);

// "[d0, d1, ...]" for error messages.
std::string shape_str(const at::Tensor& t);

// The argument checks qconv2d and qlinear share (errors: std::invalid_argument prefixed with
// `op`): x uint8 on the CPU; then x_zp, act, out_bits, out_scale, out_zp (0..2^out_bits - 1
// for code output) and scale/bias float32 [O].
void check_codes_input(const at::Tensor& x, const char* op);
void check_requant_args(int64_t x_zp, int64_t act, double out_scale, int64_t out_bits,
                        int64_t out_zp, const at::Tensor& scale, const at::Tensor& bias,
                        int64_t O, const char* op);
// Fills the requantisation fields of e shared by qconv2d and qlinear (not off/sx/residual).
void set_requant(Epilogue& e, int64_t x_zp, const at::Tensor& sumw, const at::Tensor& scale,
                 const at::Tensor& bias, int64_t act, double out_scale, int64_t out_zp,
                 int64_t out_bits, const at::Tensor& out);

// Checks the optional residual of qconv2d/qlinear against `out` (float32 values, or uint8 codes
// with res_scale finite > 0 and res_zp in 0..255; CPU; out's shape), keeps it `fmt`-contiguous
// in *keep and points e.residual / e.residual_q (+ res_scale, res_zp) at it. Errors throw
// std::invalid_argument prefixed with `op`.
void bind_residual(Epilogue& e, const std::optional<at::Tensor>& residual, const at::Tensor& out,
                   at::MemoryFormat fmt, double res_scale, int64_t res_zp, at::Tensor* keep,
                   const char* op);

// Requantises a tile stored channel-major, c[i][px] (i < nch channels o0 + i, px < npix <= 16
// consecutive output pixels): value (i, px) goes to flat output index base + i * ch_stride + px.
// (The NCHW-native layout of the planar depthwise kernel.) Not for `off`/`sx` (linear only).
void epilogue_cols(Isa isa, const Epilogue& e, const int32_t* c, int64_t ldc, int64_t o0,
                   int nch, int64_t base, int64_t ch_stride, int npix);

// AVX-512 VBMI (vpermb) present: the planar depthwise kernel can run.
bool has_vbmi();

// Copies image n of x (NCHW [C][H][W] or NHWC [H][W][C] uint8) into a zero-point-padded NHWC
// buffer dst[Hp][Wp][ct] (uint8, or int16 when s16), channel c at slot slot(c) =
// (c / cg) * cpg + c % cg; the rest (borders, padded channel slots) holds x_zp.
void pad_to_nhwc(const uint8_t* x, bool x_nhwc, int64_t C, int64_t H, int64_t W, int64_t ph,
                 int64_t pw, int64_t cg, int64_t cpg, int64_t ct, uint8_t x_zp, bool s16,
                 void* dst);

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Splits nblocks 16-channel blocks into superblocks of <= kStdJB blocks: sizes 3,3,...,r
// with the remainder r in 1..3, (4 blocks: 2+2, so no superblock of 1 when avoidable); with
// allow4 (convs), exactly 4 blocks are one superblock of 4 (kMR4 rows per micro-kernel call).
std::vector<int> superblocks(int64_t nblocks, bool allow4 = false);

}  // namespace pdquant::qk
