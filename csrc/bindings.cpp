// pybind11 module memit_fast._native: cuSOLVER / cuBLAS calls on Buffer descriptors, checked in
// buffers.cpp (a bad operand raises ValueError, a failed library call RuntimeError).
// memit_fast/native.py builds the descriptors from tensors.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "buffers.h"
#include "cuda_libs.h"

namespace py = pybind11;
using namespace memit_native;

PYBIND11_MODULE(_native, m) {
  m.doc() = "memit_fast native layer: cuSOLVER / cuBLAS calls on checked buffers (libraries loaded at run time)";
  m.attr("ABI_VERSION") = 2;

  // module_local: a second build of this module in the same process (the tests' CPU stand-in
  // beside the installed one) registers its own Buffer instead of colliding with this one.
  py::class_<Buffer>(m, "Buffer", py::module_local(), "A tensor's memory: address, shape, strides (elements), dtype name, device index")
      .def(py::init<std::uintptr_t, std::vector<std::int64_t>, std::vector<std::int64_t>, std::string, int>(),
           py::arg("ptr"), py::arg("shape"), py::arg("strides"), py::arg("dtype"), py::arg("device"))
      .def_readonly("ptr", &Buffer::ptr)
      .def_readonly("shape", &Buffer::shape)
      .def_readonly("strides", &Buffer::strides)
      .def_readonly("dtype", &Buffer::dtype)
      .def_readonly("device", &Buffer::device);
  m.def("load_cuda_libs", &load_cuda_libs, py::arg("cublas_path"), py::arg("cusolver_path"),
        "dlopen libcublas and libcusolver (paths or sonames) and resolve the functions used; raises RuntimeError.");
  m.def("cuda_libs_loaded", &cuda_libs_loaded);
  m.def("potrf_plan", &potrf_plan, py::arg("a"), py::arg("upper"), py::arg("block"), py::arg("stream"));
  m.def("potrf", py::overload_cast<const Buffer&, bool, std::int64_t, const Buffer&, const Buffer&, std::uintptr_t>(&potrf),
        py::arg("a"), py::arg("upper"), py::arg("block"), py::arg("work"), py::arg("info"), py::arg("stream"));
  m.def("potrs", py::overload_cast<const Buffer&, const Buffer&, bool, std::int64_t, const Buffer&, std::uintptr_t>(&potrs),
        py::arg("a"), py::arg("b"), py::arg("upper"), py::arg("block"), py::arg("info"), py::arg("stream"));
  m.def("syrk", py::overload_cast<const Buffer&, const Buffer&, bool, bool, double, double, std::uintptr_t>(&syrk),
        py::arg("a"), py::arg("c"), py::arg("upper"), py::arg("trans"), py::arg("alpha"), py::arg("beta"),
        py::arg("stream"));
  m.def("trsm", py::overload_cast<const Buffer&, const Buffer&, bool, bool, bool, double, std::uintptr_t>(&trsm),
        py::arg("t"), py::arg("b"), py::arg("left"), py::arg("upper"), py::arg("trans"), py::arg("alpha"),
        py::arg("stream"));
}
