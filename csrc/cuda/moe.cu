// Grouped MoE dispatch: CUDA kernels and launchers (operands: unif2ace/args.h; the semantics: the
// MoE op family's launcher contract, §3-§6).
//
// Plan (§3) is a stable counting sort in three kernels, no argsort, no host synchronisation:
//   plan_hist_kernel     grid B: block b counts the ids of its contiguous chunk of slots into a
//                        shared histogram and writes it to workspace row b ([B, E] int32).
//   plan_scan_kernel     one block: per-expert totals (counts), the exclusive scan (offsets, one
//                        serial pass over E by thread 0: E <= 8192), the tile map, and turns the
//                        workspace into each block's first position per expert (a scan over b).
//   plan_scatter_kernel  grid B, one warp each: walks its chunk 32 slots at a time in slot order;
//                        lanes with equal experts find each other with __match_any_sync, a lane's
//                        position is the expert's running cursor (shared) + its rank among the
//                        equal lanes below it. Chunks in block order × slot order inside a chunk
//                        = the stable order. Integer-only: deterministic.
// Route (§1): see the comment above route_fwd_kernel (one warp per token, fp64 keys, warp
// arg-max k times; deterministic two-level reduction of counts and probability sums).
// Permute (§4) copies one row per block as raw bytes with the widest vector (16/8/4/2 bytes) the
// row length, row stride and base pointers allow. Combine (§5) and its backward (§6): one block
// per token, fp32 accumulation in j order; the backward's Σ_d reduction is a fixed tree
// (deterministic, no atomics). Ids / positions out of range are skipped, never dereferenced.
//
// None of this has run on a GPU yet (written on a machine without one): the launch constants
// below are first guesses.

#include "moe.cuh"

#include <cuda_runtime.h>

#include <cstdint>

#include "launch.cuh"
#include "unif2ace/dtype.h"

