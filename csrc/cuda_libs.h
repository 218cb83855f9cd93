// Run-time loading of cuSOLVER and cuBLAS (no CUDA headers needed to build).
//
// The prototypes below are the C API of cusolverDn.h / cublas_api.h (checked against
// cuSOLVER 12.4 and cuBLAS 13.10 of the nvidia-cusolver / nvidia-cublas cu13 wheels; these
// legacy entry points are unchanged since CUDA 10). Enums are passed as int, which is their
// ABI on x86-64 and aarch64 Linux.
#pragma once

#include <string>

namespace memit_native {

using Stream = struct CUstream_st*;  // cudaStream_t
using SolverHandle = struct cusolverDnContext*;
using BlasHandle = struct cublasContext*;

// cuBLAS enum values (cublas_api.h)
constexpr int kFillLower = 0, kFillUpper = 1;
constexpr int kOpN = 0, kOpT = 1;
constexpr int kSideLeft = 0, kSideRight = 1;
constexpr int kDiagNonUnit = 0;

struct CudaLibs {
  int (*cusolverDnCreate)(SolverHandle*);
  int (*cusolverDnSetStream)(SolverHandle, Stream);
  int (*cusolverDnSpotrf_bufferSize)(SolverHandle, int uplo, int n, float* a, int lda, int* lwork);
  int (*cusolverDnDpotrf_bufferSize)(SolverHandle, int uplo, int n, double* a, int lda, int* lwork);
  int (*cusolverDnSpotrf)(SolverHandle, int uplo, int n, float* a, int lda, float* work, int lwork, int* info);
  int (*cusolverDnDpotrf)(SolverHandle, int uplo, int n, double* a, int lda, double* work, int lwork, int* info);
  int (*cusolverDnSpotrs)(SolverHandle, int uplo, int n, int nrhs, const float* a, int lda, float* b, int ldb, int* info);
  int (*cusolverDnDpotrs)(SolverHandle, int uplo, int n, int nrhs, const double* a, int lda, double* b, int ldb, int* info);

  int (*cublasCreate_v2)(BlasHandle*);
  int (*cublasSetStream_v2)(BlasHandle, Stream);
  int (*cublasSsyrk_v2)(BlasHandle, int uplo, int trans, int n, int k, const float* alpha, const float* a, int lda,
                        const float* beta, float* c, int ldc);
  int (*cublasDsyrk_v2)(BlasHandle, int uplo, int trans, int n, int k, const double* alpha, const double* a, int lda,
                        const double* beta, double* c, int ldc);
  int (*cublasStrsm_v2)(BlasHandle, int side, int uplo, int trans, int diag, int m, int n, const float* alpha,
                        const float* a, int lda, float* b, int ldb);
  int (*cublasDtrsm_v2)(BlasHandle, int side, int uplo, int trans, int diag, int m, int n, const double* alpha,
                        const double* a, int lda, double* b, int ldb);
  int (*cublasSgemm_v2)(BlasHandle, int transa, int transb, int m, int n, int k, const float* alpha, const float* a,
                        int lda, const float* b, int ldb, const float* beta, float* c, int ldc);
  int (*cublasDgemm_v2)(BlasHandle, int transa, int transb, int m, int n, int k, const double* alpha,
                        const double* a, int lda, const double* b, int ldb, const double* beta, double* c, int ldc);
};

// dlopen()s the two libraries (paths or sonames) and resolves every symbol above.
// Throws std::runtime_error naming the library or symbol that failed. Idempotent.
void load_cuda_libs(const std::string& cublas_path, const std::string& cusolver_path);
// The loaded table; throws std::runtime_error if load_cuda_libs has not succeeded.
const CudaLibs& cuda_libs();
bool cuda_libs_loaded();

}  // namespace memit_native
