// Omni-attention, C++ CPU kernels (fp32): host launchers on raw pointers (no torch, no pybind11).
// The operands are unif2ace/args.h's OmniAttentionArgs; the contract (every backend's) is the
// omni-attention op's docstring.
//
// Query i of sequence b may attend to key j when
//     (j < limit[b, i] and key_valid[b, j])  or  j == i
// which is Show-o's omni-attention with limit = i + 1 for text (causal) and limit = the end of the
// image for image tokens (bidirectional within it), plus padding; causal, prefix-LM and full
// attention are other limits.
#pragma once

#include <cstdint>

#include "unif2ace/args.h"
#include "unif2ace/common.h"

namespace unif2ace {

// Head sizes with a compiled kernel (others: kBadShape; the Python layer falls back to SDPA).
bool omni_attention_supported(int64_t head_dim);

// Forward: writes out [B, L, H, Dh] contiguous and lse [B, H, L] (the log-sum-exp of each query's
// scaled scores, for the backward).
Status omni_attention_fwd_cpu(const OmniAttentionArgs& a, float* out, float* lse);

// Backward from the forward's out (with its own strides) and lse, and grad_out [B, L, H, Dh].
// Writes dq, dk, dv [B, L, H, Dh] contiguous (each fully written; dq and dk are the gradients of
// the un-rotated inputs).
Status omni_attention_bwd_cpu(const OmniAttentionArgs& a, BLHD out, BLHD grad_out,
                              const float* lse, float* dq, float* dk, float* dv);

}  // namespace unif2ace
