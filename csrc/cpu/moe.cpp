// Grouped MoE dispatch, C++ CPU kernels (the semantics: the MoE op family's launcher contract).
//
// route    one pass per token: scores and keys of the token's candidates into a per-thread double
//          buffer, partial selection of k by insertion into a sorted k-array (k ≤ 8 typically,
//          candidates ≤ a few hundred: O(n·k) worst case, ~O(n) for random keys), the weights,
//          then per-thread count / probability-sum partials added in thread order (deterministic).
// plan     stable counting sort: per-chunk histograms, one exclusive scan over (expert, chunk),
//          scatter; the tile map is a walk over the E offsets. No comparison sort.
// permute  row gather (memcpy per row, any dtype).
// combine  per token, the k rows weighted and summed in fp32 in slot order: deterministic, no
//          atomics; the same kernel with weights = 1 is permute's backward.
#include "moe.h"

#include <omp.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "unif2ace/cpu_simd.h"

namespace unif2ace {
namespace {

// Large outputs are usually fresh allocations (torch's CPU allocator hands blocks over 32 MiB
// straight from mmap), so their first touch costs a page fault and a kernel zero-fill per 4 KiB,
// most of the time of a large permute into a fresh buffer. Asking for transparent huge pages on the
// 2 MiB-aligned interior before writing cuts the faults 512-fold where THP is in "madvise" mode;
// elsewhere it is a no-op.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (bytes < 4 * kHuge) return;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Work below this many elements runs on one thread (an OpenMP fork costs more than it saves).
constexpr int64_t kParallelMin = 1 << 15;
inline int threads_for(int64_t work) {
  if (work < kParallelMin) return 1;
  return std::max(1, std::min<int>(omp_get_max_threads(), static_cast<int>(work / kParallelMin)));
}

// Insert candidate (key, idx) into the descending list (vals, idxs) of length len ≤ cap, keeping
// the first of equal keys first (candidates arrive in ascending index order). idxs < 0 marks an
// empty place, so NaN keys (checks off) still fill the list with valid indices.
inline void insert_topk(double key, int64_t idx, double* vals, int64_t* idxs, int64_t cap) {
  int64_t j = cap - 1;
  if (idxs[j] >= 0 && !(key > vals[j])) return;
  while (j > 0 && (idxs[j - 1] < 0 || key > vals[j - 1])) {
    vals[j] = vals[j - 1];
    idxs[j] = idxs[j - 1];
    --j;
  }
  vals[j] = key;
  idxs[j] = idx;
}

// Scores of one token's candidates, in double: softmax over the candidates, or sigmoid.
template <class ET>
void token_scores(const typename ET::T* z, int64_t n, int scoring, double* p) {
  if (scoring == kScoreSoftmax) {
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t c = 0; c < n; ++c) m = std::max(m, static_cast<double>(ET::load(z[c])));
    double s = 0.0;
    for (int64_t c = 0; c < n; ++c) {
      p[c] = std::exp(static_cast<double>(ET::load(z[c])) - m);
      s += p[c];
    }
    const double inv = 1.0 / s;
    for (int64_t c = 0; c < n; ++c) p[c] *= inv;
  } else {
    for (int64_t c = 0; c < n; ++c)
      p[c] = 1.0 / (1.0 + std::exp(-static_cast<double>(ET::load(z[c]))));
  }
}

struct RouteShape {
  int64_t T, E, G, k, n_group, topk_group;
  const int64_t* offsets;
  const int64_t* group_ids;
};

RouteShape route_shape(const MoeRouteLogits& in, int64_t k, int64_t n_group, int64_t topk_group) {
  return RouteShape{in.T, in.E, in.G, k, n_group, topk_group, in.group_offsets, in.group_ids};
}

// Checks shared by forward and backward that do not need the per-token data.
Status check_route(const RouteShape& r) {
  if (r.T < 0 || r.E <= 0 || r.G <= 0 || r.k <= 0) return kBadShape;
  if (r.offsets[0] < 0) return kBadArgument;
  for (int64_t g = 0; g < r.G; ++g) {
    const int64_t n = r.offsets[g + 1] - r.offsets[g];
    if (n < r.k || r.offsets[g + 1] > r.E) return kBadArgument;
    if (r.n_group > 0) {
      if (n % r.n_group != 0 || r.topk_group < 1 || r.topk_group > r.n_group) return kBadArgument;
      if (r.k > r.topk_group * (n / r.n_group)) return kBadArgument;
    }
  }
  return kOk;
}

int64_t max_group(const RouteShape& r) {
  int64_t m = 0;
  for (int64_t g = 0; g < r.G; ++g) m = std::max(m, r.offsets[g + 1] - r.offsets[g]);
  return m;
}

template <class ET>
Status route_fwd(const MoeRouteArgs& args, const RouteShape& r) {
  const auto* logits = static_cast<const typename ET::T*>(args.in.logits);
  const int64_t ld_row = args.in.row_stride;
  const int scoring = args.in.scoring;
  const float* bias = args.bias;
  int64_t* ids = args.ids;
  float* weights = args.weights;
  const int64_t E = r.E, k = r.k;
  const int64_t nmax = max_group(r);
  const int nt = threads_for(r.T * nmax);
  std::vector<int64_t> cnt_part(static_cast<size_t>(nt) * E, 0);
  std::vector<double> ps_part(static_cast<size_t>(nt) * E, 0.0);
  std::atomic<int> bad{0};
#pragma omp parallel num_threads(nt)
  {
    const int th = omp_get_thread_num();
    const int nth = omp_get_num_threads();
    const int64_t t0 = r.T * th / nth, t1 = r.T * (th + 1) / nth;
    std::vector<double> p(nmax), key(nmax), gkey(std::max<int64_t>(r.n_group, 1));
    std::vector<char> allowed(nmax);
    std::vector<double> vals(std::max<int64_t>(k, r.topk_group));
    std::vector<int64_t> idxs(std::max<int64_t>(k, r.topk_group));
    int64_t* cnt = cnt_part.data() + static_cast<size_t>(th) * E;
    double* ps = ps_part.data() + static_cast<size_t>(th) * E;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = r.group_ids ? r.group_ids[t] : 0;
      if (g < 0 || g >= r.G) {  // never read through a bad group id
        bad.store(1, std::memory_order_relaxed);
        for (int64_t j = 0; j < k; ++j) {
          ids[t * k + j] = 0;
          weights[t * k + j] = std::numeric_limits<float>::quiet_NaN();
        }
        continue;
      }
      const int64_t lo = r.offsets[g], n = r.offsets[g + 1] - lo;
      token_scores<ET>(logits + t * ld_row + lo, n, scoring, p.data());
      for (int64_t c = 0; c < n; ++c)
        key[c] = p[c] + (bias ? static_cast<double>(bias[lo + c]) : 0.0);
      if (r.n_group > 0) {  // DeepSeek-V3: keep the topk_group subgroups with the best top-2 sums
        const int64_t gs = n / r.n_group;
        std::fill(idxs.begin(), idxs.begin() + r.topk_group, -1);
        for (int64_t sg = 0; sg < r.n_group; ++sg) {
          double a = -std::numeric_limits<double>::infinity(), b = a;
          for (int64_t c = sg * gs; c < (sg + 1) * gs; ++c) {
            if (key[c] > a) {
              b = a;
              a = key[c];
            } else if (key[c] > b) {
              b = key[c];
            }
          }
          insert_topk(gs > 1 ? a + b : a, sg, vals.data(), idxs.data(), r.topk_group);
        }
        std::fill(allowed.begin(), allowed.begin() + n, 0);
        for (int64_t i = 0; i < r.topk_group; ++i)
          std::fill(allowed.begin() + idxs[i] * gs, allowed.begin() + (idxs[i] + 1) * gs, 1);
      }
      std::fill(idxs.begin(), idxs.begin() + k, -1);
      for (int64_t c = 0; c < n; ++c)
        if (r.n_group == 0 || allowed[c]) insert_topk(key[c], c, vals.data(), idxs.data(), k);
      double vsum = 0.0;
      for (int64_t j = 0; j < k; ++j) vsum += p[idxs[j]];
      const double wscale = args.in.renormalize ? args.in.scaling / vsum : args.in.scaling;
      for (int64_t j = 0; j < k; ++j) {
        ids[t * k + j] = lo + idxs[j];
        weights[t * k + j] = static_cast<float>(p[idxs[j]] * wscale);
        cnt[lo + idxs[j]] += 1;
      }
      double qscale = 1.0;
      if (scoring == kScoreSigmoid) {
        double s = 0.0;
        for (int64_t c = 0; c < n; ++c) s += p[c];
        qscale = 1.0 / s;
      }
      for (int64_t c = 0; c < n; ++c) ps[lo + c] += p[c] * qscale;
    }
  }
  for (int64_t e = 0; e < E; ++e) {
    int64_t c = 0;
    double s = 0.0;
    for (int th = 0; th < nt; ++th) {
      c += cnt_part[static_cast<size_t>(th) * E + e];
      s += ps_part[static_cast<size_t>(th) * E + e];
    }
    args.counts[e] = static_cast<int32_t>(c);
    args.prob_sums[e] = static_cast<float>(s);
  }
  return bad.load() ? kBadArgument : kOk;
}

