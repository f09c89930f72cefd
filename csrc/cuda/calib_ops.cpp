// Torch glue of the CUDA calibration kernels: <op>_cuda for every op of
// pdquant_fast/ops/library.py that has a CUDA kernel, registered into pdquant_fast._C.
//
// Each function has the signature of its <op>_reference (pdquant_fast/ops/reference.py), checks
// its tensors (the Python contract validates first; these checks guard direct calls), allocates
// the outputs, and calls the raw-pointer launchers of csrc/cuda/*.cu on the current CUDA stream.
// Nothing here synchronises with the host: no .item(), the QDrop seed / beta / grad_reg are read
// by the kernels from device memory, so every op can be captured in a CUDA graph.
#ifdef PDQUANT_WITH_CUDA

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "cuda/adaround.cuh"
#include "cuda/fake_quant.cuh"
#include "cuda/mse_search.cuh"
#include "registry.h"

namespace {

using at::Tensor;

void check_f32(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the input is on ",
              like.device(), "; use one device");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)");
}

void check_bits(int64_t bits) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits must be one of [2, 3, 4, 5, 6, 7, 8], got ", bits);
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// FakeQuantArgs for x viewed as [outer, C, inner] around `axis` (per tensor when delta is 0-d).
pdquant::calib::FakeQuantArgs fq_args(const Tensor& x, const Tensor& delta,
                                      const Tensor& zero_point, int64_t bits, int64_t axis,
                                      double keep_prob, const std::optional<Tensor>& seed,
                                      const std::optional<Tensor>& mask) {
  check_f32(x, "x", x);
  check_f32(delta, "delta", x);
  check_f32(zero_point, "zero_point", x);
  check_bits(bits);
  TORCH_CHECK(delta.sizes() == zero_point.sizes(), "delta and zero_point must have one shape");
  TORCH_CHECK(x.numel() < (int64_t{1} << 32), "x has ", x.numel(),
              " elements; at most 2**32 - 1 are supported");
  TORCH_CHECK(keep_prob > 0.0 && keep_prob <= 1.0, "keep_prob must be in (0, 1], got ",
              keep_prob);
  pdquant::calib::FakeQuantArgs a;
  a.x = x.data_ptr<float>();
  a.delta = delta.data_ptr<float>();
  a.zero_point = zero_point.data_ptr<float>();
  a.bits = static_cast<int>(bits);
  if (delta.dim() == 0) {
    a.outer = 1;
    a.channels = 1;
    a.inner = x.numel();
  } else {
    TORCH_CHECK(delta.dim() == 1, "delta must be 0-d (per tensor) or 1-d (per channel)");
    TORCH_CHECK(x.dim() > 0 && axis >= -x.dim() && axis < x.dim(), "axis ", axis,
                " is out of range for x of dim ", x.dim());
    const int64_t ax = axis < 0 ? axis + x.dim() : axis;
    TORCH_CHECK(delta.size(0) == x.size(ax), "per-channel delta has ", delta.size(0),
                " entries but x.shape[", ax, "] is ", x.size(ax));
    a.outer = 1;
    for (int64_t d = 0; d < ax; ++d) a.outer *= x.size(d);
    a.channels = x.size(ax);
    a.inner = 1;
    for (int64_t d = ax + 1; d < x.dim(); ++d) a.inner *= x.size(d);
  }
  TORCH_CHECK(!(seed.has_value() && mask.has_value()), "give either seed or mask, not both");
  if (mask.has_value()) {
    TORCH_CHECK(mask->is_cuda() && mask->device() == x.device(), "mask must be on x's device");
    TORCH_CHECK(mask->scalar_type() == at::kBool, "mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK(mask->sizes() == x.sizes() && mask->is_contiguous(),
                "mask must be contiguous with x's shape");
    a.mask = reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>());
  } else if (seed.has_value() && keep_prob < 1.0) {
    TORCH_CHECK(seed->is_cuda() && seed->device() == x.device(), "seed must be on x's device");
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->dim() == 0,
                "seed must be a 0-d int64 tensor");
    a.seed = seed->data_ptr<int64_t>();
    a.keep_threshold = static_cast<uint64_t>(keep_prob * 4294967296.0);  // floor, in float64
  }
  return a;
}

