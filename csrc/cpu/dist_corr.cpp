// Distribution-correction kernels (spec §3): the per-sample BatchNorm-statistic loss, forward and
// backward (bn_stat_loss_cpu / bn_stat_loss_backward_cpu), and the input update, the closeness
// term and Adam fused into one pass (dc_adam_step_cpu).
//
// Math: pdquant_fast/ops/reference.py (bn_stat_loss_reference and its backward). For x
// [B, C, H, W] (N = H*W >= 2), the BN's running mean mu[c] and sig[c] = sqrt(running_var + 1e-6):
//
//   m[b,c] = sum_hw x / N          s[b,c] = sqrt(sum_hw (x - m)^2 / (N - 1) + 1e-6)
//   loss[b] = sum_c (mu[c] - m[b,c])^2 + (sig[c] - s[b,c])^2
//   grad_x  = g[b] * (2 (m - mu) / N  +  2 (s - sig) / (s (N - 1)) * (x - m))
//
// Forward reads x twice per (sample, channel) plane (the mean, then the centred sum of squares),
// the second time from cache: a plane (NCHW) or a sample's [H*W, C] block (channels_last) is
// what each task reduces. Sums run in double (16 lanes per plane, added in a fixed order: the
// result does not depend on the thread count); m and s are returned as float32 and the backward
// takes them back, so it is one read of x and one write of grad_x. Reductions differ from the
// reference's float32 torch.var by rounding only (budget in the tests).
//
// dc_adam_step_cpu: see pdquant_fast/ops/reference.py (dc_adam_step_reference) for the operation
// order, which is the contract; per element, in float32 with fp-contract off:
//   d = x - x0;  g' = g + d * kc[b];  m = m * b1 + g' * (1 - b1);  v = v * b2 + (g' * g') * (1 - b2)
//   x_new = x - (step[b] * m) / (sqrt(v) / sqrt_bc2 + eps)
// bit-exact with the reference; close[b] = sum of d * d over the sample / (H * W) in double.
// One pass: reads x, x0, g, m, v, writes m, v (in place) and x_new: 32 B/element, against about
// 20 full-size passes for the same update in eager PyTorch.
//
// This file is compiled four times, like fake_quant.cpp: once normally (the torch glue) and once
// per ISA pass through cpu/calib_simd_foreach.h (the plain loops below vectorise under each
// pass's target; no V type is needed).
#ifndef PDQ_ISA_PASS

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu/calib_simd.h"
#include "registry.h"

namespace pdquant {
namespace calib_cpu {

struct DcAdamArgs {
  const float *x, *x0, *g, *kc, *step;
  float *m, *v, *out;
  int64_t per = 0;  // elements per sample
  float b1, omb1, b2, omb2, sbc2, eps;
  double* close;  // [B] sums of d * d
};

}  // namespace calib_cpu
}  // namespace pdquant

#define PDQ_ISA_FILE "cpu/dist_corr.cpp"
#include "cpu/calib_simd_foreach.h"

