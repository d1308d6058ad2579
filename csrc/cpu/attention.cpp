// Omni-attention, C++ CPU kernels (fp32). Contract: attention.h and the omni-attention op.
//
// One (sequence, head) pair per OpenMP task. Queries go in blocks of R rows; a block reads the keys
// [0, hi) only, hi = the largest limit in the block (rounded up to 16), so keys no query of the
// block may see are skipped, not masked: on the tiny model's training batch (text prompt, then
// an image, then padding) the kernel reads only part of the dense L × L scores.
//
// Forward, per block: S = (scale·Q_blk) Kᵀ over 16 keys at a time from a transposed copy of K
// (R accumulators, one broadcast-FMA per row and head element), the mask, the row max and
// exp/sum in place (exp_simd: our vectorisable exp, cpu_simd.h), then O = P V with R × Dh/16
// accumulators while each V row is loaded once. No online softmax: one row of scores is at most L
// floats, so the block's scores stay in L1/L2 and every row is normalised once.
// Backward (FlashAttention-2's algebra, D_i = dO_i · O_i): the block's S and dP = dO Vᵀ in one
// pass over 16 keys, P = exp(S − lse), dS = P ∘ (dP − D), then dQ_blk = scale · dS K (each key row
// loaded once for the block) and, 16 keys at a time with the block's dS and P columns in
// registers, dKᵀ += (scale·Q_blk)ᵀ dS and dVᵀ += dO_blkᵀ P into the pair's transposed fp32
// accumulators (per thread, [Dh, L]; one load and store per accumulator vector and row block, a
// quarter of the loads of row-wise accumulation); nothing is atomic.
//
// benchmarks/bench_attention.py times it against torch's SDPA with the boolean mask (its flash CPU
// kernel); docs/results.md has the figures.
#include "attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "unif2ace/cpu_simd.h"

