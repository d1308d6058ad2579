// Discrete-diffusion mask sampling: CUDA kernels and launchers (operands: unif2ace/args.h).
//
// The semantics are the launcher contract of the mask-sampling op family; unif2ace/philox.h holds
// the Philox-4x32-10 and the Gumbel-from-bits transform shared with the C++ CPU kernels
// (bit-exact with Triton's tl.philox).
//
// maskgit_step, three kernels on one stream (no host sync, no allocation, no atomics on global
// memory, deterministic):
//   scan     one thread block per position (b, l) (grid (B·L, S)): each thread takes quads of four
//            consecutive columns — one vector load per quad (16 bytes fp32, 8 bytes bf16/fp16, when
//            the row is aligned), one Philox call per quad (the contract's counter (k >> 2, l, b,
//            4·offset + 1) gives four words, word k & 3 for column k; the Gumbel in a fast form,
//            see fast_gumbel_from_bits) — and keeps a running online
//            (max, Σe^{y−max}) for the log-sum-exp and the running (best y + G, its k, its y) for
//            the Gumbel-max; warp shuffles then shared memory reduce the block. Known positions
//            exit at once (their logits are never read). S = 1: the block writes token and
//            confidence. S > 1 (few positions, long rows): each block covers one column chunk and
//            writes a partial to the caller's workspace; the combine kernel merges them.
//   combine  (S > 1 only) one thread per position merges its S partials and finalises.
//   select   one block per sequence: the n-th smallest key by MSD radix select (8-bit digits,
//            shared-memory histogram: 4 passes over the order-preserving uint32 of the confidence),
//            then one ordered pass masks keys below the threshold and the first n − #below keys
//            equal to it in position order (warp ballots + a carried prefix): exactly the
//            contract's lexicographic (confidence, l) rule. The keys are re-read (L2) each pass.
// mask_tokens: "count" uses the same select kernel on the 64-bit Philox key (8 passes, the key
// recomputed each pass: cheaper than a workspace for L up to a few thousand); "bernoulli" is one
// elementwise kernel.
//
// Exactness: (1 + g)·cond − g·uncond, the product by 1/T, y + G and conf + τ·G_choice use the
// explicitly rounded __fmul_rn / __fsub_rn / __fadd_rn, so nvcc cannot contract them into FMAs and
// the rounding is the reference's: with supplied noise the sample is the reference's bit for bit.
//
// None of this has run on a GPU yet (it was written on a machine without one): the launch
// constants below are first guesses to be replaced by measured ones.

#include "mask_sampling.cuh"

#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>

#include "launch.cuh"
#include "unif2ace/dtype.h"
#include "unif2ace/philox.h"

