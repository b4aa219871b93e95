// Window attention forward: out = softmax(scale * q k^T + bias + mask) v and lse, per (window, head).
//
// Design (SIMT, fp32 math): one block per (window, head, block of up to 256 queries), one thread per
// query. The thread keeps its q row (pre-multiplied by scale * log2 e) and its output accumulator in
// registers and runs an online softmax (base 2) over the keys, which the block stages chunk by chunk in
// shared memory as fp32 (all threads then read the same key: a broadcast). The bias column of the head
// and the window's token table (source pixel, shift label, relative offsets) sit in shared memory too, so
// the bias, the shift mask, padding and the cyclic shift cost integer work only; nothing N x N is ever
// stored. Padding tokens (map layout) read the pad vector, take part as keys, and write no output.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>

#include "online_lse.h"
#include "window_attention.cuh"

namespace esvit {
namespace {

constexpr int kMaxRows = 256;        // queries per block
constexpr int kChunkFloats = 4096;   // K (and V) chunk size in floats: chunk keys = 4096 / HD

struct FwdPlan {
  int rows;     // queries per block
  int qblocks;  // blocks per (window, head)
  int chunk;    // keys per shared-memory chunk
  int threads;
  int64_t smem;
};

FwdPlan fwd_plan(const WinArgs& a) {
  FwdPlan p;
  const int HD = padded_head_dim(a.hd);
  p.rows = std::min(a.N, kMaxRows);
  p.qblocks = ceil_div(a.N, p.rows);
  p.chunk = std::min(a.N, kChunkFloats / HD);
  p.threads = ceil_div(p.rows, 32) * 32;
  p.smem = (int64_t)2 * p.chunk * HD * 4 + (int64_t)a.T * 4 + (int64_t)4 * a.N * 4;
  return p;
}

template <typename T, int HD>
__global__ void __launch_bounds__(kMaxRows) window_attention_fwd_kernel(const WinArgs a, const FwdPlan plan) {
  constexpr int V = VecWidth<T>::value;
  static_assert(HD % V == 0 && HD % 4 == 0, "head-dim template must be a multiple of the vector width");
  extern __shared__ float4 smem_f4[];
  float* Ks = reinterpret_cast<float*>(smem_f4);       // [chunk][HD]
  float* Vs = Ks + plan.chunk * HD;                    // [chunk][HD]
  float* bias_s = Vs + plan.chunk * HD;                // [T]: bias column of this head
  int* ints = reinterpret_cast<int*>(bias_s + a.T);
  const TokenTable tt{ints, ints + a.N, ints + 2 * a.N, ints + 3 * a.N};

  const int qb = blockIdx.x % plan.qblocks;
  const int item = blockIdx.x / plan.qblocks;  // (window, head), head fastest
  const int h = item % a.heads;
  const int w = item / a.heads;
  const int tid = threadIdx.x;
  const int N = a.N;

  for (int n = tid; n < N; n += blockDim.x) tt.build(a, w, n);
  if (a.bias)
    for (int t = tid; t < a.T; t += blockDim.x) bias_s[t] = a.bias[(int64_t)t * a.heads + h];
  __syncthreads();

  const int i = qb * plan.rows + tid;
  const bool active = tid < plan.rows && i < N;
  float q[HD], acc[HD];
  float m = -INFINITY, l = 0.f;  // running max (base-2 logits) and sum of exp2
#pragma unroll
  for (int d = 0; d < HD; ++d) acc[d] = 0.f;
  if (active) {
    const T* src = qkv_row<T>(a, 0, w, h, i, tt.pix[i]);
    const float qs = a.scale * kLog2e;
#pragma unroll
    for (int d = 0; d < HD; d += V) load_vec(src ? src + d : src, src ? a.hd - d : 0, a.vec, q + d);
#pragma unroll
    for (int d = 0; d < HD; ++d) q[d] *= qs;
  } else {
#pragma unroll
    for (int d = 0; d < HD; ++d) q[d] = 0.f;
  }

  for (int k0 = 0; k0 < N; k0 += plan.chunk) {
    const int kn = min(plan.chunk, N - k0);
    __syncthreads();  // everyone is done reading the previous chunk
    for (int u = tid; u < kn * (HD / V); u += blockDim.x) {
      const int kk = u / (HD / V), d = (u % (HD / V)) * V;
      const int j = k0 + kk;
      const T* ks = qkv_row<T>(a, 1, w, h, j, tt.pix[j]);
      const T* vs = qkv_row<T>(a, 2, w, h, j, tt.pix[j]);
      load_vec(ks ? ks + d : ks, ks ? a.hd - d : 0, a.vec, Ks + kk * HD + d);
      load_vec(vs ? vs + d : vs, vs ? a.hd - d : 0, a.vec, Vs + kk * HD + d);
    }
    __syncthreads();
    if (!active) continue;
    for (int kk = 0; kk < kn; ++kk) {
      const int j = k0 + kk;
      const float4* kr = reinterpret_cast<const float4*>(Ks + kk * HD);
      float s = 0.f;
#pragma unroll
      for (int d4 = 0; d4 < HD / 4; ++d4) {
        const float4 kv = kr[d4];
        s += q[4 * d4] * kv.x + q[4 * d4 + 1] * kv.y + q[4 * d4 + 2] * kv.z + q[4 * d4 + 3] * kv.w;
      }
      s += logit_add(a, bias_s, tt, w, i, j) * kLog2e;
      if (s > m) {  // new running max: rescale what has been accumulated
        const float corr = exp2f(m - s);
        l *= corr;
#pragma unroll
        for (int d = 0; d < HD; ++d) acc[d] *= corr;
        m = s;
      }
      const float p = softmax_weight(s, m);  // a -inf logit (user mask) weighs 0
      l += p;
      const float4* vr = reinterpret_cast<const float4*>(Vs + kk * HD);
#pragma unroll
      for (int d4 = 0; d4 < HD / 4; ++d4) {
        const float4 vv = vr[d4];
        acc[4 * d4] += p * vv.x;
        acc[4 * d4 + 1] += p * vv.y;
        acc[4 * d4 + 2] += p * vv.z;
        acc[4 * d4 + 3] += p * vv.w;
      }
    }
  }

  if (!active) return;
  a.lse[((int64_t)w * a.heads + h) * N + i] = softmax_lse2(m, l) * kLn2;  // +inf: every key masked
  const int pix = tt.pix[i];
  if (a.map && pix < 0) return;  // padding token: output discarded
  const float inv = softmax_out_scale(l);  // 0 when every key is masked
#pragma unroll
  for (int d = 0; d < HD; ++d) acc[d] *= inv;
  T* dst = static_cast<T*>(a.out) + out_row(a, a.so, w, h, i, pix);
#pragma unroll
  for (int d = 0; d < HD; d += V)
    if (d < a.hd) store_vec(dst + d, a.hd - d, a.vec, acc + d);
}

template <typename T, int HD>
void launch_typed(const WinArgs& a, cudaStream_t stream) {
  const FwdPlan p = fwd_plan(a);
  auto kernel = window_attention_fwd_kernel<T, HD>;
  if (p.smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)p.smem);
    if (err != cudaSuccess) throw std::runtime_error(cudaGetErrorString(err));
  }
  const int64_t blocks = (int64_t)a.bw * a.heads * p.qblocks;
  kernel<<<(unsigned)blocks, p.threads, p.smem, stream>>>(a, p);
}

template <typename T>
void launch_hd(const WinArgs& a, cudaStream_t stream) {
  switch (padded_head_dim(a.hd)) {
    case 16: return launch_typed<T, 16>(a, stream);
    case 32: return launch_typed<T, 32>(a, stream);
    case 64: return launch_typed<T, 64>(a, stream);
    default: return launch_typed<T, 128>(a, stream);
  }
}

}  // namespace

int64_t window_attention_fwd_smem(const WinArgs& a) { return fwd_plan(a).smem; }

void launch_window_attention_fwd(const WinArgs& a, void* stream) {
  if (a.bw == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case DType::kFloat: return launch_hd<float>(a, s);
    case DType::kHalf: return launch_hd<__half>(a, s);
    default: return launch_hd<__nv_bfloat16>(a, s);
  }
}

}  // namespace esvit