template <class ET>
Status route_bwd(const MoeRouteBwdArgs& args, const RouteShape& r) {
  const auto* logits = static_cast<const typename ET::T*>(args.in.logits);
  const int64_t ld_row = args.in.row_stride;
  const int scoring = args.in.scoring;
  const bool renormalize = args.in.renormalize;
  const float scaling = args.in.scaling;
  const int64_t* ids = args.ids;
  const float* grad_w = args.grad_weights;
  const float* grad_ps = args.grad_prob_sums;
  const int64_t E = r.E, k = r.k;
  const int64_t nmax = max_group(r);
  std::atomic<int> bad{0};
#pragma omp parallel num_threads(threads_for(r.T * nmax))
  {
    std::vector<double> p(nmax), dp(nmax);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < r.T; ++t) {
      float* gz = args.grad_logits + t * E;
      std::fill(gz, gz + E, 0.0f);
      const int64_t g = r.group_ids ? r.group_ids[t] : 0;
      if (g < 0 || g >= r.G) {
        bad.store(1, std::memory_order_relaxed);
        continue;
      }
      const int64_t lo = r.offsets[g], n = r.offsets[g + 1] - lo;
      token_scores<ET>(logits + t * ld_row + lo, n, scoring, p.data());
      std::fill(dp.begin(), dp.begin() + n, 0.0);
      double psum = 0.0;
      if (scoring == kScoreSigmoid)
        for (int64_t c = 0; c < n; ++c) psum += p[c];
      if (grad_ps) {
        if (scoring == kScoreSoftmax) {
          for (int64_t c = 0; c < n; ++c) dp[c] += grad_ps[lo + c];
        } else {  // q = p / Σp:  dp_c += (G_c − Σ q·G) / Σp
          double qg = 0.0;
          for (int64_t c = 0; c < n; ++c) qg += p[c] / psum * grad_ps[lo + c];
          for (int64_t c = 0; c < n; ++c) dp[c] += (grad_ps[lo + c] - qg) / psum;
        }
      }
      if (grad_w) {
        const int64_t* id = ids + t * k;
        const float* gw = grad_w + t * k;
        bool ok = true;
        for (int64_t j = 0; j < k; ++j) ok = ok && id[j] >= lo && id[j] < lo + n;
        if (!ok) {
          bad.store(1, std::memory_order_relaxed);
          continue;
        }
        if (renormalize) {
          double V = 0.0, gv = 0.0;
          for (int64_t j = 0; j < k; ++j) V += p[id[j] - lo];
          for (int64_t j = 0; j < k; ++j) gv += gw[j] * p[id[j] - lo];
          for (int64_t j = 0; j < k; ++j) dp[id[j] - lo] += scaling * (gw[j] - gv / V) / V;
        } else {
          for (int64_t j = 0; j < k; ++j) dp[id[j] - lo] += static_cast<double>(scaling) * gw[j];
        }
      }
      if (scoring == kScoreSoftmax) {
        double pd = 0.0;
        for (int64_t c = 0; c < n; ++c) pd += p[c] * dp[c];
        for (int64_t c = 0; c < n; ++c) gz[lo + c] = static_cast<float>(p[c] * (dp[c] - pd));
      } else {
        for (int64_t c = 0; c < n; ++c) gz[lo + c] = static_cast<float>(dp[c] * p[c] * (1.0 - p[c]));
      }
    }
  }
  return bad.load() ? kBadArgument : kOk;
}