namespace unif2ace {
namespace {

using cuda::ceil_div;

// ---- launch configuration: every tuning constant and the whole heuristic live here -------------

constexpr int kScanMaxThreads = 256;  // threads per scan block (4 columns each per step)
constexpr int kScanMinThreads = 32;
constexpr int kCombineThreads = 128;
constexpr int kSelectThreads = 256;  // one block per sequence
constexpr int kBernoulliThreads = 256;
constexpr int kMaxSplits = 64;
constexpr int64_t kSplitMinCols = 2048;  // columns per split at least (2 steps of 256 threads)
constexpr int kSplitBlocksPerSm = 4;     // split while B·L < 4 × SMs
constexpr int kNoK = INT_MAX;            // "no column yet" in the running argmax
constexpr int64_t kMaxCols = INT32_MAX - 65536;  // column indices are 32-bit below this
constexpr int kPartialFloats = 4;                // (max, sum, best score, y at best) per partial

// Column splits per position: fill ~kSplitBlocksPerSm blocks per SM when B·L alone cannot, each
// split at least kSplitMinCols columns, at most kMaxSplits and what the workspace holds.
int plan_splits(int64_t n_pos, int64_t K, int sm_count, int64_t max_splits) {
  const int64_t want = int64_t{kSplitBlocksPerSm} * sm_count;
  if (n_pos <= 0 || n_pos >= want || K < 2 * kSplitMinCols) return 1;
  int64_t s = ceil_div(want, n_pos);
  s = s < K / kSplitMinCols ? s : K / kSplitMinCols;
  s = s < kMaxSplits ? s : kMaxSplits;
  s = s < max_splits ? s : max_splits;
  return s > 1 ? static_cast<int>(s) : 1;
}

// Columns per split: a multiple of 4 so the Philox quads (k >> 2) never straddle two splits.
int64_t split_chunk(int64_t K, int splits) { return ceil_div(ceil_div(K, splits), 4) * 4; }

int64_t workspace_bytes_for(int64_t n_pos, int splits) {
  return splits > 1 ? n_pos * splits * int64_t{(kPartialFloats + 1) * 4} : 0;
}

// Columns [k, k + 4) of a row as fp32: one vector load when the quad is whole and the row aligned,
// else scalar loads of the columns below k_end (the others are left at 0 and never used).
template <class E>
__device__ __forceinline__ void load_columns(const typename E::T* row, int64_t k, int64_t k_end,
                                             bool vector_ok, float out[4]) {
  if (vector_ok && k + 4 <= k_end) {
    cuda::load_vec<E, 4>(row + k, out);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) out[j] = k + j < k_end ? E::load(row[k + j]) : 0.f;
  }
}

// ---- Gumbel noise of the sampling race ----------------------------------------------------------

// The contract's Gumbel of one 32-bit word (philox.h: gumbel_from_bits) in a fast, branch-free
// form for the per-column sampling noise: two MUFU lg2 (__logf) instead of precise logf + log1pf,
// whose divergent branches would cost three precise logs per column (~70 instructions: the scan
// would be compute-bound at a fraction of the memory bandwidth). Top bit set: E = −log1p(−t) by its
// series below t = 1/8 (8 terms, truncation < 2^-22 relative), else −log(1 − t); top bit clear:
// E = −log t. Absolute error of G about 3e-6 at worst (__logf near 1 over E >= 0.13), so it can
// differ from the explicit path fed with philox_noise() only at near-ties, as the contract allows.
// The per-position choice noise keeps the precise gumbel_from_bits (one per position).
__device__ __forceinline__ float fast_gumbel_from_bits(uint32_t x) {
  const float t = half_uniform_from_bits(x);
  const bool hi = (x >> 31) != 0;
  float series = 1.f / 8.f;
#pragma unroll
  for (int i = 7; i >= 1; --i) series = fmaf(series, t, 1.f / static_cast<float>(i));
  series *= t;  // t + t²/2 + ... + t⁸/8
  const float e_log = -__logf(hi ? 1.f - t : t);
  const float e = (hi && t < 0.125f) ? series : e_log;
  return -__logf(e);
}

// ---- scan: running state, its merge, and the block reduction ------------------------------------

// The contract's policy for a non-finite y (NaN, +inf): it counts as −inf, never sampled.
__device__ __forceinline__ float policy_y(float v) {
  return fabsf(v) < INFINITY ? v : -INFINITY;  // NaN fails the compare
}

struct ScanState {
  float m;     // running max of y (starts at −FLT_MAX so a −inf y adds e^{−inf} = 0)
  float s;     // Σ e^{y − m}
  float best;  // best y + G so far
  float yb;    // y at the best column
  int kb;      // the best column (kNoK: none yet)
};

__device__ __forceinline__ ScanState scan_init() {
  return ScanState{-FLT_MAX, 0.f, -INFINITY, -INFINITY, kNoK};
}

// One column, visited in increasing k by each thread: strict > keeps the smallest k on ties.
__device__ __forceinline__ void scan_column(ScanState& st, float y, float g, int k) {
  const float score = __fadd_rn(y, g);
  if (score > st.best) {
    st.best = score;
    st.kb = k;
    st.yb = y;
  }
  // __expf (ex2.approx, ~2 ulp on the terms that matter: arguments near 0): the confidence needs
  // log Σ to ~1e-6, and a precise expf would add ~8 instructions per column to a compute-bound loop.
  if (y > st.m) {
    st.s = st.s * __expf(st.m - y) + 1.f;
    st.m = y;
  } else {
    st.s += __expf(y - st.m);
  }
}

// Merge of two states over disjoint column sets (order-independent): max/sum rescaling, and the
// argmax by (higher score, then smaller k) — the reference's "first maximum".
__device__ __forceinline__ void scan_merge(ScanState& a, const ScanState& o) {
  const float m = fmaxf(a.m, o.m);
  a.s = a.s * expf(a.m - m) + o.s * expf(o.m - m);
  a.m = m;
  if (o.best > a.best || (o.best == a.best && o.kb < a.kb)) {
    a.best = o.best;
    a.kb = o.kb;
    a.yb = o.yb;
  }
}

__device__ __forceinline__ ScanState shfl_xor_state(const ScanState& v, int off) {
  return ScanState{__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off),
                   __shfl_xor_sync(0xffffffffu, v.best, off),
                   __shfl_xor_sync(0xffffffffu, v.yb, off),
                   __shfl_xor_sync(0xffffffffu, v.kb, off)};
}

