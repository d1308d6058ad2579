// D3Diff score-matching loss, C++ CPU kernel (the formula: unif2ace/d3diff_math.h).
//
// One row at a time, chunks of rows handed to OpenMP threads. A row comes from memory once (pass 1b
// prefetches the next row while it computes) and stays in L1/L2 for the rest of its passes (8192
// fp32 logits = 32 KB):
//   pass 1a  m  = max_y z_y
//   pass 1b  s  = Σ_y e_y,  e_y = exp(z_y − m)   (e_y kept in a per-thread fp32 row when the
//                                                  gradient is wanted: one exp per element)
//   finalise   d3diff_finalize_row(m, s, z[x0], ...)  -> loss and the gradient coefficients
//   pass 2   grad_y = e_y · (coef_p / s + coef_e · e^{m − log K}),   grad[x0] −= coef_t
// Pass 2 is d3diff_math.h's gradient, coef_p·p_y + coef_e·exp(z_y − log K) − coef_t·[y = x0], with
// p_y = e_y / s and exp(z_y − log K) = e_y·e^{m − log K} factored out. When that factor overflows
// (m − log K near 88: huge logits with a score-entropy term) the row falls back to the unfactored
// form, one more exp per element, so no finite gradient turns into inf or NaN.
//
// The exp in the inner loops is our own (exp_simd, cpu_simd.h): libm's expf does not vectorise
// without -ffast-math, which the build does not use. Each row routine is compiled several times for
// different instruction sets (target attributes) and one is picked at run time from the CPU.
#include "d3diff_loss.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>

#include "unif2ace/cpu_simd.h"
#include "unif2ace/d3diff_math.h"

namespace unif2ace {
namespace {

using namespace cpu;  // NOLINT: the shared SIMD helpers

// The launcher's operands and log K.
struct Args : D3DiffLossArgs {
  float log_k;
};

// ---- the row kernel: one source of truth, instantiated per element type and instruction set -----

template <class E>
U2A_ALWAYS_INLINE float row_max(const typename E::T* z, int64_t k) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < k; ++i) {
    const float v = E::load(z[i]);
    m = v > m ? v : m;  // a NaN logit is skipped here and poisons s (exp(NaN - m)) instead
  }
  return m;
}

// Summed in blocks of kSumBlock (a vector of partial sums per block, then the block sums): with one
// vector of partial sums over the whole row, an SSE build's 4 lanes each add 2048 terms at K = 8192
// and the loss came out 5× less accurate than torch's fp32 logsumexp (2.6e-6 vs 4e-7 relative).
constexpr int64_t kSumBlock = 512;

template <class E, bool kKeep>
U2A_ALWAYS_INLINE float row_sum_exp(const typename E::T* z, int64_t k, float m, float* e,
                                    const typename E::T* next) {
  const ExpRange er = exp_range();
  float s = 0.f;
  for (int64_t b = 0; b < k; b += kSumBlock) {
    const int64_t nb = std::min(kSumBlock, k - b);
    // The same block of the next row, one prefetch per 64-byte line, so that its DRAM reads overlap
    // this row's exps (the loss-only pass then runs at about its in-cache compute time).
    if (next) {
      const char* p = reinterpret_cast<const char*>(next + b);
      const char* pe = reinterpret_cast<const char*>(next + b + nb);
      for (; p < pe; p += 64) __builtin_prefetch(p, 0, 3);
    }
    float sb = 0.f;
#pragma omp simd reduction(+ : sb)
    for (int64_t i = b; i < b + nb; ++i) {
      const float ei = exp_simd(E::load(z[i]) - m, er);
      if constexpr (kKeep) e[i] = ei;
      sb += ei;
    }
    s += sb;
  }
  return s;
}

template <class E>
U2A_ALWAYS_INLINE void row_fill(typename E::T* g, int64_t k, float v) {
  const typename E::T x = E::store(v);
#pragma omp simd
  for (int64_t i = 0; i < k; ++i) g[i] = x;
}

