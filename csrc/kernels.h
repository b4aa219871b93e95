// Host <-> kernel interface: argument structs and launchers of the kernels in csrc/*.cu. Plain C++ so
// ops.cpp can include it.
#pragma once

#include <stdint.h>

#include "window_index.h"

namespace esvit {

// Storage dtype of the attention tensors (q/k/v/out/dout/grads all share it).
enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

struct WinArgs {
  // problem
  int bw;      // number of windows, B * nW
  int heads;   //
  int hd;      // head dim (the kernels pad it to the template HD >= hd with zeros)
  int Wh, Ww;  // window
  int N;       // tokens per window, Wh * Ww
  int T;       // bias-table rows, (2Wh - 1)(2Ww - 1)
  float scale;
  DType dtype;
  bool vec;    // every row pointer is 16-byte aligned and hd is a multiple of the vector width

  // map layout (swa_*): (B, H, W, 3C) qkv with the shift / pad / partition done by window_index.h
  bool map;
  MapGeom geom;
  int C;             // heads * hd
  int nW;            // windows per image
  const void* qkv;   // (B, H, W, 3C) contiguous
  const void* pad;   // (3C,) in the storage dtype, or nullptr for zeros
  void* dqkv;        // (B, H, W, 3C) contiguous

  // windows layout (wa_*): (B*nW, heads, N, hd) tensors, unit last stride, strides of dims 0..2 here
  const void *q, *k, *v;
  int64_t sq[3], sk[3], sv[3];
  void *dq, *dk, *dv;  // laid out like `out`
  const void* mask;    // (nW_mask, N, N), unit last stride, or nullptr
  int mask_dtype;      // 0 float32, 1 float16, 2 bfloat16
  int mask_nw;
  int64_t smask[2];

  // both layouts
  const float* bias;   // (T, heads) float32 contiguous, or nullptr
  void* out;           // forward output; map: (B, H, W, C) contiguous
  const void* out_c;   // saved output (backward)
  const void* dout;    // (backward); map: (B, H, W, C) contiguous
  int64_t so[3];       // windows layout strides of out (forward) and of dq, dk, dv (backward)
  int64_t soc[3];      // windows layout strides of the saved output (backward)
  int64_t sdo[3];      // windows layout strides of dout (backward)
  float* lse;          // (bw, heads, N) float32 contiguous
};

// Launchers (stream: the current torch stream, passed as a cudaStream_t cast to void*).
void launch_window_attention_fwd(const WinArgs& a, void* stream);

// Bias / pad gradients: when need_dbias, dbias is (T, heads) float32; when need_dpad (map layout),
// dpad is (3C,) float32. `work` is a float32 scratch buffer of window_attention_bwd_workspace() floats.
void launch_window_attention_bwd(const WinArgs& a, bool need_dbias, bool need_dpad, float* dbias, float* dpad,
                                 float* work, void* stream);
int64_t window_attention_bwd_workspace(const WinArgs& a, bool need_dbias, bool need_dpad);

// Largest dynamic shared memory the kernels ask for (bytes), checked against the device limit by ops.cpp.
int64_t window_attention_fwd_smem(const WinArgs& a);
int64_t window_attention_bwd_smem(const WinArgs& a);

// Region matching: student (B, Ts, D), teacher (B, Tt, D) contiguous, both of `dtype`; out (B, Ts) int64.
void launch_region_match(const void* student, const void* teacher, int64_t* out, int B, int Ts, int Tt, int D,
                         DType dtype, void* stream);

// Region loss: student (R = B*Ts rows of K), teacher (B, Tt, K), both contiguous of `dtype`; match (B, Ts)
// int64 in [0, Tt) (checked by the caller: the kernels trust it); center (K,) float32.
struct RegionLossArgs {
  const void* student;
  const void* teacher;
  const int64_t* match;
  const float* center;
  int64_t rows;  // B * Ts
  int Ts, Tt, K;
  float student_temp, teacher_temp;
  DType dtype;
  bool vec;      // rows 16-byte aligned (K * element size a multiple of 16, aligned pointers)
};

// row_loss (R,) float32 = CE of each row; stats (R, 2) float32 = (lse2 of s*log2e/ts, lse2 of (t-c)*log2e/tt).
void launch_region_loss_fwd(const RegionLossArgs& a, float* row_loss, float* stats, void* stream);
// dstudent (R, K) in `dtype` from the scalar float32 upstream gradient grad_loss (device pointer).
void launch_region_loss_bwd(const RegionLossArgs& a, const float* grad_loss, const float* stats, void* dstudent,
                            void* stream);

}  // namespace esvit
