// D3Diff score-matching loss: CUDA kernels and launchers (operands: unif2ace/args.h).
//
// Per row of logits z ∈ R^K the kernels only do indexing and reductions: one pass reduces the row
// to (max, Σ exp(z − max)) with an online softmax and reads the target logit; the row math
// (loss, gradient coefficients, one gradient element) is unif2ace/d3diff_math.h, the same code the
// C++ CPU kernel runs and its tests exercise. A second pass re-reads the row (L2-resident for the
// usual K: 8192 bf16 = 16 KiB per row) and writes the gradient, possibly in place.
//
// Two paths, chosen on the host in one place (plan_splits / row_threads below):
//   row path    one thread block per row: d3diff_loss_fwd_row_kernel.
//   split path  few rows (N < 2 × SMs) and long rows (K ≥ 16384): the columns are cut into S
//               chunks; grid (N, S). d3diff_loss_partial_kernel writes each chunk's (max, sumexp)
//               to a caller-supplied workspace, d3diff_loss_finalize_kernel (grid (N, S) again, the
//               kernel boundary being the grid-wide barrier) merges a row's S partials, writes the
//               loss and the gradient of its chunk. No atomics, no counters to zero, no allocation:
//               CUDA-graph safe, deterministic.
//
// Memory access: every row (or chunk) is read with 16-byte vector loads after a scalar head that
// reaches 16-byte alignment, so a column range of a wider vocabulary (any offset, any row stride)
// still streams with vector loads. Gradient stores are vectorised the same way on the gradient's
// own alignment; when the logits row is misaligned relative to it, the logits are read with scalar
// loads in the same loop. All row offsets are 64-bit; column indices are 32-bit (K < 2^31 − 2^16,
// checked on the host).
//
// None of this has run on a GPU yet (it was written on a machine without one): the launch
// constants below are first guesses to be replaced by measured ones.

#include "d3diff_loss.cuh"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "launch.cuh"
#include "unif2ace/d3diff_math.h"
#include "unif2ace/dtype.h"

