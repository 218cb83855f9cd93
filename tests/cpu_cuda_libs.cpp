// A host-memory stand-in for the cuSOLVER / cuBLAS entry points memit_fast._native loads
// (csrc/cuda_libs.h): the same prototypes and column-major semantics (only the named triangle is
// read or written), plain loops in double. Loaded in place of both libraries, it runs the whole
// native layer (descriptor checks, blocked factor and solve, pointer arithmetic) on CPU tensors.
#include <cmath>
#include <vector>

namespace {

constexpr int kLower = 0, kUpper = 1, kOpT = 1, kLeft = 0;

template <typename T>
struct Col {  // column-major view
  T* p;
  int ld;
  T& operator()(int i, int j) const { return p[i + static_cast<long>(j) * ld]; }
};

// Dense op(tri(A)) (s x s) in double, and whether it is lower triangular.
template <typename T>
std::vector<double> tri(const T* a, int lda, int s, int uplo, bool trans, bool& lower) {
  std::vector<double> t(static_cast<size_t>(s) * s, 0.0);
  for (int j = 0; j < s; ++j)
    for (int i = 0; i < s; ++i)
      if ((uplo == kUpper) ? i <= j : i >= j) t[trans ? j + i * s : i + j * s] = a[i + static_cast<long>(j) * lda];
  lower = (uplo == kLower) != trans;
  return t;
}

// x := T^-1 x for dense triangular T (s x s, column-major).
void solve(const std::vector<double>& t, int s, bool lower, std::vector<double>& x) {
  if (lower) {
    for (int i = 0; i < s; ++i) {
      for (int k = 0; k < i; ++k) x[i] -= t[i + k * s] * x[k];
      x[i] /= t[i + i * s];
    }
  } else {
    for (int i = s - 1; i >= 0; --i) {
      for (int k = i + 1; k < s; ++k) x[i] -= t[i + k * s] * x[k];
      x[i] /= t[i + i * s];
    }
  }
}

template <typename T>
int potrf(int uplo, int n, T* a, int lda, int* info) {
  Col<T> m{a, lda};
  auto at = [&](int i, int j) -> T& { return uplo == kLower ? m(i, j) : m(j, i); };  // L(i, j), i >= j
  *info = 0;
  for (int j = 0; j < n; ++j) {
    double d = at(j, j);
    for (int k = 0; k < j; ++k) d -= static_cast<double>(at(j, k)) * at(j, k);
    if (!(d > 0)) {
      *info = j + 1;
      return 0;
    }
    at(j, j) = static_cast<T>(std::sqrt(d));
    for (int i = j + 1; i < n; ++i) {
      double v = at(i, j);
      for (int k = 0; k < j; ++k) v -= static_cast<double>(at(i, k)) * at(j, k);
      at(i, j) = static_cast<T>(v / at(j, j));
    }
  }
  return 0;
}

template <typename T>
int potrs(int uplo, int n, int nrhs, const T* a, int lda, T* b, int ldb, int* info) {
  bool lower;  // A = L L^T with L = tri(A) (lower) or U^T (upper)
  auto l = tri(a, lda, n, uplo, uplo == kUpper, lower);
  auto lt = tri(a, lda, n, uplo, uplo == kLower, lower);
  for (int c = 0; c < nrhs; ++c) {
    std::vector<double> x(b + static_cast<long>(c) * ldb, b + static_cast<long>(c) * ldb + n);
    solve(l, n, true, x);
    solve(lt, n, false, x);
    for (int i = 0; i < n; ++i) b[i + static_cast<long>(c) * ldb] = static_cast<T>(x[i]);
  }
  *info = 0;
  return 0;
}

template <typename T>
int syrk(int uplo, int trans, int n, int k, const T* alpha, const T* a, int lda, const T* beta, T* c, int ldc) {
  Col<const T> A{a, lda};
  Col<T> C{c, ldc};
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < n; ++i) {
      if (uplo == kUpper ? i > j : i < j) continue;
      double s = 0;
      for (int l = 0; l < k; ++l)
        s += trans == kOpT ? static_cast<double>(A(l, i)) * A(l, j) : static_cast<double>(A(i, l)) * A(j, l);
      C(i, j) = static_cast<T>(*alpha * s + *beta * static_cast<double>(C(i, j)));
    }
  return 0;
}

