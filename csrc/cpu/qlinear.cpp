// qlinear_cpu: packed low-bit linear layer with int32 accumulation and fused requantisation.
//
// Contract (pdquant_fast/ops/library.py, deployment section):
//   acc[n,o] = sum_k (x[n,k] - x_zp) * w[o,k]                       int32, exact
//   y = float(acc) * scale[o] + bias[o]; (+ residual); act; float32 out or uint8 codes
// residual: float32 values, or uint8 codes read as (float(q) - res_zp) * res_scale.
// x: uint8 [N, K]; w: int8 (or int16 for 8-bit weights) offsets w_code - w_zp, [O, K].
//
// Entry points (pdquant_fast._C):
//   qlinear_cpu(x, x_zp, w, scale, bias, act, residual, out_scale, out_zp, out_bits,
//               res_scale = 0, res_zp = 0)
//       w an int8/int16 tensor: prepacks w (as bytes) on every call: correct, slower;
//       w a QLinearPackedCpu from qlinear_prepack_cpu: uses it (what the packed runtime does)
//   qlinear_prepack_cpu(w, w_bits) -> QLinearPackedCpu        once, at load time
//   qlinear_packed_cpu(x, x_zp, packed, scale, bias, act, residual, out_scale, out_zp, out_bits,
//                      res_scale, res_zp)
//       the op's argument list with w -> packed
//
// Storage of the prepacked weights (w_bits = bits the offsets were quantised with):
//   w_bits 2 / 3-4: sub-byte. Per output channel u = w + off[o], off[o] = -min_k w[o,k], so
//     u in [0, 2^b - 1] (b = 2, or 4 for 3-4 bits); 8 / b consecutive k-groups (4 k each) share
//     one 64-byte line per 16 channels:
//
//       line byte (16*... ) = o * 4 + e (o < 16 channels, e < 4 k of the group)
//       bits [s*b, s*b + b) of the byte = u[o][4 * (kline * 8/b + s) + e]
//
//     4-bit: low nibble = even k-group, high nibble = odd k-group. The kernel unpacks with a
//     shift and an AND (no lookup) into the u8 operand of vpdpbusd. Then
//       acc = sum_k x*u - off[o] * sum_k x - x_zp * sum_k w.
//     Weight bytes streamed per call: O * K * b / 8 (b = 2 or 4), plus 12 bytes per channel.
//   w_bits 5..8: bytes: int8 panels (vpdpbusd), or int16 panels (vpdpwssd) when some |w| > 127.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cpu/qgemm.h"
#include "registry.h"

namespace pdquant::qk {
namespace {

struct PackedLinear {
  int64_t O = 0, K = 0;
  int w_bits = 8;    // as given (or inferred) at prepack
  int store_bits = 8;  // 2 or 4: sub-byte lines; 8: byte/int16 panels
  KMode mode = KMode::kU8S8;
  int64_t kp = 0;       // padded K of an A row (elements)
  int64_t kgroups = 0;  // 4-byte groups per A row
  std::vector<int> sb;
  std::vector<int64_t> sb_block0, sb_off;
  int32_t max_abs_w = 0;
  at::Tensor panel;  // uint8
  at::Tensor sumw;   // int32 [O]
  at::Tensor off;    // int32 [O] (sub-byte only)