namespace unif2ace {
namespace {

using cuda::ceil_div;
using cuda::load_vec;
using cuda::store_vec;

// ---- launch configuration: every tuning constant and the whole heuristic live here -------------

constexpr int kSplitThreads = 256;     // threads per block on the split path
constexpr int kMaxSplits = 128;        // <= kSplitThreads: finalize reduces one partial per thread
constexpr int kSplitMinChunk = 8192;   // columns per split at least (16 KiB of bf16 per block)
constexpr int kSplitChunkAlign = 64;   // chunk length is a multiple of this many columns
constexpr int kSplitRowsPerSm = 2;     // split only when n_rows < kSplitRowsPerSm × SMs
constexpr int kSplitBlocksPerSm = 8;   // aim the split grid at 8 × 256 threads = 2048 per SM
constexpr int64_t kMaxCols = INT32_MAX - 65536;  // 32-bit column indices never overflow below this

// Threads per block on the row path, by row length in bytes: each thread handles about 2-8
// 16-byte vectors per row (bf16 K = 8192 → 256 threads, 4 vectors each).
int row_threads(int64_t n_cols, int elem_bytes) {
  const int64_t row_bytes = n_cols * elem_bytes;
  if (row_bytes <= 4096) return 128;
  if (row_bytes <= 16384) return 256;
  return 512;
}

struct SplitPlan {
  int splits;  // column chunks per row; 1 = row path
  int chunk;   // columns per chunk (the last one may be shorter, never empty)
};

// max_splits: at most this many chunks (what the workspace holds, and kMaxSplits).
SplitPlan plan_splits(int64_t n_rows, int64_t n_cols, int sm_count, int64_t max_splits) {
  const SplitPlan row_path{1, static_cast<int>(n_cols)};
  if (n_rows <= 0 || n_rows >= int64_t{kSplitRowsPerSm} * sm_count ||
      n_cols < 2 * int64_t{kSplitMinChunk})
    return row_path;
  int64_t s = ceil_div(int64_t{kSplitBlocksPerSm} * sm_count, n_rows);  // fill the GPU
  s = s < n_cols / kSplitMinChunk ? s : n_cols / kSplitMinChunk;      // chunks not too short
  s = s < kMaxSplits ? s : kMaxSplits;
  s = s < max_splits ? s : max_splits;
  if (s < 2) return row_path;
  const int64_t chunk = ceil_div(ceil_div(n_cols, s), kSplitChunkAlign) * kSplitChunkAlign;
  s = ceil_div(n_cols, chunk);  // <= the s above; every chunk non-empty
  if (s < 2) return row_path;
  return SplitPlan{static_cast<int>(s), static_cast<int>(chunk)};
}

// Workspace layout of the split path: float2 partial[n_rows][splits] (max, sumexp), then
// float target_logit[n_rows] (read in the partial kernel, before any gradient overwrites the row).
int64_t workspace_bytes_for(int64_t n_rows, int splits) {
  return splits > 1 ? n_rows * (int64_t{8} * splits + 4) : 0;
}

// ---- element access ----------------------------------------------------------------------------

__device__ __forceinline__ float nan_value() { return __int_as_float(0x7fc00000); }

// Elements per 16-byte vector.
template <class E>
constexpr int kVec = 16 / static_cast<int>(sizeof(typename E::T));

// Elements before p + n_head is 16-byte aligned, at most n. p is aligned to its element size
// (checked on the host for the base pointers; row strides and offsets are whole elements).
template <typename T>
__device__ __forceinline__ int head_elems(const T* p, int n) {
  const int misalign = static_cast<int>(reinterpret_cast<uintptr_t>(p) & 15u);
  const int h = ((16 - misalign) & 15) / static_cast<int>(sizeof(T));
  return h < n ? h : n;
}

// ---- online (max, sum of exp) ----------------------------------------------------------------

struct MaxSum {
  float m;  // running max (-inf: nothing seen, or only -inf)
  float s;  // sum of exp(z - m)
};

// max that propagates NaN from either side (fmaxf would drop it).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// Fold N values into acc: one rescale of the running sum per call, N exps.
template <int N>
__device__ __forceinline__ void ms_add(MaxSum& acc, const float* v) {
  float vm = v[0];
#pragma unroll
  for (int k = 1; k < N; ++k) vm = nan_max(vm, v[k]);
  const float m = nan_max(acc.m, vm);
  if (m == -INFINITY) return;  // all -inf so far: exp(-inf - (-inf)) would be NaN
  float s = (m != acc.m) ? acc.s * expf(acc.m - m) : acc.s;  // acc.m = -inf: 0 · 0
#pragma unroll
  for (int k = 0; k < N; ++k) s += expf(v[k] - m);
  acc.m = m;
  acc.s = s;
}

// Merge two partial reductions (an empty one is {-inf, 0}).
__device__ __forceinline__ MaxSum ms_combine(MaxSum a, MaxSum b) {
  const float m = nan_max(a.m, b.m);
  if (m == -INFINITY) return MaxSum{-INFINITY, 0.f};
  return MaxSum{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// Xor butterfly. Lanes may differ in the last bit (an FMA contraction makes ms_combine(a, b) and
// ms_combine(b, a) round differently), so only lane 0's result is used.
__device__ __forceinline__ MaxSum warp_reduce(MaxSum v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const MaxSum o{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off)};
    v = ms_combine(v, o);
  }
  return v;
}

// Block-wide merge. Every thread returns the same bits (each merges the per-warp partials of lane 0
// in the same order), and so does every block given the same inputs: the split path relies on the
// latter for identical gradient coefficients in all blocks of a row. Every thread of the block must
// call it (it holds barriers).
template <int THREADS>
__device__ __forceinline__ MaxSum block_reduce(MaxSum v) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps");
  constexpr int kWarps = THREADS / 32;
  __shared__ MaxSum warp_part[kWarps];
  v = warp_reduce(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  MaxSum r = warp_part[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = ms_combine(r, warp_part[w]);
  // Nobody may refill warp_part (a second call) while a slower thread still reads it.
  __syncthreads();
  return r;
}

// This thread's (max, sumexp) over x[0, n): scalar head to 16-byte alignment, then vectors
// (two in flight per iteration), then a scalar tail shorter than one vector.
template <class E, int THREADS>
__device__ __forceinline__ MaxSum reduce_range(const typename E::T* x, int n) {
  constexpr int V = kVec<E>;
  static_assert(V <= THREADS, "head and tail are one element per thread");
  const int tid = static_cast<int>(threadIdx.x);
  MaxSum acc{-INFINITY, 0.f};

  const int head = head_elems(x, n);  // < V
  if (tid < head) {
    const float v = E::load(x[tid]);
    ms_add<1>(acc, &v);
  }
  const int nvec = (n - head) / V;
  const typename E::T* xv = x + head;  // 16-byte aligned
  int i = tid;
  for (; i + THREADS < nvec; i += 2 * THREADS) {
    float v[2 * V];
    load_vec<E, V>(xv + i * V, v);
    load_vec<E, V>(xv + (i + THREADS) * V, v + V);
    ms_add<2 * V>(acc, v);
  }
  if (i < nvec) {
    float v[V];
    load_vec<E, V>(xv + i * V, v);
    ms_add<V>(acc, v);
  }
  const int tail = head + nvec * V;  // n - tail < V
  if (tail + tid < n) {
    const float v = E::load(x[tail + tid]);
    ms_add<1>(acc, &v);
  }
  return acc;
}

// g[j] = gradient of column j of x[0, n), j = t is the target (t outside [0, n): none here).
// g may be x itself (in place): each thread reads its own elements before writing them, and no
// thread touches another's elements. Stores are vectorised on g's alignment; x is read with vector
// loads when it shares that alignment (always, in place), else with scalar loads.
template <class E, int THREADS>
__device__ __forceinline__ void grad_range(const typename E::T* x, typename E::T* g,
                                           int n, int t, const D3DiffRow& r, float log_k) {
  constexpr int V = kVec<E>;
  const int tid = static_cast<int>(threadIdx.x);
  const bool x_vec =
      ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(g)) & 15u) == 0;