template <class I>
Status plan_impl(const I* ids, int64_t N, int64_t E, int64_t block_m, int32_t* counts,
                 int32_t* offsets, int32_t* sorted_slot, int32_t* slot_pos, int32_t* tile_expert,
                 int32_t* tile_row, int64_t max_tiles) {
  // Chunks of >= 64K slots each: below that the histogram is cheap and threads only add a fork.
  const int nch = std::max(1, std::min<int>(omp_get_max_threads(), static_cast<int>(N >> 16)));
  std::vector<int64_t> hist(static_cast<size_t>(nch) * E, 0);
  std::atomic<int> bad{0};
#pragma omp parallel for num_threads(nch) schedule(static, 1)
  for (int c = 0; c < nch; ++c) {
    int64_t* h = hist.data() + static_cast<size_t>(c) * E;
    for (int64_t s = N * c / nch; s < N * (c + 1) / nch; ++s) {
      const int64_t e = static_cast<int64_t>(ids[s]);
      if (e < 0 || e >= E) {
        bad.store(1, std::memory_order_relaxed);
        continue;
      }
      ++h[e];
    }
  }
  if (bad.load()) return kBadArgument;
  // Exclusive scan over (expert, chunk): chunk c's first position for expert e.
  int64_t run = 0;
  for (int64_t e = 0; e < E; ++e) {
    offsets[e] = static_cast<int32_t>(run);
    int64_t ce = 0;
    for (int c = 0; c < nch; ++c) {
      const int64_t h = hist[static_cast<size_t>(c) * E + e];
      hist[static_cast<size_t>(c) * E + e] = run;
      run += h;
      ce += h;
    }
    counts[e] = static_cast<int32_t>(ce);
  }
  offsets[E] = static_cast<int32_t>(run);
#pragma omp parallel for num_threads(nch) schedule(static, 1)
  for (int c = 0; c < nch; ++c) {
    int64_t* base = hist.data() + static_cast<size_t>(c) * E;
    for (int64_t s = N * c / nch; s < N * (c + 1) / nch; ++s) {
      const int64_t p = base[static_cast<int64_t>(ids[s])]++;
      sorted_slot[p] = static_cast<int32_t>(s);
      slot_pos[s] = static_cast<int32_t>(p);
    }
  }
  if (block_m > 0) {
    int64_t i = 0;
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t row = offsets[e]; row < offsets[e + 1]; row += block_m) {
        if (i >= max_tiles) return kBadArgument;
        tile_expert[i] = static_cast<int32_t>(e);
        tile_row[i] = static_cast<int32_t>(row);
        ++i;
      }
    }
    for (; i < max_tiles; ++i) {
      tile_expert[i] = -1;
      tile_row[i] = static_cast<int32_t>(N);
    }
  }
  return kOk;
}

