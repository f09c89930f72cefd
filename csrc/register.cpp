// The one PYBIND11_MODULE of pdquant_fast._C: runs every op file's registrar (see registry.h).
#include "registry.h"

#include <ATen/Parallel.h>

namespace {

// Which SIMD paths this build can take and which the running CPU has (for `pdquant info`).
pybind11::dict build_info() {
  pybind11::dict d;
#ifdef PDQUANT_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  d["openmp"] = at::get_parallel_info();
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  d["cpu_avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
  d["cpu_avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
  d["cpu_avx512vnni"] = static_cast<bool>(__builtin_cpu_supports("avx512vnni"));
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pdquant-fast compiled kernels (C++ CPU, and CUDA when built with it)";
  m.def("build_info", &build_info, "what this build of the extension has");
  for (auto reg : pdquant::registrars()) reg(m);
}