template <typename T>
int trsm(int side, int uplo, int trans, int, int m, int n, const T* alpha, const T* a, int lda, T* b, int ldb) {
  Col<T> B{b, ldb};
  bool lower;
  if (side == kLeft) {  // op(T) X = alpha B, column by column
    auto t = tri(a, lda, m, uplo, trans == kOpT, lower);
    for (int j = 0; j < n; ++j) {
      std::vector<double> x(m);
      for (int i = 0; i < m; ++i) x[i] = *alpha * static_cast<double>(B(i, j));
      solve(t, m, lower, x);
      for (int i = 0; i < m; ++i) B(i, j) = static_cast<T>(x[i]);
    }
  } else {  // X op(T) = alpha B: op(T)^T x = alpha b for each row
    auto t = tri(a, lda, n, uplo, trans != kOpT, lower);
    for (int i = 0; i < m; ++i) {
      std::vector<double> x(n);
      for (int j = 0; j < n; ++j) x[j] = *alpha * static_cast<double>(B(i, j));
      solve(t, n, lower, x);
      for (int j = 0; j < n; ++j) B(i, j) = static_cast<T>(x[j]);
    }
  }
  return 0;
}

template <typename T>
int gemm(int ta, int tb, int m, int n, int k, const T* alpha, const T* a, int lda, const T* b, int ldb, const T* beta,
         T* c, int ldc) {
  Col<const T> A{a, lda}, B{b, ldb};
  Col<T> C{c, ldc};
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      double s = 0;
      for (int l = 0; l < k; ++l)
        s += static_cast<double>(ta == kOpT ? A(l, i) : A(i, l)) * (tb == kOpT ? B(j, l) : B(l, j));
      C(i, j) = static_cast<T>(*alpha * s + *beta * static_cast<double>(C(i, j)));
    }
  return 0;
}

}  // namespace

extern "C" {
int cusolverDnCreate(void** h) { *h = reinterpret_cast<void*>(1); return 0; }
int cusolverDnSetStream(void*, void*) { return 0; }
int cusolverDnSpotrf_bufferSize(void*, int, int n, float*, int, int* lwork) { *lwork = n; return 0; }
int cusolverDnDpotrf_bufferSize(void*, int, int n, double*, int, int* lwork) { *lwork = n; return 0; }
int cusolverDnSpotrf(void*, int u, int n, float* a, int lda, float*, int, int* info) { return potrf(u, n, a, lda, info); }
int cusolverDnDpotrf(void*, int u, int n, double* a, int lda, double*, int, int* info) { return potrf(u, n, a, lda, info); }
int cusolverDnSpotrs(void*, int u, int n, int r, const float* a, int lda, float* b, int ldb, int* info) { return potrs(u, n, r, a, lda, b, ldb, info); }
int cusolverDnDpotrs(void*, int u, int n, int r, const double* a, int lda, double* b, int ldb, int* info) { return potrs(u, n, r, a, lda, b, ldb, info); }
int cublasCreate_v2(void** h) { *h = reinterpret_cast<void*>(1); return 0; }
int cublasSetStream_v2(void*, void*) { return 0; }
int cublasSsyrk_v2(void*, int u, int t, int n, int k, const float* al, const float* a, int lda, const float* be, float* c, int ldc) { return syrk(u, t, n, k, al, a, lda, be, c, ldc); }
int cublasDsyrk_v2(void*, int u, int t, int n, int k, const double* al, const double* a, int lda, const double* be, double* c, int ldc) { return syrk(u, t, n, k, al, a, lda, be, c, ldc); }
int cublasStrsm_v2(void*, int s, int u, int t, int d, int m, int n, const float* al, const float* a, int lda, float* b, int ldb) { return trsm(s, u, t, d, m, n, al, a, lda, b, ldb); }
int cublasDtrsm_v2(void*, int s, int u, int t, int d, int m, int n, const double* al, const double* a, int lda, double* b, int ldb) { return trsm(s, u, t, d, m, n, al, a, lda, b, ldb); }
int cublasSgemm_v2(void*, int ta, int tb, int m, int n, int k, const float* al, const float* a, int lda, const float* b, int ldb, const float* be, float* c, int ldc) { return gemm(ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc); }
int cublasDgemm_v2(void*, int ta, int tb, int m, int n, int k, const double* al, const double* a, int lda, const double* b, int ldb, const double* be, double* c, int ldc) { return gemm(ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc); }
}
