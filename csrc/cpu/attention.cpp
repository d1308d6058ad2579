// Omni-attention, C++ CPU kernels (fp32). Contract: attention.h and the omni-attention op.
//
// One (sequence, head) pair per OpenMP task. A block of queries reads the keys [0, hi) only,
// hi = the largest limit in the block (rounded up to 16), so keys no query of the block may see
// are skipped, not masked: on the model's training batch (text prompt, then an image, then
// padding) the kernels read about three quarters of the dense L × L scores.
//
// Each pair first writes its operands once into per-thread scratch: the rotated, scaled Q rows and
// the rotated K rows (one out-of-line routine, so the forward and the backward see the same
// rounding of the rotation and the backward's recomputed scores are the forward's), and the
// transposed Kᵀ (and Vᵀ) [Dh][Lp], so that 16 keys are one vector. Every product then runs in a
// register-blocked micro-kernel (16 vector accumulators; the AVX-512 clone holds them in zmm
// registers) over contiguous rows:
//   S = Q Kᵀ, dP = dO Vᵀ   4 query rows × 64 keys, one broadcast-FMA per row, element and vector;
//   O = P V, dQ = dS K     R query rows × Dh, each key row loaded once for the R rows;
//   dV = Pᵀ dO, dK = dSᵀ Q 256 / Dh key rows × Dh, each query row loaded once for those keys.
// Masking and exp are one explicit-vector pass over 16 keys at a time (exp_v16: the Cephes expf
// of cpu_simd.h's exp_simd, in vector form).
//
// Forward, per block of R = rows_for(Dh) queries: S over [0, hi), the mask, the row max, exp and
// sum in place, then O = P V and the normalisation. No online softmax: one row of scores is at
// most L floats, so the block's scores stay in L1/L2 and every row is normalised once.
// Backward (FlashAttention-2's algebra, D_i = dO_i · O_i, P = exp(S − lse), dS = P ∘ (dP − D)),
// tiled: a strip of kStrip queries against chunks of kChunk keys. Per chunk, each group of R
// queries whose keys reach into the chunk computes its S and dP tile, P and dS, and adds dS K to
// the strip's dQ (in L1); then the chunk's dV and dK rows take Pᵀ dO and dSᵀ Q summed over the
// strip's active queries, loaded and stored once per strip and chunk. Groups whose keys end
// before a chunk skip it. Everything is per pair and per thread: no atomics, and the result does
// not depend on the thread count.
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

// 16 lanes; GCC lowers the arithmetic to one zmm (AVX-512 clone), two ymm or four xmm.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));    // unaligned loads/stores
typedef int32_t vi16u __attribute__((vector_size(64), aligned(4)));  // unaligned loads
#define U2A_LOAD(p) (*reinterpret_cast<const v16u*>(p))
#define U2A_STORE(p, x) (*reinterpret_cast<v16u*>(p) = (x))
#define U2A_LOADI(p) (*reinterpret_cast<const vi16u*>(p))

constexpr int64_t kLanes = 16;
constexpr int kStrip = 32;  // backward: queries per strip (a multiple of every rows_for)
constexpr int kChunk = 64;  // backward: keys per tile (a multiple of every keys_for)

inline int64_t round_up(int64_t n, int64_t m = kLanes) { return (n + m - 1) / m * m; }

// Query rows per block: R × Dh/16 accumulators in O = P V and dQ = dS K.
constexpr int rows_for(int64_t Dh) { return Dh <= 32 ? 8 : (Dh == 64 ? 4 : 2); }
// Key rows per block of dV = Pᵀ dO and dK = dSᵀ Q: 256 / Dh × Dh/16 = 16 accumulators.
constexpr int keys_for(int64_t Dh) { return static_cast<int>(256 / Dh); }

// Per-thread scratch, sized for one (sequence, head) pair and reused for every pair a thread runs.
// Row buffers have Lr = L rounded up to kStrip rows ([L, Lr) zero); transposed ones are [Dh][Lp].
struct Scratch {
  int64_t Lp, Lr;
  std::vector<float> qs, kr, kt, s;      // rotated, scaled Q rows; rotated K rows; Kᵀ; fwd scores
  std::vector<float> dos, vt, dka, dva;  // backward: dO rows, Vᵀ, dK and dV accumulators (rows)
  std::vector<float> dd, pt, dst, dqa;   // backward: D; the P and dS tiles; the strip's dQ
  std::vector<int32_t> kvm;              // key_valid row as -1 / 0 lanes, zero-padded to Lr
  Scratch(int64_t L, int64_t Dh, bool backward)
      : Lp(round_up(L)), Lr(round_up(L, kStrip)), qs(Lr * Dh), kr(Lr * Dh), kt(Dh * Lp),
        s(backward ? 0 : rows_for(Dh) * Lp), dos(backward ? Lr * Dh : 0),
        vt(backward ? Dh * Lp : 0), dka(backward ? Lr * Dh : 0), dva(backward ? Lr * Dh : 0),
        dd(backward ? Lr : 0), pt(backward ? kStrip * kChunk : 0),
        dst(backward ? kStrip * kChunk : 0), dqa(backward ? kStrip * Dh : 0), kvm(Lr, 0) {}
};