// Block-wide merge; the result is valid in thread 0. blockDim.x is a multiple of 32, <= 256.
__device__ __forceinline__ ScanState block_merge(ScanState st) {
  __shared__ ScanState warp_state[kScanMaxThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) scan_merge(st, shfl_xor_state(st, off));
  if (lane == 0) warp_state[warp] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < n_warps; ++w) scan_merge(st, warp_state[w]);
  }
  return st;
}

struct ScanParams {
  const void* logits;
  const void* uncond;
  int64_t stride_b, stride_l, ustride_b, ustride_l;
  const int64_t* ids;
  const float* gumbel;  // [B, L, K] or nullptr (Philox)
  const float* choice;  // [B, L] or nullptr (Philox)
  int64_t* out_ids;
  float* confidence;
  float* part_f;  // [B·L, S, 4] (S > 1)
  int* part_k;    // [B·L, S] (S > 1)
  int64_t L, K, chunk, n_pos;
  int splits;
  int64_t mask_id;
  float c_cond, c_uncond, inv_t, tau;
  uint64_t seed;
  uint32_t offset;
};

// Token and confidence of an unknown position from its merged state.
__device__ __forceinline__ void finalize_position(const ScanParams& p, int64_t pos, uint32_t b32,
                                                  uint32_t l32, const ScanState& st) {
  if (!(st.s > 0.f)) {  // no finite y: nothing can be sampled (the contract: token 0, −inf)
    p.out_ids[pos] = 0;
    p.confidence[pos] = -INFINITY;
    return;
  }
  // y_ŷ − logsumexp y as (y_ŷ − m) − log s: exact for large m, the C++ kernel's order
  float conf = __fsub_rn(__fsub_rn(st.yb, st.m), logf(st.s));
  if (p.tau != 0.f) {
    const float gc =
        p.choice != nullptr
            ? p.choice[pos]
            : gumbel_from_bits(
                  philox4x32_10(0u, l32, b32, 4u * p.offset + kStreamChoice, p.seed).w[0]);
    conf = __fadd_rn(conf, __fmul_rn(p.tau, gc));
  }
  p.out_ids[pos] = st.kb == kNoK ? 0 : st.kb;  // every score −inf (NaN noise): column 0
  p.confidence[pos] = conf;
}

