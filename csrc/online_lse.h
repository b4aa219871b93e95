// Online (streaming) base-2 log-sum-exp states and their merge, shared by the region-loss kernels and the
// CPU test (csrc/tests/index_check.cpp "lse" mode replays the kernel's split over threads and warps), and the
// softmax-row rules of the window-attention kernels (their CPU emulation uses the same functions).
#pragma once

#include <math.h>

#include "window_index.h"  // ESVIT_HD

namespace esvit {

// m = running max, l = sum of 2^(value - m). A teacher state also carries acc = sum of 2^(u - m) * x.
struct Lse {
  float m, l;
};

ESVIT_HD Lse lse_empty() { return Lse{-INFINITY, 0.f}; }

// A softmax row from its max m and l = sum 2^(s - m) over its logits s (base 2), a -inf logit weighing 0
// (softmax_weight). A row whose every logit is -inf has l == 0: its output is 0 (softmax_out_scale, the
// factor of sum_j 2^(s_j - m) v_j) and its lse +inf (softmax_lse2), so 2^(s - lse) is 0 for every key in
// the backward and its gradients are 0, as PyTorch's SDPA math path and FlexAttention define such a row.
// float for the kernels, double for the CPU emulation (csrc/tests/index_check.cpp).
ESVIT_HD float exp2_of(float x) { return exp2f(x); }
ESVIT_HD double exp2_of(double x) { return exp2(x); }
ESVIT_HD float log2_of(float x) { return log2f(x); }
ESVIT_HD double log2_of(double x) { return log2(x); }

template <class F>
ESVIT_HD F softmax_weight(F s, F m) { return s == -F(INFINITY) ? F(0) : exp2_of(s - m); }
template <class F>
ESVIT_HD F softmax_out_scale(F l) { return l == F(0) ? F(0) : F(1) / l; }
template <class F>
ESVIT_HD F softmax_lse2(F m, F l) { return l == F(0) ? F(INFINITY) : m + log2_of(l); }

// 2^(m_old - m_new), 0 for an empty state (avoids -inf - -inf).
ESVIT_HD float lse_rescale(float m_old, float m_new) { return m_old == -INFINITY ? 0.f : exp2f(m_old - m_new); }

ESVIT_HD void lse_push(Lse& a, float x) {
  if (x > a.m) {
    a.l *= lse_rescale(a.m, x);
    a.m = x;
  }
  a.l += softmax_weight(x, a.m);
}

// Push teacher value u together with the student value x it weights.
ESVIT_HD void lse_push(Lse& a, float& acc, float u, float x) {
  if (u > a.m) {
    const float c = lse_rescale(a.m, u);
    a.l *= c;
    acc *= c;
    a.m = u;
  }
  const float p = softmax_weight(u, a.m);
  a.l += p;
  acc += p * x;
}

// Merge b (with its acc_b) into a (and acc).
ESVIT_HD void lse_merge(Lse& a, float& acc, const Lse& b, float acc_b) {
  const float m = a.m > b.m ? a.m : b.m;
  if (m == -INFINITY) return;  // both empty
  const float ca = lse_rescale(a.m, m), cb = lse_rescale(b.m, m);
  a.l = a.l * ca + b.l * cb;
  acc = acc * ca + acc_b * cb;
  a.m = m;
}

}  // namespace esvit