namespace unif2ace {
namespace {

// ---- launch configuration ----------------------------------------------------------------------
constexpr int kHistThreads = 256;
constexpr int kScanThreads = 1024;
constexpr int64_t kMinChunk = 1024;  // slots per plan block at least
constexpr int64_t kMaxPlanBlocks = 512;
constexpr int64_t kMaxExperts = 8192;  // one int32 per expert in shared memory (32 KiB)
constexpr int kRowThreads = 128;        // permute / combine: threads per row

int64_t plan_chunk(int64_t n) {
  int64_t c = (n + kMaxPlanBlocks - 1) / kMaxPlanBlocks;
  c = (c + 31) / 32 * 32;
  return c < kMinChunk ? kMinChunk : c;
}

int64_t plan_blocks(int64_t n) {
  const int64_t c = plan_chunk(n);
  const int64_t b = (n + c - 1) / c;
  return b < 1 ? 1 : b;
}

using cuda::launch_status;

__device__ __forceinline__ int64_t load_id(const void* ids, int is64, int64_t s) {
  return is64 ? static_cast<const int64_t*>(ids)[s]
              : static_cast<int64_t>(static_cast<const int32_t*>(ids)[s]);
}

// ---- plan ---------------------------------------------------------------------------------------

__global__ void plan_hist_kernel(const void* __restrict__ ids, int is64, int64_t n, int E,
                                 int64_t chunk, int32_t* __restrict__ hist) {
  extern __shared__ int32_t sh_hist[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) sh_hist[e] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  for (int64_t s = begin + threadIdx.x; s < end; s += blockDim.x) {
    const int64_t e = load_id(ids, is64, s);
    if (e >= 0 && e < E) atomicAdd(&sh_hist[e], 1);
  }
  __syncthreads();
  int32_t* row = hist + static_cast<int64_t>(blockIdx.x) * E;
  for (int e = threadIdx.x; e < E; e += blockDim.x) row[e] = sh_hist[e];
}

__global__ void plan_scan_kernel(int32_t* __restrict__ hist, int nblocks, int E, int64_t n,
                                 int64_t block_m, int32_t* __restrict__ counts,
                                 int32_t* __restrict__ offsets, int32_t* __restrict__ sorted_slot,
                                 int32_t* __restrict__ tile_expert, int32_t* __restrict__ tile_row,
                                 int64_t max_tiles) {
  extern __shared__ int32_t sh[];
  int32_t* tot = sh;        // [E]
  int32_t* tfirst = sh + E; // [E]
  __shared__ int64_t sh_total, sh_tiles;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int32_t c = 0;
    for (int b = 0; b < nblocks; ++b) c += hist[static_cast<int64_t>(b) * E + e];
    tot[e] = c;
    counts[e] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t run = 0, trun = 0;
    for (int e = 0; e < E; ++e) {
      offsets[e] = static_cast<int32_t>(run);
      tfirst[e] = static_cast<int32_t>(trun);
      run += tot[e];
      if (block_m > 0) trun += (tot[e] + block_m - 1) / block_m;
    }
    offsets[E] = static_cast<int32_t>(run);
    sh_total = run;
    sh_tiles = trun;
  }
  __syncthreads();
  const int64_t total = sh_total;
  const int64_t tiles = sh_tiles < max_tiles ? sh_tiles : max_tiles;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int32_t first = offsets[e];  // written by thread 0 before the barrier
    int32_t base = first;
    for (int b = 0; b < nblocks; ++b) {
      const int64_t i = static_cast<int64_t>(b) * E + e;
      const int32_t v = hist[i];
      hist[i] = base;
      base += v;
    }
    if (block_m > 0) {
      const int64_t nt = (tot[e] + block_m - 1) / block_m;
      for (int64_t i = 0; i < nt; ++i) {
        const int64_t slot = tfirst[e] + i;
        if (slot >= max_tiles) break;
        tile_expert[slot] = e;
        tile_row[slot] = static_cast<int32_t>(first + i * block_m);
      }
    }
  }
  for (int64_t i = tiles + threadIdx.x; i < max_tiles; i += blockDim.x) {
    tile_expert[i] = -1;
    tile_row[i] = static_cast<int32_t>(n);
  }
  for (int64_t p = total + threadIdx.x; p < n; p += blockDim.x) sorted_slot[p] = -1;  // dropped
}

// One warp per block.
__global__ void plan_scatter_kernel(const void* __restrict__ ids, int is64, int64_t n, int E,
                                    int64_t chunk, const int32_t* __restrict__ bases,
                                    int32_t* __restrict__ sorted_slot,
                                    int32_t* __restrict__ slot_pos) {
  extern __shared__ int32_t cursor[];
  const int lane = threadIdx.x;
  const int32_t* row = bases + static_cast<int64_t>(blockIdx.x) * E;
  for (int e = lane; e < E; e += 32) cursor[e] = row[e];
  __syncwarp();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  const unsigned below = (1u << lane) - 1u;
  for (int64_t base = begin; base < end; base += 32) {  // uniform trip count across the warp
    const int64_t s = base + lane;
    int key = -1;
    if (s < end) {
      const int64_t e = load_id(ids, is64, s);
      if (e >= 0 && e < E) {
        key = static_cast<int>(e);
      } else {
        slot_pos[s] = -1;  // dropped slot
      }
    }
    const unsigned peers = __match_any_sync(0xffffffffu, key);
    if (key >= 0) {
      const int32_t pos = cursor[key] + __popc(peers & below);
      sorted_slot[pos] = static_cast<int32_t>(s);
      slot_pos[s] = pos;
    }
    __syncwarp();
    if (key >= 0 && (peers >> lane) == 1u) cursor[key] += __popc(peers);  // highest equal lane
    __syncwarp();
  }
}

// ---- permute ------------------------------------------------------------------------------------