template <class ET>
void combine_impl(const MoeCombineInput& in, typename ET::T* out) {
  using S = typename ET::T;
  const S* src = static_cast<const S*>(in.src);
  const int64_t n_src = in.n_src, D = in.D, ld_src = in.src_row_stride, T = in.T, k = in.k;
  const int32_t* pos = in.slot_pos;
  const float* w = in.weights;
#pragma omp parallel num_threads(threads_for(T * k * D))
  {
    std::vector<float> acc(D);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t p = pos[t * k + j];
        if (p < 0 || p >= n_src) continue;  // guarded: never read out of bounds
        const float wj = w ? w[t * k + j] : 1.0f;
        const S* row = src + p * ld_src;
        float* a = acc.data();
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] += wj * ET::load(row[d]);
      }
      S* o = out + t * D;
      for (int64_t d = 0; d < D; ++d) o[d] = ET::store(acc[d]);
    }
  }
}

// fp32 specialisation: accumulate straight into the output row (the stores are the accumulator).
template <>
void combine_impl<Elem<kFloat32>>(const MoeCombineInput& in, float* out) {
  const float* src = static_cast<const float*>(in.src);
  const int64_t n_src = in.n_src, D = in.D, ld_src = in.src_row_stride, T = in.T, k = in.k;
  const int32_t* pos = in.slot_pos;
  const float* w = in.weights;
#pragma omp parallel for num_threads(threads_for(T * k * D)) schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    float* o = out + t * D;
    std::fill(o, o + D, 0.0f);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t p = pos[t * k + j];
      if (p < 0 || p >= n_src) continue;
      const float wj = w ? w[t * k + j] : 1.0f;
      const float* row = src + p * ld_src;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] += wj * row[d];
    }
  }
}