  int64_t nbytes() const {
    return panel.nbytes() + sumw.nbytes() + (off.defined() ? off.nbytes() : 0);
  }
};

void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("qlinear: " + msg);
}

// Fills sb_block0 / sb_off for superblocks holding `rows` 64-byte rows per 16-channel block;
// returns the panel's size in bytes.
int64_t place_superblocks(PackedLinear& pk, int64_t rows) {
  int64_t off = 0, b0 = 0;
  for (int s : pk.sb) {
    pk.sb_block0.push_back(b0);
    pk.sb_off.push_back(off);
    off += rows * 64 * s;
    b0 += s;
  }
  return off;
}

std::shared_ptr<PackedLinear> prepack(const at::Tensor& w_in, int64_t w_bits) {
  check(w_in.dim() == 2, "w must be 2-d [O, K], got " + shape_str(w_in));
  check(w_in.scalar_type() == at::kChar || w_in.scalar_type() == at::kShort,
        std::string("w must be int8 (weight bits <= 7) or int16 (8-bit weights) offsets "
                    "w_code - w_zp, got ") +
            std::string(c10::toString(w_in.scalar_type())));
  check(w_in.device().is_cpu(), "w must be a CPU tensor");
  check(w_bits == 0 || (w_bits >= 2 && w_bits <= 8),
        "w_bits must be 2..8 (or 0: the fewest bits that hold every row), got " +
            std::to_string(w_bits));
  const at::Tensor w = w_in.to(at::kInt).contiguous();
  auto pk = std::make_shared<PackedLinear>();
  const int64_t O = w.size(0), K = w.size(1);
  check(O > 0 && K > 0, "w has an empty dimension: " + shape_str(w));
  pk->O = O;
  pk->K = K;
  const int32_t* wp = w.data_ptr<int32_t>();
  pk->sumw = at::empty({O}, at::kInt);
  at::Tensor lo = at::empty({O}, at::kInt);
  int32_t* sw = pk->sumw.data_ptr<int32_t>();
  int32_t* lop = lo.data_ptr<int32_t>();
  int32_t range = 0, mx = 0, wlo = 0, whi = 0;
  for (int64_t o = 0; o < O; ++o) {
    int32_t s = 0, mn = wp[o * K], mxo = wp[o * K];
    for (int64_t k = 0; k < K; ++k) {
      const int32_t v = wp[o * K + k];
      s += v;
      mn = std::min(mn, v);
      mxo = std::max(mxo, v);
      mx = std::max(mx, std::abs(v));
      wlo = std::min(wlo, v);
      whi = std::max(whi, v);
    }
    sw[o] = s;
    lop[o] = mn;
    range = std::max(range, mxo - mn);
  }
  pk->max_abs_w = mx;
  int bits = static_cast<int>(w_bits);
  if (bits == 0) bits = range <= 3 ? 2 : range <= 15 ? 4 : 8;
  if (bits <= 4) {
    check(range <= (1 << bits) - 1,
          "w_bits = " + std::to_string(bits) + " but a row of w spans " + std::to_string(range) +
              " codes (max - min); " + std::to_string(bits) + "-bit offsets span at most " +
              std::to_string((1 << bits) - 1));
  }
  pk->w_bits = bits;
  pk->store_bits = bits <= 2 ? 2 : bits <= 4 ? 4 : 8;
  const int64_t nblocks = (O + kBlock - 1) / kBlock;
  pk->sb = superblocks(nblocks);
  if (pk->store_bits < 8) {
    const int per = 8 / pk->store_bits;
    pk->mode = KMode::kU8S8;
    pk->kgroups = round_up((K + 3) / 4, per);
    pk->kp = pk->kgroups * 4;
    pk->off = (-lo).contiguous();
    pk->panel = at::zeros({place_superblocks(*pk, pk->kgroups / per)}, at::kByte);
    uint8_t* panel = pk->panel.data_ptr<uint8_t>();
    for (size_t s = 0; s < pk->sb.size(); ++s) {
      const int jb = pk->sb[s];
      for (int64_t kg = 0; kg < pk->kgroups; ++kg)
        for (int j = 0; j < jb; ++j)
          for (int oo = 0; oo < kBlock; ++oo) {
            const int64_t o = (pk->sb_block0[s] + j) * kBlock + oo;
            uint8_t* d = panel + pk->sb_off[s] + ((kg / per) * jb + j) * 64 + oo * 4;
            for (int e = 0; e < 4; ++e) {
              const int64_t k = kg * 4 + e;
              // Padding (k >= K, o >= O) holds u = 0: contributes nothing to sum x*u.
              const int32_t u = (o < O && k < K) ? wp[o * K + k] - lop[o] : 0;
              d[e] |= static_cast<uint8_t>(u << ((kg % per) * pk->store_bits));
            }
          }
    }
    return pk;
  }
  pk->mode = wlo >= -128 && whi <= 127 ? KMode::kU8S8 : KMode::kS16;
  const int64_t per = pk->mode == KMode::kU8S8 ? 4 : 2;
  pk->kp = round_up(K, per);
  pk->kgroups = pk->kp / per;
  pk->panel = at::zeros({place_superblocks(*pk, pk->kgroups)}, at::kByte);
  uint8_t* panel = pk->panel.data_ptr<uint8_t>();
  for (size_t s = 0; s < pk->sb.size(); ++s) {
    const int jb = pk->sb[s];
    for (int64_t kg = 0; kg < pk->kgroups; ++kg)
      for (int j = 0; j < jb; ++j)
        for (int oo = 0; oo < kBlock; ++oo) {
          const int64_t o = (pk->sb_block0[s] + j) * kBlock + oo;
          uint8_t* d = panel + pk->sb_off[s] + (kg * jb + j) * 64 + oo * 4;
          for (int e = 0; e < per; ++e) {
            const int64_t k = kg * per + e;
            const int32_t v = (o < O && k < K) ? wp[o * K + k] : 0;
            if (per == 4) {
              d[e] = static_cast<uint8_t>(static_cast<int8_t>(v));
            } else {
              const int16_t v16 = static_cast<int16_t>(v);
              std::memcpy(d + 2 * e, &v16, 2);
            }
          }
        }
  }
  return pk;
}

at::Tensor run(const PackedLinear& pk, const at::Tensor& x_in, int64_t x_zp,
               const at::Tensor& scale, const at::Tensor& bias, int64_t act,
               const std::optional<at::Tensor>& residual, double out_scale, int64_t out_zp,
               int64_t out_bits, double res_scale, int64_t res_zp) {
  check(x_in.dim() == 2, "x must be 2-d [N, K] uint8 codes, got " + shape_str(x_in));
  check_codes_input(x_in, "qlinear");
  check(x_in.size(1) == pk.K, "x has K = " + std::to_string(x_in.size(1)) + " but w has K = " +
                                  std::to_string(pk.K));
  const int64_t O = pk.O, K = pk.K;
  check_requant_args(x_zp, act, out_scale, out_bits, out_zp, scale, bias, O, "qlinear");
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0);
  at::Tensor out = at::empty({N, O}, x.options().dtype(out_bits ? at::kByte : at::kFloat));
  Epilogue e;
  at::Tensor res;  // keeps the bound residual alive
  bind_residual(e, residual, out, at::MemoryFormat::Contiguous, res_scale, res_zp, &res,
                "qlinear");
  if (N == 0) return out;

