// quantize_codes_cpu: float32 activations -> uint8 codes of a per-tensor quantizer, one pass.
//
// Contract (pdquant_fast/ops/library.py, deployment section; reference.quantize_codes_reference):
//   q = clamp(round_half_even(x / delta) + zp, 0, 2^bits - 1)      float32 math, uint8 out
// with true IEEE division (not a multiply by 1 / delta) and round half to even, so the codes are
// the simulation's (and the packed runtime's ActParams.quantize's) bit for bit. The output has
// x's shape and memory format (a dense tensor in any dim order is read and written as its flat
// storage); other strided inputs are made contiguous first. NaN inputs give an unspecified code
// (the reference's NaN-to-uint8 cast is itself unspecified).
//
// Entry points (pdquant_fast._C): quantize_codes_cpu(x, delta, zp, bits, channels_last=False)
// -> uint8 tensor (channels_last: channels_last codes of a 4-d x), and
// its inverse dequantize_codes_cpu(codes, delta, zp) -> float32 (see below).
// ISA: AVX-512 when the q-kernels' active ISA is avx512vnni (PDQUANT_CPU_ISA), else scalar
// (the compiler may vectorise it; the math is the same element by element).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "cpu/qgemm.h"
#include "cpu/qsimd.h"
#include "registry.h"

namespace pdquant::qk {
namespace {

void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("quantize_codes_cpu: " + msg);
}

// Round half to even: nearbyint under the default rounding mode (to nearest, ties to even),
// which nothing in this library changes.
inline float rhe(float v) { return std::nearbyint(v); }

void quantize_scalar(const float* x, uint8_t* q, int64_t n, float delta, float zp, float qmax) {
  for (int64_t i = 0; i < n; ++i) {
    float v = rhe(x[i] / delta) + zp;
    v = std::min(std::max(v, 0.f), qmax);
    q[i] = static_cast<uint8_t>(static_cast<int32_t>(v));
  }
}

#ifdef PDQ_X86
PDQ_VNNI void quantize_avx512(const float* x, uint8_t* q, int64_t n, float delta, float zp,
                              float qmax) {
  const __m512 vd = _mm512_set1_ps(delta), vz = _mm512_set1_ps(zp), vq = _mm512_set1_ps(qmax);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    __m512i c[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) c[j] = qvec(_mm512_loadu_ps(x + i + 16 * j), vd, vz, vq);
    _mm512_storeu_si512(q + i, narrow4(c[0], c[1], c[2], c[3]));
  }
  for (; i < n; i += 16) {
    const int64_t r = std::min<int64_t>(16, n - i);
    const __mmask16 k = r == 16 ? 0xFFFF : static_cast<__mmask16>((1u << r) - 1);
    const __m512i c = qvec(_mm512_maskz_loadu_ps(k, x + i), vd, vz, vq);
    _mm_mask_storeu_epi8(q + i, k, _mm512_cvtepi32_epi8(c));
  }
}
#endif