namespace unif2ace {
namespace {

using cpu::exp_range;
using cpu::exp_simd;
using cpu::ExpRange;

// 16 floats; GCC lowers the arithmetic to one zmm (AVX-512 clone), two ymm or four xmm.
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // unaligned loads/stores
#define U2A_LOAD(p) (*reinterpret_cast<const v16u*>(p))
#define U2A_STORE(p, x) (*reinterpret_cast<v16u*>(p) = (x))

constexpr int64_t kLanes = 16;

inline int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// Rows per query block: R × Dh/16 accumulators stay within the 32 AVX-512 registers.
constexpr int rows_for(int64_t Dh) { return Dh <= 32 ? 8 : (Dh == 64 ? 4 : 2); }

// Per-thread scratch, sized for one (sequence, head) pair and reused for every pair a thread runs.
struct Scratch {
  std::vector<float> kt, vt, dka, dva, s, ds;  // dka, dva: dKᵀ, dVᵀ accumulators [Dh][Lp]
  std::vector<float> kr;                       // backward: the rotated K rows [L][Dh]
  std::vector<uint8_t> kv;  // key_valid row, zero-padded to Lp (the simd loops read whole vectors)
  Scratch(int64_t L, int64_t Dh, bool backward)
      : kt(Dh * round_up(L)), vt(backward ? Dh * round_up(L) : 0),
        dka(backward ? Dh * round_up(L) : 0), dva(backward ? Dh * round_up(L) : 0),
        s(rows_for(Dh) * round_up(L)), ds(backward ? rows_for(Dh) * round_up(L) : 0),
        kr(backward ? L * Dh : 0), kv(round_up(L), 0) {}
};

// Keys of the block [i0, i0 + nr): [0, hi), hi = max over rows of max(limit, i + 1), within [1, L].
inline int64_t block_keys(const int32_t* lim, int64_t i0, int nr, int64_t L) {
  int64_t hi = 0;
  for (int r = 0; r < nr; ++r) hi = std::max<int64_t>(hi, std::max<int64_t>(lim[i0 + r], i0 + r + 1));
  return std::min(hi, L);
}

// Rotary position embedding of one sequence (rotate-half convention, transformers' Phi): the
// first 2·half elements of a row at position-table row i turn by the angles whose cos / sin are
// cos[i·half + d], sin[i·half + d]; half = 0: none.
struct Rope {
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t half = 0;
};

// dst = mul · rope(x row i), Dh elements.
U2A_ALWAYS_INLINE void load_row(const float* x, int64_t i, const Rope& rp, int64_t Dh, float mul,
                                float* dst) {
  for (int64_t d = 0; d < Dh; ++d) dst[d] = x[d] * mul;
  const int64_t h = rp.half;
  const float *c = rp.cos + i * h, *sn = rp.sin + i * h;
  for (int64_t d = 0; d < h; ++d) {
    const float a = x[d], b = x[d + h];
    dst[d] = (a * c[d] - b * sn[d]) * mul;
    dst[d + h] = (b * c[d] + a * sn[d]) * mul;
  }
}

// The gradient through the rotation, in place: g = ropeᵀ(g) for row i.
U2A_ALWAYS_INLINE void unrotate_row(float* g, int64_t i, const Rope& rp) {
  const int64_t h = rp.half;
  const float *c = rp.cos + i * h, *sn = rp.sin + i * h;
  for (int64_t d = 0; d < h; ++d) {
    const float a = g[d], b = g[d + h];
    g[d] = a * c[d] + b * sn[d];
    g[d + h] = b * c[d] - a * sn[d];
  }
}

// Transposed copy of one head's [L, Dh] rows (rotated by rp) into t[Dh][Lp], zero columns
// beyond L; rows: a [L, Dh] copy of the rotated rows as well, or nullptr. Inlined into each SIMD
// clone of the caller (the rotation then contracts to FMAs there); see also rotated_keys below.
U2A_ALWAYS_INLINE void transpose_head(const float* x, int64_t sl, int64_t L, int64_t Dh,
                                      const Rope& rp, float* t, float* rows) {
  const int64_t Lp = round_up(L);
  float tmp[128];
  for (int64_t j = 0; j < L; ++j) {
    float* r = rows ? rows + j * Dh : tmp;
    load_row(x + j * sl, j, rp, Dh, 1.f, r);
    for (int64_t d = 0; d < Dh; ++d) t[d * Lp + j] = r[d];
  }
  for (int64_t d = 0; d < Dh; ++d)
    for (int64_t j = L; j < Lp; ++j) t[d * Lp + j] = 0.f;
}

// The backward's transposed copy of the rotated K rows (and the rows themselves, for dQ), kept out
// of line: compiled once for the baseline target, so the rotation's rounding (no FMA contraction)
// does not depend on the SIMD clone that calls it or on the inliner's budget. The backward's
// gradients have always been computed this way; the forward rotates K inline.
__attribute__((noinline)) void rotated_keys(const float* k, int64_t sl, int64_t L, int64_t Dh,
                                            const Rope& rp, float* t, float* rows) {
  transpose_head(k, sl, L, Dh, rp, t, rows);
}

// Bitwise, not && / || (no control flow in the simd loops); kv is padded to Lp, so reading kv[j]
// unconditionally is in bounds.
inline bool allowed(int64_t i, int64_t j, int64_t li, const uint8_t* kv) {
  return ((j < li) & (kv[j] != 0)) | (j == i);
}

template <int DH>
__attribute__((target_clones("avx512f", "avx2,fma", "default"))) void fwd_pair(
    const float* q, const float* k, const float* v, int64_t sl_q, int64_t sl_k, int64_t sl_v,
    int64_t L, const int32_t* lim, const Rope& rp, float scale, float* out, int64_t sl_o,
    float* lse, Scratch& w) {
  constexpr int R = rows_for(DH);
  const int64_t Lp = round_up(L);
  const ExpRange er = exp_range();
  float* kt = w.kt.data();
  float* s = w.s.data();
  const uint8_t* kv = w.kv.data();
  transpose_head(k, sl_k, L, DH, rp, kt, nullptr);
  for (int64_t i0 = 0; i0 < L; i0 += R) {
    const int nr = static_cast<int>(std::min<int64_t>(R, L - i0));
    const int64_t hi = block_keys(lim, i0, nr, L), hp = round_up(hi);
    float qs[R][DH];
    for (int r = 0; r < R; ++r) {
      if (r < nr)
        load_row(q + (i0 + r) * sl_q, i0 + r, rp, DH, scale, qs[r]);
      else
        std::memset(qs[r], 0, sizeof(qs[r]));
    }
    for (int64_t j = 0; j < hp; j += kLanes) {
      v16 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = v16{};
      for (int d = 0; d < DH; ++d) {
        const v16 kk = U2A_LOAD(kt + d * Lp + j);
        for (int r = 0; r < R; ++r) acc[r] += qs[r][d] * kk;
      }
      for (int r = 0; r < R; ++r) U2A_STORE(s + r * Lp + j, acc[r]);
    }
    float inv[R];
    for (int r = 0; r < R; ++r) {
      float* sr = s + r * Lp;
      if (r >= nr) {
        std::memset(sr, 0, sizeof(float) * hp);
        inv[r] = 0.f;
        continue;
      }
      const int64_t i = i0 + r, li = std::min<int64_t>(std::max(lim[i], 0), L);
      float m = -INFINITY;
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < hp; ++j) {
        const float x = allowed(i, j, li, kv) ? sr[j] : -INFINITY;
        sr[j] = x;
        m = x > m ? x : m;
      }
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < hp; ++j) {
        const float e = exp_simd(sr[j] - m, er);
        sr[j] = e;
        sum += e;
      }
      inv[r] = 1.f / sum;
      lse[i] = m + std::log(sum);
    }
    v16 acc[R][DH / kLanes];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < DH / kLanes; ++c) acc[r][c] = v16{};
    for (int64_t j = 0; j < hi; ++j) {
      v16 vv[DH / kLanes];
      for (int c = 0; c < DH / kLanes; ++c) vv[c] = U2A_LOAD(v + j * sl_v + kLanes * c);
      for (int r = 0; r < R; ++r) {
        const float p = s[r * Lp + j];
        for (int c = 0; c < DH / kLanes; ++c) acc[r][c] += p * vv[c];
      }
    }
    for (int r = 0; r < nr; ++r)
      for (int c = 0; c < DH / kLanes; ++c)
        U2A_STORE(out + (i0 + r) * sl_o + kLanes * c, acc[r][c] * inv[r]);
  }
}