template <class ET>
void combine_bwd_impl(const MoeCombineBwdArgs& a) {
  using S = typename ET::T;
  const MoeCombineInput& in = a.in;
  const S* go = static_cast<const S*>(a.grad_out);
  const S* src = static_cast<const S*>(in.src);
  S* gsrc = static_cast<S*>(a.grad_src);
  const int64_t n_src = in.n_src, D = in.D, ld_src = in.src_row_stride, T = in.T, k = in.k;
  const int32_t* pos = in.slot_pos;
  const float* w = in.weights;
  float* gw = a.grad_weights;
#pragma omp parallel for num_threads(threads_for(T * k * D)) schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    const S* g = go + t * a.grad_out_row_stride;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t p = pos[t * k + j];
      if (p < 0 || p >= n_src) continue;
      const float wj = w ? w[t * k + j] : 1.0f;
      S* gs = gsrc + p * D;
      if (gw) {  // one pass: the gradient row and the dot product with the source row
        const S* row = src + p * ld_src;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) {  // read src before writing: gsrc may alias src
          const float gd = ET::load(g[d]), sd = ET::load(row[d]);
          gs[d] = ET::store(wj * gd);
          dot += gd * sd;
        }
        gw[t * k + j] = dot;
      } else {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) gs[d] = ET::store(wj * ET::load(g[d]));
      }
    }
  }
}

// ---- SiLU-GLU: exp without libm (std::exp does not vectorise without -ffast-math) ---------------

// exp(x) in fp32 (Cephes expf, cpu_simd.h's polynomial; max relative error ~1.2e-7 over
// [-87, 88]); x is clamped into that range, so exp(-large) is a tiny normal number and
// sigmoid/silu stay exact to fp32.
U2A_HD float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  const float p = cpu::expf_poly(r);
  const float er = 1.0f + r + r * r * p;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return er * scale;
}

// Row kernels, cloned for AVX-512 / AVX2 and the baseline target and picked at load time (the
// build itself has no -march); several times faster than torch's separate elementwise ops
// (benchmarks/bench_moe.py).
template <class ET, class S = typename ET::T>
__attribute__((target_clones("avx512f", "arch=x86-64-v3", "default"))) void silu_glu_fwd_rows(
    const S* h, int64_t n_rows, int64_t F, int64_t ld_h, S* a) {
#pragma omp parallel for num_threads(threads_for(n_rows * F)) schedule(static)
  for (int64_t i = 0; i < n_rows; ++i) {
    const S* g = h + i * ld_h;
    const S* u = g + F;
    S* o = a + i * F;
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      const float gv = ET::load(g[f]);
      o[f] = ET::store(gv / (1.0f + exp_poly(-gv)) * ET::load(u[f]));
    }
  }
}

template <class ET, class S = typename ET::T>
__attribute__((target_clones("avx512f", "arch=x86-64-v3", "default"))) void silu_glu_bwd_rows(
    const S* h, const S* da, int64_t n_rows, int64_t F, int64_t ld_h, S* dh, S* a) {
#pragma omp parallel for num_threads(threads_for(n_rows * F)) schedule(static)
  for (int64_t i = 0; i < n_rows; ++i) {
    const S* g = h + i * ld_h;
    const S* u = g + F;
    const S* d = da + i * F;
    S* dg = dh + i * 2 * F;
    S* du = dg + F;
    S* o = a ? a + i * F : nullptr;
    // Each element is read before its slot is written, so dh may be h itself (in place).
    if (o) {
#pragma omp simd
      for (int64_t f = 0; f < F; ++f) {
        const float gv = ET::load(g[f]), uv = ET::load(u[f]), dv = ET::load(d[f]);
        const float s = 1.0f / (1.0f + exp_poly(-gv));
        const float silu = gv * s;
        o[f] = ET::store(silu * uv);
        dg[f] = ET::store(dv * uv * s * (1.0f + gv * (1.0f - s)));  // d silu/dg = s (1 + g (1 − s))
        du[f] = ET::store(dv * silu);
      }
    } else {
#pragma omp simd
      for (int64_t f = 0; f < F; ++f) {
        const float gv = ET::load(g[f]), uv = ET::load(u[f]), dv = ET::load(d[f]);
        const float s = 1.0f / (1.0f + exp_poly(-gv));
        dg[f] = ET::store(dv * uv * s * (1.0f + gv * (1.0f - s)));
        du[f] = ET::store(dv * gv * s);
      }
    }
  }
}