template <typename V>
__global__ void permute_kernel(const char* __restrict__ x, int64_t T, int64_t row_bytes,
                               int64_t x_row_bytes, const int32_t* __restrict__ sorted_slot,
                               int64_t n, int64_t top_k, char* __restrict__ xs) {
  const int64_t p = blockIdx.x;
  const int64_t s = sorted_slot[p];
  const int64_t nv = row_bytes / static_cast<int64_t>(sizeof(V));
  V* dst = reinterpret_cast<V*>(xs + p * row_bytes);
  if (s < 0 || s >= n || s / top_k >= T) {
    V zero;
    memset(&zero, 0, sizeof(V));
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) dst[i] = zero;
    return;
  }
  const V* src = reinterpret_cast<const V*>(x + (s / top_k) * x_row_bytes);
  for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) dst[i] = src[i];
}

// ---- combine ------------------------------------------------------------------------------------

template <class ET, class T = typename ET::T>
__global__ void combine_kernel(const T* __restrict__ src, int64_t n, int64_t D, int64_t src_stride,
                               const int32_t* __restrict__ slot_pos, int64_t top_k,
                               const float* __restrict__ weights, T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t pos = slot_pos[t * top_k + j];
      if (pos < 0 || pos >= n) continue;
      const float w = weights ? weights[t * top_k + j] : 1.f;
      acc += w * ET::load(src[pos * src_stride + d]);
    }
    out[t * D + d] = ET::store(acc);
  }
}

template <class ET, class T = typename ET::T>
__global__ void combine_bwd_kernel(const T* __restrict__ grad_out, int64_t go_stride,
                                   const T* src, int64_t n, int64_t D, int64_t src_stride,
                                   const int32_t* __restrict__ slot_pos, int64_t top_k,
                                   const float* __restrict__ weights, T* grad_src,
                                   float* __restrict__ grad_weights) {
  // src and grad_src may alias: no __restrict__ on them; each thread reads src[pos, d] before it
  // writes grad_src[pos, d], and rows of different tokens are different positions.
  __shared__ float warp_sums[kRowThreads / 32];
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t j = 0; j < top_k; ++j) {
    const int64_t pos = slot_pos[t * top_k + j];
    const bool ok = pos >= 0 && pos < n;
    const float w = weights ? weights[t * top_k + j] : 1.f;
    float part = 0.f;
    if (ok) {
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        const float g = ET::load(grad_out[t * go_stride + d]);
        if (grad_weights) part += g * ET::load(src[pos * src_stride + d]);
        grad_src[pos * D + d] = ET::store(w * g);
      }
    }
    if (grad_weights) {  // uniform across the block
      for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
      if (lane == 0) warp_sums[warp] = part;
      __syncthreads();
      if (threadIdx.x == 0) {
        float sum = 0.f;
        for (int i = 0; i < kRowThreads / 32; ++i) sum += warp_sums[i];
        grad_weights[t * top_k + j] = sum;
      }
      __syncthreads();
    }
  }
}

template <class ET>
int launch_combine(const MoeCombineArgs& a, cudaStream_t st) {
  using T = typename ET::T;
  const MoeCombineInput& in = a.in;
  combine_kernel<ET><<<static_cast<unsigned>(in.T), kRowThreads, 0, st>>>(
      static_cast<const T*>(in.src), in.n_src, in.D, in.src_row_stride, in.slot_pos, in.k,
      in.weights, static_cast<T*>(a.out));
  return launch_status();
}

template <class ET>
int launch_combine_bwd(const MoeCombineBwdArgs& a, cudaStream_t st) {
  using T = typename ET::T;
  const MoeCombineInput& in = a.in;
  combine_bwd_kernel<ET><<<static_cast<unsigned>(in.T), kRowThreads, 0, st>>>(
      static_cast<const T*>(a.grad_out), a.grad_out_row_stride, static_cast<const T*>(in.src),
      in.n_src, in.D, in.src_row_stride, in.slot_pos, in.k, in.weights,
      static_cast<T*>(a.grad_src), a.grad_weights);
  return launch_status();
}