template <int DH>
__attribute__((target_clones("avx512f", "avx2,fma", "default"))) void bwd_pair(
    const float* q, const float* k, const float* v, const float* o, const float* go, int64_t sl_q,
    int64_t sl_k, int64_t sl_v, int64_t sl_o, int64_t sl_go, int64_t L, const int32_t* lim,
    const Rope& rp, float scale, const float* lse, float* dq, float* dk, float* dv, int64_t sl_d,
    Scratch& w) {
  constexpr int R = rows_for(DH);
  const int64_t Lp = round_up(L);
  const ExpRange er = exp_range();
  float *kt = w.kt.data(), *vt = w.vt.data(), *dka = w.dka.data(), *dva = w.dva.data();
  float *p = w.s.data(), *ds = w.ds.data(), *kr = w.kr.data();
  const uint8_t* kv = w.kv.data();
  rotated_keys(k, sl_k, L, DH, rp, kt, kr);  // kr: the rotated K rows, for dQ
  transpose_head(v, sl_v, L, DH, Rope{}, vt, nullptr);
  std::memset(dka, 0, sizeof(float) * DH * Lp);
  std::memset(dva, 0, sizeof(float) * DH * Lp);
  for (int64_t i0 = 0; i0 < L; i0 += R) {
    const int nr = static_cast<int>(std::min<int64_t>(R, L - i0));
    const int64_t hi = block_keys(lim, i0, nr, L), hp = round_up(hi);
    float qs[R][DH], dos[R][DH], dr[R];
    for (int r = 0; r < R; ++r) {
      if (r >= nr) {
        std::memset(qs[r], 0, sizeof(qs[r]));
        std::memset(dos[r], 0, sizeof(dos[r]));
        dr[r] = 0.f;
        continue;
      }
      load_row(q + (i0 + r) * sl_q, i0 + r, rp, DH, scale, qs[r]);
      float acc = 0.f;
      for (int d = 0; d < DH; ++d) {
        dos[r][d] = go[(i0 + r) * sl_go + d];
        acc += dos[r][d] * o[(i0 + r) * sl_o + d];
      }
      dr[r] = acc;
    }
    // S (into p) and dP (into ds), 16 keys at a time
    for (int64_t j = 0; j < hp; j += kLanes) {
      v16 as[R], ap[R];
      for (int r = 0; r < R; ++r) as[r] = ap[r] = v16{};
      for (int d = 0; d < DH; ++d) {
        const v16 kk = U2A_LOAD(kt + d * Lp + j), vv = U2A_LOAD(vt + d * Lp + j);
        for (int r = 0; r < R; ++r) {
          as[r] += qs[r][d] * kk;
          ap[r] += dos[r][d] * vv;
        }
      }
      for (int r = 0; r < R; ++r) {
        U2A_STORE(p + r * Lp + j, as[r]);
        U2A_STORE(ds + r * Lp + j, ap[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float *pr = p + r * Lp, *dsr = ds + r * Lp;
      if (r >= nr) {
        std::memset(pr, 0, sizeof(float) * hp);
        std::memset(dsr, 0, sizeof(float) * hp);
        continue;
      }
      const int64_t i = i0 + r, li = std::min<int64_t>(std::max(lim[i], 0), L);
      const float l = lse[i], d_i = dr[r];
      // two passes, each of the forward's vectorisable shape: mask to -inf, then exp (0 there)
#pragma omp simd
      for (int64_t j = 0; j < hp; ++j) pr[j] = allowed(i, j, li, kv) ? pr[j] - l : -INFINITY;
#pragma omp simd
      for (int64_t j = 0; j < hp; ++j) {
        const float pj = exp_simd(pr[j], er);
        pr[j] = pj;
        dsr[j] = pj * (dsr[j] - d_i);
      }
    }
    // dQ_blk = scale · dS K: each key row loaded once for the block's R rows
    v16 qa[R][DH / kLanes];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < DH / kLanes; ++c) qa[r][c] = v16{};
    for (int64_t j = 0; j < hi; ++j) {
      v16 kk[DH / kLanes];
      for (int c = 0; c < DH / kLanes; ++c) kk[c] = U2A_LOAD(kr + j * DH + kLanes * c);
      for (int r = 0; r < R; ++r) {
        const float g = ds[r * Lp + j];
        for (int c = 0; c < DH / kLanes; ++c) qa[r][c] += g * kk[c];
      }
    }
    // dKᵀ += (scale·Q_blk)ᵀ dS and dVᵀ += dO_blkᵀ P, 16 keys at a time: the block's dS and P
    // columns stay in registers, each accumulator vector is loaded and stored once per row block
    for (int64_t j = 0; j < hp; j += kLanes) {
      v16 dsv[R], pv[R];
      for (int r = 0; r < R; ++r) {
        dsv[r] = U2A_LOAD(ds + r * Lp + j);
        pv[r] = U2A_LOAD(p + r * Lp + j);
      }
      for (int d = 0; d < DH; ++d) {
        v16 a = U2A_LOAD(dka + d * Lp + j), b = U2A_LOAD(dva + d * Lp + j);
        for (int r = 0; r < R; ++r) {
          a += qs[r][d] * dsv[r];
          b += dos[r][d] * pv[r];
        }
        U2A_STORE(dka + d * Lp + j, a);
        U2A_STORE(dva + d * Lp + j, b);
      }
    }
    for (int r = 0; r < nr; ++r) {
      float* row = dq + (i0 + r) * sl_d;
      for (int c = 0; c < DH / kLanes; ++c) U2A_STORE(row + kLanes * c, qa[r][c] * scale);
      unrotate_row(row, i0 + r, rp);
    }
  }
  for (int64_t j = 0; j < L; ++j) {
    float *dkr = dk + j * sl_d, *dvr = dv + j * sl_d;
    for (int d = 0; d < DH; ++d) {
      dkr[d] = dka[d * Lp + j];
      dvr[d] = dva[d * Lp + j];
    }
    unrotate_row(dkr, j, rp);
  }
}

Status check_args(const OmniAttentionArgs& a) {
  if (a.B < 0 || a.L < 0 || a.H < 0) return kBadShape;
  if (!omni_attention_supported(a.Dh)) return kBadShape;
  if (a.B * a.L * a.H > 0 && (!a.q.p || !a.k.p || !a.v.p || !a.limit || !a.key_valid))
    return kBadArgument;
  if (a.rope_half < 0 || 2 * a.rope_half > a.Dh) return kBadShape;
  if (a.rope_half > 0 && (!a.rope_cos || !a.rope_sin)) return kBadArgument;
  return kOk;
}

Rope rope_of(const float* cos, const float* sin, int64_t half, int64_t b, int64_t L) {
  if (half == 0) return Rope{};
  return Rope{cos + b * L * half, sin + b * L * half, half};
}

// f(b, h, scratch) for every (sequence, head) pair, pairs spread over the threads; each thread
// allocates its scratch once and fills in the pair's key_valid row.
template <class F>
void for_each_pair(int64_t B, int64_t L, int64_t H, int64_t Dh, const uint8_t* key_valid,
                   bool backward, F&& f) {
  const int64_t pairs = B * H;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), pairs)));