// Row i. e: per-thread fp32 scratch of n_cols floats (used only when the gradient is wanted).
template <class E>
U2A_ALWAYS_INLINE void d3diff_row(const Args& a, int64_t i, float* e, bool prefetch_next) {
  using T = typename E::T;
  const int64_t k = a.n_cols;
  const T* z = static_cast<const T*>(a.logits) + i * a.row_stride;
  T* g = a.grad ? static_cast<T*>(a.grad) + i * a.grad_row_stride : nullptr;
  const int64_t t = a.targets[i];
  if (t == a.ignore_index) {  // contributes nothing; its logits are not read
    a.loss[i] = 0.f;
    if (g) row_fill<E>(g, k, 0.f);
    return;
  }
  if (t < 0 || t >= k) {  // bad target: NaN row, no out-of-bounds read
    a.loss[i] = std::numeric_limits<float>::quiet_NaN();
    if (g) row_fill<E>(g, k, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const float zt = E::load(z[t]);  // read before the gradient may overwrite the row (in place)
  const float m = row_max<E>(z, k);
  const T* next = prefetch_next ? z + a.row_stride : nullptr;
  const float s = g ? row_sum_exp<E, true>(z, k, m, e, next)
                    : row_sum_exp<E, false>(z, k, m, nullptr, next);
  const float scale = a.grad_scale ? a.grad_scale[i] : 1.f;
  const D3DiffRow r = d3diff_finalize_row(m, s, zt, t, a.ignore_index, a.ratio[i], a.w_ce[i],
                                          a.w_se[i], a.alpha, a.log_k, scale);
  a.loss[i] = r.loss;
  if (!g) return;

  const float cp = r.coef_p / s;  // s >= 1 (the max element contributes e^0), or NaN
  // coef_e == 0 (mask-only loss, or scale 0) must not meet an overflowing e^{m - log K} (0·inf).
  const float c = r.coef_e != 0.f ? cp + r.coef_e * std::exp(m - a.log_k) : cp;
  float gt;
  if (std::isfinite(c) || std::isnan(s)) {
    // grad_y = c · e_y   (the common case: one multiply per element)
#pragma omp simd
    for (int64_t y = 0; y < k; ++y) g[y] = E::store(c * e[y]);
    gt = c * e[t] - r.coef_t;
  } else {
    // c overflowed: keep the two terms apart, exp(z_y - log K) straight from the logit (read
    // before the same element is written, so the in-place gradient stays correct).
    const float ce = r.coef_e, lk = a.log_k;
    const ExpRange er = exp_range();
#pragma omp simd
    for (int64_t y = 0; y < k; ++y)
      g[y] = E::store(cp * e[y] + ce * exp_simd(E::load(z[y]) - lk, er));
    gt = cp * e[t] + ce * exp_simd(zt - lk, er) - r.coef_t;
  }
  g[t] = E::store(gt);
}

// Rows [begin, end). Compiled once per instruction set below; d3diff_row and the helpers are
// always_inline, so each copy is vectorised for its own target.
#define U2A_D3DIFF_ROWS(NAME, ATTR)                                         \
  template <class E>                                                        \
  ATTR void NAME(const Args& a, int64_t begin, int64_t end, float* e) {     \
    for (int64_t i = begin; i < end; ++i) d3diff_row<E>(a, i, e, i + 1 < end); \
  }

U2A_D3DIFF_ROWS(d3diff_rows_baseline, )
#if U2A_X86
U2A_D3DIFF_ROWS(d3diff_rows_avx_fma, U2A_TARGET_AVX_FMA)
U2A_D3DIFF_ROWS(d3diff_rows_avx2_fma, U2A_TARGET_AVX2_FMA)
U2A_D3DIFF_ROWS(d3diff_rows_avx512, U2A_TARGET_AVX512)
#endif
#undef U2A_D3DIFF_ROWS

// ---- run-time choice of the instruction-set variant --------------------------------------------

// The level in use: set by d3diff_cpu_set_simd_level, else the best this CPU runs capped by
// UNIF2ACE_CPU_SIMD.
std::atomic<int> g_level{-1};

int current_level() {
  int l = g_level.load(std::memory_order_relaxed);
  if (l >= 0) return l;
  l = std::min(max_simd_level(), simd_level_cap());
  g_level.store(l, std::memory_order_relaxed);
  return l;
}

using RowsFn = void (*)(const Args&, int64_t, int64_t, float*);

template <class E>
RowsFn rows_fn(int level) {
#if U2A_X86
  switch (level) {
    case kSimdAvx512: return d3diff_rows_avx512<E>;
    case kSimdAvx2Fma: return d3diff_rows_avx2_fma<E>;
    case kSimdAvxFma: return d3diff_rows_avx_fma<E>;
    default: break;
  }
#else
  (void)level;
#endif
  return d3diff_rows_baseline<E>;
}

}  // namespace

const char* d3diff_cpu_simd_level() { return kSimdLevelNames[current_level()]; }

Status d3diff_cpu_set_simd_level(const char* name) {
  const int l = simd_level_from_name(name);
  if (l < 0 || l > max_simd_level()) return kBadArgument;
  g_level.store(l, std::memory_order_relaxed);
  return kOk;
}

Status d3diff_loss_fwd_cpu(const D3DiffLossArgs& args) {
  const int64_t n_rows = args.n_rows, n_cols = args.n_cols;
  if (n_rows < 0 || n_cols < 1) return kBadShape;
  if (args.row_stride < n_cols || (args.grad && args.grad_row_stride < n_cols)) return kBadStride;
  // In place means the same rows: the same base and the same stride.
  if (args.grad && args.grad == args.logits && args.grad_row_stride != args.row_stride)
    return kBadStride;
  if (n_rows == 0) return kOk;
  if (!args.logits || !args.targets || !args.ratio || !args.w_ce || !args.w_se || !args.loss)
    return kBadArgument;
  const Args a{args, static_cast<float>(std::log(static_cast<double>(n_cols)))};

  const int level = current_level();
  RowsFn fn = nullptr;
  if (const int s = U2A_DISPATCH_FLOAT(args.dtype, E, fn = rows_fn<E>(level)); s != kOk)
    return static_cast<Status>(s);

  // Chunks of rows handed out dynamically: on a shared machine a thread loses its core for a
  // scheduler tick (4 ms) now and then, and with a fixed split the other thread then waits at the
  // end. A chunk is ~128K elements (16 rows at K = 8192), so the hand-out costs nothing,
  // and a problem of one chunk runs on the calling thread (no fork/join for small inputs).
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 17) / n_cols);
  const int64_t n_chunks = (n_rows + chunk - 1) / chunk;
  const bool parallel = n_chunks > 1;
  const int max_threads = parallel ? std::max(omp_get_max_threads(), 1) : 1;
  // The exp scratch row, one per thread (it stays in L1/L2 next to the logits row). Allocated here,
  // not inside the parallel region, so that a failure is a status and not std::terminate.
  // Rows padded to 64 bytes so that two threads never write one cache line.
  const int64_t ld = (n_cols + 15) / 16 * 16;
  std::unique_ptr<float[]> scratch;
  if (args.grad) {
    scratch.reset(new (std::nothrow) float[static_cast<size_t>(max_threads) * ld]);
    if (!scratch) return kBadShape;  // n_cols too large for the scratch rows
  }
#pragma omp parallel num_threads(max_threads) if (parallel)
  {
    float* e = scratch ? scratch.get() + omp_get_thread_num() * ld : nullptr;
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < n_chunks; ++c) fn(a, c * chunk, std::min(n_rows, (c + 1) * chunk), e);
  }
  return kOk;
}

}  // namespace unif2ace
