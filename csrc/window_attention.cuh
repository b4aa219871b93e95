// Device-side addressing shared by the forward and backward window-attention kernels: where the q / k /
// v / out rows of token n of window w, head h live, for both layouts.
#pragma once

#include "common.cuh"
#include "kernels.h"

namespace esvit {

// Head-dim template: the smallest of 16, 32, 64, 128 that holds hd.
inline int padded_head_dim(int hd) { return hd <= 16 ? 16 : hd <= 32 ? 32 : hd <= 64 ? 64 : 128; }

// Per-window token table, built once per window in shared memory (n < N):
//   pix[n]   source pixel y*W + x of the token in its image (map layout), -1 for a padding token;
//            n itself in the windows layout
//   label[n] shift-mask region label (always 0 in the windows layout: its mask is a tensor)
//   koff[n]  rel_key_offset(n), qbase[n] = rel_query_base(n): bias row of (i, j) = qbase[i] - koff[j]
struct TokenTable {
  int* pix;
  int* label;
  int* koff;
  int* qbase;

  __device__ __forceinline__ void build(const WinArgs& a, int w, int n) const {
    if (a.map) {
      const TokenInfo ti = map_token(a.geom, w % a.nW, n);
      pix[n] = ti.pix;
      label[n] = ti.label;
    } else {
      pix[n] = n;
      label[n] = 0;
    }
    koff[n] = rel_key_offset(n, a.Ww);
    qbase[n] = rel_query_base(n, a.Wh, a.Ww);
  }
};

// Row pointers of one token (element offset of channel h*hd within the token's row). `part` is 0, 1, 2
// for q, k, v. Returns nullptr for a padding token without a pad vector (its row reads as zeros).
template <typename T>
__device__ __forceinline__ const T* qkv_row(const WinArgs& a, int part, int w, int h, int n, int pix) {
  if (a.map) {
    const int64_t ch = (int64_t)part * a.C + (int64_t)h * a.hd;
    if (pix < 0) return a.pad ? static_cast<const T*>(a.pad) + ch : nullptr;
    const int64_t img = w / a.nW;
    return static_cast<const T*>(a.qkv) + ((img * a.geom.H * a.geom.W + pix) * 3 * a.C + ch);
  }
  const int64_t* s = part == 0 ? a.sq : part == 1 ? a.sk : a.sv;
  const void* base = part == 0 ? a.q : part == 1 ? a.k : a.v;
  return static_cast<const T*>(base) + (w * s[0] + h * s[1] + n * s[2]);
}

// Offset of token n's head-h row in an output-shaped tensor: (B, H, W, C) in the map layout (padding
// tokens have none: callers skip pix < 0), windows layout strides s otherwise.
__device__ __forceinline__ int64_t out_row(const WinArgs& a, const int64_t* s, int w, int h, int n, int pix) {
  if (a.map) {
    const int64_t img = w / a.nW;
    return (img * a.geom.H * a.geom.W + pix) * a.C + (int64_t)h * a.hd;
  }
  return w * s[0] + h * s[1] + n * s[2];
}

// Row of qkv-shaped gradient for token n (map layout: dqkv; windows layout: dq / dk / dv laid out like out).
template <typename T>
__device__ __forceinline__ T* grad_row(const WinArgs& a, int part, int w, int h, int n, int pix) {
  if (a.map) {
    const int64_t img = w / a.nW;
    return static_cast<T*>(a.dqkv) + ((img * a.geom.H * a.geom.W + pix) * 3 * a.C + (int64_t)part * a.C +
                                      (int64_t)h * a.hd);
  }
  void* base = part == 0 ? a.dq : part == 1 ? a.dk : a.dv;
  return static_cast<T*>(base) + (w * a.so[0] + h * a.so[1] + n * a.so[2]);
}

// The additive logit term of pair (i, j) other than q.k: bias + shift mask (map) or mask tensor (windows).
__device__ __forceinline__ float logit_add(const WinArgs& a, const float* bias_s, const TokenTable& tt,
                                           int w, int i, int j) {
  float add = 0.f;
  if (a.bias) add = bias_s[tt.qbase[i] - tt.koff[j]];
  if (tt.label[i] != tt.label[j]) add -= 100.f;
  if (a.mask) add += load_any(a.mask, a.mask_dtype, (w % a.mask_nw) * a.smask[0] + i * a.smask[1] + j);
  return add;
}

}  // namespace esvit