// ---- route (contract §1) ----------------------------------------------------------------------
// One warp per token (kRouteWarps tokens per block, grid-stride): lane l holds the candidates
// c = l, l + 32, ... (PL per lane, PL·32 >= E) with their fp64 scores and keys, the same
// arithmetic as the C++ kernel (softmax: exp(z − max) / Σ; sigmoid: 1 / (1 + exp(−z)); key =
// score + bias) so equal (logit, bias) pairs stay exact ties. Selection is k rounds of a warp
// arg-max under the stable order (larger key first, equal keys → lower index); the DeepSeek-V3
// subgroup limit runs the same arg-max over subgroup scores (sum of a subgroup's two best keys,
// a warp top-2 merge). Counts and probability sums go to per-warp shared rows (each (token,
// expert) written by one lane), summed over warps and then over blocks in a fixed order: no
// atomics, run-to-run deterministic for a given T.
constexpr int kRouteWarps = 4;
constexpr int64_t kRouteMaxBlocks = 1024;
constexpr int64_t kRouteMaxE = 256;  // PL <= 8 candidates per lane
constexpr int kNone = 0x7fffffff;

int64_t route_blocks(int64_t T) {
  const int64_t b = (T + kRouteWarps - 1) / kRouteWarps;
  return b < kRouteMaxBlocks ? b : kRouteMaxBlocks;
}

// (ka, ia) comes strictly before (kb, ib) in the stable descending order; kNone = no candidate.
__device__ __forceinline__ bool route_before(double ka, int ia, double kb, int ib) {
  if (ia == kNone) return false;
  if (ib == kNone) return true;
  return ka > kb || (ka == kb && ia < ib);
}

// Warp arg-max of (key, index) pairs under route_before; every lane gets the winner (and its p).
__device__ __forceinline__ void warp_argmax(double& key, double& p, int& idx) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const double k2 = __shfl_xor_sync(0xffffffffu, key, o);
    const double p2 = __shfl_xor_sync(0xffffffffu, p, o);
    const int i2 = __shfl_xor_sync(0xffffffffu, idx, o);
    if (route_before(k2, i2, key, idx)) {
      key = k2;
      p = p2;
      idx = i2;
    }
  }
}

