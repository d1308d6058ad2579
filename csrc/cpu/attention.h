// Omni-attention, C++ CPU kernels (fp32): host launchers on raw pointers (no torch, no pybind11).
// The contract (every backend's) is the comment block at the top of python/unif2ace/ops/attention.py.
//
// Query i of sequence b may attend to key j when
//     (j < limit[b, i] and key_valid[b, j])  or  j == i
// which is Show-o's omni-attention with limit = i + 1 for text (causal) and limit = the end of the
// image for image tokens (bidirectional within it), plus padding; causal, prefix-LM and full
// attention are other limits.
#pragma once

#include <cstdint>

#include "unif2ace/common.h"

namespace unif2ace {

// One [B, L, H, Dh] operand: element strides of the batch, sequence and head dimensions; the head
// dimension Dh is contiguous.
struct BLHD {
  const float* p;
  int64_t sb, sl, sh;
};

// Head sizes with a compiled kernel (others: kBadShape; the Python layer falls back to SDPA).
bool omni_attention_supported(int64_t head_dim);

// Forward. q, k, v [B, L, H, Dh]; limit int32 [B, L]; key_valid uint8 [B, L] (0/1), both
// contiguous. rope_cos, rope_sin float32 [B, L, rope_half] contiguous, or rope_half = 0: when
// given, q and k are first turned by the rotary embedding (rotate-half convention: elements d and
// d + half of each head, d < half; 2·half <= Dh). Writes out [B, L, H, Dh] contiguous and lse
// [B, H, L] (the log-sum-exp of each query's scaled scores, for the backward). scale: the score
// multiplier (1/sqrt(Dh) usually).
Status omni_attention_fwd_cpu(BLHD q, BLHD k, BLHD v, int64_t B, int64_t L, int64_t H,
                              int64_t Dh, const int32_t* limit, const uint8_t* key_valid,
                              const float* rope_cos, const float* rope_sin, int64_t rope_half,
                              float scale, float* out, float* lse);

// Backward. out and lse from the forward (out with its own strides), grad_out [B, L, H, Dh].
// Writes dq, dk, dv [B, L, H, Dh] contiguous (each fully written; dq and dk are the gradients of
// the un-rotated inputs).
Status omni_attention_bwd_cpu(BLHD q, BLHD k, BLHD v, BLHD out, BLHD grad_out, int64_t B,
                              int64_t L, int64_t H, int64_t Dh, const int32_t* limit,
                              const uint8_t* key_valid, const float* rope_cos,
                              const float* rope_sin, int64_t rope_half, float scale,
                              const float* lse, float* dq, float* dk, float* dv);

}  // namespace unif2ace
