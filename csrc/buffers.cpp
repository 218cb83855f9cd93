#include "buffers.h"

#include <algorithm>
#include <array>
#include <climits>
#include <sstream>
#include <stdexcept>
#include <string>

#include "linalg.h"

namespace memit_native {
namespace {

// A column-major view of a checked Buffer; at(i, j) is the address of element (i, j).
struct Mat {
  std::uintptr_t ptr;
  int rows, cols, ld;
  bool f64;
  std::uintptr_t at(std::int64_t i, std::int64_t j) const {
    return ptr + static_cast<std::uintptr_t>((i + j * ld) * (f64 ? 8 : 4));
  }
};

// Throws std::invalid_argument (ValueError in Python) "op: name <parts...>".
template <typename... Parts>
[[noreturn]] void fail(const std::string& op, const std::string& name, const Parts&... parts) {
  std::ostringstream s;
  s << op << ": " << name << " ";
  (s << ... << parts);
  throw std::invalid_argument(s.str());
}

std::string shape_str(const Buffer& b) {
  std::string s = "(";
  for (size_t i = 0; i < b.shape.size(); ++i) s += (i ? ", " : "") + std::to_string(b.shape[i]);
  return s + (b.shape.size() == 1 ? ",)" : ")");
}

void check_common(const std::string& op, const std::string& name, const Buffer& b, int device) {
  if (b.shape.size() != b.strides.size()) fail(op, name, "has ", b.shape.size(), " sizes but ", b.strides.size(), " strides");
  if (b.device != device) fail(op, name, "is on device ", b.device, ", the other operands on ", device);
  for (auto s : b.shape)
    if (s < 0 || s > INT_MAX) fail(op, name, "has a size outside [0, 2^31): ", shape_str(b));
  std::int64_t numel = 1;
  for (auto s : b.shape) numel *= s;
  if (numel > 0 && b.ptr == 0) fail(op, name, "has a null address");
}

// A 2-d float buffer of `dtype` with unit column stride: column-major shape[1] x shape[0], ld strides[0].
Mat matrix(const std::string& op, const std::string& name, const Buffer& b, const std::string& dtype, int device) {
  check_common(op, name, b, device);
  if (b.dtype != dtype) fail(op, name, "must be ", dtype, ", not ", b.dtype);
  if (b.shape.size() != 2) fail(op, name, "must be 2-d, got shape ", shape_str(b));
  if (b.shape[1] > 1 && b.strides[1] != 1)
    fail(op, name, "must have contiguous rows (unit last stride), got strides (", b.strides[0], ", ", b.strides[1], ")");
  if (b.strides[0] < std::max<std::int64_t>(1, b.shape[1]) || b.strides[0] > INT_MAX)
    fail(op, name, "has row stride ", b.strides[0], ", need >= ", b.shape[1], " (its leading dimension)");
  return {b.ptr, static_cast<int>(b.shape[1]), static_cast<int>(b.shape[0]), static_cast<int>(b.strides[0]),
          dtype == "float64"};
}

Mat float_matrix(const std::string& op, const std::string& name, const Buffer& b) {
  if (b.dtype != "float32" && b.dtype != "float64") fail(op, name, "must be float32 or float64, not ", b.dtype);
  return matrix(op, name, b, b.dtype, b.device);
}

Mat square(const std::string& op, const std::string& name, const Buffer& b) {
  Mat m = float_matrix(op, name, b);
  if (m.rows != m.cols) fail(op, name, "must be square, got shape ", shape_str(b));
  return m;
}

// A contiguous 1-d buffer of `dtype` with at least `count` elements (exactly, if `exact`).
void check_vector(const std::string& op, const std::string& name, const Buffer& b, const std::string& dtype, int device,
                  std::int64_t count, bool exact) {
  check_common(op, name, b, device);
  if (b.dtype != dtype) fail(op, name, "must be ", dtype, ", not ", b.dtype);
  if (b.shape.size() != 1 || (b.shape[0] > 1 && b.strides[0] != 1))
    fail(op, name, "must be a contiguous 1-d buffer, got shape ", shape_str(b));
  if (exact ? b.shape[0] != count : b.shape[0] < count)
    fail(op, name, "has ", b.shape[0], " elements, need ", exact ? "" : "at least ", count);
}

void steps(std::int64_t o, std::int64_t n, std::int64_t block, std::vector<std::array<std::int64_t, 3>>& out) {
  if (block <= 0 || n <= block) {
    out.push_back({o, n, 0});
    return;
  }
  const std::int64_t q = std::max<std::int64_t>(1, std::min<std::int64_t>(256, block / 2));
  std::int64_t n1 = (n / 2) / q * q;
  if (n1 == 0) n1 = n / 2;
  steps(o, n1, block, out);
  out.push_back({o, n1, n - n1});
  steps(o + n1, n - n1, block, out);
}

// (o, n, 0): potrf of the diagonal block at o of size n; (o, k1, k2): the update after its first k1.
std::vector<std::array<std::int64_t, 3>> potrf_steps(std::int64_t n, std::int64_t block) {
  std::vector<std::array<std::int64_t, 3>> out;
  steps(0, n, block, out);
  return out;
}

}  // namespace

std::pair<std::int64_t, std::vector<std::int64_t>> potrf_plan(const Buffer& a, bool upper, std::int64_t block,
                                                              std::uintptr_t stream) {
  const Mat m = square("potrf_plan", "a", a);
  const Call c{stream, a.device};
  std::int64_t lwork = 0;
  std::vector<std::int64_t> offsets;
  for (const auto& s : potrf_steps(m.rows, block))
    if (s[2] == 0) {
      lwork = std::max(lwork, potrf_workspace(c, m.f64, upper, static_cast<int>(s[1]), m.ld));
      offsets.push_back(s[0]);
    }
  return {lwork, offsets};
}

void potrf(const Buffer& a, bool upper, std::int64_t block, const Buffer& work, const Buffer& info,
           std::uintptr_t stream) {
  const Mat m = square("potrf", "a", a);
  const auto plan = potrf_plan(a, upper, block, stream);
  check_vector("potrf", "work", work, a.dtype, a.device, plan.first, false);
  check_vector("potrf", "info", info, "int32", a.device, static_cast<std::int64_t>(plan.second.size()), true);
  const Call c{stream, a.device};
  std::int64_t b = 0;
  for (const auto& s : potrf_steps(m.rows, block)) {
    const std::int64_t o = s[0], k1 = s[1], k2 = s[2];
    const int i1 = static_cast<int>(k1), i2 = static_cast<int>(k2);
    if (k2 == 0) {
      potrf(c, m.f64, upper, i1, m.at(o, o), m.ld, work.ptr, work.shape[0], info.ptr + 4 * b++);
    } else if (upper) {  // U12 = U11^-T A12 (k1 x k2), A22 -= U12^T U12
      trsm(c, m.f64, true, true, true, i1, i2, 1.0, m.at(o, o), m.ld, m.at(o, o + k1), m.ld);
      syrk(c, m.f64, true, true, i2, i1, -1.0, m.at(o, o + k1), m.ld, 1.0, m.at(o + k1, o + k1), m.ld);
    } else {  // L21 = A21 L11^-T (k2 x k1), A22 -= L21 L21^T
      trsm(c, m.f64, false, false, true, i2, i1, 1.0, m.at(o, o), m.ld, m.at(o + k1, o), m.ld);
      syrk(c, m.f64, false, false, i2, i1, -1.0, m.at(o + k1, o), m.ld, 1.0, m.at(o + k1, o + k1), m.ld);
    }
  }
}

void potrs(const Buffer& a, const Buffer& b, bool upper, std::int64_t block, const Buffer& info,
           std::uintptr_t stream) {
  const Mat f = square("potrs", "a", a);
  const Mat x = matrix("potrs", "b", b, a.dtype, a.device);
  check_vector("potrs", "info", info, "int32", a.device, 1, false);
  if (x.rows != f.rows)
    fail("potrs", "b", "has ", x.rows, " rows as a column-major matrix (row-major shape ", shape_str(b), "), a is ",
         f.rows, " x ", f.rows);
  const Call c{stream, a.device};
  const int n = f.rows, r = x.cols;
  if (!upper || block <= 0 || n <= block) {
    potrs(c, f.f64, upper, n, r, f.ptr, f.ld, x.ptr, x.ld, info.ptr);
    return;
  }
  for (std::int64_t o = 0; o < n; o += block) {  // forward: U^T Y = B, block rows top to bottom
    const int k = static_cast<int>(std::min<std::int64_t>(block, n - o));
    trsm(c, f.f64, true, true, true, k, r, 1.0, f.at(o, o), f.ld, x.at(o, 0), x.ld);
    if (o + k < n)  // Y2 -= U12^T Y1
      gemm(c, f.f64, true, false, static_cast<int>(n - o - k), r, k, -1.0, f.at(o, o + k), f.ld, x.at(o, 0), x.ld, 1.0,
           x.at(o + k, 0), x.ld);
  }
  for (std::int64_t o = (n - 1) / block * block; o >= 0; o -= block) {  // backward: U X = Y, bottom to top
    const int k = static_cast<int>(std::min<std::int64_t>(block, n - o));
    trsm(c, f.f64, true, true, false, k, r, 1.0, f.at(o, o), f.ld, x.at(o, 0), x.ld);
    if (o > 0)  // X0 -= U01 X1
      gemm(c, f.f64, false, false, static_cast<int>(o), r, k, -1.0, f.at(0, o), f.ld, x.at(o, 0), x.ld, 1.0, x.ptr,
           x.ld);
  }
}

void syrk(const Buffer& a, const Buffer& c, bool upper, bool trans, double alpha, double beta, std::uintptr_t stream) {
  const Mat out = square("syrk", "c", c);
  const Mat in = matrix("syrk", "a", a, c.dtype, c.device);
  const int n = trans ? in.cols : in.rows, k = trans ? in.rows : in.cols;
  if (n != out.rows)
    fail("syrk", "a", "gives op(a) with ", n, " rows (row-major shape ", shape_str(a), "), c is ", out.rows, " x ",
         out.rows);
  syrk(Call{stream, c.device}, out.f64, upper, trans, n, k, alpha, in.ptr, in.ld, beta, out.ptr, out.ld);
}

void trsm(const Buffer& t, const Buffer& b, bool left, bool upper, bool trans, double alpha, std::uintptr_t stream) {
  const Mat tri = square("trsm", "t", t);
  const Mat x = matrix("trsm", "b", b, t.dtype, t.device);
  if ((left ? x.rows : x.cols) != tri.rows)
    fail("trsm", "b", "is ", x.rows, " x ", x.cols, " (column-major), t is ", tri.rows, " x ", tri.rows,
         left ? " on the left" : " on the right");
  trsm(Call{stream, t.device}, tri.f64, left, upper, trans, x.rows, x.cols, alpha, tri.ptr, tri.ld, x.ptr, x.ld);
}

}  // namespace memit_native