#ifdef PDQ_X86
// Rows nh in [b, e) (image nh / H, row nh % H) of C <= 4 NCHW planes of H x W floats ->
// interleaved channels_last codes q[(nh W + w) C + c]: 16 pixels at a time, the C code vectors
// narrowed into one register (lane c = channel c's 16 bytes) and interleaved by one vpermb.
PDQ_VBMI void quantize_rows_cl_vbmi(const float* x, int64_t C, int64_t H, int64_t W, int64_t b,
                                    int64_t e, uint8_t* q, float delta, float zp, float qmax) {
  const __m512 vd = _mm512_set1_ps(delta), vz = _mm512_set1_ps(zp), vq = _mm512_set1_ps(qmax);
  alignas(64) uint8_t idx[64];
  for (int j = 0; j < 64; ++j)
    idx[j] = static_cast<uint8_t>(j < 16 * C ? (j % C) * 16 + j / C : 0);
  const __m512i perm = _mm512_load_si512(idx);
  const int64_t plane = H * W;
  for (int64_t nh = b; nh < e; ++nh) {
    const float* xr = x + ((nh / H) * C * H + nh % H) * W;
    uint8_t* qr = q + nh * W * C;
    for (int64_t w0 = 0; w0 < W; w0 += 16) {
      const int64_t r = std::min<int64_t>(16, W - w0);
      const __mmask16 k = r == 16 ? 0xFFFF : static_cast<__mmask16>((1u << r) - 1);
      __m512i c[4];
#pragma GCC unroll 4
      for (int64_t ch = 0; ch < 4; ++ch)
        c[ch] = ch < C ? qvec(_mm512_maskz_loadu_ps(k, xr + ch * plane + w0), vd, vz, vq)
                       : _mm512_setzero_si512();
      const __m512i v = _mm512_permutexvar_epi8(perm, narrow4(c[0], c[1], c[2], c[3]));
      const int64_t nb = r * C;
      const __mmask64 m = nb == 64 ? ~__mmask64{0} : ((__mmask64{1} << nb) - 1);
      _mm512_mask_storeu_epi8(qr + w0 * C, m, v);
    }
  }
}
#endif

// x [N, C, H, W] contiguous NCHW -> channels_last codes, interleaved row by row, where C <= 4
// and VBMI is active; else an undefined tensor (the caller then copies the layout).
at::Tensor quantize_cl_interleaved(const at::Tensor& x, float d, float z, float qmax) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
#ifdef PDQ_X86
  if (C <= 4 && active_isa() == Isa::kAvx512Vnni && has_vbmi()) {
    at::Tensor q = at::empty({N, C, H, W}, x.options().dtype(at::kByte),
                             at::MemoryFormat::ChannelsLast);
    if (q.numel() == 0) return q;
    const float* xp = x.data_ptr<float>();
    uint8_t* qp = q.data_ptr<uint8_t>();
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, W * C));
    at::parallel_for(0, N * H, grain, [&](int64_t b, int64_t e) {
      quantize_rows_cl_vbmi(xp, C, H, W, b, e, qp, d, z, qmax);
    });
    return q;
  }
#endif
  (void)N, (void)C, (void)H, (void)W, (void)d, (void)z, (void)qmax;
  return {};
}

at::Tensor quantize_codes_cpu(const at::Tensor& x_in, double delta, int64_t zp, int64_t bits,
                              bool channels_last) {
  check(x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
        std::string("x must be a float32 CPU tensor, got ") +
            std::string(c10::toString(x_in.scalar_type())) + " on " + x_in.device().str());
  check(bits >= 2 && bits <= 8, "bits must be 2..8, got " + std::to_string(bits));
  check(std::isfinite(delta) && delta > 0 && std::isfinite(static_cast<float>(delta)) &&
            static_cast<float>(delta) > 0,
        "delta must be finite and > 0 in float32, got " + std::to_string(delta));
  check(0 <= zp && zp < (int64_t{1} << bits), "zp must be a code 0.." +
                                                 std::to_string((1 << bits) - 1) + " for " +
                                                 std::to_string(bits) + " bits, got " +
                                                 std::to_string(zp));
  check(!channels_last || x_in.dim() == 4,
        "channels_last codes need a 4-d [N, C, H, W] x, got " + std::to_string(x_in.dim()) +
            " dims");
  const float d = static_cast<float>(delta), z = static_cast<float>(zp);
  const float qmax = static_cast<float>((1 << bits) - 1);
  if (channels_last && !x_in.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    const at::Tensor xc = x_in.contiguous();
    at::Tensor q = quantize_cl_interleaved(xc, d, z, qmax);
    if (q.defined()) return q;
    return quantize_codes_cpu(xc, delta, zp, bits, false)
        .contiguous(at::MemoryFormat::ChannelsLast);
  }
  // dense in some dim order (contiguous, channels_last, ...): keep the layout, walk the storage
  const bool dense = x_in.is_non_overlapping_and_dense();
  const at::Tensor x = dense ? x_in : x_in.contiguous();
  at::Tensor q = at::empty_like(x, x.options().dtype(at::kByte));
  const int64_t n = x.numel();
  if (n == 0) return q;
  const float* xp = x.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  const bool simd = active_isa() == Isa::kAvx512Vnni;
  at::parallel_for(0, (n + 63) / 64, 2048, [&](int64_t b0, int64_t b1) {
    const int64_t i0 = b0 * 64, i1 = std::min(n, b1 * 64);
#ifdef PDQ_X86
    if (simd) return quantize_avx512(xp + i0, qp + i0, i1 - i0, d, z, qmax);
#endif
    quantize_scalar(xp + i0, qp + i0, i1 - i0, d, z, qmax);
  });
  return q;
}