__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// minBlocks 1: without it ptxas (nvcc 13) held PL = 8 at 96 registers and spilled 16 B; with it
// 116-118 registers at PL = 8, no spill (sm_80 / sm_90a).
template <class ET, int PL, class S = typename ET::T>
__global__ void __launch_bounds__(kRouteWarps * 32, 1)
    route_fwd_kernel(const S* __restrict__ logits, int64_t ld_row, int64_t T, int E, int64_t G,
                     const int64_t* __restrict__ offsets, const int64_t* __restrict__ group_ids,
                     const float* __restrict__ bias, int k, int softmax, int renormalize,
                     int n_group, int topk_group, float scaling, int64_t* __restrict__ ids,
                     float* __restrict__ weights, int32_t* __restrict__ cnt_part,
                     float* __restrict__ ps_part) {
  __shared__ float ps_s[kRouteWarps][kRouteMaxE];
  __shared__ int32_t cnt_s[kRouteWarps][kRouteMaxE];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int e = lane; e < E; e += 32) {
    ps_s[warp][e] = 0.f;
    cnt_s[warp][e] = 0;
  }
  __syncwarp();
  const double kInf = __longlong_as_double(0x7ff0000000000000LL);
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp; t < T;
       t += static_cast<int64_t>(gridDim.x) * kRouteWarps) {
    const int64_t g = group_ids ? group_ids[t] : 0;
    if (g < 0 || g >= G) {  // checks off: never read through a bad group id
      for (int j = lane; j < k; j += 32) {
        ids[t * k + j] = 0;
        weights[t * k + j] = __int_as_float(0x7fc00000);
      }
      continue;
    }
    const int64_t lo = offsets[g];
    int n = static_cast<int>(offsets[g + 1] - lo);
    n = n < E - static_cast<int>(lo) ? n : E - static_cast<int>(lo);
    const S* z = logits + t * ld_row + lo;
    double p[PL], key[PL];
    unsigned avail = 0;
    double m = -kInf;
#pragma unroll
    for (int i = 0; i < PL; ++i) {
      const int c = i * 32 + lane;
      p[i] = c < n ? static_cast<double>(ET::load(z[c])) : -kInf;
      m = fmax(m, p[i]);
      if (c < n) avail |= 1u << i;
    }
    double psum = 0.0;
    if (softmax) {
      m = warp_max(m);
#pragma unroll
      for (int i = 0; i < PL; ++i) {
        p[i] = (avail >> i & 1u) ? exp(p[i] - m) : 0.0;
        psum += p[i];
      }
      psum = warp_sum(psum);
      const double inv = __drcp_rn(psum);  // = 1.0 / psum; p · inv as in the C++ kernel
#pragma unroll
      for (int i = 0; i < PL; ++i) p[i] *= inv;
    } else {
#pragma unroll
      for (int i = 0; i < PL; ++i) {
        // __drcp_rn is the correctly rounded 1 / x: the same value as the division, without the
        // division's slow-path subroutine call (which cost a 16-byte spill per unrolled copy)
        p[i] = (avail >> i & 1u) ? __drcp_rn(1.0 + exp(-p[i])) : 0.0;
        psum += p[i];
      }
      psum = warp_sum(psum);
    }
#pragma unroll
    for (int i = 0; i < PL; ++i) {
      const int c = i * 32 + lane;
      key[i] = p[i] + ((bias && c < n) ? static_cast<double>(bias[lo + c]) : 0.0);
    }
    if (n_group > 0) {  // DeepSeek-V3: keep the topk_group subgroups with the best top-2 sums
      const int gs = n / n_group > 0 ? n / n_group : 1;
      double gkey[PL];
      unsigned gavail = 0;
#pragma unroll
      for (int i = 0; i < PL; ++i) {
        gkey[i] = -kInf;
        if (i * 32 + lane < n_group) gavail |= 1u << i;
      }
      for (int sg = 0; sg < n_group; ++sg) {
        double a = -kInf, b = -kInf;
#pragma unroll
        for (int i = 0; i < PL; ++i) {
          const int c = i * 32 + lane;
          if ((avail >> i & 1u) && c / gs == sg) {
            if (key[i] > a) {
              b = a;
              a = key[i];
            } else if (key[i] > b) {
              b = key[i];
            }
          }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {  // top-2 merge (symmetric: both partners agree)
          const double a2 = __shfl_xor_sync(0xffffffffu, a, o);
          const double b2 = __shfl_xor_sync(0xffffffffu, b, o);
          if (a >= a2) {
            b = fmax(b, a2);
          } else {
            b = fmax(a, b2);
            a = a2;
          }
        }
        const double score = gs > 1 ? a + b : a;
#pragma unroll
        for (int i = 0; i < PL; ++i)
          if (i * 32 + lane == sg) gkey[i] = score;
      }
      unsigned allowed = 0;
      for (int r = 0; r < topk_group; ++r) {
        double bk = -kInf, bp = 0.0;
        int bi = kNone;
#pragma unroll
        for (int i = 0; i < PL; ++i) {
          const int c = i * 32 + lane;
          if ((gavail >> i & 1u) && route_before(gkey[i], c, bk, bi)) {
            bk = gkey[i];
            bi = c;
          }
        }
        warp_argmax(bk, bp, bi);
        if (bi == kNone) break;
#pragma unroll
        for (int i = 0; i < PL; ++i) {
          const int c = i * 32 + lane;
          if (c == bi) gavail &= ~(1u << i);
          if (c / gs == bi) allowed |= 1u << i;
        }
      }
      avail &= allowed;
    }
    double vsum = 0.0, my_v = 0.0;
    int my_id = 0;
    for (int j = 0; j < k; ++j) {
      double bk = -kInf, bp = 0.0;
      int bi = kNone;
#pragma unroll
      for (int i = 0; i < PL; ++i) {
        if ((avail >> i & 1u) && route_before(key[i], i * 32 + lane, bk, bi)) {
          bk = key[i];
          bp = p[i];
          bi = i * 32 + lane;
        }
      }
      warp_argmax(bk, bp, bi);
      if (bi == kNone) {  // cannot happen for validated inputs; keep the write in range
        bi = 0;
        bp = 0.0;
      }
#pragma unroll
      for (int i = 0; i < PL; ++i)
        if (i * 32 + lane == bi) avail &= ~(1u << i);
      vsum += bp;
      if ((j & 31) == lane) {
        my_id = bi;
        my_v = bp;
      }
    }
    const double wscale = renormalize ? scaling * __drcp_rn(vsum) : static_cast<double>(scaling);
    if (lane < k) {  // k <= 32 (checked by the launcher); distinct ids per lane: no conflict
      ids[t * k + lane] = lo + my_id;
      weights[t * k + lane] = static_cast<float>(my_v * wscale);
      cnt_s[warp][lo + my_id] += 1;
    }
    const double qscale = softmax ? 1.0 : __drcp_rn(psum);
#pragma unroll
    for (int i = 0; i < PL; ++i) {
      const int c = i * 32 + lane;
      if (c < n) ps_s[warp][lo + c] += static_cast<float>(p[i] * qscale);
    }
    __syncwarp();  // the next token (another lo) may touch the same shared entries from other lanes
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int32_t c = 0;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kRouteWarps; ++w) {
      c += cnt_s[w][e];
      s += ps_s[w][e];
    }
    cnt_part[static_cast<int64_t>(blockIdx.x) * E + e] = c;
    ps_part[static_cast<int64_t>(blockIdx.x) * E + e] = s;
  }
}