  const int head = head_elems(g, n);
  if (tid < head) g[tid] = E::store(d3diff_grad_elem(r, E::load(x[tid]), log_k, tid == t));
  const int nvec = (n - head) / V;
  const typename E::T* xv = x + head;  // 16-byte aligned when x_vec
  typename E::T* gv = g + head;        // 16-byte aligned
  int i = tid;
  for (; i + THREADS < nvec; i += 2 * THREADS) {
    const int i1 = i + THREADS;
    float v[2 * V];
    if (x_vec) {
      load_vec<E, V>(xv + i * V, v);
      load_vec<E, V>(xv + i1 * V, v + V);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        v[k] = E::load(xv[i * V + k]);
        v[V + k] = E::load(xv[i1 * V + k]);
      }
    }
    // Column (relative to head) of v[0] is i*V and of v[V] is i1*V.
    const int t0 = t - head - i * V;
    const int t1 = t - head - i1 * V;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      v[k] = d3diff_grad_elem(r, v[k], log_k, k == t0);
      v[V + k] = d3diff_grad_elem(r, v[V + k], log_k, k == t1);
    }
    store_vec<E, V>(gv + i * V, v);
    store_vec<E, V>(gv + i1 * V, v + V);
  }
  if (i < nvec) {
    float v[V];
    if (x_vec) {
      load_vec<E, V>(xv + i * V, v);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = E::load(xv[i * V + k]);
    }
    const int t0 = t - head - i * V;
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = d3diff_grad_elem(r, v[k], log_k, k == t0);
    store_vec<E, V>(gv + i * V, v);
  }
  const int tail = head + nvec * V;
  if (tail + tid < n) {
    const int j = tail + tid;
    g[j] = E::store(d3diff_grad_elem(r, E::load(x[j]), log_k, j == t));
  }
}

