// Column-major LAPACK/BLAS calls on device memory: Cholesky factor and solve (cuSOLVER),
// symmetric rank-k update, triangular solve and matrix product (cuBLAS).
//
// No torch types and no checks: pointers are device addresses, `stream` a cudaStream_t,
// `device` the CUDA device index the caller has made current (handles are cached per thread and
// device). buffers.h checks the operands and calls these. Errors (a failed library call) throw
// std::runtime_error; `info` of potrf/potrs is written to device memory and checked by the
// caller, so no call here synchronizes the stream.
#pragma once

#include <cstdint>

namespace memit_native {

struct Call {
  std::uintptr_t stream;
  int device;
};

// Device workspace of potrf, in elements of the matrix dtype.
std::int64_t potrf_workspace(const Call& c, bool f64, bool upper, int n, int lda);
// A (n x n, lda) := its Cholesky factor in the `upper` or lower triangle; *info = 0 on success,
// i > 0 if the leading minor of order i is not positive definite.
void potrf(const Call& c, bool f64, bool upper, int n, std::uintptr_t a, int lda, std::uintptr_t work,
           std::int64_t lwork, std::uintptr_t info);
// B (n x nrhs, ldb) := A^-1 B with A's factor from potrf.
void potrs(const Call& c, bool f64, bool upper, int n, int nrhs, std::uintptr_t a, int lda, std::uintptr_t b, int ldb,
           std::uintptr_t info);
// C (n x n, triangle `upper`) := alpha op(A) op(A)^T + beta C; op(A) = A (n x k) or, if trans, A^T (A is k x n).
void syrk(const Call& c, bool f64, bool upper, bool trans, int n, int k, double alpha, std::uintptr_t a, int lda,
          double beta, std::uintptr_t cmat, int ldc);
// B (m x n, ldb) := alpha op(T)^-1 B (left) or alpha B op(T)^-1 (right); T triangular, op = T or T^T.
void trsm(const Call& c, bool f64, bool left, bool upper, bool trans, int m, int n, double alpha, std::uintptr_t t,
          int ldt, std::uintptr_t b, int ldb);
// C (m x n) := alpha op(A) op(B) + beta C; op(A) m x k, op(B) k x n.
void gemm(const Call& c, bool f64, bool trans_a, bool trans_b, int m, int n, int k, double alpha, std::uintptr_t a,
          int lda, std::uintptr_t b, int ldb, double beta, std::uintptr_t cmat, int ldc);

}  // namespace memit_native