Tensor fake_quant_act_cuda(const Tensor& x, const Tensor& delta, const Tensor& zero_point,
                           int64_t bits, int64_t axis, double keep_prob,
                           const std::optional<Tensor>& seed, const std::optional<Tensor>& mask) {
  auto a = fq_args(x, delta, zero_point, bits, axis, keep_prob, seed, mask);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty_like(x);
  a.out = y.data_ptr<float>();
  a.aligned16 = aligned16(a.x) && aligned16(a.out) && (a.mask == nullptr || aligned16(a.mask));
  check_launch(
      pdquant::calib::fake_quant_forward(a, c10::cuda::getCurrentCUDAStream().stream()),
      "fake_quant_act_cuda");
  return y;
}

std::tuple<Tensor, Tensor> fake_quant_act_backward_cuda(
    const Tensor& grad, const Tensor& x, const Tensor& delta, const Tensor& zero_point,
    int64_t bits, int64_t axis, double keep_prob, const std::optional<Tensor>& seed,
    const std::optional<Tensor>& mask) {
  auto a = fq_args(x, delta, zero_point, bits, axis, keep_prob, seed, mask);
  check_f32(grad, "grad", x);
  TORCH_CHECK(grad.sizes() == x.sizes(), "grad must have x's shape");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor grad_x = at::empty_like(x);
  Tensor grad_delta = at::zeros_like(delta);  // the sum over no element when x is empty
  a.grad = grad.data_ptr<float>();
  a.out = grad_x.data_ptr<float>();
  a.aligned16 = aligned16(a.x) && aligned16(a.grad) && aligned16(a.out) &&
                (a.mask == nullptr || aligned16(a.mask));
  if (x.numel() == 0) return {grad_x, grad_delta};
  Tensor partials =
      at::empty({pdquant::calib::fake_quant_backward_partials(a)}, x.options().dtype(at::kDouble));
  check_launch(pdquant::calib::fake_quant_backward(a, partials.data_ptr<double>(),
                                                   grad_delta.data_ptr<float>(),
                                                   c10::cuda::getCurrentCUDAStream().stream()),
               "fake_quant_act_backward_cuda");
  return {grad_x, grad_delta};
}

pdquant::calib::AdaRoundArgs ada_args(const Tensor& w_floor, const Tensor& alpha,
                                      const std::optional<Tensor>& delta, const Tensor& zero_point,
                                      int64_t bits, const std::optional<Tensor>& beta) {
  check_f32(w_floor, "w_floor", w_floor);
  check_f32(alpha, "alpha", w_floor);
  check_f32(zero_point, "zero_point", w_floor);
  check_bits(bits);
  TORCH_CHECK(w_floor.dim() >= 1, "w_floor must have an output-channel axis 0");
  TORCH_CHECK(alpha.sizes() == w_floor.sizes(), "alpha must have w_floor's shape");
  const int64_t c = w_floor.size(0);
  TORCH_CHECK(zero_point.dim() == 1 && zero_point.size(0) == c, "zero_point must have shape [",
              c, "]");
  pdquant::calib::AdaRoundArgs a;
  a.w_floor = w_floor.data_ptr<float>();
  a.alpha = alpha.data_ptr<float>();
  a.zero_point = zero_point.data_ptr<float>();
  if (delta.has_value()) {
    check_f32(*delta, "delta", w_floor);
    TORCH_CHECK(delta->dim() == 1 && delta->size(0) == c, "delta must have shape [", c, "]");
    a.delta = delta->data_ptr<float>();
  }
  if (beta.has_value()) {
    check_f32(*beta, "beta", w_floor);
    TORCH_CHECK(beta->dim() == 0, "beta must be a 0-d float32 tensor");
    a.beta = beta->data_ptr<float>();
  }
  a.channels = c;
  a.inner = c > 0 ? w_floor.numel() / c : 0;
  a.bits = static_cast<int>(bits);
  a.aligned16 = aligned16(a.w_floor) && aligned16(a.alpha);
  return a;
}