// ---- GELU (erf and tanh forms): the same one-pass row kernels -----------------------------------

constexpr float kSqrtHalf = 0.70710678118654752f;      // 1/√2
constexpr float kInvSqrt2Pi = 0.39894228040143268f;    // 1/√(2π)
constexpr float kTanhC = 0.79788456080286536f;         // √(2/π)

// Φ(x), the standard normal CDF, from erfc(|x|/√2) by Abramowitz & Stegun 7.1.26 (|error of erf|
// ≤ 1.5e-7; gelu = x·Φ(x) within 2.2e-7 of fp64 over [−12, 12], its derivative within 7e-8).
U2A_HD float normal_cdf(float x) {
  const float z = (x < 0.0f ? -x : x) * kSqrtHalf;
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  float q = 1.061405429f;
  q = q * t - 1.453152027f;
  q = q * t + 1.421413741f;
  q = q * t - 0.284496736f;
  q = q * t + 0.254829592f;
  const float half_erfc = 0.5f * q * t * exp_poly(-z * z);
  return x < 0.0f ? half_erfc : 1.0f - half_erfc;
}

// gelu(x) and, when dy != nullptr, gelu'(x) (one expression for the value in both passes, so the
// backward's recomputed a is the forward's bit for bit). erf form: x·Φ(x), Φ + x·φ. tanh form
// (Phi's gelu_new): 0.5·x·(1 + tanh u) = x·σ(2u) with u = √(2/π)(x + 0.044715x³), derivative
// σ + x·σ(1 − σ)·2u'.
template <bool kTanh>
U2A_HD float gelu_and_grad(float x, float* dy) {
  if constexpr (kTanh) {
    const float s = 1.0f / (1.0f + exp_poly(-2.0f * kTanhC * (x + 0.044715f * x * x * x)));
    if (dy) *dy = s + x * s * (1.0f - s) * 2.0f * kTanhC * (1.0f + 3.0f * 0.044715f * x * x);
    return x * s;
  } else {
    const float c = normal_cdf(x);
    if (dy) *dy = c + x * kInvSqrt2Pi * exp_poly(-0.5f * x * x);
    return x * c;
  }
}

template <class ET, bool kTanh, class S = typename ET::T>
__attribute__((target_clones("avx512f", "arch=x86-64-v3", "default"))) void gelu_fwd_rows(
    const S* h, int64_t n_rows, int64_t F, int64_t ld_h, S* a) {
#pragma omp parallel for num_threads(threads_for(n_rows * F)) schedule(static)
  for (int64_t i = 0; i < n_rows; ++i) {
    const S* x = h + i * ld_h;
    S* o = a + i * F;
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      o[f] = ET::store(gelu_and_grad<kTanh>(ET::load(x[f]), nullptr));
    }
  }
}

template <class ET, bool kTanh, class S = typename ET::T>
__attribute__((target_clones("avx512f", "arch=x86-64-v3", "default"))) void gelu_bwd_rows(
    const S* h, const S* da, int64_t n_rows, int64_t F, int64_t ld_h, S* dh, S* a) {
#pragma omp parallel for num_threads(threads_for(n_rows * F)) schedule(static)
  for (int64_t i = 0; i < n_rows; ++i) {
    const S* x = h + i * ld_h;
    const S* d = da + i * F;
    S* g = dh + i * F;
    S* o = a + i * F;
    // each element is read before its slot is written, so dh may be h itself (in place)
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      float dy;
      const float y = gelu_and_grad<kTanh>(ET::load(x[f]), &dy);
      o[f] = ET::store(y);
      g[f] = ET::store(ET::load(d[f]) * dy);
    }
  }
}

// Bytes of n elements of a floating dtype code (0 for any other code).
size_t float_bytes(int dtype, int64_t n) {
  return is_float_dtype(dtype) ? static_cast<size_t>(n * dtype_size(dtype)) : 0;
}