template <class E, bool kUncond, bool kNoise>
__global__ void __launch_bounds__(kScanMaxThreads) maskgit_scan_kernel(const ScanParams p) {
  using T = typename E::T;
  const int64_t pos = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t id = p.ids[pos];
  if (id != p.mask_id) {  // known: keeps its token, confidence +inf; logits not read (whole block)
    if (p.splits == 1 && threadIdx.x == 0) {
      p.out_ids[pos] = id;
      p.confidence[pos] = INFINITY;
    }
    return;
  }
  const int64_t b = pos / p.L, l = pos - b * p.L;
  const uint32_t b32 = static_cast<uint32_t>(b), l32 = static_cast<uint32_t>(l);
  const T* row = static_cast<const T*>(p.logits) + b * p.stride_b + l * p.stride_l;
  const T* urow = kUncond ? static_cast<const T*>(p.uncond) + b * p.ustride_b + l * p.ustride_l
                          : row;
  const float* nrow = kNoise ? p.gumbel + pos * p.K : nullptr;
  // Column k of every quad is a multiple of 4: an aligned row makes every whole quad aligned.
  constexpr uintptr_t kAlignMask = 4 * sizeof(T) - 1;  // a quad is one 16- or 8-byte vector
  const bool row_vec = (reinterpret_cast<uintptr_t>(row) & kAlignMask) == 0;
  const bool urow_vec = (reinterpret_cast<uintptr_t>(urow) & kAlignMask) == 0;
  const uint32_t c3 = 4u * p.offset + kStreamSample;

  const int64_t k_begin = int64_t{split} * p.chunk;
  const int64_t k_end = k_begin + p.chunk < p.K ? k_begin + p.chunk : p.K;
  ScanState st = scan_init();
  // Not unrolled: `#pragma unroll 2` (next quad's loads issued early) made ptxas spill 16 bytes in
  // the bf16 guided Philox variant on sm_90a (nvcc 13.0); occupancy (~40 registers) hides latency.
  for (int64_t k = k_begin + 4 * int64_t{threadIdx.x}; k < k_end; k += 4 * int64_t{blockDim.x}) {
    float x[4], u[4], g[4];
    load_columns<E>(row, k, k_end, row_vec, x);
    if (kUncond) load_columns<E>(urow, k, k_end, urow_vec, u);
    if (kNoise) {
#pragma unroll
      for (int j = 0; j < 4; ++j) g[j] = k + j < k_end ? nrow[k + j] : 0.f;
    } else {
      const Philox4 w = philox4x32_10(static_cast<uint32_t>(k >> 2), l32, b32, c3, p.seed);
#pragma unroll
      for (int j = 0; j < 4; ++j) g[j] = fast_gumbel_from_bits(w.w[j]);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (k + j < k_end) {
        const float z =
            kUncond ? __fsub_rn(__fmul_rn(p.c_cond, x[j]), __fmul_rn(p.c_uncond, u[j])) : x[j];
        scan_column(st, policy_y(__fmul_rn(z, p.inv_t)), g[j], static_cast<int>(k + j));
      }
    }
  }
  st = block_merge(st);
  if (threadIdx.x != 0) return;
  if (p.splits == 1) {
    finalize_position(p, pos, b32, l32, st);
  } else {
    const int64_t part = pos * p.splits + split;
    float* f = p.part_f + part * kPartialFloats;
    f[0] = st.m;
    f[1] = st.s;
    f[2] = st.best;
    f[3] = st.yb;
    p.part_k[part] = st.kb;
  }
}

// One thread per position: merge the S partials of the scan (unknown positions only).
__global__ void __launch_bounds__(kCombineThreads) maskgit_combine_kernel(const ScanParams p) {
  const int64_t pos = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (pos >= p.n_pos) return;
  const int64_t id = p.ids[pos];
  if (id != p.mask_id) {
    p.out_ids[pos] = id;
    p.confidence[pos] = INFINITY;
    return;
  }
  ScanState st = scan_init();
  for (int sp = 0; sp < p.splits; ++sp) {
    const int64_t part = pos * p.splits + sp;
    const float* f = p.part_f + part * kPartialFloats;
    scan_merge(st, ScanState{f[0], f[1], f[2], f[3], p.part_k[part]});
  }
  const int64_t b = pos / p.L, l = pos - b * p.L;
  finalize_position(p, pos, static_cast<uint32_t>(b), static_cast<uint32_t>(l), st);
}

// ---- per-sequence select of the n smallest (key, l) ---------------------------------------------