// g[0, n) = 0 (an ignored row's gradient; its logits are never read).
template <class E, int THREADS>
__device__ __forceinline__ void zero_range(typename E::T* g, int n) {
  constexpr int V = kVec<E>;
  const int tid = static_cast<int>(threadIdx.x);
  const int head = head_elems(g, n);
  if (tid < head) g[tid] = E::store(0.f);
  const int nvec = (n - head) / V;
  typename E::T* gv = g + head;
  float zero[V];
#pragma unroll
  for (int k = 0; k < V; ++k) zero[k] = 0.f;
  for (int i = tid; i < nvec; i += THREADS) store_vec<E, V>(gv + i * V, zero);
  const int tail = head + nvec * V;
  if (tail + tid < n) g[tail + tid] = E::store(0.f);
}

// ---- kernels -----------------------------------------------------------------------------------

struct Params {
  const void* logits;  // [n_rows, n_cols] of the dtype, col stride 1
  int64_t row_stride;  // elements
  int n_cols;          // K
  const int64_t* targets;
  const float* ratio;
  const float* w_ce;
  const float* w_se;
  float alpha;
  float log_k;
  int64_t ignore_index;
  float* loss;
  void* grad;  // nullptr: loss only; may equal logits (then grad_row_stride == row_stride)
  int64_t grad_row_stride;
  const float* grad_scale;  // nullptr: 1
  // split path only
  float2* ws_partial;       // [n_rows][splits]
  float* ws_target_logit;   // [n_rows]
  int splits;
  int chunk;
};

// Per-row inputs, loaded at the top of a kernel so their latency overlaps the row reduction.
struct RowScalars {
  float a, w_ce, w_se, scale;
};

__device__ __forceinline__ RowScalars load_row_scalars(const Params& p, int64_t row) {
  return RowScalars{p.ratio[row], p.w_ce[row], p.w_se[row],
                    p.grad_scale != nullptr ? p.grad_scale[row] : 1.f};
}

// The shared row math, plus the bad-target rule: loss NaN and, through coef_p = NaN, a NaN in
// every gradient element (NaN · exp(...) is NaN whatever the exponential).
__device__ __forceinline__ D3DiffRow finish_row(const Params& p, const RowScalars& rs, MaxSum ms,
                                                float zt, int64_t target, bool valid) {
  D3DiffRow r = d3diff_finalize_row(ms.m, ms.s, zt, target, p.ignore_index, rs.a, rs.w_ce, rs.w_se,
                                    p.alpha, p.log_k, rs.scale);
  if (!valid) {
    r.loss = nan_value();
    r.coef_p = nan_value();
  }
  return r;
}

// Row path: block = one row.
template <class E, int THREADS>
__global__ void __launch_bounds__(THREADS) d3diff_loss_fwd_row_kernel(const Params p) {
  using T = typename E::T;
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;
  T* g = p.grad != nullptr ? static_cast<T*>(p.grad) + row * p.grad_row_stride : nullptr;
  const int64_t target = p.targets[row];

  if (target == p.ignore_index) {  // uniform over the block: nobody reaches a barrier
    if (threadIdx.x == 0) p.loss[row] = 0.f;
    if (g != nullptr) zero_range<E, THREADS>(g, p.n_cols);
    return;
  }
  const bool valid = target >= 0 && target < p.n_cols;  // never read outside the row
  const RowScalars rs = load_row_scalars(p, row);
  // Read before block_reduce's barrier: after it, an in-place gradient overwrites the row.
  const float zt = valid ? E::load(x[target]) : nan_value();

  MaxSum ms = reduce_range<E, THREADS>(x, p.n_cols);
  ms = block_reduce<THREADS>(ms);

  const D3DiffRow r = finish_row(p, rs, ms, zt, target, valid);
  if (threadIdx.x == 0) p.loss[row] = r.loss;
  if (g != nullptr)
    grad_range<E, THREADS>(x, g, p.n_cols, valid ? static_cast<int>(target) : -1, r, p.log_k);
}

