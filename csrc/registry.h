// Self-registration of kernel entry points into the Python module pdquant_fast._C.
//
// Each op file defines a `void f(pybind11::module_&)` that adds its `<op>_cpu` (or `<op>_cuda`)
// functions and registers it with PDQ_REGISTER(f). register.cpp runs every registrar when the
// module is imported, so adding an op never means editing a shared file. The Python-side
// contracts (torch.library schemas, autograd, fake kernels) live in pdquant_fast/ops/library.py;
// these are the plain kernels it dispatches to (pdquant_fast/ops/backends.py).
#pragma once

#include <torch/extension.h>

#include <vector>

namespace pdquant {

using Registrar = void (*)(pybind11::module_&);

// Function-local static: safe to use from other translation units' static initialisers.
inline std::vector<Registrar>& registrars() {
  static std::vector<Registrar> list;
  return list;
}

struct AutoRegister {
  explicit AutoRegister(Registrar r) { registrars().push_back(r); }
};

}  // namespace pdquant

#define PDQ_CONCAT_INNER(a, b) a##b
#define PDQ_CONCAT(a, b) PDQ_CONCAT_INNER(a, b)
#define PDQ_REGISTER(fn) \
  static ::pdquant::AutoRegister PDQ_CONCAT(pdq_autoregister_, __LINE__)(fn)