struct SelectParams {
  const float* confidence;  // [B, L] (kPhilox == false)
  const int64_t* n;         // [B]
  const int64_t* src_ids;   // [B, L]: kept where not masked; may be out_ids itself (no restrict)
  int64_t* out_ids;         // [B, L]
  bool* out_mask;           // [B, L]
  int64_t L;
  int64_t mask_id;
  uint64_t seed;
  uint32_t offset;
};

// Sort key of position l of sequence b. Confidence: the order-preserving uint32 of the float, with
// −0.0 taken as +0.0 (the float compare ties them). Philox: (w0 << 32) | w1 of stream 0.
template <bool kPhilox>
__device__ __forceinline__ uint64_t select_key(const SelectParams& q, int64_t row, uint32_t b32,
                                               int64_t l) {
  if (kPhilox) {
    const Philox4 w =
        philox4x32_10(0u, static_cast<uint32_t>(l), b32, 4u * q.offset + kStreamMask, q.seed);
    return (static_cast<uint64_t>(w.w[0]) << 32) | w.w[1];
  } else {
    uint32_t bits = __float_as_uint(q.confidence[row + l]);
    if (bits == 0x80000000u) bits = 0u;
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  }
}

template <bool kPhilox>
__global__ void __launch_bounds__(kSelectThreads) select_kernel(const SelectParams q) {
  constexpr int kBits = kPhilox ? 64 : 32;
  __shared__ unsigned int hist[256];
  __shared__ unsigned int warp_count[kSelectThreads / 32];
  __shared__ int s_digit;
  __shared__ unsigned int s_rank;

  const int64_t b = blockIdx.x;
  const uint32_t b32 = static_cast<uint32_t>(b);
  const int64_t row = b * q.L;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int64_t n = q.n[b];
  n = n < 0 ? 0 : (n > q.L ? q.L : n);

  // MSD radix select: after the passes, prefix is the n-th smallest key and rank the number of
  // keys equal to it that precede the n-th in (key, l) order (0-based).
  uint64_t prefix = 0, prefix_mask = 0;
  unsigned int rank = n > 0 ? static_cast<unsigned int>(n - 1) : 0u;
  if (n > 0) {  // uniform across the block
    for (int shift = kBits - 8; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0u;
      __syncthreads();
      for (int64_t l = tid; l < q.L; l += blockDim.x) {
        const uint64_t key = select_key<kPhilox>(q, row, b32, l);
        if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
      }
      __syncthreads();
      if (warp == 0) {  // the digit whose bin holds rank: lane j owns bins 8j .. 8j + 7
        unsigned int c[8], sum = 0;
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          c[t] = hist[8 * lane + t];
          sum += c[t];
        }
        unsigned int incl = sum;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const unsigned int v = __shfl_up_sync(0xffffffffu, incl, off);
          if (lane >= off) incl += v;
        }
        // rank < (keys matching the prefix), so some lane's inclusive count exceeds it.
        const unsigned int ballot = __ballot_sync(0xffffffffu, incl > rank);
        if (lane == __ffs(ballot) - 1) {
          unsigned int acc = incl - sum;
          int digit = 8 * lane + 7;
#pragma unroll
          for (int t = 0; t < 8; ++t) {
            if (acc + c[t] > rank) {
              digit = 8 * lane + t;
              break;
            }
            acc += c[t];
          }
          s_digit = digit;
          s_rank = rank - acc;
        }
      }
      __syncthreads();
      prefix |= static_cast<uint64_t>(s_digit) << shift;
      prefix_mask |= uint64_t{0xff} << shift;
      rank = s_rank;
      // The next writes of hist / s_digit / s_rank come after the next pass's first barrier.
    }
  }
  const unsigned int need = n > 0 ? rank + 1u : 0u;  // keys == prefix to take, in l order

  // Ordered pass: block-wide exclusive count of (key == prefix) before each position.
  unsigned int carry = 0;
  for (int64_t base = 0; base < q.L; base += blockDim.x) {
    const int64_t l = base + tid;
    const bool valid = l < q.L;
    const uint64_t key = valid ? select_key<kPhilox>(q, row, b32, l) : 0;
    const bool below = valid && n > 0 && key < prefix;
    const bool eq = valid && n > 0 && key == prefix;
    const unsigned int ballot = __ballot_sync(0xffffffffu, eq);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    unsigned int before = carry, total = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) {
      if (w < warp) before += warp_count[w];
      total += warp_count[w];
    }
    before += __popc(ballot & ((1u << lane) - 1u));
    const bool sel = below || (eq && before < need);
    if (valid) {
      const int64_t src = q.src_ids[row + l];  // read before the write (may be the same element)
      q.out_ids[row + l] = sel ? q.mask_id : src;
      q.out_mask[row + l] = sel;
    }
    carry += total;
    __syncthreads();  // warp_count is rewritten by the next chunk
  }
}

