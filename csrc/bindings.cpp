// pybind11 module optembed_ext._C. Importing it loads the shared library, whose static initialisers register the
// `optembed` torch library (schemas + CPU/CUDA kernels, see csrc/<op>.cpp and csrc/cuda/<op>.cu). The module itself
// only exposes build facts, used by optembed_ext._ext.build_info() and in error messages.
#include <pybind11/pybind11.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#ifndef OPTEMBED_VERSION
#define OPTEMBED_VERSION "0.0.0"
#endif
#ifndef OPTEMBED_TORCH_VERSION
#define OPTEMBED_TORCH_VERSION ""
#endif
#ifndef OPTEMBED_WITH_CUDA
#define OPTEMBED_WITH_CUDA 0
#endif
#ifndef OPTEMBED_CUDA_VERSION
#define OPTEMBED_CUDA_VERSION ""
#endif
#ifndef OPTEMBED_CUDA_ARCHS
#define OPTEMBED_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "optembed_ext compiled ops (registered as torch.ops.optembed.*) and build facts";
  m.attr("__version__") = OPTEMBED_VERSION;
  m.attr("torch_version") = OPTEMBED_TORCH_VERSION;  // torch the extension was compiled against
  m.attr("with_cuda") = static_cast<bool>(OPTEMBED_WITH_CUDA);
  m.attr("cuda_version") = OPTEMBED_CUDA_VERSION;  // nvcc version ("" without CUDA)
  m.attr("cuda_archs") = OPTEMBED_CUDA_ARCHS;      // comma-separated CMAKE_CUDA_ARCHITECTURES ("" without CUDA)
#if defined(_OPENMP)
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
#if defined(__VERSION__)
  m.attr("compiler") = __VERSION__;
#else
  m.attr("compiler") = "";
#endif
  m.def("parallel_info", []() { return at::get_parallel_info(); },
        "ATen parallel backend as seen by the extension (threads, OpenMP/MKL)");
}