// The sizes of the combine input, checked for the forward and the backward.
Status check_combine(const MoeCombineInput& in) {
  if (in.n_src < 0 || in.D < 0 || in.T < 0 || in.k <= 0) return kBadShape;
  if (in.n_src > 1 && in.src_row_stride < in.D) return kBadStride;
  return kOk;
}

}  // namespace

Status moe_silu_glu_fwd_cpu(const MoeActivationArgs& a) {
  const int64_t n_rows = a.n_rows, F = a.F;
  if (n_rows < 0 || F < 0) return kBadShape;
  if (n_rows > 1 && a.h_row_stride < 2 * F) return kBadStride;
  advise_huge_pages(a.a, float_bytes(a.dtype, n_rows * F));
  return static_cast<Status>(U2A_DISPATCH_FLOAT(a.dtype, E, {
    using S = typename E::T;
    silu_glu_fwd_rows<E>(static_cast<const S*>(a.h), n_rows, F, a.h_row_stride,
                         static_cast<S*>(a.a));
  }));
}

Status moe_silu_glu_bwd_cpu(const MoeActivationArgs& a) {
  const int64_t n_rows = a.n_rows, F = a.F;
  if (n_rows < 0 || F < 0) return kBadShape;
  if (n_rows > 1 && a.h_row_stride < 2 * F) return kBadStride;
  advise_huge_pages(a.dh, float_bytes(a.dtype, n_rows * 2 * F));
  if (a.a) advise_huge_pages(a.a, float_bytes(a.dtype, n_rows * F));
  return static_cast<Status>(U2A_DISPATCH_FLOAT(a.dtype, E, {
    using S = typename E::T;
    silu_glu_bwd_rows<E>(static_cast<const S*>(a.h), static_cast<const S*>(a.da), n_rows, F,
                         a.h_row_stride, static_cast<S*>(a.dh), static_cast<S*>(a.a));
  }));
}

Status moe_route_fwd_cpu(const MoeRouteArgs& a) {
  if (a.in.scoring != kScoreSoftmax && a.in.scoring != kScoreSigmoid) return kBadArgument;
  if (a.n_group < 0) return kBadArgument;
  const RouteShape r = route_shape(a.in, a.k, a.n_group, a.n_group > 0 ? a.topk_group : 0);
  if (Status s = check_route(r); s != kOk) return s;
  Status status = kOk;
  const int ds = U2A_DISPATCH_FLOAT(a.in.dtype, E, status = route_fwd<E>(a, r));
  return ds != kOk ? static_cast<Status>(ds) : status;
}

Status moe_route_bwd_cpu(const MoeRouteBwdArgs& a) {
  if (a.in.scoring != kScoreSoftmax && a.in.scoring != kScoreSigmoid) return kBadArgument;
  const RouteShape r = route_shape(a.in, a.k, 0, 0);
  if (Status s = check_route(r); s != kOk) return s;
  Status status = kOk;
  const int ds = U2A_DISPATCH_FLOAT(a.in.dtype, E, status = route_bwd<E>(a, r));
  return ds != kOk ? static_cast<Status>(ds) : status;
}

Status moe_plan_cpu(const MoePlanArgs& a) {
  const int64_t n_slots = a.n_slots, E = a.E, block_m = a.block_m;
  if (n_slots < 0 || E <= 0 || block_m < 0) return kBadShape;
  if (n_slots > std::numeric_limits<int32_t>::max()) return kBadShape;
  if (block_m > 0 && a.max_tiles < n_slots / block_m + E) return kBadArgument;
  if (a.ids_dtype == kInt32)
    return plan_impl(static_cast<const int32_t*>(a.ids), n_slots, E, block_m, a.counts, a.offsets,
                     a.sorted_slot, a.slot_pos, a.tile_expert, a.tile_row, a.max_tiles);
  if (a.ids_dtype == kInt64)
    return plan_impl(static_cast<const int64_t*>(a.ids), n_slots, E, block_m, a.counts, a.offsets,
                     a.sorted_slot, a.slot_pos, a.tile_expert, a.tile_row, a.max_tiles);
  return kBadDtype;
}