std::tuple<Tensor, Tensor> adaround_soft_cuda(const Tensor& w_floor, const Tensor& alpha,
                                              const Tensor& delta, const Tensor& zero_point,
                                              int64_t bits, const Tensor& beta) {
  auto a = ada_args(w_floor, alpha, delta, zero_point, bits, beta);
  const c10::cuda::CUDAGuard guard(w_floor.device());
  Tensor w_q = at::empty_like(w_floor);
  Tensor reg = at::zeros({}, w_floor.options());
  if (w_floor.numel() == 0) return {w_q, reg};
  a.aligned16 = a.aligned16 && aligned16(w_q.data_ptr<float>());
  Tensor partials = at::empty({pdquant::calib::adaround_soft_partials(a)},
                              w_floor.options().dtype(at::kDouble));
  check_launch(pdquant::calib::adaround_soft(a, w_q.data_ptr<float>(), partials.data_ptr<double>(),
                                             reg.data_ptr<float>(),
                                             c10::cuda::getCurrentCUDAStream().stream()),
               "adaround_soft_cuda");
  return {w_q, reg};
}

Tensor adaround_soft_backward_cuda(const Tensor& grad_wq, const Tensor& grad_reg,
                                   const Tensor& w_floor, const Tensor& alpha, const Tensor& delta,
                                   const Tensor& zero_point, int64_t bits, const Tensor& beta) {
  auto a = ada_args(w_floor, alpha, delta, zero_point, bits, beta);
  check_f32(grad_wq, "grad_wq", w_floor);
  check_f32(grad_reg, "grad_reg", w_floor);
  TORCH_CHECK(grad_wq.sizes() == w_floor.sizes() && grad_reg.dim() == 0,
              "grad_wq must have w_floor's shape and grad_reg must be 0-d");
  const c10::cuda::CUDAGuard guard(w_floor.device());
  Tensor grad_alpha = at::empty_like(alpha);
  if (w_floor.numel() == 0) return grad_alpha;
  a.aligned16 = a.aligned16 && aligned16(grad_wq.data_ptr<float>()) &&
                aligned16(grad_alpha.data_ptr<float>());
  check_launch(pdquant::calib::adaround_soft_backward(
                   a, grad_wq.data_ptr<float>(), grad_reg.data_ptr<float>(),
                   grad_alpha.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()),
               "adaround_soft_backward_cuda");
  return grad_alpha;
}

Tensor adaround_hard_cuda(const Tensor& w_floor, const Tensor& alpha, const Tensor& zero_point,
                          int64_t bits) {
  auto a = ada_args(w_floor, alpha, std::nullopt, zero_point, bits, std::nullopt);
  const c10::cuda::CUDAGuard guard(w_floor.device());
  Tensor codes = at::empty_like(w_floor, w_floor.options().dtype(at::kByte));
  if (w_floor.numel() == 0) return codes;
  a.aligned16 = a.aligned16 && aligned16(codes.data_ptr<uint8_t>());
  check_launch(pdquant::calib::adaround_hard(a, codes.data_ptr<uint8_t>(),
                                             c10::cuda::getCurrentCUDAStream().stream()),
               "adaround_hard_cuda");
  return codes;
}

