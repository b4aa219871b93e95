// EsViT region loss L_R: mean over student rows r = (b, i) of
//     CE_r = -sum_k softmax((t[b, m_r] - c) / tt)_k * log_softmax(s_r / ts)_k,
// and its gradient with respect to the student logits,
//     dL/ds_rk = g / R * (softmax(s_r / ts)_k - softmax((t[b, m_r] - c) / tt)_k) / ts.
//
// One block per student row streams the row and its matched teacher row over K once (vectorised loads),
// keeping per thread an online log-sum-exp of the student logits and of the teacher logits plus the
// teacher-weighted sum of the student logits; the block then merges the partial states. With base-2
// logits x = s * log2e / ts and u = (t - c) * log2e / tt: CE_r = ln2 * (lse2(x) - sum_k 2^(u_k - lse2(u)) x_k).
// Neither the gathered teacher rows nor a softmax copy is ever written; the backward is a second streaming
// pass from the saved (lse2(x), lse2(u)) of each row. The row losses are averaged by torch (fixed order).
#include <cuda_runtime.h>

#include "common.cuh"
#include "kernels.h"
#include "online_lse.h"

namespace esvit {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    region_loss_fwd_kernel(const T* __restrict__ student, const T* __restrict__ teacher,
                           const int64_t* __restrict__ match, const float* __restrict__ center, int Ts, int Tt,
                           int K, float xs_scale, float u_scale, bool vec, float* __restrict__ row_loss,
                           float* __restrict__ stats) {
  constexpr int V = VecWidth<T>::value;
  const int64_t row = blockIdx.x;
  const int64_t b = row / Ts;
  const T* srow = student + row * K;
  const T* trow = teacher + (b * Tt + match[row]) * K;

  Lse ls = lse_empty(), lt = lse_empty();
  float acc = 0.f, unused = 0.f;
  for (int k0 = threadIdx.x * V; k0 < K; k0 += kThreads * V) {
    float sv[V], tv[V], cv[V];
    load_vec(srow + k0, K - k0, vec, sv);
    load_vec(trow + k0, K - k0, vec, tv);
#pragma unroll
    for (int q = 0; q < V; ++q) cv[q] = k0 + q < K ? center[k0 + q] : 0.f;
#pragma unroll
    for (int q = 0; q < V; ++q) {
      if (k0 + q >= K) break;
      const float x = sv[q] * xs_scale;
      lse_push(ls, x);
      lse_push(lt, acc, (tv[q] - cv[q]) * u_scale, x);
    }
  }

  // Block merge: within each warp by xor shuffles, then thread 0 over the per-warp states (shared memory).
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Lse os{__shfl_xor_sync(0xffffffffu, ls.m, o), __shfl_xor_sync(0xffffffffu, ls.l, o)};
    Lse ot{__shfl_xor_sync(0xffffffffu, lt.m, o), __shfl_xor_sync(0xffffffffu, lt.l, o)};
    const float oacc = __shfl_xor_sync(0xffffffffu, acc, o);
    lse_merge(ls, unused, os, 0.f);
    lse_merge(lt, acc, ot, oacc);
  }
  __shared__ float part[kThreads / 32][5];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    part[warp][0] = ls.m; part[warp][1] = ls.l; part[warp][2] = lt.m; part[warp][3] = lt.l; part[warp][4] = acc;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kThreads / 32; ++w) {
    lse_merge(ls, unused, Lse{part[w][0], part[w][1]}, 0.f);
    lse_merge(lt, acc, Lse{part[w][2], part[w][3]}, part[w][4]);
  }
  const float lse_x = ls.m + log2f(ls.l), lse_u = lt.m + log2f(lt.l);
  row_loss[row] = kLn2 * (lse_x - acc / lt.l);
  stats[2 * row] = lse_x;
  stats[2 * row + 1] = lse_u;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    region_loss_bwd_kernel(const float* __restrict__ grad_loss, const T* __restrict__ student,
                           const T* __restrict__ teacher, const int64_t* __restrict__ match,
                           const float* __restrict__ center, const float* __restrict__ stats, int Ts, int Tt, int K,
                           float xs_scale, float u_scale, float grad_scale, bool vec, T* __restrict__ dstudent) {
  constexpr int V = VecWidth<T>::value;
  const int64_t row = blockIdx.x;
  const int64_t b = row / Ts;
  const T* srow = student + row * K;
  const T* trow = teacher + (b * Tt + match[row]) * K;
  T* drow = dstudent + row * K;
  const float lse_x = stats[2 * row], lse_u = stats[2 * row + 1];
  const float g = grad_loss[0] * grad_scale;  // upstream gradient / (R * ts)
  for (int k0 = threadIdx.x * V; k0 < K; k0 += kThreads * V) {
    float sv[V], tv[V], out[V];
    load_vec(srow + k0, K - k0, vec, sv);
    load_vec(trow + k0, K - k0, vec, tv);
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const float c = k0 + q < K ? center[k0 + q] : 0.f;
      out[q] = g * (exp2f(sv[q] * xs_scale - lse_x) - exp2f((tv[q] - c) * u_scale - lse_u));
    }
    store_vec(drow + k0, K - k0, vec, out);
  }
}

template <typename T>
void fwd_typed(const RegionLossArgs& a, float* row_loss, float* stats, cudaStream_t s) {
  region_loss_fwd_kernel<T><<<(unsigned)a.rows, kThreads, 0, s>>>(
      static_cast<const T*>(a.student), static_cast<const T*>(a.teacher), a.match, a.center, a.Ts, a.Tt, a.K,
      kLog2e / a.student_temp, kLog2e / a.teacher_temp, a.vec, row_loss, stats);
}

template <typename T>
void bwd_typed(const RegionLossArgs& a, const float* grad_loss, const float* stats, void* dstudent, cudaStream_t s) {
  region_loss_bwd_kernel<T><<<(unsigned)a.rows, kThreads, 0, s>>>(
      grad_loss, static_cast<const T*>(a.student), static_cast<const T*>(a.teacher), a.match, a.center, stats,
      a.Ts, a.Tt, a.K, kLog2e / a.student_temp, kLog2e / a.teacher_temp, 1.f / ((float)a.rows * a.student_temp),
      a.vec, static_cast<T*>(dstudent));
}

}  // namespace

void launch_region_loss_fwd(const RegionLossArgs& a, float* row_loss, float* stats, void* stream) {
  if (a.rows == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::kFloat: return fwd_typed<float>(a, row_loss, stats, s);
    case DType::kHalf: return fwd_typed<__half>(a, row_loss, stats, s);
    default: return fwd_typed<__nv_bfloat16>(a, row_loss, stats, s);
  }
}

void launch_region_loss_bwd(const RegionLossArgs& a, const float* grad_loss, const float* stats, void* dstudent,
                            void* stream) {
  if (a.rows == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::kFloat: return bwd_typed<float>(a, grad_loss, stats, dstudent, s);
    case DType::kHalf: return bwd_typed<__half>(a, grad_loss, stats, dstudent, s);
    default: return bwd_typed<__nv_bfloat16>(a, grad_loss, stats, dstudent, s);
  }
}

}  // namespace esvit