// counts[e] / prob_sums[e] = the per-block partials summed in block order (deterministic).
__global__ void route_reduce_kernel(const int32_t* __restrict__ cnt_part,
                                    const float* __restrict__ ps_part, int nblocks, int E,
                                    int32_t* __restrict__ counts, float* __restrict__ prob_sums) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  int32_t c = 0;
  float s = 0.f;
  for (int b = 0; b < nblocks; ++b) {
    c += cnt_part[static_cast<int64_t>(b) * E + e];
    s += ps_part[static_cast<int64_t>(b) * E + e];
  }
  counts[e] = c;
  prob_sums[e] = s;
}

template <class ET>
int launch_route(const MoeRouteArgs& a, int E, int64_t nblocks, int32_t* cnt_part, float* ps_part,
                 cudaStream_t st) {
  const MoeRouteLogits& in = a.in;
  const auto* z = static_cast<const typename ET::T*>(in.logits);
  const unsigned grid = static_cast<unsigned>(nblocks);
  constexpr int kThreads = kRouteWarps * 32;
  const int softmax = in.scoring == 0, renorm = in.renormalize ? 1 : 0;
  const int k = static_cast<int>(a.k), ng = static_cast<int>(a.n_group);
  const int tg = a.n_group > 0 ? static_cast<int>(a.topk_group) : 0;
#define U2A_ROUTE_LAUNCH(PL)                                                                    \
  route_fwd_kernel<ET, PL><<<grid, kThreads, 0, st>>>(                                         \
      z, in.row_stride, in.T, E, in.G, in.group_offsets, in.group_ids, a.bias, k, softmax,     \
      renorm, ng, tg, in.scaling, a.ids, a.weights, cnt_part, ps_part)
  if (E <= 32)
    U2A_ROUTE_LAUNCH(1);
  else if (E <= 64)
    U2A_ROUTE_LAUNCH(2);
  else if (E <= 128)
    U2A_ROUTE_LAUNCH(4);
  else
    U2A_ROUTE_LAUNCH(8);
#undef U2A_ROUTE_LAUNCH
  return launch_status();
}

}  // namespace