__global__ void __launch_bounds__(kBernoulliThreads)
    bernoulli_kernel(const int64_t* __restrict__ ids, const float* __restrict__ gamma, int64_t B,
                     int64_t L, int64_t mask_id, uint64_t seed, uint32_t offset,
                     int64_t* __restrict__ out_ids, bool* __restrict__ out_mask) {
  const int64_t total = B * L;
  const uint32_t c3 = 4u * offset + kStreamMask;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t b = i / L, l = i - b * L;
    const uint32_t w0 =
        philox4x32_10(0u, static_cast<uint32_t>(l), static_cast<uint32_t>(b), c3, seed).w[0];
    const bool sel = static_cast<float>(w0 >> 8) < gamma[b] * 16777216.0f;  // exact fp32 compare
    out_ids[i] = sel ? mask_id : ids[i];
    out_mask[i] = sel;
  }
}

// ---- host side ----------------------------------------------------------------------------------

template <class E>
void launch_scan(const ScanParams& p, int threads, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(p.n_pos), static_cast<unsigned int>(p.splits));
  const bool u = p.uncond != nullptr, nz = p.gumbel != nullptr;
  if (u && nz) maskgit_scan_kernel<E, true, true><<<grid, threads, 0, stream>>>(p);
  else if (u) maskgit_scan_kernel<E, true, false><<<grid, threads, 0, stream>>>(p);
  else if (nz) maskgit_scan_kernel<E, false, true><<<grid, threads, 0, stream>>>(p);
  else maskgit_scan_kernel<E, false, false><<<grid, threads, 0, stream>>>(p);
}

// Threads of a scan block: one per quad of the chunk, a multiple of 32 in [32, 256].
int scan_threads(int64_t chunk) {
  const int64_t quads = ceil_div(chunk, 4);
  int t = kScanMinThreads;
  while (t < kScanMaxThreads && t < quads) t *= 2;
  return t;
}

constexpr int64_t kMaxGridX = INT32_MAX;

}  // namespace

int mask_tokens_fwd_cuda(const MaskTokensArgs& a, void* stream) {
  const int64_t B = a.B, L = a.L;
  if (B < 0 || L < 0 || B > kMaxGridX || L > INT32_MAX) return kBadShape;
  if (a.mode != 0 && a.mode != 1) return kBadArgument;
  if (B == 0 || L == 0) return kOk;
  if (a.ids == nullptr || a.out_ids == nullptr || a.out_mask == nullptr) return kBadArgument;
  if ((a.mode == 0 && a.n_mask == nullptr) || (a.mode == 1 && a.gamma == nullptr))
    return kBadArgument;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.mode == 0) {
    const SelectParams q{nullptr, a.n_mask, a.ids,  a.out_ids, a.out_mask,
                         L,       a.mask_id, a.seed, a.offset};
    select_kernel<true><<<static_cast<unsigned int>(B), kSelectThreads, 0, s>>>(q);
  } else {
    int64_t blocks = ceil_div(B * L, kBernoulliThreads);
    blocks = blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20);  // grid-stride beyond
    bernoulli_kernel<<<static_cast<unsigned int>(blocks), kBernoulliThreads, 0, s>>>(
        a.ids, a.gamma, B, L, a.mask_id, a.seed, a.offset, a.out_ids, a.out_mask);
  }
  return cuda::launch_status();
}