// Keys of the rows [i0, i0 + nr): [0, hi), hi = max over rows of max(limit, i + 1), within [1, L].
inline int64_t block_keys(const int32_t* lim, int64_t i0, int64_t nr, int64_t L) {
  int64_t hi = 0;
  for (int64_t r = 0; r < nr; ++r)
    hi = std::max<int64_t>(hi, std::max<int64_t>(lim[i0 + r], i0 + r + 1));
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

// dst[j] = mul · rope(x row j) for j < L (row stride sl), Dh floats each, contiguous; rows
// [L, rows) zero. Out of line and compiled once for the baseline target: the rotation's rounding
// (no FMA contraction) is the same in the forward and the backward, whichever SIMD clone calls it.
__attribute__((noinline)) void prep_rows(const float* x, int64_t sl, int64_t L, int64_t rows,
                                         int64_t Dh, const Rope& rp, float mul, float* dst) {
  for (int64_t j = 0; j < L; ++j) load_row(x + j * sl, j, rp, Dh, mul, dst + j * Dh);
  std::memset(dst + L * Dh, 0, sizeof(float) * (rows - L) * Dh);
}

// t[d][j] = rows[j][d] for j < Lp (rows holds at least Lp rows of DH floats).
template <int DH>
U2A_ALWAYS_INLINE void transpose_rows(const float* rows, int64_t Lp, float* t) {
  for (int64_t j0 = 0; j0 < Lp; j0 += kLanes)
    for (int d = 0; d < DH; ++d) {
      v16 x;
      for (int u = 0; u < kLanes; ++u) x[u] = rows[(j0 + u) * DH + d];
      U2A_STORE(t + d * Lp + j0, x);
    }
}

// exp of 16 lanes: exp_simd (cpu_simd.h: Cephes expf, the clamp to [-88, 89] its only special
// case; -inf gives 0, NaN stays NaN) with vector selects instead of scalar ones.
U2A_ALWAYS_INLINE void exp_v16(v16& x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kBias = 12582912.f + 127.f;
  const v16 lo = v16{} - 88.f, hi = v16{} + 89.f;
  v16 xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const v16 t = xc * kLog2e + kBias;
  const v16 n = t - kBias;
  const v16 r = (xc - n * kLn2Hi) - n * kLn2Lo;
  v16 p = v16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  x = p * reinterpret_cast<v16>(reinterpret_cast<vu16>(t) << 23);
}

// Which of the keys [j, j + 16) query i (limit li) may see: ((j < li) and key_valid) or j == i,
// as -1 / 0 lanes; kvm is key_valid as -1 / 0, padded to a whole vector.
U2A_ALWAYS_INLINE void allowed_v(int64_t j, int32_t i, int32_t li, const int32_t* kvm, vi16& ok) {
  const vi16 jv = vi16{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} +
                  static_cast<int32_t>(j);
  ok = ((jv < li) & U2A_LOADI(kvm + j)) | (jv == i);
}

U2A_ALWAYS_INLINE float hmax(const v16& x) {
  float m = x[0];
  for (int u = 1; u < kLanes; ++u) m = x[u] > m ? x[u] : m;
  return m;
}

U2A_ALWAYS_INLINE float hsum(const v16& x) {
  float s = 0.f;
  for (int u = 0; u < kLanes; ++u) s += x[u];
  return s;
}

// c[r][0, 16·NC) = Σ_d a[r][d] · bt[d][0, 16·NC) for r < NR: rows a (DH floats each,
// contiguous) against 16·NC transposed columns (row stride ldb); c has row stride ldc.
template <int DH, int NR, int NC>
U2A_ALWAYS_INLINE void tile_abt(const float* a, const float* bt, int64_t ldb, float* c,
                                int64_t ldc) {
  v16 acc[NR][NC];
  for (int r = 0; r < NR; ++r)
    for (int k = 0; k < NC; ++k) acc[r][k] = v16{};
  for (int d = 0; d < DH; ++d) {
    v16 b[NC];
    for (int k = 0; k < NC; ++k) b[k] = U2A_LOAD(bt + d * ldb + kLanes * k);
    for (int r = 0; r < NR; ++r) {
      const float x = a[r * DH + d];
      for (int k = 0; k < NC; ++k) acc[r][k] += x * b[k];
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int k = 0; k < NC; ++k) U2A_STORE(c + r * ldc + kLanes * k, acc[r][k]);
}

// tile_abt over n columns (a multiple of 16): 64 at a time, then the rest.
template <int DH, int NR>
U2A_ALWAYS_INLINE void rows_abt(const float* a, const float* bt, int64_t ldb, int64_t n, float* c,
                                int64_t ldc) {
  int64_t j = 0;
  for (; j + 4 * kLanes <= n; j += 4 * kLanes) tile_abt<DH, NR, 4>(a, bt + j, ldb, c + j, ldc);
  switch ((n - j) / kLanes) {
    case 3: tile_abt<DH, NR, 3>(a, bt + j, ldb, c + j, ldc); break;
    case 2: tile_abt<DH, NR, 2>(a, bt + j, ldb, c + j, ldc); break;
    case 1: tile_abt<DH, NR, 1>(a, bt + j, ldb, c + j, ldc); break;
    default: break;
  }
}

// R rows of a (stride DH) against the columns [0, n) of bt: rows_abt in groups of 4 rows.
template <int DH, int R>
U2A_ALWAYS_INLINE void block_abt(const float* a, const float* bt, int64_t ldb, int64_t n,
                                 float* c, int64_t ldc) {
  constexpr int NR = R < 4 ? R : 4;
  for (int r = 0; r < R; r += NR) rows_abt<DH, NR>(a + r * DH, bt, ldb, n, c + r * ldc, ldc);
}

// c[r][:] += Σ_{j<n} a[r][j] · b[j][:] for r < NR: c [NR][DH] contiguous, a row stride lda, b
// row stride ldb. Each row of b is loaded once for the NR rows.
template <int DH, int NR>
U2A_ALWAYS_INLINE void acc_ab(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t n,
                              float* c) {
  constexpr int C = DH / kLanes;
  v16 acc[NR][C];
  for (int r = 0; r < NR; ++r)
    for (int k = 0; k < C; ++k) acc[r][k] = U2A_LOAD(c + r * DH + kLanes * k);
  for (int64_t j = 0; j < n; ++j) {
    v16 bv[C];
    for (int k = 0; k < C; ++k) bv[k] = U2A_LOAD(b + j * ldb + kLanes * k);
    for (int r = 0; r < NR; ++r) {
      const float x = a[r * lda + j];
      for (int k = 0; k < C; ++k) acc[r][k] += x * bv[k];
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int k = 0; k < C; ++k) U2A_STORE(c + r * DH + kLanes * k, acc[r][k]);
}

// c[j][:] += Σ_t a[rows[t]][j] · b[rows[t]][:] for j < NJ: c [NJ][DH] contiguous, a row stride
// lda, b contiguous rows. Each row of b is loaded once for the NJ rows of c.
template <int DH, int NJ>
U2A_ALWAYS_INLINE void acc_atb(const float* a, int64_t lda, const float* b, const int* rows,
                               int n, float* c) {
  constexpr int C = DH / kLanes;
  v16 acc[NJ][C];
  for (int j = 0; j < NJ; ++j)
    for (int k = 0; k < C; ++k) acc[j][k] = U2A_LOAD(c + j * DH + kLanes * k);
  for (int t = 0; t < n; ++t) {
    const int r = rows[t];
    v16 bv[C];
    for (int k = 0; k < C; ++k) bv[k] = U2A_LOAD(b + r * DH + kLanes * k);
    const float* ar = a + r * lda;
    for (int j = 0; j < NJ; ++j) {
      const float x = ar[j];
      for (int k = 0; k < C; ++k) acc[j][k] += x * bv[k];
    }
  }
  for (int j = 0; j < NJ; ++j)
    for (int k = 0; k < C; ++k) U2A_STORE(c + j * DH + kLanes * k, acc[j][k]);
}

// One copy per instruction set, the best this CPU runs chosen at load time: AVX-512, x86-64-v3
// (AVX2 with FMA: one clone, where "avx2,fma" would make an AVX2 clone without FMA and a separate
// FMA one) and the baseline.
template <int DH>
__attribute__((target_clones("avx512f", "arch=x86-64-v3", "default"))) void fwd_pair(
    const float* q, const float* k, const float* v, int64_t sl_q, int64_t sl_k, int64_t sl_v,
    int64_t L, const int32_t* lim, const Rope& rp, float scale, float* out, int64_t sl_o,
    float* lse, Scratch& w) {
  constexpr int R = rows_for(DH), C = DH / kLanes;
  const int64_t Lp = w.Lp, Lr = w.Lr;
  float *qs = w.qs.data(), *kr = w.kr.data(), *kt = w.kt.data(), *s = w.s.data();
  const int32_t* kvm = w.kvm.data();
  prep_rows(q, sl_q, L, Lr, DH, rp, scale, qs);
  prep_rows(k, sl_k, L, Lr, DH, rp, 1.f, kr);
  transpose_rows<DH>(kr, Lp, kt);
  const v16 ninf = v16{} - INFINITY;
  for (int64_t i0 = 0; i0 < L; i0 += R) {
    const int nr = static_cast<int>(std::min<int64_t>(R, L - i0));
    const int64_t hi = block_keys(lim, i0, nr, L), hp = round_up(hi);
    block_abt<DH, R>(qs + i0 * DH, kt, Lp, hp, s, Lp);
    float inv[R];
    for (int r = 0; r < R; ++r) {
      float* sr = s + r * Lp;
      if (r >= nr) {
        std::memset(sr, 0, sizeof(float) * hp);
        inv[r] = 0.f;
        continue;
      }
      const int32_t i = static_cast<int32_t>(i0 + r);
      const int32_t li = static_cast<int32_t>(std::min<int64_t>(std::max(lim[i], 0), L));
      v16 mv = ninf;
      for (int64_t j = 0; j < hp; j += kLanes) {
        vi16 ok;
        allowed_v(j, i, li, kvm, ok);
        const v16 x = ok ? v16(U2A_LOAD(sr + j)) : ninf;
        U2A_STORE(sr + j, x);
        mv = x > mv ? x : mv;
      }
      const float m = hmax(mv);
      v16 sv = v16{};
      for (int64_t j = 0; j < hp; j += kLanes) {
        v16 e = U2A_LOAD(sr + j) - m;
        exp_v16(e);
        U2A_STORE(sr + j, e);
        sv += e;
      }
      const float sum = hsum(sv);
      inv[r] = 1.f / sum;
      lse[i] = m + std::log(sum);
    }
    float o[R * DH];
    std::memset(o, 0, sizeof(o));
    acc_ab<DH, R>(s, Lp, v, sl_v, hi, o);
    for (int r = 0; r < nr; ++r)
      for (int c = 0; c < C; ++c)
        U2A_STORE(out + (i0 + r) * sl_o + kLanes * c, U2A_LOAD(o + r * DH + kLanes * c) * inv[r]);
  }
}

template <int DH>
__attribute__((target_clones("avx512f", "arch=x86-64-v3", "default"))) void bwd_pair(
    const float* q, const float* k, const float* v, const float* o, const float* go, int64_t sl_q,
    int64_t sl_k, int64_t sl_v, int64_t sl_o, int64_t sl_go, int64_t L, const int32_t* lim,
    const Rope& rp, float scale, const float* lse, float* dq, float* dk, float* dv, int64_t sl_d,
    Scratch& w) {
  constexpr int R = rows_for(DH), NJ = keys_for(DH);
  const int64_t Lp = w.Lp, Lr = w.Lr;
  float *qs = w.qs.data(), *kr = w.kr.data(), *kt = w.kt.data(), *vt = w.vt.data();
  float *dos = w.dos.data(), *dka = w.dka.data(), *dva = w.dva.data(), *dd = w.dd.data();
  float *pt = w.pt.data(), *dst = w.dst.data(), *dqa = w.dqa.data();
  const int32_t* kvm = w.kvm.data();
  prep_rows(q, sl_q, L, Lr, DH, rp, scale, qs);
  prep_rows(k, sl_k, L, Lr, DH, rp, 1.f, kr);
  transpose_rows<DH>(kr, Lp, kt);
  prep_rows(v, sl_v, L, Lr, DH, Rope{}, 1.f, dva);  // V rows, borrowing dV's accumulator
  transpose_rows<DH>(dva, Lp, vt);
  prep_rows(go, sl_go, L, Lr, DH, Rope{}, 1.f, dos);
  for (int64_t i = 0; i < Lr; ++i) {  // D_i = dO_i · O_i
    v16 acc = v16{};
    if (i < L)
      for (int c = 0; c < DH / kLanes; ++c)
        acc += U2A_LOAD(dos + i * DH + kLanes * c) * U2A_LOAD(o + i * sl_o + kLanes * c);
    dd[i] = hsum(acc);
  }
  std::memset(dka, 0, sizeof(float) * Lr * DH);
  std::memset(dva, 0, sizeof(float) * Lr * DH);
  const v16 ninf = v16{} - INFINITY;
  constexpr int G = kStrip / R;  // row groups per strip
  for (int64_t i0 = 0; i0 < L; i0 += kStrip) {
    const int nr = static_cast<int>(std::min<int64_t>(kStrip, L - i0));
    int64_t gp[G];  // each group's keys: [0, gp), gp a multiple of 16 (0: no row there)
    int64_t hp = 0;
    for (int g = 0; g < G; ++g) {
      const int64_t r0 = static_cast<int64_t>(g) * R;
      gp[g] = r0 < nr ? round_up(block_keys(lim, i0 + r0, std::min<int64_t>(R, nr - r0), L)) : 0;
      hp = std::max(hp, gp[g]);
    }
    std::memset(dqa, 0, sizeof(float) * kStrip * DH);
    for (int64_t j0 = 0; j0 < hp; j0 += kChunk) {
      const int64_t jn = std::min<int64_t>(kChunk, hp - j0);
      int rows[kStrip], na = 0;  // the strip's rows whose group reaches into this chunk
      for (int g = 0; g < G; ++g) {
        const int64_t kn = std::min(jn, gp[g] - j0);
        if (kn <= 0) continue;
        const int r0 = g * R;
        float *pg = pt + r0 * kChunk, *dg = dst + r0 * kChunk;
        block_abt<DH, R>(qs + (i0 + r0) * DH, kt + j0, Lp, kn, pg, kChunk);
        block_abt<DH, R>(dos + (i0 + r0) * DH, vt + j0, Lp, kn, dg, kChunk);
        for (int r = 0; r < R; ++r) {
          const int64_t ii = i0 + r0 + r;
          const bool real = ii < L;  // rows past L: zero operands, every key masked, P = dS = 0
          const int32_t i = real ? static_cast<int32_t>(ii) : -1;
          const int32_t li =
              real ? static_cast<int32_t>(std::min<int64_t>(std::max(lim[ii], 0), L)) : 0;
          const float l = real ? lse[ii] : 0.f, di = dd[i0 + r0 + r];
          float *pr = pg + r * kChunk, *dr = dg + r * kChunk;
          for (int64_t j = 0; j < kn; j += kLanes) {
            vi16 ok;
            allowed_v(j0 + j, i, li, kvm, ok);
            v16 p = ok ? v16(U2A_LOAD(pr + j) - l) : ninf;
            exp_v16(p);
            U2A_STORE(pr + j, p);
            U2A_STORE(dr + j, p * (U2A_LOAD(dr + j) - di));
          }
          for (int64_t j = kn; j < jn; j += kLanes) {
            U2A_STORE(pr + j, v16{});
            U2A_STORE(dr + j, v16{});
          }
          if (r0 + r < nr) rows[na++] = r0 + r;
        }
        acc_ab<DH, R>(dg, kChunk, kr + j0 * DH, DH, kn, dqa + r0 * DH);
      }
      for (int64_t j = 0; j < jn; j += NJ) {
        acc_atb<DH, NJ>(pt + j, kChunk, dos + i0 * DH, rows, na, dva + (j0 + j) * DH);
        acc_atb<DH, NJ>(dst + j, kChunk, qs + i0 * DH, rows, na, dka + (j0 + j) * DH);
      }
    }
    for (int r = 0; r < nr; ++r) {
      float* row = dq + (i0 + r) * sl_d;
      for (int c = 0; c < DH / kLanes; ++c)
        U2A_STORE(row + kLanes * c, U2A_LOAD(dqa + r * DH + kLanes * c) * scale);
      unrotate_row(row, i0 + r, rp);
    }
  }
  for (int64_t j = 0; j < L; ++j) {
    float *dkr = dk + j * sl_d, *dvr = dv + j * sl_d;
    std::memcpy(dkr, dka + j * DH, sizeof(float) * DH);
    std::memcpy(dvr, dva + j * DH, sizeof(float) * DH);
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
  const int nt =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), pairs)));
#pragma omp parallel num_threads(nt)
  {
    Scratch w(L, Dh, backward);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < pairs; ++bh) {
      const int64_t b = bh / H;
      for (int64_t j = 0; j < L; ++j) w.kvm[j] = key_valid[b * L + j] != 0 ? -1 : 0;
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
