#include "linalg.h"

#include <stdexcept>
#include <string>
#include <unordered_map>

#include "cuda_libs.h"

namespace memit_native {
namespace {

struct Handles {
  SolverHandle solver = nullptr;
  BlasHandle blas = nullptr;
};

const char* solver_status(int s) {
  static const char* names[] = {"SUCCESS",        "NOT_INITIALIZED",  "ALLOC_FAILED",   "INVALID_VALUE",
                                "ARCH_MISMATCH",  "MAPPING_ERROR",    "EXECUTION_FAILED", "INTERNAL_ERROR",
                                "MATRIX_TYPE_NOT_SUPPORTED", "NOT_SUPPORTED"};
  return (s >= 0 && s < 10) ? names[s] : "UNKNOWN";
}

const char* blas_status(int s) {
  switch (s) {
    case 0: return "SUCCESS";
    case 1: return "NOT_INITIALIZED";
    case 3: return "ALLOC_FAILED";
    case 7: return "INVALID_VALUE";
    case 8: return "ARCH_MISMATCH";
    case 11: return "MAPPING_ERROR";
    case 13: return "EXECUTION_FAILED";
    case 14: return "INTERNAL_ERROR";
    case 15: return "NOT_SUPPORTED";
    default: return "UNKNOWN";
  }
}

void check_solver(int status, const char* what) {
  if (status != 0)
    throw std::runtime_error(std::string(what) + " failed: CUSOLVER_STATUS_" + solver_status(status) + " (" +
                             std::to_string(status) + ")");
}

void check_blas(int status, const char* what) {
  if (status != 0)
    throw std::runtime_error(std::string(what) + " failed: CUBLAS_STATUS_" + blas_status(status) + " (" +
                             std::to_string(status) + ")");
}

// One pair of handles per thread and device, created on first use and kept for the life of the
// thread: destroying them at process exit can run after the CUDA context is gone.
Handles& handles(const Call& c) {
  thread_local std::unordered_map<int, Handles> cache;
  Handles& h = cache[c.device];
  const CudaLibs& lib = cuda_libs();
  if (!h.solver) check_solver(lib.cusolverDnCreate(&h.solver), "cusolverDnCreate");
  if (!h.blas) check_blas(lib.cublasCreate_v2(&h.blas), "cublasCreate");
  auto stream = reinterpret_cast<Stream>(c.stream);
  check_solver(lib.cusolverDnSetStream(h.solver, stream), "cusolverDnSetStream");
  check_blas(lib.cublasSetStream_v2(h.blas, stream), "cublasSetStream");
  return h;
}

int fill(bool upper) { return upper ? kFillUpper : kFillLower; }

template <typename T>
T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace

std::int64_t potrf_workspace(const Call& c, bool f64, bool upper, int n, int lda) {
  const CudaLibs& lib = cuda_libs();
  Handles& h = handles(c);
  int lwork = 0;
  if (f64)
    check_solver(lib.cusolverDnDpotrf_bufferSize(h.solver, fill(upper), n, nullptr, lda, &lwork), "potrf_bufferSize");
  else
    check_solver(lib.cusolverDnSpotrf_bufferSize(h.solver, fill(upper), n, nullptr, lda, &lwork), "potrf_bufferSize");
  return lwork;
}

void potrf(const Call& c, bool f64, bool upper, int n, std::uintptr_t a, int lda, std::uintptr_t work,
           std::int64_t lwork, std::uintptr_t info) {
  if (lwork > INT32_MAX) throw std::invalid_argument("potrf: workspace larger than 2^31 elements");
  const CudaLibs& lib = cuda_libs();
  Handles& h = handles(c);
  if (f64)
    check_solver(lib.cusolverDnDpotrf(h.solver, fill(upper), n, ptr<double>(a), lda, ptr<double>(work),
                                      static_cast<int>(lwork), ptr<int>(info)),
                 "cusolverDnDpotrf");
  else
    check_solver(lib.cusolverDnSpotrf(h.solver, fill(upper), n, ptr<float>(a), lda, ptr<float>(work),
                                      static_cast<int>(lwork), ptr<int>(info)),
                 "cusolverDnSpotrf");
}

void potrs(const Call& c, bool f64, bool upper, int n, int nrhs, std::uintptr_t a, int lda, std::uintptr_t b, int ldb,
           std::uintptr_t info) {
  const CudaLibs& lib = cuda_libs();
  Handles& h = handles(c);
  if (f64)
    check_solver(lib.cusolverDnDpotrs(h.solver, fill(upper), n, nrhs, ptr<const double>(a), lda, ptr<double>(b), ldb,
                                      ptr<int>(info)),
                 "cusolverDnDpotrs");
  else
    check_solver(lib.cusolverDnSpotrs(h.solver, fill(upper), n, nrhs, ptr<const float>(a), lda, ptr<float>(b), ldb,
                                      ptr<int>(info)),
                 "cusolverDnSpotrs");
}

void syrk(const Call& c, bool f64, bool upper, bool trans, int n, int k, double alpha, std::uintptr_t a, int lda,
          double beta, std::uintptr_t cmat, int ldc) {
  const CudaLibs& lib = cuda_libs();
  Handles& h = handles(c);  // pointer mode is the default: alpha and beta live on the host
  const int op = trans ? kOpT : kOpN;
  if (f64) {
    check_blas(lib.cublasDsyrk_v2(h.blas, fill(upper), op, n, k, &alpha, ptr<const double>(a), lda, &beta,
                                  ptr<double>(cmat), ldc),
               "cublasDsyrk");
  } else {
    const float af = static_cast<float>(alpha), bf = static_cast<float>(beta);
    check_blas(lib.cublasSsyrk_v2(h.blas, fill(upper), op, n, k, &af, ptr<const float>(a), lda, &bf, ptr<float>(cmat),
                                  ldc),
               "cublasSsyrk");
  }
}

void trsm(const Call& c, bool f64, bool left, bool upper, bool trans, int m, int n, double alpha, std::uintptr_t t,
          int ldt, std::uintptr_t b, int ldb) {
  const CudaLibs& lib = cuda_libs();
  Handles& h = handles(c);
  const int side = left ? kSideLeft : kSideRight, op = trans ? kOpT : kOpN;
  if (f64) {
    check_blas(lib.cublasDtrsm_v2(h.blas, side, fill(upper), op, kDiagNonUnit, m, n, &alpha, ptr<const double>(t), ldt,
                                  ptr<double>(b), ldb),
               "cublasDtrsm");
  } else {
    const float af = static_cast<float>(alpha);
    check_blas(lib.cublasStrsm_v2(h.blas, side, fill(upper), op, kDiagNonUnit, m, n, &af, ptr<const float>(t), ldt,
                                  ptr<float>(b), ldb),
               "cublasStrsm");
  }
}

void gemm(const Call& c, bool f64, bool trans_a, bool trans_b, int m, int n, int k, double alpha, std::uintptr_t a,
          int lda, std::uintptr_t b, int ldb, double beta, std::uintptr_t cmat, int ldc) {
  const CudaLibs& lib = cuda_libs();
  Handles& h = handles(c);
  const int op_a = trans_a ? kOpT : kOpN, op_b = trans_b ? kOpT : kOpN;
  if (f64) {
    check_blas(lib.cublasDgemm_v2(h.blas, op_a, op_b, m, n, k, &alpha, ptr<const double>(a), lda, ptr<const double>(b),
                                  ldb, &beta, ptr<double>(cmat), ldc),
               "cublasDgemm");
  } else {
    const float af = static_cast<float>(alpha), bf = static_cast<float>(beta);
    check_blas(lib.cublasSgemm_v2(h.blas, op_a, op_b, m, n, k, &af, ptr<const float>(a), lda, ptr<const float>(b), ldb,
                                  &bf, ptr<float>(cmat), ldc),
               "cublasSgemm");
  }
}

}  // namespace memit_native
