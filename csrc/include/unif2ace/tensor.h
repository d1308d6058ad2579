// A tensor as it crosses the binding: data pointer, dtype code, sizes and strides (in elements).
// No torch, no pybind11: the bindings build one from the tuple Python passes
// (python/unif2ace/ops/_native.py: desc), check it, then hand its pointer and sizes to a launcher.
#pragma once

#include <cstdint>

#include "unif2ace/dtype.h"

namespace unif2ace {

constexpr int kMaxDims = 4;

struct TensorDesc {
  bool present = false;  // false: Python passed None (an absent optional operand)
  void* data = nullptr;
  int dtype = -1;  // a DType code; -1 for a dtype the kernels do not know
  int ndim = 0;    // may exceed kMaxDims: only the first kMaxDims sizes and strides are kept
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};

  int64_t size(int d) const { return sizes[d]; }
  int64_t stride(int d) const { return strides[d]; }

  // The dimensions described (a tensor of more than kMaxDims fails every ndim check).
  int dims() const { return ndim < kMaxDims ? ndim : kMaxDims; }

  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < dims(); ++d) n *= sizes[d];
    return n;
  }

  // Row-major dense, as torch's is_contiguous(): dimensions of size 1 may carry any stride, and an
  // empty tensor is contiguous.
  bool contiguous() const {
    if (numel() == 0) return true;
    int64_t expected = 1;
    for (int d = dims() - 1; d >= 0; --d) {
      if (sizes[d] != 1 && strides[d] != expected) return false;
      expected *= sizes[d];
    }
    return true;
  }

  // The last dimension is dense (stride 1, or a single column): rows can be streamed.
  bool unit_last_stride() const {
    return dims() == 0 || sizes[dims() - 1] <= 1 || strides[dims() - 1] == 1;
  }

  // The data pointer as T* (nullptr when absent).
  template <class T>
  T* ptr() const {
    return present ? static_cast<T*>(data) : nullptr;
  }
};

}  // namespace unif2ace
