// Discrete-diffusion mask sampling, CUDA launchers (shared/DESIGN.md §5). Raw pointers in, nothing
// torch, nothing pybind11, no CUDA header: the stream travels as `void*` (a cudaStream_t), so the
// binding file compiles with the host compiler alone.
//
// The semantics are the LAUNCHER CONTRACT at the top of python/unif2ace/ops/mask_sampling.py
// (Philox counter layout, Gumbel from 32 bits, tie rules); unif2ace/philox.h holds the shared
// Philox-4x32-10 and Gumbel transform. Every function launches asynchronously on `stream`, never
// synchronises the host and never allocates device memory (CUDA-graph safe).
#pragma once

#include <cstdint>

namespace unif2ace {

// Training-time masking. ids, out_ids: int64 [B, L]; out_mask: bool [B, L]; all contiguous.
//   mode 0 ("count"):     row b masks the n = clamp(n_mask[b], 0, L) positions with the smallest
//                         (key, l), key = (w0 << 32) | w1 of Philox counter (0, l, b, 4·offset).
//                         n_mask: int64 [B]; gamma unused (may be null).
//   mode 1 ("bernoulli"): masked iff float(w0 >> 8) < gamma[b]·2^24. gamma: float32 [B]; n_mask
//                         unused (may be null).
// out_ids = mask_id where masked, else ids. Returns a Status (unif2ace/common.h).
int mask_tokens_fwd_cuda(const int64_t* ids, int64_t B, int64_t L, const float* gamma,
                         const int64_t* n_mask, int64_t mask_id, uint64_t seed, uint32_t offset,
                         int mode, int64_t* out_ids, bool* out_mask, void* stream);

// Bytes of device workspace maskgit_step_fwd_cuda can use for [B, L, K] logits on the *current*
// device (depends on its SM count): > 0 only for the split-over-K path (few positions, long rows).
// Host-only query, no synchronisation.
int64_t maskgit_step_workspace_bytes_cuda(int64_t B, int64_t L, int64_t K);

// One MaskGIT / Show-o decode step.
//   logits      [B, L, K] of `dtype` (DType), element strides (stride_b, stride_l, 1), read only
//   uncond      nullptr, or [B, L, K] of `dtype` with strides (ustride_b, ustride_l, 1)
//   ids         int64 [B, L] contiguous; known positions are ids != mask_id
//   mask_len    int64 [B]; n = clamp(mask_len[b], 0, L) positions are re-masked per sequence
//   guidance g  z = fp32(1 + g)·cond − fp32(g)·uncond (each product and the difference rounded to
//               fp32, no FMA, as the reference computes it); inv_temperature: fp32 1/T;
//               choice_temperature τ (τ·G_choice skipped when τ == 0)
//   gumbel      nullptr (Philox stream 1) or float32 [B, L, K] contiguous noise
//   choice      nullptr (Philox stream 2) or float32 [B, L] contiguous noise
//   out_ids     int64 [B, L], out_mask bool [B, L], confidence float32 [B, L]: written
//   workspace   device memory of workspace_bytes (16-byte aligned) or nullptr / 0. Fewer bytes than
//               maskgit_step_workspace_bytes_cuda() asks for only means fewer (or no) column
//               splits, never an error.
int maskgit_step_fwd_cuda(const void* logits, int64_t B, int64_t L, int64_t K, int64_t stride_b,
                          int64_t stride_l, int dtype, const void* uncond, int64_t ustride_b,
                          int64_t ustride_l, const int64_t* ids, const int64_t* mask_len,
                          int64_t mask_id, double guidance, float inv_temperature,
                          float choice_temperature, uint64_t seed, uint32_t offset,
                          const float* gumbel, const float* choice, int64_t* out_ids,
                          bool* out_mask, float* confidence, void* workspace,
                          int64_t workspace_bytes, void* stream);

// The CUDA error string of the last kCudaError returned by these launchers on this host thread.
const char* mask_sampling_last_cuda_error();

}  // namespace unif2ace