int64_t maskgit_step_workspace_bytes_cuda(int64_t B, int64_t L, int64_t K) {
  if (B <= 0 || L <= 0 || K <= 0) return 0;
  const int64_t n_pos = B * L;
  return workspace_bytes_for(n_pos,
                             plan_splits(n_pos, K, cuda::sm_count_current_device(), kMaxSplits));
}

int maskgit_step_fwd_cuda(const MaskgitStepArgs& a, void* workspace, int64_t workspace_bytes,
                          void* stream) {
  const int64_t B = a.B, L = a.L, K = a.K;
  if (!is_float_dtype(a.dtype)) return kBadDtype;
  if (B < 0 || L < 0 || K < 0 || K > kMaxCols || L > INT32_MAX) return kBadShape;
  if (B > 0 && L > 0 && B * L > kMaxGridX) return kBadShape;
  if (a.stride_b < 0 || a.stride_l < 0 || a.ustride_b < 0 || a.ustride_l < 0) return kBadStride;
  if (B == 0 || L == 0) return kOk;
  if (K == 0) return kBadShape;
  if (a.logits == nullptr || a.ids == nullptr || a.mask_len == nullptr || a.out_ids == nullptr ||
      a.out_mask == nullptr || a.confidence == nullptr)
    return kBadArgument;

  const int64_t n_pos = B * L;
  int64_t max_splits = kMaxSplits;
  if (workspace == nullptr || workspace_bytes <= 0 || !cuda::aligned(workspace, 16)) {
    max_splits = 1;
  } else {
    const int64_t per_split = workspace_bytes_for(n_pos, 2) / 2;
    max_splits = workspace_bytes / per_split;
  }
  const int splits = plan_splits(n_pos, K, cuda::sm_count_current_device(), max_splits);

  ScanParams p;
  p.logits = a.logits;
  p.uncond = a.uncond;
  p.stride_b = a.stride_b;
  p.stride_l = a.stride_l;
  p.ustride_b = a.ustride_b;
  p.ustride_l = a.ustride_l;
  p.ids = a.ids;
  p.gumbel = a.gumbel;
  p.choice = a.choice;
  p.out_ids = a.out_ids;
  p.confidence = a.confidence;
  p.part_f = nullptr;
  p.part_k = nullptr;
  p.L = L;
  p.K = K;
  p.chunk = splits > 1 ? split_chunk(K, splits) : K;
  p.n_pos = n_pos;
  p.splits = splits;
  p.mask_id = a.mask_id;
  // The reference's scalars: fp32(1 + g) and fp32(g) (torch rounds a Python scalar to the
  // tensor's dtype before the multiply).
  p.c_cond = static_cast<float>(1.0 + a.guidance);
  p.c_uncond = static_cast<float>(a.guidance);
  p.inv_t = a.inv_temperature;
  p.tau = a.choice_temperature;
  p.seed = a.seed;
  p.offset = a.offset;
  if (splits > 1) {
    p.part_f = static_cast<float*>(workspace);
    p.part_k = reinterpret_cast<int*>(p.part_f + n_pos * splits * kPartialFloats);
  }

  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int threads = scan_threads(p.chunk);
  U2A_DISPATCH_FLOAT(a.dtype, E, launch_scan<E>(p, threads, s));  // the dtype is checked above
  if (splits > 1) {
    const int64_t blocks = ceil_div(n_pos, kCombineThreads);
    maskgit_combine_kernel<<<static_cast<unsigned int>(blocks), kCombineThreads, 0, s>>>(p);
  }
  const SelectParams q{a.confidence, a.mask_len, a.out_ids, a.out_ids, a.out_mask,
                       L,            a.mask_id,  a.seed,    a.offset};
  select_kernel<false><<<static_cast<unsigned int>(B), kSelectThreads, 0, s>>>(q);
  return cuda::launch_status();
}

}  // namespace unif2ace