int64_t moe_route_workspace_bytes_cuda(int64_t T, int64_t num_experts) {
  if (T < 0 || num_experts < 1) return 0;
  const int64_t b = route_blocks(T) < 1 ? 1 : route_blocks(T);
  return b * num_experts * static_cast<int64_t>(sizeof(int32_t) + sizeof(float));
}

int moe_route_fwd_cuda(const MoeRouteArgs& a, void* workspace, int64_t workspace_bytes,
                       void* stream) {
  const MoeRouteLogits& in = a.in;
  const int64_t T = in.T, E = in.E, top_k = a.k, n_group = a.n_group, topk_group = a.topk_group;
  if (T < 0 || T >= (int64_t{1} << 31) || E < 1 || E > kRouteMaxE || in.G < 1 || top_k < 1 ||
      top_k > 32 || top_k > E || n_group < 0 || n_group > E || topk_group < 0 ||
      (n_group > 0 && (topk_group < 1 || topk_group > n_group)))
    return kBadShape;
  if (in.scoring != 0 && in.scoring != 1) return kBadArgument;
  if (!in.group_offsets || !a.counts || !a.prob_sums ||
      (T > 0 && (!in.logits || !a.ids || !a.weights)))
    return kBadArgument;
  if (!is_float_dtype(in.dtype)) return kBadDtype;
  if (!workspace || workspace_bytes < moe_route_workspace_bytes_cuda(T, E)) return kBadArgument;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t nb = route_blocks(T);
  int32_t* cnt_part = static_cast<int32_t*>(workspace);
  float* ps_part = reinterpret_cast<float*>(cnt_part + (nb < 1 ? 1 : nb) * E);
  const int e = static_cast<int>(E);
  if (nb > 0) {
    int status = kOk;
    U2A_DISPATCH_FLOAT(in.dtype, ET, status = launch_route<ET>(a, e, nb, cnt_part, ps_part, st));
    if (status != kOk) return status;
  }
  route_reduce_kernel<<<1, kRouteMaxE, 0, st>>>(cnt_part, ps_part, static_cast<int>(nb), e,
                                                a.counts, a.prob_sums);
  return launch_status();
}

int64_t moe_plan_workspace_bytes_cuda(int64_t n, int64_t num_experts) {
  if (n < 0 || num_experts < 1) return 0;
  return plan_blocks(n) * num_experts * static_cast<int64_t>(sizeof(int32_t));
}

int moe_plan_cuda(const MoePlanArgs& a, void* workspace, int64_t workspace_bytes, void* stream) {
  const int64_t n = a.n_slots, num_experts = a.E, block_m = a.block_m;
  int64_t max_tiles = a.max_tiles;
  if (n < 0 || n >= (int64_t{1} << 31) || num_experts < 1 || num_experts > kMaxExperts ||
      block_m < 0 || max_tiles < 0)
    return kBadShape;
  if (a.ids_dtype != kInt32 && a.ids_dtype != kInt64) return kBadDtype;
  if (!a.counts || !a.offsets || (n > 0 && (!a.ids || !a.sorted_slot || !a.slot_pos)))
    return kBadArgument;
  if (block_m > 0 && max_tiles > 0 && (!a.tile_expert || !a.tile_row)) return kBadArgument;
  if (block_m == 0) max_tiles = 0;
  const int ids_is_int64 = a.ids_dtype == kInt64;
  const int E = static_cast<int>(num_experts);
  const int64_t chunk = plan_chunk(n);
  const int64_t B = plan_blocks(n);
  if (workspace_bytes < moe_plan_workspace_bytes_cuda(n, num_experts) || !workspace)
    return kBadArgument;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  int32_t* hist = static_cast<int32_t*>(workspace);
  const size_t sh = static_cast<size_t>(E) * sizeof(int32_t);
  if (2 * sh > 48 * 1024) {
    // above the default dynamic shared memory limit: opt in (host call, no synchronisation)
    cudaFuncSetAttribute(plan_scan_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(2 * sh));
  }
  plan_hist_kernel<<<static_cast<unsigned>(B), kHistThreads, sh, st>>>(a.ids, ids_is_int64, n, E,
                                                                       chunk, hist);
  plan_scan_kernel<<<1, kScanThreads, 2 * sh, st>>>(hist, static_cast<int>(B), E, n, block_m,
                                                    a.counts, a.offsets, a.sorted_slot,
                                                    a.tile_expert, a.tile_row, max_tiles);
  if (n > 0)
    plan_scatter_kernel<<<static_cast<unsigned>(B), 32, sh, st>>>(
        a.ids, ids_is_int64, n, E, chunk, hist, a.sorted_slot, a.slot_pos);
  return launch_status();
}