std::tuple<Tensor, Tensor> mse_search_2d_cuda(const Tensor& x, int64_t bits, int64_t steps,
                                              const std::optional<Tensor>& x_min,
                                              const std::optional<Tensor>& x_max) {
  check_f32(x, "x", x);
  check_bits(bits);
  TORCH_CHECK(x.dim() == 2 && x.size(0) > 0 && x.size(1) > 0,
              "x must be a non-empty 2-d [C, K] tensor, got ", x.sizes());
  TORCH_CHECK(steps >= 1, "steps must be a positive int, got ", steps);
  TORCH_CHECK(x_min.has_value() == x_max.has_value(), "give both x_min and x_max, or neither");
  const int64_t c = x.size(0);
  const float* rmin = nullptr;
  const float* rmax = nullptr;
  if (x_min.has_value()) {
    check_f32(*x_min, "x_min", x);
    check_f32(*x_max, "x_max", x);
    TORCH_CHECK(x_min->dim() == 1 && x_min->size(0) == c && x_max->dim() == 1 &&
                    x_max->size(0) == c,
                "x_min and x_max must have shape [C] = [", c, "]");
    // containment (the kernels' precondition): one reduction each, a host sync like the
    // fake-quant ops' step check
    TORCH_CHECK(x_min->le(std::get<0>(x.min(1))).all().item<bool>() &&
                    x_max->ge(std::get<0>(x.max(1))).all().item<bool>(),
                "x_min/x_max must contain every element of their row");
    rmin = x_min->data_ptr<float>();
    rmax = x_max->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor score = at::empty({c, steps}, x.options());
  Tensor zbest = at::empty({c, steps}, x.options().dtype(at::kInt));
  Tensor delta = at::empty({c}, x.options());
  Tensor zero_point = at::empty({c}, x.options());
  check_launch(pdquant::calib::mse_search_2d(
                   x.data_ptr<float>(), c, x.size(1), static_cast<int>(bits), steps, rmin, rmax,
                   score.data_ptr<float>(), zbest.data_ptr<int32_t>(), delta.data_ptr<float>(),
                   zero_point.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()),
               "mse_search_2d_cuda");
  return {delta, zero_point};
}

void register_calib_cuda(pybind11::module_& m) {
  using pybind11::arg;
  m.def("fake_quant_act_cuda", &fake_quant_act_cuda, "fake-quant with QDrop (CUDA)", arg("x"),
        arg("delta"), arg("zero_point"), arg("bits"), arg("axis"), arg("keep_prob"), arg("seed"),
        arg("mask"));
  m.def("fake_quant_act_backward_cuda", &fake_quant_act_backward_cuda,
        "(grad_x, grad_delta) of fake_quant_act (CUDA)", arg("grad"), arg("x"), arg("delta"),
        arg("zero_point"), arg("bits"), arg("axis"), arg("keep_prob"), arg("seed"), arg("mask"));
  m.def("adaround_soft_cuda", &adaround_soft_cuda, "(w_q, reg) AdaRound soft (CUDA)",
        arg("w_floor"), arg("alpha"), arg("delta"), arg("zero_point"), arg("bits"), arg("beta"));
  m.def("adaround_soft_backward_cuda", &adaround_soft_backward_cuda,
        "grad_alpha of adaround_soft (CUDA)", arg("grad_wq"), arg("grad_reg"), arg("w_floor"),
        arg("alpha"), arg("delta"), arg("zero_point"), arg("bits"), arg("beta"));
  m.def("adaround_hard_cuda", &adaround_hard_cuda, "uint8 AdaRound codes (CUDA)", arg("w_floor"),
        arg("alpha"), arg("zero_point"), arg("bits"));
  m.def("mse_search_2d_cuda", &mse_search_2d_cuda, "(delta, zero_point) L2.4 search (CUDA)",
        arg("x"), arg("bits"), arg("steps"), arg("x_min") = pybind11::none(),
        arg("x_max") = pybind11::none());
}

PDQ_REGISTER(register_calib_cuda);

}  // namespace

#endif  // PDQUANT_WITH_CUDA