  const Isa isa = active_isa();
  const bool sub = pk.store_bits < 8;
  const bool s16 = pk.mode == KMode::kS16;
  // A rows: x itself when K is already a whole number of groups, else a padded copy.
  const uint8_t* xs = x.data_ptr<uint8_t>();
  const int64_t row_bytes = pk.kp * (s16 ? 2 : 1);
  const uint8_t* ap = xs;
  at::Tensor buf;
  if (s16 || pk.kp != K) {
    buf = at::zeros({N * row_bytes}, at::kByte);
    uint8_t* bp = buf.data_ptr<uint8_t>();
    at::parallel_for(0, N, 16, [&](int64_t b, int64_t en) {
      for (int64_t n = b; n < en; ++n) {
        if (s16) {
          int16_t* d = reinterpret_cast<int16_t*>(bp + n * row_bytes);
          for (int64_t k = 0; k < K; ++k) d[k] = xs[n * K + k];
        } else {
          std::memcpy(bp + n * row_bytes, xs + n * K, K);
        }
      }
    });
    ap = bp;
  }
  at::Tensor sx_t;
  if (sub) {
    sx_t = at::empty({N}, at::kInt);
    int32_t* sx = sx_t.data_ptr<int32_t>();
    at::parallel_for(0, N, 16, [&](int64_t b, int64_t en) {
      for (int64_t n = b; n < en; ++n) {
        int32_t s = 0;
        for (int64_t k = 0; k < K; ++k) s += xs[n * K + k];
        sx[n] = s;
      }
    });
  }
  set_requant(e, x_zp, pk.sumw, scale, bias, act, out_scale, out_zp, out_bits, out);
  e.off = sub ? pk.off.data_ptr<int32_t>() : nullptr;
  e.sx = sub ? sx_t.data_ptr<int32_t>() : nullptr;

  const int64_t nsb = static_cast<int64_t>(pk.sb.size());
  const int64_t ntiles = (N + kTileRows - 1) / kTileRows;
  const uint8_t* panel = pk.panel.data_ptr<uint8_t>();
  const int64_t zero = 0;
  constexpr int64_t ldc = kBlock * kMaxJB;
  // Superblock outermost: each thread streams its share of the weights once (batch 1: the
  // whole call is one pass over the packed weights).
  at::parallel_for(0, nsb * ntiles, 1, [&](int64_t b, int64_t en) {
    alignas(64) int32_t cbuf[kTileRows * ldc];
    for (int64_t it = b; it < en; ++it) {
      const int64_t tile = it % ntiles, s = it / ntiles;
      const int64_t r0 = tile * kTileRows;
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, N - r0));
      const int jb = pk.sb[s];
      for (int half = 0; half * kMR < rows; ++half) {
        const int mr = std::min(kMR, rows - half * kMR);
        const uint8_t* a[kMR];
        for (int m = 0; m < kMR; ++m)
          a[m] = ap + (r0 + half * kMR + std::min(m, mr - 1)) * row_bytes;
        if (sub) {
          UkPackedArgs u;
          std::copy(a, a + kMR, u.a);
          u.kgroups = pk.kgroups;
          u.w = panel + pk.sb_off[s];
          u.bits = pk.store_bits;
          u.jb = jb;
          u.mr = mr;
          u.c = cbuf + half * kMR * ldc;
          u.ldc = ldc;
          ukernel_packed(isa, u);
        } else {
          UkArgs u;
          std::copy(a, a + kMR, u.a);
          u.toff = &zero;
          u.ntaps = 1;
          u.cgroups = pk.kgroups;
          u.w = reinterpret_cast<const int8_t*>(panel + pk.sb_off[s]);
          u.jb = jb;
          u.mr = mr;
          u.c = cbuf + half * kMR * ldc;
          u.ldc = ldc;
          u.mode = pk.mode;
          u.wide = pk.max_abs_w > 64;
          ukernel(isa, u);
        }
      }
      const int64_t o0 = pk.sb_block0[s] * kBlock;
      const int cols = static_cast<int>(std::min<int64_t>(kBlock * jb, O - o0));
      epilogue(isa, e, cbuf, ldc, TileDst{r0 * O + o0, O, 1, o0, rows, cols, r0});
    }
  });
  return out;
}