#pragma omp parallel num_threads(nt)
  {
    Scratch w(L, Dh, backward);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < pairs; ++bh) {
      const int64_t b = bh / H;
      for (int64_t j = 0; j < L; ++j) w.kv[j] = key_valid[b * L + j] != 0;
      f(b, bh % H, w);
    }
  }
}

// f(std::integral_constant<int, Dh>{}) for a compiled head size (omni_attention_supported).
template <class F>
void with_head_size(int64_t Dh, F&& f) {
  switch (Dh) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: f(std::integral_constant<int, 128>{});
  }
}

}  // namespace

bool omni_attention_supported(int64_t head_dim) {
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128;
}

Status omni_attention_fwd_cpu(const OmniAttentionArgs& a, float* out, float* lse) {
  if (const Status st = check_args(a); st != kOk) return st;
  const int64_t B = a.B, L = a.L, H = a.H, Dh = a.Dh;
  if (B * L * H == 0) return kOk;
  if (!out || !lse) return kBadArgument;
  for_each_pair(B, L, H, Dh, a.key_valid, false, [&](int64_t b, int64_t h, Scratch& w) {
    const float* qp = a.q.p + b * a.q.sb + h * a.q.sh;
    const float* kp = a.k.p + b * a.k.sb + h * a.k.sh;
    const float* vp = a.v.p + b * a.v.sb + h * a.v.sh;
    float* op = out + (b * L * H + h) * Dh;
    const int32_t* lim = a.limit + b * L;
    float* lp = lse + (b * H + h) * L;
    const Rope rp = rope_of(a.rope_cos, a.rope_sin, a.rope_half, b, L);
    with_head_size(Dh, [&](auto dh) {
      fwd_pair<dh()>(qp, kp, vp, a.q.sl, a.k.sl, a.v.sl, L, lim, rp, a.scale, op, H * Dh, lp, w);
    });
  });
  return kOk;
}

