// max_pool2d_codes_cpu: 2-D max-pool of uint8 activation codes (NCHW), the packed runtime's
// pooling on codes (max commutes with the increasing dequantization (q - zp) * delta).
//
// Contract (pdquant_fast/ops/library.py, deployment section; reference: F.max_pool2d on the codes
// as float32, cast back): out[n, c, oh, ow] = max of x[n, c, oh*sh - ph + i, ow*sw - pw + j] over
// the in-bounds taps 0 <= i < kh, 0 <= j < kw (padding never wins, as PyTorch's -inf padding);
// no dilation, floor output size. Exact (a max of integers).
//
// Entry point (pdquant_fast._C): max_pool2d_codes_cpu(x, kernel_size, stride, padding).
// channels_last x (torch.channels_last, still [N, C, H, W]): the output is channels_last too,
// each output pixel the max of its window's C-channel pixel vectors.
// NCHW, per (n, c) plane: rows max-filtered over kw columns and subsampled, then the max over kh of
// those rows per output row (both inner loops contiguous: AVX-512 when the q-kernels' active ISA
// is avx512vnni, PDQUANT_CPU_ISA, else scalar). Planes in parallel.
#include <ATen/Parallel.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/qgemm.h"
#include "cpu/qsimd.h"
#include "registry.h"

namespace pdquant::qk {
namespace {

void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("max_pool2d_codes_cpu: " + msg);
}

// d[i] = max(d[i], a[i]) for i < n.
void max_into_scalar(uint8_t* d, const uint8_t* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = std::max(d[i], a[i]);
}

#ifdef PDQ_X86
PDQ_VNNI void max_into_avx512(uint8_t* d, const uint8_t* a, int64_t n) {
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    _mm512_storeu_si512(d + i,
                        _mm512_max_epu8(_mm512_loadu_si512(d + i), _mm512_loadu_si512(a + i)));
  if (i < n) {
    const __mmask64 k = ~0ULL >> (64 - (n - i));
    const __m512i m =
        _mm512_max_epu8(_mm512_maskz_loadu_epi8(k, d + i), _mm512_maskz_loadu_epi8(k, a + i));
    _mm512_mask_storeu_epi8(d + i, k, m);
  }
}
#endif

std::vector<int64_t> pair(const std::vector<int64_t>& v, const char* name) {
  check(v.size() == 1 || v.size() == 2,
        std::string(name) + " must have 1 or 2 entries, got " + std::to_string(v.size()));
  return v.size() == 2 ? v : std::vector<int64_t>{v[0], v[0]};
}

at::Tensor max_pool2d_codes_cpu(const at::Tensor& x_in, const std::vector<int64_t>& kernel_size,
                                const std::vector<int64_t>& stride,
                                const std::vector<int64_t>& padding) {
  check(x_in.scalar_type() == at::kByte && x_in.device().is_cpu() && x_in.dim() == 4,
        "x must be uint8 codes [N, C, H, W] on the CPU");
  const auto k = pair(kernel_size, "kernel_size"), s = pair(stride, "stride"),
             p = pair(padding, "padding");
  const int64_t kh = k[0], kw = k[1], sh = s[0], sw = s[1], ph = p[0], pw = p[1];
  check(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1, "kernel_size and stride must be >= 1");
  check(ph >= 0 && pw >= 0 && 2 * ph <= kh && 2 * pw <= kw,
        "padding must be >= 0 and at most half the kernel size (as in torch max_pool2d)");
  const bool nhwc = x_in.is_contiguous(at::MemoryFormat::ChannelsLast) && !x_in.is_contiguous();
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H + 2 * ph - kh) / sh + 1, Wo = (W + 2 * pw - kw) / sw + 1;
  check(H + 2 * ph >= kh && W + 2 * pw >= kw, "the padded input is smaller than the kernel");
  at::Tensor out = at::empty({N, C, Ho, Wo}, x.options(), fmt);
  if (out.numel() == 0) return out;
  const uint8_t* xp = x.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  auto max_into = max_into_scalar;
#ifdef PDQ_X86
  if (active_isa() == Isa::kAvx512Vnni) max_into = max_into_avx512;
#endif
  if (nhwc) {
    // channels_last: each output pixel is the max over its in-bounds taps of C-byte pixel
    // vectors (contiguous, vectorised along channels). Output rows in parallel.
    at::parallel_for(0, N * Ho, 1, [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const int64_t n = row / Ho, oh = row % Ho;
        const int64_t h0 = std::max<int64_t>(0, oh * sh - ph);
        const int64_t h1 = std::min<int64_t>(H, oh * sh - ph + kh);
        for (int64_t ow = 0; ow < Wo; ++ow) {
          const int64_t w0 = std::max<int64_t>(0, ow * sw - pw);
          const int64_t w1 = std::min<int64_t>(W, ow * sw - pw + kw);
          uint8_t* d = op + ((n * Ho + oh) * Wo + ow) * C;
          const uint8_t* img = xp + n * H * W * C;
          std::copy(img + (h0 * W + w0) * C, img + (h0 * W + w0) * C + C, d);
          for (int64_t h = h0; h < h1; ++h)
            for (int64_t w = (h == h0 ? w0 + 1 : w0); w < w1; ++w)
              max_into(d, img + (h * W + w) * C, C);
        }
      }
    });
    return out;
  }
  // Codes are >= 0, so a zero is neutral for max: padding becomes zeros. Per plane: each input
  // row is zero-padded, max-filtered over kw taps at full resolution (contiguous, vectorised),
  // and subsampled at stride sw into T[h]; each output row is then the max over its kh rows
  // of T (contiguous again).
  const int64_t Wp = W + 2 * pw, Wf = Wp - kw + 1;
  at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
    std::vector<uint8_t> padded(Wp, 0), full(Wf), t(H * Wo);
    for (int64_t plane = b; plane < e; ++plane) {
      const uint8_t* src = xp + plane * H * W;
      uint8_t* dst = op + plane * Ho * Wo;
      for (int64_t h = 0; h < H; ++h) {
        std::copy(src + h * W, src + h * W + W, padded.begin() + pw);
        std::copy(padded.begin(), padded.begin() + Wf, full.begin());
        for (int64_t j = 1; j < kw; ++j) max_into(full.data(), padded.data() + j, Wf);
        uint8_t* th = t.data() + h * Wo;
        for (int64_t ow = 0; ow < Wo; ++ow) th[ow] = full[ow * sw];
      }
      for (int64_t oh = 0; oh < Ho; ++oh) {
        // every window holds an in-bounds row: padding <= kernel / 2
        const int64_t h0 = std::max<int64_t>(0, oh * sh - ph);
        const int64_t h1 = std::min<int64_t>(H, oh * sh - ph + kh);
        uint8_t* d = dst + oh * Wo;
        std::copy(t.data() + h0 * Wo, t.data() + h0 * Wo + Wo, d);
        for (int64_t h = h0 + 1; h < h1; ++h) max_into(d, t.data() + h * Wo, Wo);
      }
    }
  });
  return out;
}

void register_pool(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("max_pool2d_codes_cpu", &max_pool2d_codes_cpu, py::arg("x"), py::arg("kernel_size"),
        py::arg("stride"), py::arg("padding"),
        "pdquant::max_pool2d_codes on CPU: max-pool of uint8 codes [N, C, H, W], NCHW or "
        "channels_last (kept), in-bounds taps only, no dilation, floor output size");
}

}  // namespace
}  // namespace pdquant::qk

PDQ_REGISTER(pdquant::qk::register_pool);
