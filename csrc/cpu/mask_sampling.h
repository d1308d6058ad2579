// Discrete-diffusion mask sampling, C++ CPU kernels: launchers on raw pointers (no torch, no
// pybind11). The operands are unif2ace/args.h's; the exact semantics (Philox counters, the Gumbel
// of a word, the selection order) are the launcher contract of the mask-sampling op family.
#pragma once

#include <cstdint>

#include "unif2ace/args.h"
#include "unif2ace/common.h"

namespace unif2ace {

// Training-time masking (OpenMP over rows).
Status mask_tokens_cpu(const MaskTokensArgs& a);

// One MaskGIT / Show-o decode step. Phase 1 (OpenMP over positions): each masked position reads its
// logits once — guidance, temperature, max, then sum of exp and the Gumbel argmax in one more pass
// over a per-thread fp32 row — and writes its token and confidence. Phase 2 (OpenMP over
// sequences): nth_element of the L (confidence, position) pairs, re-mask the first
// clamp(mask_len[b], 0, L).
Status maskgit_step_cpu(const MaskgitStepArgs& a);

// n Gumbel samples of stream 1 at (b = 0, l = 0, columns 0 … n−1) — exactly the noise the step's
// Philox path draws for one position — through the same vectorised code (tail tests).
Status philox_gumbel_cpu(uint64_t seed, uint32_t offset, int64_t n, float* out);

// Instruction-set variant the step kernel runs ("baseline", "avx2_fma", "avx512").
const char* mask_sampling_cpu_simd_level();

}  // namespace unif2ace