namespace pdquant {
namespace calib_cpu {
namespace {

void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("bn_stat_loss_cpu: " + msg);
}

// 0: NCHW-contiguous, 1: channels_last.
int layout_of(const at::Tensor& x) {
  check(x.dim() == 4, "x must be 4-d [B, C, H, W]");
  check(x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be a float32 CPU tensor");
  if (x.is_contiguous()) return 0;
  check(x.is_contiguous(at::MemoryFormat::ChannelsLast),
        "x must be contiguous or channels_last");
  return 1;
}

void check_vec(const at::Tensor& t, const char* name, int64_t n) {
  check(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous() &&
            t.dim() == 1 && t.size(0) == n,
        std::string(name) + " must be a contiguous float32 CPU tensor [" + std::to_string(n) +
            "]");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_stat_loss_cpu(const at::Tensor& x,
                                                                const at::Tensor& mu,
                                                                const at::Tensor& sig) {
  const int cl = layout_of(x);
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2) * x.size(3);
  check(N >= 2, "H * W must be >= 2 (unbiased variance)");
  check_vec(mu, "mean", C);
  check_vec(sig, "std", C);
  at::Tensor m = at::empty({B, C}, at::kFloat), s = at::empty({B, C}, at::kFloat);
  at::Tensor loss = at::empty({B}, at::kFloat);
  std::vector<double> term(B * C);
  const float* xp = x.data_ptr<float>();
  float* mp = m.data_ptr<float>();
  float* sp = s.data_ptr<float>();
  const float* mup = mu.data_ptr<float>();
  const float* sgp = sig.data_ptr<float>();
  if (cl == 0) {
    at::parallel_for(0, B * C, 1, [&](int64_t b, int64_t e) {
      PDQ_ISA_DISPATCH(stat_planes, xp, N, C, b, e, mup, sgp, mp, sp, term.data());
    });
  } else {
    at::parallel_for(0, B, 1, [&](int64_t b, int64_t e) {
      PDQ_ISA_DISPATCH(stat_nhwc, xp, N, C, b, e, mup, sgp, mp, sp, term.data());
    });
  }
  float* lp = loss.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    double v = 0.0;
    for (int64_t c = 0; c < C; ++c) v += term[b * C + c];
    lp[b] = static_cast<float>(v);
  }
  return {loss, m, s};
}

at::Tensor bn_stat_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                     const at::Tensor& mu, const at::Tensor& sig,
                                     const at::Tensor& m, const at::Tensor& s) {
  const int cl = layout_of(x);
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2) * x.size(3);
  check(N >= 2, "H * W must be >= 2 (unbiased variance)");
  check_vec(mu, "mean", C);
  check_vec(sig, "std", C);
  check_vec(grad, "grad", B);
  check(m.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat && m.is_contiguous() &&
            s.is_contiguous() && m.numel() == B * C && s.numel() == B * C,
        "m and s must be contiguous float32 [B, C] (the forward's outputs)");
  // Per (sample, channel): grad_x = a + k * (x - m), a = g 2 (m - mu) / N,
  // k = g 2 (s - sig) / (s (N - 1)), in double, rounded once to float.
  const float* gp = grad.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* mup = mu.data_ptr<float>();
  const float* sgp = sig.data_ptr<float>();
  std::vector<float> A(B * C), K(B * C);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = b * C + c;
      const double g = gp[b];
      A[i] = static_cast<float>(g * 2.0 * (double(mp[i]) - mup[c]) / double(N));
      K[i] = static_cast<float>(g * 2.0 * (double(sp[i]) - sgp[c]) /
                                (double(sp[i]) * double(N - 1)));
    }
  at::Tensor gx = at::empty_like(x);  // keeps x's memory format
  const float* xp = x.data_ptr<float>();
  float* op = gx.data_ptr<float>();
  if (cl == 0) {
    at::parallel_for(0, B * C, 1, [&](int64_t b, int64_t e) {
      PDQ_ISA_DISPATCH(grad_planes, xp, N, b, e, mp, A.data(), K.data(), op);
    });
  } else {
    at::parallel_for(0, B, 1, [&](int64_t b, int64_t e) {
      PDQ_ISA_DISPATCH(grad_nhwc, xp, N, C, b, e, mp, A.data(), K.data(), op);
    });
  }
  return gx;
}

std::tuple<at::Tensor, at::Tensor> dc_adam_step_cpu(const at::Tensor& x, const at::Tensor& x0,
                                                    const at::Tensor& g, at::Tensor m,
                                                    at::Tensor v, const at::Tensor& kc,
                                                    const at::Tensor& step, double b1, double b2,
                                                    double sqrt_bc2, double eps) {
  layout_of(x);
  const int64_t B = x.size(0), HW = x.size(2) * x.size(3);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x0, &g, &m, &v})
    check(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->sizes() == x.sizes() &&
              t->strides() == x.strides(),
          "x0, g, m and v must be float32 CPU tensors with x's shape and strides");
  check_vec(kc, "kc", B);
  check_vec(step, "step", B);
  at::Tensor xn = at::empty_like(x);
  at::Tensor close = at::empty({B}, at::kFloat);
  std::vector<double> acc(B);
  DcAdamArgs a;
  a.x = x.data_ptr<float>();
  a.x0 = x0.data_ptr<float>();
  a.g = g.data_ptr<float>();
  a.m = m.data_ptr<float>();
  a.v = v.data_ptr<float>();
  a.out = xn.data_ptr<float>();
  a.kc = kc.data_ptr<float>();
  a.step = step.data_ptr<float>();
  a.per = B > 0 ? x.numel() / B : 0;
  a.b1 = static_cast<float>(b1);
  a.omb1 = static_cast<float>(1.0 - b1);
  a.b2 = static_cast<float>(b2);
  a.omb2 = static_cast<float>(1.0 - b2);
  a.sbc2 = static_cast<float>(sqrt_bc2);
  a.eps = static_cast<float>(eps);
  a.close = acc.data();
  at::parallel_for(0, B, 1, [&](int64_t b, int64_t e) { PDQ_ISA_DISPATCH(dc_adam_rows, a, b, e); });
  float* cp = close.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) cp[b] = static_cast<float>(acc[b] / double(HW));
  return {xn, close};
}