void dequantize_scalar(const uint8_t* q, float* y, int64_t n, float delta, float zp) {
  for (int64_t i = 0; i < n; ++i) y[i] = (static_cast<float>(q[i]) - zp) * delta;
}

#ifdef PDQ_X86
PDQ_VNNI void dequantize_avx512(const uint8_t* q, float* y, int64_t n, float delta, float zp) {
  const __m512 vd = _mm512_set1_ps(delta), vz = _mm512_set1_ps(zp);
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t r = std::min<int64_t>(16, n - i);
    const __mmask16 k = r == 16 ? 0xFFFF : static_cast<__mmask16>((1u << r) - 1);
    const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, q + i)));
    _mm512_mask_storeu_ps(y + i, k, _mm512_mul_ps(_mm512_sub_ps(f, vz), vd));
  }
}
#endif

// dequantize_codes_cpu: uint8 codes -> float32 (float(q) - zp) * delta (a subtraction and a
// multiplication, each rounded: ActParams.dequantize bit for bit), x's shape and memory format.
at::Tensor dequantize_codes_cpu(const at::Tensor& q_in, double delta, int64_t zp) {
  check(q_in.scalar_type() == at::kByte && q_in.device().is_cpu(),
        std::string("codes must be a uint8 CPU tensor, got ") +
            std::string(c10::toString(q_in.scalar_type())) + " on " + q_in.device().str());
  check(std::isfinite(delta) && delta > 0 && static_cast<float>(delta) > 0,
        "delta must be finite and > 0 in float32, got " + std::to_string(delta));
  check(0 <= zp && zp <= 255, "zp must be a code 0..255, got " + std::to_string(zp));
  const at::Tensor q = q_in.is_non_overlapping_and_dense() ? q_in : q_in.contiguous();
  at::Tensor y = at::empty_like(q, q.options().dtype(at::kFloat));
  const int64_t n = q.numel();
  if (n == 0) return y;
  const float d = static_cast<float>(delta), z = static_cast<float>(zp);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const bool simd = active_isa() == Isa::kAvx512Vnni;
  at::parallel_for(0, (n + 63) / 64, 2048, [&](int64_t b0, int64_t b1) {
    const int64_t i0 = b0 * 64, i1 = std::min(n, b1 * 64);
#ifdef PDQ_X86
    if (simd) return dequantize_avx512(qp + i0, yp + i0, i1 - i0, d, z);
#endif
    dequantize_scalar(qp + i0, yp + i0, i1 - i0, d, z);
  });
  return y;
}

void register_quantize(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("quantize_codes_cpu", &quantize_codes_cpu, py::arg("x"), py::arg("delta"),
        py::arg("zp"), py::arg("bits"), py::arg("channels_last") = false,
        "pdquant::quantize_codes on CPU: float32 -> uint8 clamp(round_half_even(x / delta) + zp, "
        "0, 2^bits - 1), x's shape and memory format (or channels_last codes of a 4-d x)");
  m.def("dequantize_codes_cpu", &dequantize_codes_cpu, py::arg("codes"), py::arg("delta"),
        py::arg("zp"),
        "pdquant::dequantize_codes on CPU: uint8 -> float32 (float(q) - zp) * delta, the codes' "
        "shape and memory format");
}

}  // namespace
}  // namespace pdquant::qk

PDQ_REGISTER(pdquant::qk::register_quantize);