Status omni_attention_bwd_cpu(const OmniAttentionArgs& a, BLHD out, BLHD grad_out,
                              const float* lse, float* dq, float* dk, float* dv) {
  if (const Status st = check_args(a); st != kOk) return st;
  const int64_t B = a.B, L = a.L, H = a.H, Dh = a.Dh;
  if (B * L * H == 0) return kOk;
  if (!out.p || !grad_out.p || !lse || !dq || !dk || !dv) return kBadArgument;
  for_each_pair(B, L, H, Dh, a.key_valid, true, [&](int64_t b, int64_t h, Scratch& w) {
    const float* qp = a.q.p + b * a.q.sb + h * a.q.sh;
    const float* kp = a.k.p + b * a.k.sb + h * a.k.sh;
    const float* vp = a.v.p + b * a.v.sb + h * a.v.sh;
    const float* op = out.p + b * out.sb + h * out.sh;
    const float* gp = grad_out.p + b * grad_out.sb + h * grad_out.sh;
    const int64_t off = (b * L * H + h) * Dh;
    const int32_t* lim = a.limit + b * L;
    const float* lp = lse + (b * H + h) * L;
    const Rope rp = rope_of(a.rope_cos, a.rope_sin, a.rope_half, b, L);
    with_head_size(Dh, [&](auto dh) {
      bwd_pair<dh()>(qp, kp, vp, op, gp, a.q.sl, a.k.sl, a.v.sl, out.sl, grad_out.sl, L, lim, rp,
                     a.scale, lp, dq + off, dk + off, dv + off, H * Dh, w);
    });
  });
  return kOk;
}

}  // namespace unif2ace