Status moe_permute_cpu(const MoePermuteArgs& a) {
  const int64_t T = a.T, D = a.D, n_rows = a.n_rows, k = a.k, elem_size = a.elem_size;
  if (T < 0 || D < 0 || n_rows < 0 || k <= 0 || elem_size <= 0) return kBadShape;
  if (T > 1 && a.x_row_stride < D) return kBadStride;
  const char* src = static_cast<const char*>(a.x);
  char* dst = static_cast<char*>(a.xs);
  const int32_t* sorted_slot = a.sorted_slot;
  const size_t row_bytes = static_cast<size_t>(D * elem_size);
  advise_huge_pages(a.xs, row_bytes * static_cast<size_t>(n_rows));
  std::atomic<int> bad{0};
#pragma omp parallel for num_threads(threads_for(n_rows * D)) schedule(static)
  for (int64_t p = 0; p < n_rows; ++p) {
    const int64_t t = static_cast<int64_t>(sorted_slot[p]) / k;
    if (sorted_slot[p] < 0 || t >= T) {  // guarded: zero row, error reported
      bad.store(1, std::memory_order_relaxed);
      std::memset(dst + p * row_bytes, 0, row_bytes);
      continue;
    }
    std::memcpy(dst + p * row_bytes, src + t * a.x_row_stride * elem_size, row_bytes);
  }
  return bad.load() ? kBadArgument : kOk;
}

Status moe_combine_cpu(const MoeCombineArgs& a) {
  if (Status s = check_combine(a.in); s != kOk) return s;
  advise_huge_pages(a.out, float_bytes(a.in.dtype, a.in.T * a.in.D));
  return static_cast<Status>(U2A_DISPATCH_FLOAT(
      a.in.dtype, E, combine_impl<E>(a.in, static_cast<typename E::T*>(a.out))));
}

Status moe_combine_bwd_cpu(const MoeCombineBwdArgs& a) {
  if (Status s = check_combine(a.in); s != kOk) return s;
  if (a.in.T > 1 && a.grad_out_row_stride < a.in.D) return kBadStride;
  advise_huge_pages(a.grad_src, float_bytes(a.in.dtype, a.in.n_src * a.in.D));
  return static_cast<Status>(U2A_DISPATCH_FLOAT(a.in.dtype, E, combine_bwd_impl<E>(a)));
}

Status moe_gelu_fwd_cpu(const MoeActivationArgs& a) {
  const int64_t n_rows = a.n_rows, F = a.F;
  if (n_rows < 0 || F < 0) return kBadShape;
  if (n_rows > 1 && a.h_row_stride < F) return kBadStride;
  advise_huge_pages(a.a, float_bytes(a.dtype, n_rows * F));
  return static_cast<Status>(U2A_DISPATCH_FLOAT(a.dtype, E, {
    using S = typename E::T;
    const S* hp = static_cast<const S*>(a.h);
    S* ap = static_cast<S*>(a.a);
    if (a.tanh_form) {
      gelu_fwd_rows<E, true>(hp, n_rows, F, a.h_row_stride, ap);
    } else {
      gelu_fwd_rows<E, false>(hp, n_rows, F, a.h_row_stride, ap);
    }
  }));
}

Status moe_gelu_bwd_cpu(const MoeActivationArgs& a) {
  const int64_t n_rows = a.n_rows, F = a.F;
  if (n_rows < 0 || F < 0) return kBadShape;
  if (n_rows > 1 && a.h_row_stride < F) return kBadStride;
  if (a.dh == a.h && n_rows > 1 && a.h_row_stride != F) return kBadStride;  // in place: rows = F
  if (a.a == nullptr) return kBadArgument;
  advise_huge_pages(a.dh, float_bytes(a.dtype, n_rows * F));
  advise_huge_pages(a.a, float_bytes(a.dtype, n_rows * F));
  return static_cast<Status>(U2A_DISPATCH_FLOAT(a.dtype, E, {
    using S = typename E::T;
    const S* hp = static_cast<const S*>(a.h);
    const S* dp = static_cast<const S*>(a.da);
    S* dh = static_cast<S*>(a.dh);
    S* ap = static_cast<S*>(a.a);
    if (a.tanh_form) {
      gelu_bwd_rows<E, true>(hp, dp, n_rows, F, a.h_row_stride, dh, ap);
    } else {
      gelu_bwd_rows<E, false>(hp, dp, n_rows, F, a.h_row_stride, dh, ap);
    }
  }));
}

}  // namespace unif2ace