// Split path, pass 1: grid (n_rows, splits); block (row, s) reduces columns [s·chunk, +chunk).
template <class E>
__global__ void __launch_bounds__(kSplitThreads) d3diff_loss_partial_kernel(const Params p) {
  using T = typename E::T;
  const int64_t row = blockIdx.x;
  const int split = static_cast<int>(blockIdx.y);
  const int64_t target = p.targets[row];
  if (target == p.ignore_index) return;  // finalize handles ignored rows without partials

  const int c0 = split * p.chunk;  // < n_cols: every chunk is non-empty
  const int n = min(p.chunk, p.n_cols - c0);
  const T* xrow = static_cast<const T*>(p.logits) + row * p.row_stride;
  if (split == 0 && threadIdx.x == 0) {
    const bool valid = target >= 0 && target < p.n_cols;
    p.ws_target_logit[row] = valid ? E::load(xrow[target]) : nan_value();
  }
  MaxSum ms = reduce_range<E, kSplitThreads>(xrow + c0, n);
  ms = block_reduce<kSplitThreads>(ms);
  if (threadIdx.x == 0) p.ws_partial[row * p.splits + split] = make_float2(ms.m, ms.s);
}

// Split path, pass 2: grid (n_rows, splits) with a gradient, (n_rows, 1) without. Each block
// merges its row's partials (the same merge, so the same coefficients, in every block of the row),
// block (row, 0) writes the loss, block (row, s) the gradient of chunk s.
template <class E>
__global__ void __launch_bounds__(kSplitThreads) d3diff_loss_finalize_kernel(const Params p) {
  using T = typename E::T;
  const int64_t row = blockIdx.x;
  const int split = static_cast<int>(blockIdx.y);
  const int c0 = split * p.chunk;
  const int n = min(p.chunk, p.n_cols - c0);
  T* g = p.grad != nullptr ? static_cast<T*>(p.grad) + row * p.grad_row_stride + c0 : nullptr;
  const int64_t target = p.targets[row];

  if (target == p.ignore_index) {
    if (split == 0 && threadIdx.x == 0) p.loss[row] = 0.f;
    if (g != nullptr) zero_range<E, kSplitThreads>(g, n);
    return;
  }
  const bool valid = target >= 0 && target < p.n_cols;
  const RowScalars rs = load_row_scalars(p, row);
  const float zt = p.ws_target_logit[row];  // NaN for a bad target (pass 1)

  MaxSum ms{-INFINITY, 0.f};
  if (static_cast<int>(threadIdx.x) < p.splits) {  // splits <= kMaxSplits <= kSplitThreads
    const float2 q = p.ws_partial[row * p.splits + threadIdx.x];
    ms = MaxSum{q.x, q.y};
  }
  ms = block_reduce<kSplitThreads>(ms);

  const D3DiffRow r = finish_row(p, rs, ms, zt, target, valid);
  if (split == 0 && threadIdx.x == 0) p.loss[row] = r.loss;
  if (g != nullptr) {
    const T* x = static_cast<const T*>(p.logits) + row * p.row_stride + c0;
    // Target column relative to this chunk; outside [0, n) (or -1 - c0 when invalid) matches none.
    const int t = valid ? static_cast<int>(target) - c0 : -1 - c0;
    grad_range<E, kSplitThreads>(x, g, n, t, r, p.log_k);
  }
}

template <class E>
void launch_kernels(const Params& p, int64_t n_rows, cudaStream_t stream) {
  using T = typename E::T;
  const unsigned rows = static_cast<unsigned>(n_rows);
  if (p.splits > 1) {
    const dim3 grid1(rows, static_cast<unsigned>(p.splits));
    d3diff_loss_partial_kernel<E><<<grid1, kSplitThreads, 0, stream>>>(p);
    const dim3 grid2(rows, p.grad != nullptr ? static_cast<unsigned>(p.splits) : 1u);
    d3diff_loss_finalize_kernel<E><<<grid2, kSplitThreads, 0, stream>>>(p);
    return;
  }
  switch (row_threads(p.n_cols, static_cast<int>(sizeof(T)))) {
    case 128: d3diff_loss_fwd_row_kernel<E, 128><<<rows, 128, 0, stream>>>(p); break;
    case 256: d3diff_loss_fwd_row_kernel<E, 256><<<rows, 256, 0, stream>>>(p); break;
    default: d3diff_loss_fwd_row_kernel<E, 512><<<rows, 512, 0, stream>>>(p); break;
  }
}

}  // namespace

