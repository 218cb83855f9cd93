// pybind11 module memit_fast._native: flat functions over device pointers (Python ints).
// Python (memit_fast/native.py, memit_fast/solve.py) checks dtypes, shapes and devices.
#include <pybind11/pybind11.h>

#include "cuda_libs.h"
#include "linalg.h"

namespace py = pybind11;
using namespace memit_native;
using uptr = std::uintptr_t;

PYBIND11_MODULE(_native, m) {
  m.doc() = "memit_fast native layer: cuSOLVER / cuBLAS calls on device pointers (libraries loaded at run time)";
  m.attr("ABI_VERSION") = 1;

  m.def("load_cuda_libs", &load_cuda_libs, py::arg("cublas_path"), py::arg("cusolver_path"),
        "dlopen libcublas and libcusolver (paths or sonames) and resolve the functions used; raises RuntimeError.");
  m.def("cuda_libs_loaded", &cuda_libs_loaded);

  m.def(
      "potrf_workspace",
      [](bool f64, bool upper, int n, int lda, uptr stream, int device) {
        return potrf_workspace({stream, device}, f64, upper, n, lda);
      },
      py::arg("f64"), py::arg("upper"), py::arg("n"), py::arg("lda"), py::arg("stream"), py::arg("device"));
  m.def(
      "potrf",
      [](bool f64, bool upper, int n, uptr a, int lda, uptr work, std::int64_t lwork, uptr info, uptr stream,
         int device) { potrf({stream, device}, f64, upper, n, a, lda, work, lwork, info); },
      py::arg("f64"), py::arg("upper"), py::arg("n"), py::arg("a"), py::arg("lda"), py::arg("work"), py::arg("lwork"),
      py::arg("info"), py::arg("stream"), py::arg("device"));
  m.def(
      "potrs",
      [](bool f64, bool upper, int n, int nrhs, uptr a, int lda, uptr b, int ldb, uptr info, uptr stream, int device) {
        potrs({stream, device}, f64, upper, n, nrhs, a, lda, b, ldb, info);
      },
      py::arg("f64"), py::arg("upper"), py::arg("n"), py::arg("nrhs"), py::arg("a"), py::arg("lda"), py::arg("b"),
      py::arg("ldb"), py::arg("info"), py::arg("stream"), py::arg("device"));
  m.def(
      "syrk",
      [](bool f64, bool upper, bool trans, int n, int k, double alpha, uptr a, int lda, double beta, uptr c, int ldc,
         uptr stream, int device) { syrk({stream, device}, f64, upper, trans, n, k, alpha, a, lda, beta, c, ldc); },
      py::arg("f64"), py::arg("upper"), py::arg("trans"), py::arg("n"), py::arg("k"), py::arg("alpha"), py::arg("a"),
      py::arg("lda"), py::arg("beta"), py::arg("c"), py::arg("ldc"), py::arg("stream"), py::arg("device"));
  m.def(
      "trsm",
      [](bool f64, bool left, bool upper, bool trans, int m, int n, double alpha, uptr t, int ldt, uptr b, int ldb,
         uptr stream, int device) { trsm({stream, device}, f64, left, upper, trans, m, n, alpha, t, ldt, b, ldb); },
      py::arg("f64"), py::arg("left"), py::arg("upper"), py::arg("trans"), py::arg("m"), py::arg("n"),
      py::arg("alpha"), py::arg("t"), py::arg("ldt"), py::arg("b"), py::arg("ldb"), py::arg("stream"),
      py::arg("device"));
}
