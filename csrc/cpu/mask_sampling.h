// Discrete-diffusion mask sampling, C++ CPU kernels: host launchers on raw pointers (no torch, no
// pybind11). The exact semantics (Philox counters, the Gumbel of a word, the selection order) are
// the launcher contract at the top of python/unif2ace/ops/mask_sampling.py.
#pragma once

#include <cstdint>

#include "unif2ace/common.h"

namespace unif2ace {

// Training-time masking of ids [B, L] (int64, contiguous). mode 0 ("count"): row b masks the
// clamp(n_mask[b], 0, L) positions with the smallest (Philox key, position); mode 1 ("bernoulli"):
// position masked iff float(w0 >> 8) < gamma[b]·2^24. out_ids int64 [B, L] (mask_id where masked,
// else ids), out_mask uint8/bool [B, L]. gamma float32 [B] (read in mode 1), n_mask int64 [B] (read
// in mode 0). OpenMP over rows.
Status mask_tokens_cpu(const int64_t* ids, int64_t B, int64_t L, const float* gamma,
                       const int64_t* n_mask, int64_t mask_id, uint64_t seed, uint32_t offset, int mode,
                       int64_t* out_ids, uint8_t* out_mask);

// One MaskGIT / Show-o decode step. logits [B, L, K] (dtype code `dtype`, element strides
// (stride_b, stride_l, 1)); uncond nullptr or the same shape/dtype with strides (ustride_b,
// ustride_l, 1); ids, out_ids int64 [B, L]; mask_len int64 [B]; gumbel nullptr or float32
// [B, L, K] contiguous; choice nullptr or float32 [B, L]; out_mask uint8 [B, L]; confidence float32
// [B, L]. Phase 1 (OpenMP over positions): each masked position reads its logits once — guidance,
// temperature, max, then sum of exp and the Gumbel argmax in one more pass over a per-thread fp32
// row — and writes its token and confidence. Phase 2 (OpenMP over sequences): nth_element of the L
// (confidence, position) pairs, re-mask the first clamp(mask_len[b], 0, L).
Status maskgit_step_cpu(const void* logits, int64_t B, int64_t L, int64_t K, int64_t stride_b,
                        int64_t stride_l, int dtype, const void* uncond, int64_t ustride_b,
                        int64_t ustride_l, const int64_t* ids, const int64_t* mask_len,
                        int64_t mask_id, double guidance, float inv_temperature,
                        float choice_temperature, uint64_t seed, uint32_t offset,
                        const float* gumbel, const float* choice, int64_t* out_ids,
                        uint8_t* out_mask, float* confidence);

// n Gumbel samples of stream 1 at (b = 0, l = 0, columns 0 … n−1) — exactly the noise the step's
// Philox path draws for one position — through the same vectorised code (tail tests).
Status philox_gumbel_cpu(uint64_t seed, uint32_t offset, int64_t n, float* out);

// Instruction-set variant the step kernel runs ("baseline", "avx2_fma", "avx512").
const char* mask_sampling_cpu_simd_level();

}  // namespace unif2ace