void register_bn_stat(pybind11::module_& mod) {
  mod.def("bn_stat_loss_cpu", &bn_stat_loss_cpu,
          "(loss [B], m [B, C], s [B, C]): per-sample BN-statistic loss of distribution "
          "correction (see pdquant_fast.ops.reference.bn_stat_loss_reference)",
          pybind11::arg("x"), pybind11::arg("mean"), pybind11::arg("std"));
  mod.def("bn_stat_loss_backward_cpu", &bn_stat_loss_backward_cpu,
          "grad_x of bn_stat_loss_cpu from the forward's m and s, one pass",
          pybind11::arg("grad"), pybind11::arg("x"), pybind11::arg("mean"), pybind11::arg("std"),
          pybind11::arg("m"), pybind11::arg("s"));
  mod.def("dc_adam_step_cpu", &dc_adam_step_cpu,
          "(x_new, close [B]): DC closeness gradient + Adam update in one pass, m and v updated "
          "in place (see pdquant_fast.ops.reference.dc_adam_step_reference)",
          pybind11::arg("x"), pybind11::arg("x0"), pybind11::arg("g"), pybind11::arg("m"),
          pybind11::arg("v"), pybind11::arg("kc"), pybind11::arg("step"), pybind11::arg("b1"),
          pybind11::arg("b2"), pybind11::arg("sqrt_bc2"), pybind11::arg("eps"));
}

}  // namespace

PDQ_REGISTER(register_bn_stat);

}  // namespace calib_cpu
}  // namespace pdquant

#else  // PDQ_ISA_PASS: the kernels, compiled once per ISA

constexpr int kLanes = 16;

// Sum of p[0..n) in double over kLanes lanes, lanes added in order at the end.
inline double lane_sum(const float* p, int64_t n) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(p[i + j]);
  for (int j = 0; i + j < n; ++j) acc[j] += static_cast<double>(p[i + j]);
  double v = 0.0;
  for (int j = 0; j < kLanes; ++j) v += acc[j];
  return v;
}

// Sum of (p - m)^2 in double, the same lane scheme.
inline double lane_m2(const float* p, int64_t n, double m) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const double d = static_cast<double>(p[i + j]) - m;
      acc[j] += d * d;
    }
  for (int j = 0; i + j < n; ++j) {
    const double d = static_cast<double>(p[i + j]) - m;
    acc[j] += d * d;
  }
  double v = 0.0;
  for (int j = 0; j < kLanes; ++j) v += acc[j];
  return v;
}

inline void finish(double sum, double m2, int64_t N, float mu, float sig, float* m_out,
                   float* s_out, double* term) {
  const double m = sum / double(N);
  const double s = std::sqrt(m2 / double(N - 1) + 1e-6);
  *m_out = static_cast<float>(m);
  *s_out = static_cast<float>(s);
  const double dm = double(mu) - m, ds = double(sig) - s;
  *term = dm * dm + ds * ds;
}

// NCHW: planes [p0, p1) of x viewed as [B*C][N].
void stat_planes(const float* x, int64_t N, int64_t C, int64_t p0, int64_t p1, const float* mu,
                 const float* sig, float* m, float* s, double* term) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* xp = x + p * N;
    const double sum = lane_sum(xp, N);
    const double m2 = lane_m2(xp, N, sum / double(N));
    const int64_t c = p % C;
    finish(sum, m2, N, mu[c], sig[c], m + p, s + p, term + p);
  }
}