int64_t d3diff_loss_workspace_bytes_cuda(int64_t n_rows, int64_t n_cols) {
  if (n_rows <= 0 || n_cols < 1 || n_cols > kMaxCols || n_rows > INT32_MAX) return 0;
  const SplitPlan plan = plan_splits(n_rows, n_cols, cuda::sm_count_current_device(), kMaxSplits);
  return workspace_bytes_for(n_rows, plan.splits);
}

int d3diff_loss_fwd_cuda(const D3DiffLossArgs& a, void* workspace, int64_t workspace_bytes,
                         void* stream) {
  using cuda::aligned;
  const int64_t n_rows = a.n_rows, n_cols = a.n_cols;
  if (!is_float_dtype(a.dtype)) return kBadDtype;
  if (n_rows < 0 || n_rows > INT32_MAX || n_cols < 1 || n_cols > kMaxCols) return kBadShape;
  // Rows must not overlap (a one-row tensor may carry any stride).
  if (a.row_stride < 0 || (n_rows > 1 && a.row_stride < n_cols)) return kBadStride;
  if (a.grad != nullptr && (a.grad_row_stride < 0 || (n_rows > 1 && a.grad_row_stride < n_cols)))
    return kBadStride;
  if (n_rows == 0) return kOk;
  if (a.logits == nullptr || a.targets == nullptr || a.ratio == nullptr || a.w_ce == nullptr ||
      a.w_se == nullptr || a.loss == nullptr)
    return kBadArgument;
  // In place means exactly in place: the same rows, else one block would overwrite another's input.
  if (a.grad != nullptr && a.grad == a.logits && a.grad_row_stride != a.row_stride)
    return kBadArgument;
  const uintptr_t esize = static_cast<uintptr_t>(dtype_size(a.dtype));
  if (!aligned(a.logits, esize) || (a.grad != nullptr && !aligned(a.grad, esize)) ||
      !aligned(a.targets, 8) || !aligned(a.ratio, 4) || !aligned(a.w_ce, 4) ||
      !aligned(a.w_se, 4) || !aligned(a.loss, 4) ||
      (a.grad_scale != nullptr && !aligned(a.grad_scale, 4)))
    return kBadArgument;
  if (workspace_bytes < 0 || (workspace != nullptr && !aligned(workspace, 8))) return kBadArgument;

  // Splits the workspace can hold: n_rows · (8·splits + 4) bytes.
  int64_t max_splits = 1;
  if (workspace != nullptr && workspace_bytes > 0) max_splits = (workspace_bytes / n_rows - 4) / 8;
  const SplitPlan plan = plan_splits(n_rows, n_cols, cuda::sm_count_current_device(), max_splits);

  Params p;
  p.logits = a.logits;
  p.row_stride = a.row_stride;
  p.n_cols = static_cast<int>(n_cols);
  p.targets = a.targets;
  p.ratio = a.ratio;
  p.w_ce = a.w_ce;
  p.w_se = a.w_se;
  p.alpha = a.alpha;
  p.log_k = std::log(static_cast<float>(n_cols));
  p.ignore_index = a.ignore_index;
  p.loss = a.loss;
  p.grad = a.grad;
  p.grad_row_stride = a.grad_row_stride;
  p.grad_scale = a.grad_scale;
  p.splits = plan.splits;
  p.chunk = plan.chunk;
  p.ws_partial = nullptr;
  p.ws_target_logit = nullptr;
  if (plan.splits > 1) {
    p.ws_partial = static_cast<float2*>(workspace);
    p.ws_target_logit = reinterpret_cast<float*>(p.ws_partial + n_rows * plan.splits);
  }

  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  U2A_DISPATCH_FLOAT(a.dtype, E, launch_kernels<E>(p, n_rows, s));  // the dtype is checked above
  return cuda::launch_status();
}

// One definition for every CUDA launcher (they share launch.cuh's error state).
const char* cuda_last_error() { return cudaGetErrorString(cuda::t_last_cuda_error); }

}  // namespace unif2ace
