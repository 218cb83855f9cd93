#include "cuda_libs.h"

#include <dlfcn.h>

#include <mutex>
#include <stdexcept>

namespace memit_native {
namespace {

CudaLibs g_libs{};
bool g_loaded = false;
std::mutex g_mutex;

void* open_library(const std::string& path) {
  // RTLD_GLOBAL is not needed: each library finds its own dependencies through its RPATH.
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) throw std::runtime_error("cannot load " + path + ": " + dlerror());
  return handle;
}

template <typename Fn>
void resolve(void* lib, const char* name, Fn*& out) {
  dlerror();
  void* sym = dlsym(lib, name);
  if (!sym) throw std::runtime_error(std::string("symbol ") + name + " not found: " + dlerror());
  out = reinterpret_cast<Fn*>(sym);
}

}  // namespace

void load_cuda_libs(const std::string& cublas_path, const std::string& cusolver_path) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_loaded) return;
  CudaLibs libs{};
  void* blas = open_library(cublas_path);  // first: libcusolver depends on it
  void* solver = open_library(cusolver_path);
#define MEMIT_RESOLVE(lib, name) resolve(lib, #name, libs.name)
  MEMIT_RESOLVE(solver, cusolverDnCreate);
  MEMIT_RESOLVE(solver, cusolverDnSetStream);
  MEMIT_RESOLVE(solver, cusolverDnSpotrf_bufferSize);
  MEMIT_RESOLVE(solver, cusolverDnDpotrf_bufferSize);
  MEMIT_RESOLVE(solver, cusolverDnSpotrf);
  MEMIT_RESOLVE(solver, cusolverDnDpotrf);
  MEMIT_RESOLVE(solver, cusolverDnSpotrs);
  MEMIT_RESOLVE(solver, cusolverDnDpotrs);
  MEMIT_RESOLVE(blas, cublasCreate_v2);
  MEMIT_RESOLVE(blas, cublasSetStream_v2);
  MEMIT_RESOLVE(blas, cublasSsyrk_v2);
  MEMIT_RESOLVE(blas, cublasDsyrk_v2);
  MEMIT_RESOLVE(blas, cublasStrsm_v2);
  MEMIT_RESOLVE(blas, cublasDtrsm_v2);
  MEMIT_RESOLVE(blas, cublasSgemm_v2);
  MEMIT_RESOLVE(blas, cublasDgemm_v2);
#undef MEMIT_RESOLVE
  g_libs = libs;
  g_loaded = true;  // the library handles stay open for the life of the process
}

const CudaLibs& cuda_libs() {
  if (!g_loaded) throw std::runtime_error("cuSOLVER/cuBLAS not loaded: call load_cuda_libs first");
  return g_libs;
}

bool cuda_libs_loaded() { return g_loaded; }

}  // namespace memit_native