// channels_last: samples [b0, b1) of x viewed as [B][N][C]; per-channel double accumulators.
void stat_nhwc(const float* x, int64_t N, int64_t C, int64_t b0, int64_t b1, const float* mu,
               const float* sig, float* m, float* s, double* term) {
  std::vector<double> sum(C), m2(C), mean(C);
  for (int64_t b = b0; b < b1; ++b) {
    const float* xb = x + b * N * C;
    std::fill(sum.begin(), sum.end(), 0.0);
    std::fill(m2.begin(), m2.end(), 0.0);
    double* su = sum.data();
    for (int64_t i = 0; i < N; ++i) {
      const float* r = xb + i * C;
      for (int64_t c = 0; c < C; ++c) su[c] += static_cast<double>(r[c]);
    }
    double* me = mean.data();
    for (int64_t c = 0; c < C; ++c) me[c] = su[c] / double(N);
    double* q = m2.data();
    for (int64_t i = 0; i < N; ++i) {
      const float* r = xb + i * C;
      for (int64_t c = 0; c < C; ++c) {
        const double d = static_cast<double>(r[c]) - me[c];
        q[c] += d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c)
      finish(su[c], q[c], N, mu[c], sig[c], m + b * C + c, s + b * C + c, term + b * C + c);
  }
}

void grad_planes(const float* x, int64_t N, int64_t p0, int64_t p1, const float* m,
                 const float* A, const float* K, float* out) {
  for (int64_t p = p0; p < p1; ++p) {
    const float a = A[p], k = K[p], mm = m[p];
    const float* xp = x + p * N;
    float* op = out + p * N;
    for (int64_t i = 0; i < N; ++i) op[i] = a + k * (xp[i] - mm);
  }
}

void grad_nhwc(const float* x, int64_t N, int64_t C, int64_t b0, int64_t b1, const float* m,
               const float* A, const float* K, float* out) {
  for (int64_t b = b0; b < b1; ++b) {
    const float* a = A + b * C;
    const float* k = K + b * C;
    const float* mm = m + b * C;
    for (int64_t i = 0; i < N; ++i) {
      const float* r = x + (b * N + i) * C;
      float* o = out + (b * N + i) * C;
      for (int64_t c = 0; c < C; ++c) o[c] = a[c] + k[c] * (r[c] - mm[c]);
    }
  }
}

// Samples [b0, b1): the fused DC Adam step (operation order of dc_adam_step_reference).
void dc_adam_rows(const DcAdamArgs& a, int64_t b0, int64_t b1) {
  using F = typename V::F;
  const F b1v = V::set1(a.b1), omb1v = V::set1(a.omb1), b2v = V::set1(a.b2),
          omb2v = V::set1(a.omb2), sbc2v = V::set1(a.sbc2), epsv = V::set1(a.eps);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t o = b * a.per;
    const float kc = a.kc[b], st = a.step[b];
    const F kcv = V::set1(kc), stv = V::set1(st);
    typename V::DAcc acc = V::dzero();
    int64_t i = 0;
    for (; i + V::W <= a.per; i += V::W) {
      const F xv = V::load(a.x + o + i);
      const F d = V::sub(xv, V::load(a.x0 + o + i));
      V::dacc(acc, d, d);
      const F g = V::add(V::load(a.g + o + i), V::mul(d, kcv));
      const F m = V::add(V::mul(V::load(a.m + o + i), b1v), V::mul(g, omb1v));
      const F v = V::add(V::mul(V::load(a.v + o + i), b2v), V::mul(V::mul(g, g), omb2v));
      const F den = V::add(V::div(V::sqrt_(v), sbc2v), epsv);
      V::store(a.m + o + i, m);
      V::store(a.v + o + i, v);
      V::store(a.out + o + i, V::sub(xv, V::div(V::mul(stv, m), den)));
    }
    double tail = 0.0;
    for (; i < a.per; ++i) {
      const float xv = a.x[o + i];
      const float d = xv - a.x0[o + i];
      tail += static_cast<double>(d) * d;
      const float g = a.g[o + i] + d * kc;
      const float m = a.m[o + i] * a.b1 + g * a.omb1;
      const float v = a.v[o + i] * a.b2 + (g * g) * a.omb2;
      const float den = std::sqrt(v) / a.sbc2 + a.eps;
      a.m[o + i] = m;
      a.v[o + i] = v;
      a.out[o + i] = xv - (st * m) / den;
    }
    a.close[b] = V::dsum(acc) + tail;
  }
}

#endif  // PDQ_ISA_PASS
