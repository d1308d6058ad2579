// D3Diff row math shared by every C++/CUDA backend. One place for the formula:
// the kernels only reduce a row to (max, sum of exp, target logit) and call these.
//
// For a row with logits z[0..K), LSE = log sum exp z, clean target x0, ratio a >= 0:
//   CE = LSE - z[x0]
//   u  = LSE - log K
//   SE = a * (CE + e^u - 1 - u)                 (SEDD absorbing score entropy, scale_by_sigma)
//   l  = w_ce * CE + alpha * w_se * SE
//   dl/dz_y = w_ce * p_y + alpha * w_se * a * exp(z_y - log K) - (w_ce + alpha * w_se * a) * [y == x0]
// (e^u * p_y = exp(z_y - log K), so the gradient never forms e^u * p_y as a product of two
//  possibly-overflowing factors.)
#pragma once

#include <cmath>

#include "unif2ace/common.h"

namespace unif2ace {

struct D3DiffRow {
  float lse;        // log-sum-exp of the row
  float loss;       // l (0 for an ignored row)
  float coef_p;     // multiplies p_y = exp(z_y - lse)            (w_ce * scale)
  float coef_e;     // multiplies exp(z_y - log K)                (alpha * w_se * a * scale)
  float coef_t;     // subtracted at the target column            ((w_ce + alpha * w_se * a) * scale)
  bool ignored;     // target == ignore_index: loss 0, gradient 0
};

// m, s: running max and sum of exp(z - m) over the row; zt: the target logit (as float).
// scale: the row's incoming gradient (1 when the gradient is precomputed in the forward).
U2A_HD D3DiffRow d3diff_finalize_row(float m, float s, float zt, int64_t target, int64_t ignore_index,
                                     float a, float w_ce, float w_se, float alpha, float log_k,
                                     float scale) {
  D3DiffRow r;
  r.ignored = (target == ignore_index);
  r.lse = m + logf(s);
  if (r.ignored) {
    r.loss = 0.f;
    r.coef_p = r.coef_e = r.coef_t = 0.f;
    return r;
  }
  const float ce = r.lse - zt;
  const float u = r.lse - log_k;
  // expm1(u) - u is the well-conditioned form of e^u - 1 - u near u = 0.
  const float se = a * (ce + (expm1f(u) - u));
  const float wse = alpha * w_se;
  // alpha * w_se == 0 (mask-only loss) must not turn an overflowing e^u into 0 * inf = NaN.
  r.loss = w_ce * ce + (wse != 0.f ? wse * se : 0.f);
  r.coef_p = w_ce * scale;
  r.coef_e = wse * a * scale;
  r.coef_t = (w_ce + wse * a) * scale;
  return r;
}

// Gradient of one element, given the row's finalised coefficients.
U2A_HD float d3diff_grad_elem(const D3DiffRow& r, float z, float log_k, bool is_target) {
  float g = r.coef_p * expf(z - r.lse);
  if (r.coef_e != 0.f) g += r.coef_e * expf(z - log_k);
  return is_target ? g - r.coef_t : g;
}

}  // namespace unif2ace
