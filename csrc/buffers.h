// Typed entry points of memit_fast._native: each operand is a Buffer (a tensor's address, shape,
// strides, dtype and device), checked here with errors that name the call and the operand; the
// column-major view and every block offset are computed here, then linalg.h does the calls.
//
// A row-major (R, C) buffer with unit column stride and row stride ld is read as the
// column-major C x R matrix with leading dimension ld (a row-major lower triangle is the
// column-major upper one). Shapes below are the column-major ones.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace memit_native {

struct Buffer {
  std::uintptr_t ptr;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> strides;  // in elements
  std::string dtype;                  // "float32", "float64" or "int32"
  int device;                         // CUDA device index (-1: host memory)
};

// (workspace elements of `potrf`, offsets of its diagonal blocks). a: n x n float32/float64.
// Blocks: a recursion that halves a (at multiples of 256 where it can) down to `block` (<= 0: one).
std::pair<std::int64_t, std::vector<std::int64_t>> potrf_plan(const Buffer& a, bool upper, std::int64_t block,
                                                              std::uintptr_t stream);
// a := its Cholesky factor in place (upper: U^T U = A in the upper triangle; else L L^T = A),
// right-looking: A11 = factor (recursively), A12 := U11^-T A12, A22 -= U12^T U12, A22 = factor.
// work: 1-d, a's dtype, at least potrf_plan's elements; info: int32, one entry per block (the
// order of its first failing leading minor, counted inside the block, or 0).
void potrf(const Buffer& a, bool upper, std::int64_t block, const Buffer& work, const Buffer& info,
           std::uintptr_t stream);
// b (n x r) := A^-1 b with a (n x n) factored by potrf. For an upper factor and n > block > 0:
// per diagonal block a trsm, a gemm for the rest of b, forward then backward; else cuSOLVER's
// potrs, which writes its argument check to info[0] (int32).
void potrs(const Buffer& a, const Buffer& b, bool upper, std::int64_t block, const Buffer& info,
           std::uintptr_t stream);
// c (n x n, the `upper` or lower triangle) := alpha op(a) op(a)^T + beta c, op(a) = a or a^T.
void syrk(const Buffer& a, const Buffer& c, bool upper, bool trans, double alpha, double beta, std::uintptr_t stream);
// b := alpha op(t)^-1 b (left) or alpha b op(t)^-1 (right); t triangular (`upper` or lower).
void trsm(const Buffer& t, const Buffer& b, bool left, bool upper, bool trans, double alpha, std::uintptr_t stream);

}  // namespace memit_native