int moe_permute_cuda(const MoePermuteArgs& a, void* stream) {
  const int64_t T = a.T, D = a.D, n = a.n_rows, top_k = a.k, elem_bytes = a.elem_size;
  if (T < 0 || D < 0 || n < 0 || top_k < 1 || n >= (int64_t{1} << 31)) return kBadShape;
  if (elem_bytes != 2 && elem_bytes != 4) return kBadDtype;
  if (n == 0 || D == 0) return kOk;
  if (!a.x || !a.sorted_slot || !a.xs) return kBadArgument;
  const int64_t row = D * elem_bytes, xrow = a.x_row_stride * elem_bytes;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(n);
  const char* xp = static_cast<const char*>(a.x);
  char* op = static_cast<char*>(a.xs);
  auto fits = [&](int64_t b) {
    return row % b == 0 && xrow % b == 0 && cuda::aligned(a.x, b) && cuda::aligned(a.xs, b);
  };
  const int32_t* ss = a.sorted_slot;
  if (fits(16))
    permute_kernel<uint4><<<grid, kRowThreads, 0, st>>>(xp, T, row, xrow, ss, n, top_k, op);
  else if (fits(8))
    permute_kernel<uint2><<<grid, kRowThreads, 0, st>>>(xp, T, row, xrow, ss, n, top_k, op);
  else if (fits(4))
    permute_kernel<uint32_t><<<grid, kRowThreads, 0, st>>>(xp, T, row, xrow, ss, n, top_k, op);
  else
    permute_kernel<uint16_t><<<grid, kRowThreads, 0, st>>>(xp, T, row, xrow, ss, n, top_k, op);
  return launch_status();
}

namespace {
// The sizes of the combine input, checked for the forward and the backward.
int check_combine(const MoeCombineInput& in) {
  if (in.n_src < 0 || in.D < 0 || in.T < 0 || in.k < 1 || in.T >= (int64_t{1} << 31))
    return kBadShape;
  return is_float_dtype(in.dtype) ? kOk : kBadDtype;
}
}  // namespace

int moe_combine_cuda(const MoeCombineArgs& a, void* stream) {
  if (int s = check_combine(a.in); s != kOk) return s;
  if (a.in.T == 0 || a.in.D == 0) return kOk;
  if (!a.in.src || !a.in.slot_pos || !a.out) return kBadArgument;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  int status = kOk;
  U2A_DISPATCH_FLOAT(a.in.dtype, ET, status = launch_combine<ET>(a, st));
  return status;
}

int moe_combine_bwd_cuda(const MoeCombineBwdArgs& a, void* stream) {
  if (int s = check_combine(a.in); s != kOk) return s;
  if (a.in.T == 0) return kOk;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (a.in.D == 0) {
    if (a.grad_weights) cudaMemsetAsync(a.grad_weights, 0, a.in.T * a.in.k * sizeof(float), st);
    return launch_status();
  }
  if (!a.grad_out || !a.in.src || !a.in.slot_pos || !a.grad_src) return kBadArgument;
  int status = kOk;
  U2A_DISPATCH_FLOAT(a.in.dtype, ET, status = launch_combine_bwd<ET>(a, st));
  return status;
}

}  // namespace unif2ace
