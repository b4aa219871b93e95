// Online (streaming) base-2 log-sum-exp states and their merge, shared by the region-loss kernels and the
// CPU test (csrc/tests/index_check.cpp "lse" mode replays the kernel's split over threads and warps).
#pragma once

#include <math.h>

#include "window_index.h"  // ESVIT_HD

namespace esvit {

// m = running max, l = sum of 2^(value - m). A teacher state also carries acc = sum of 2^(u - m) * x.
struct Lse {
  float m, l;
};

ESVIT_HD Lse lse_empty() { return Lse{-INFINITY, 0.f}; }

// 2^(m_old - m_new), 0 for an empty state (avoids -inf - -inf).
ESVIT_HD float lse_rescale(float m_old, float m_new) { return m_old == -INFINITY ? 0.f : exp2f(m_old - m_new); }

ESVIT_HD void lse_push(Lse& a, float x) {
  if (x > a.m) {
    a.l *= lse_rescale(a.m, x);
    a.m = x;
  }
  a.l += x == -INFINITY ? 0.f : exp2f(x - a.m);
}

// Push teacher value u together with the student value x it weights.
ESVIT_HD void lse_push(Lse& a, float& acc, float u, float x) {
  if (u > a.m) {
    const float c = lse_rescale(a.m, u);
    a.l *= c;
    acc *= c;
    a.m = u;
  }
  const float p = u == -INFINITY ? 0.f : exp2f(u - a.m);
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
