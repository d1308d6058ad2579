// The typed layer of the pybind11 modules (_C and _C_cuda): what Python passes for a tensor
// becomes a TensorDesc (unif2ace/tensor.h), every operand is checked by name before a launcher
// sees a raw pointer, and a launcher's Status becomes a Python exception.
//
// Python passes a tensor as the tuple (data_ptr, dtype code, sizes, strides) built by
// python/unif2ace/ops/_native.py: desc, and None for an absent optional operand. A failed check is
// a ValueError "<op>: <argument> <what>", so two operands passed in each other's place are caught
// here, before any kernel runs.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "unif2ace/common.h"
#include "unif2ace/dtype.h"
#include "unif2ace/tensor.h"

namespace pybind11 {
namespace detail {

// (data_ptr, dtype code, sizes, strides) or None -> TensorDesc.
template <>
struct type_caster<unif2ace::TensorDesc> {
  PYBIND11_TYPE_CASTER(unif2ace::TensorDesc, const_name("TensorDesc"));

  bool load(handle src, bool /*convert*/) {
    value = unif2ace::TensorDesc{};
    if (src.is_none()) return true;
    if (!isinstance<tuple>(src)) return false;
    const auto t = reinterpret_borrow<tuple>(src);
    if (t.size() != 4 || !isinstance<sequence>(t[2]) || !isinstance<sequence>(t[3])) return false;
    const auto sizes = reinterpret_borrow<sequence>(t[2]);
    const auto strides = reinterpret_borrow<sequence>(t[3]);
    if (sizes.size() != strides.size()) return false;
    value.present = true;
    value.data = reinterpret_cast<void*>(t[0].cast<std::uintptr_t>());
    value.dtype = t[1].cast<int>();
    value.ndim = static_cast<int>(sizes.size());
    for (int d = 0; d < value.dims(); ++d) {
      value.sizes[d] = sizes[d].cast<int64_t>();
      value.strides[d] = strides[d].cast<int64_t>();
    }
    return true;
  }

  static handle cast(const unif2ace::TensorDesc&, return_value_policy, handle) {
    return none().release();  // never returned to Python
  }
};

}  // namespace detail
}  // namespace pybind11

namespace unif2ace {

// Bad arguments are ValueError, any other failure RuntimeError. cuda_error: the CUDA error string
// of a kCudaError.
inline void raise_if_error(int status, const char* op, const std::string& detail = "",
                           const char* cuda_error = nullptr) {
  if (status == kOk) return;
  std::string msg = std::string(op) + ": " + status_message(status);
  if (status == kCudaError && cuda_error != nullptr) msg += std::string(": ") + cuda_error;
  if (!detail.empty()) msg += " (" + detail + ")";
  if (status == kCudaError) throw std::runtime_error(msg);
  if (status == kBadDtype || status == kBadShape || status == kBadStride ||
      status == kBadArgument)
    throw pybind11::value_error(msg);
  throw std::runtime_error(msg);
}

// "[2, 3]" for sizes or strides.
inline std::string dims_str(const int64_t* v, int n) {
  std::string s = "[";
  for (int d = 0; d < n; ++d) s += (d ? ", " : "") + std::to_string(v[d]);
  return s + "]";
}

// One tensor operand of a binding, checked by name. An absent optional operand (None) passes every
// check but required(). Each check returns *this, so they chain:
//   Arg(op, "targets", targets).required().dtype(kInt64).shape({n_rows}).contiguous();
class Arg {
 public:
  Arg(const char* op, const char* name, const TensorDesc& t) : op_(op), name_(name), t_(t) {}

  const TensorDesc& desc() const { return t_; }

  // Present, and a non-empty tensor has a data pointer.
  const Arg& required() const {
    if (!t_.present) fail("is required, got None");
    if (t_.data == nullptr && t_.numel() > 0) fail("has a null data pointer");
    return *this;
  }

  const Arg& dtype(int code) const {
    if (t_.present && t_.dtype != code)
      fail(std::string("must be ") + dtype_name(code) + ", got " + dtype_name(t_.dtype));
    return *this;
  }

  // One of two dtypes (an index tensor that may be int32 or int64, a mask that may be bool or
  // uint8).
  const Arg& dtype(int code, int other) const {
    if (t_.present && t_.dtype != code && t_.dtype != other)
      fail(std::string("must be ") + dtype_name(code) + " or " + dtype_name(other) + ", got " +
           dtype_name(t_.dtype));
    return *this;
  }

  // float32, bfloat16 or float16.
  const Arg& floating() const {
    if (t_.present && !is_float_dtype(t_.dtype))
      fail(std::string("must be float32, bfloat16 or float16, got ") + dtype_name(t_.dtype));
    return *this;
  }

  const Arg& ndim(int n) const {
    if (t_.present && t_.ndim != n)
      fail("must have " + std::to_string(n) + " dimensions, got " + std::to_string(t_.ndim));
    return *this;
  }

  // ndim == dims.size() and each size equal (-1: any).
  const Arg& shape(std::initializer_list<int64_t> dims) const {
    if (!t_.present) return *this;
    bool ok = t_.ndim == static_cast<int>(dims.size());
    int d = 0;
    for (const int64_t want : dims) {
      ok = ok && (want < 0 || t_.sizes[d] == want);
      ++d;
    }
    if (!ok) {
      std::string w = "[";
      int i = 0;
      for (const int64_t x : dims) w += (i++ ? ", " : "") + (x >= 0 ? std::to_string(x) : "*");
      fail("must have shape " + w + "], got " + dims_str(t_.sizes, t_.dims()));
    }
    return *this;
  }

  // The same shape as another operand.
  const Arg& same_shape(const Arg& other) const {
    if (!t_.present || !other.t_.present) return *this;
    bool same = t_.ndim == other.t_.ndim;
    for (int d = 0; same && d < t_.dims(); ++d) same = t_.sizes[d] == other.t_.sizes[d];
    if (!same)
      fail(std::string("must have the shape of ") + other.name_ + " " +
           dims_str(other.t_.sizes, other.t_.dims()) + ", got " + dims_str(t_.sizes, t_.dims()));
    return *this;
  }

  const Arg& same_dtype(const Arg& other) const {
    if (t_.present && other.t_.present && t_.dtype != other.t_.dtype)
      fail(std::string("must have the dtype of ") + other.name_ + " (" +
           dtype_name(other.t_.dtype) + "), got " + dtype_name(t_.dtype));
    return *this;
  }

  const Arg& contiguous() const {
    if (t_.present && !t_.contiguous())
      fail("must be contiguous, got strides " + dims_str(t_.strides, t_.dims()) + " for shape " +
           dims_str(t_.sizes, t_.dims()));
    return *this;
  }

  // Stride 1 along the last dimension (rows are read as dense vectors).
  const Arg& unit_last_stride() const {
    if (t_.present && !t_.unit_last_stride())
      fail("must have stride 1 along its last dimension, got strides " +
           dims_str(t_.strides, t_.dims()));
    return *this;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw pybind11::value_error(std::string(op_) + ": " + name_ + " " + what);
  }

  const char* op_;
  const char* name_;
  const TensorDesc& t_;
};

}  // namespace unif2ace