at::Tensor qlinear_cpu(const at::Tensor& x, int64_t x_zp, const at::Tensor& w,
                       const at::Tensor& scale, const at::Tensor& bias, int64_t act,
                       const std::optional<at::Tensor>& residual, double out_scale,
                       int64_t out_zp, int64_t out_bits, double res_scale, int64_t res_zp) {
  const auto pk = prepack(w, 8);
  return run(*pk, x, x_zp, scale, bias, act, residual, out_scale, out_zp, out_bits,
             res_scale, res_zp);
}

at::Tensor qlinear_packed_cpu(const at::Tensor& x, int64_t x_zp, const PackedLinear& pk,
                              const at::Tensor& scale, const at::Tensor& bias, int64_t act,
                              const std::optional<at::Tensor>& residual, double out_scale,
                              int64_t out_zp, int64_t out_bits, double res_scale, int64_t res_zp) {
  return run(pk, x, x_zp, scale, bias, act, residual, out_scale, out_zp, out_bits,
             res_scale, res_zp);
}

void register_qlinear(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<PackedLinear, std::shared_ptr<PackedLinear>>(
      m, "QLinearPackedCpu",
      "Linear weights prepacked by qlinear_prepack_cpu for qlinear_packed_cpu (opaque).")
      .def_readonly("out_features", &PackedLinear::O)
      .def_readonly("in_features", &PackedLinear::K)
      .def_readonly("w_bits", &PackedLinear::w_bits)
      .def_readonly("store_bits", &PackedLinear::store_bits)
      .def_property_readonly("nbytes", &PackedLinear::nbytes)
      .def_property_readonly("weight_nbytes",
                             [](const PackedLinear& p) { return p.panel.nbytes(); })
      .def("__repr__", [](const PackedLinear& p) {
        return "QLinearPackedCpu(O=" + std::to_string(p.O) + ", K=" + std::to_string(p.K) +
               ", w_bits=" + std::to_string(p.w_bits) +
               ", stored as " + (p.store_bits < 8 ? std::to_string(p.store_bits) + "-bit lines"
                                 : p.mode == KMode::kS16 ? std::string("int16")
                                                         : std::string("int8")) +
               ")";
      });
  m.def("qlinear_cpu", &qlinear_cpu, py::arg("x"), py::arg("x_zp"), py::arg("w"),
        py::arg("scale"), py::arg("bias"), py::arg("act"), py::arg("residual"),
        py::arg("out_scale"), py::arg("out_zp"), py::arg("out_bits"),
        py::arg("res_scale") = 0.0, py::arg("res_zp") = 0,
        "pdquant::qlinear on CPU (prepacks w as bytes on every call; use qlinear_prepack_cpu + "
        "qlinear_packed_cpu at load time / run time)");
  // The packed runtime passes the prepacked blob in place of w to qlinear_cpu itself.
  m.def("qlinear_cpu", &qlinear_packed_cpu, py::arg("x"), py::arg("x_zp"), py::arg("w"),
        py::arg("scale"), py::arg("bias"), py::arg("act"), py::arg("residual"),
        py::arg("out_scale"), py::arg("out_zp"), py::arg("out_bits"), py::arg("res_scale") = 0.0,
        py::arg("res_zp") = 0);
  m.def("qlinear_prepack_cpu", &prepack, py::arg("w"), py::arg("w_bits") = 0,
        "prepack int8/int16 weight offsets [O, K] for qlinear_packed_cpu; w_bits 2 or 3-4: "
        "2-/4-bit lines (each row must span <= 2^bits - 1 codes), 5-8: bytes; 0: fewest bits "
        "that hold every row");
  m.def("qlinear_packed_cpu", &qlinear_packed_cpu, py::arg("x"), py::arg("x_zp"),
        py::arg("packed"), py::arg("scale"), py::arg("bias"), py::arg("act"),
        py::arg("residual"), py::arg("out_scale"), py::arg("out_zp"), py::arg("out_bits"),
        py::arg("res_scale") = 0.0, py::arg("res_zp") = 0,
        "qlinear_cpu with weights from qlinear_prepack_cpu (same arguments, w -> packed)");
}

}  // namespace
}  // namespace pdquant::qk

PDQ_REGISTER(pdquant::qk::register_qlinear);
