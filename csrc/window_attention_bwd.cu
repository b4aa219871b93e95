// Window attention backward: dq, dk, dv (written in the input layout), the bias-table gradient and the
// pad-vector gradient, from dout, the saved output and lse.
//
// Design (SIMT, fp32 math, deterministic): a block of 256 threads owns one head and a group of G
// consecutive windows, which it processes one after the other. Per window it walks 32 x 32 tiles of the
// (query, key) matrix, key block outer, query block inner (FlashAttention-2 order):
//   S / dP tile   P = exp2(S*scale*log2e + add*log2e - lse*log2e), dS = P * (dP - D), D_i = dO_i . O_i
//   dK, dV        accumulated in registers over the query blocks, written once per key block
//   dQ            accumulated in shared memory for the whole window (each element has one owner thread)
//   bias grad     each table row t has one owner thread, which adds the tile's dS over exactly the pairs
//                 with relative index t (window_index.h: for_each_pair_of_row) in a fixed order
//   pad grad      dk / dv of padding keys, summed per (k|v, channel) by one owner thread
// Per-block partial sums of the bias / pad gradient go to a scratch buffer that a second kernel adds up
// in a fixed order, so the result is bitwise reproducible (for a given GPU model: G depends on the SM
// count). Nothing N x N leaves shared memory.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>

#include "window_attention.cuh"

namespace esvit {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 32;  // BQ = BK

struct BwdPlan {
  int G;        // windows per block
  int groups;   // blocks per head
  int np;       // N rounded up to the tile
  int HD;
  int64_t smem;
};

int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) !=
                                                cudaSuccess)
    return 132;
  return sms;
}

BwdPlan bwd_plan(const WinArgs& a) {
  BwdPlan p;
  p.HD = padded_head_dim(a.hd);
  p.np = ceil_div(a.N, kTile) * kTile;
  // Enough blocks to fill the GPU several times over; the rest of the windows are looped over inside a
  // block, which keeps the bias-gradient partials small.
  const int64_t target = (int64_t)8 * sm_count();
  const int64_t per_head = std::max<int64_t>(1, (target + a.heads - 1) / a.heads);
  p.G = (int)std::max<int64_t>(1, (a.bw + per_head - 1) / per_head);
  p.groups = ceil_div(a.bw, p.G);
  const int64_t floats = (int64_t)4 * kTile * (p.HD + 1)  // Ks, Vs, Qs, dOs
                         + (int64_t)2 * kTile * kTile      // Ps, dSs
                         + (int64_t)p.np * p.HD            // dQs
                         + (int64_t)2 * p.np               // lse (base 2), D
                         + (int64_t)2 * a.T                // bias column, bias-gradient owners
                         + (int64_t)2 * p.HD;              // pad-gradient owners
  p.smem = floats * 4 + (int64_t)4 * p.np * 4;             // + token table (4 ints per token)
  return p;
}

template <typename T, int HD>
__device__ __forceinline__ void load_rows(const WinArgs& a, int part, int w, int h, int r0, const int* pix,
                                          bool zero_padding_tokens, float* dst) {
  // Rows r0 .. r0+31 of q / k / v (part 0..2) or of dout (part 3) into dst[32][HD+1], zeros past N.
  constexpr int V = VecWidth<T>::value;
  for (int u = threadIdx.x; u < kTile * (HD / V); u += kThreads) {
    const int rr = u / (HD / V), d = (u % (HD / V)) * V;
    const int n = r0 + rr;
    const T* src = nullptr;
    if (n < a.N) {
      const int p = pix[n];
      if (part == 3) {
        if (!(a.map && p < 0)) src = static_cast<const T*>(a.dout) + out_row(a, a.sdo, w, h, n, p);
      } else if (!(zero_padding_tokens && a.map && p < 0)) {
        src = qkv_row<T>(a, part, w, h, n, p);
      }
    }
    float tmp[V];
    load_vec(src ? src + d : src, src ? a.hd - d : 0, a.vec, tmp);
#pragma unroll
    for (int k = 0; k < V; ++k) dst[rr * (HD + 1) + d + k] = tmp[k];
  }
}

template <typename T, int HD>
__global__ void __launch_bounds__(kThreads)
    window_attention_bwd_kernel(const WinArgs a, const BwdPlan plan, bool need_dbias, bool need_dpad,
                                float* dbias_part, float* dpad_part) {
  constexpr int V = VecWidth<T>::value;
  constexpr int LD = HD + 1;                      // padded row: conflict-free column walks
  constexpr int KV_PER_THREAD = kTile * HD / kThreads;
  static_assert(KV_PER_THREAD * kThreads == kTile * HD, "tile must split evenly over the threads");
  extern __shared__ float4 smem_f4[];
  float* Ks = reinterpret_cast<float*>(smem_f4);  // [32][LD]
  float* Vs = Ks + kTile * LD;
  float* Qs = Vs + kTile * LD;
  float* dOs = Qs + kTile * LD;
  float* Ps = dOs + kTile * LD;                   // [32][32]
  float* dSs = Ps + kTile * kTile;
  float* dQs = dSs + kTile * kTile;               // [np][HD]
  float* lse_s = dQs + plan.np * HD;              // [np], base 2
  float* D_s = lse_s + plan.np;                   // [np]
  float* bias_s = D_s + plan.np;                  // [T]
  float* dbias_acc = bias_s + a.T;                // [T], entry t owned by thread t % 256
  float* dpad_acc = dbias_acc + a.T;              // [2][HD], entry owned by thread = index
  int* ints = reinterpret_cast<int*>(dpad_acc + 2 * HD);
  const TokenTable tt{ints, ints + plan.np, ints + 2 * plan.np, ints + 3 * plan.np};

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int h = blockIdx.y, g = blockIdx.x;
  const int N = a.N;
  const int nb = plan.np / kTile;
  const float sl2 = a.scale * kLog2e;

  for (int t = tid; t < a.T; t += kThreads) {
    bias_s[t] = a.bias ? a.bias[(int64_t)t * a.heads + h] : 0.f;
    dbias_acc[t] = 0.f;
  }
  if (tid < 2 * HD) dpad_acc[tid] = 0.f;

  const int w_end = min(a.bw, (g + 1) * plan.G);
  for (int w = g * plan.G; w < w_end; ++w) {
    __syncthreads();  // the previous window is completely done with the token table and dQs
    for (int n = tid; n < N; n += kThreads) tt.build(a, w, n);
    for (int e = tid; e < plan.np * HD; e += kThreads) dQs[e] = 0.f;
    __syncthreads();

    // lse (to base 2) and D_i = dO_i . O_i, one warp per query; padding queries have dO = 0.
    for (int i = warp; i < N; i += kThreads / 32) {
      const int p = tt.pix[i];
      float dsum = 0.f;
      if (!(a.map && p < 0)) {
        const T* o = static_cast<const T*>(a.out_c) + out_row(a, a.soc, w, h, i, p);
        const T* go = static_cast<const T*>(a.dout) + out_row(a, a.sdo, w, h, i, p);
        for (int d = lane; d < a.hd; d += 32) dsum += to_float(o[d]) * to_float(go[d]);
      }
      dsum = warp_sum(dsum);
      if (lane == 0) {
        D_s[i] = dsum;
        lse_s[i] = a.lse[((int64_t)w * a.heads + h) * N + i] * kLog2e;
      }
    }

    for (int kb = 0; kb < nb; ++kb) {
      const int k0 = kb * kTile;
      load_rows<T, HD>(a, 1, w, h, k0, tt.pix, false, Ks);
      load_rows<T, HD>(a, 2, w, h, k0, tt.pix, false, Vs);
      float dk[KV_PER_THREAD], dv[KV_PER_THREAD];
#pragma unroll
      for (int r = 0; r < KV_PER_THREAD; ++r) dk[r] = dv[r] = 0.f;

      for (int qb = 0; qb < nb; ++qb) {
        const int q0 = qb * kTile;
        load_rows<T, HD>(a, 0, w, h, q0, tt.pix, false, Qs);
        load_rows<T, HD>(a, 3, w, h, q0, tt.pix, true, dOs);
        __syncthreads();  // (A) K, V, Q, dO tiles (and, the first time, lse / D) are in place

        // S and dP: thread (key j = lane, queries warp + 8r).
        {
          float s[4] = {0.f, 0.f, 0.f, 0.f}, dp[4] = {0.f, 0.f, 0.f, 0.f};
          const float* kr = Ks + lane * LD;
          const float* vr = Vs + lane * LD;
#pragma unroll 8
          for (int d = 0; d < HD; ++d) {
            const float kd = kr[d], vd = vr[d];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              s[r] += Qs[(warp + 8 * r) * LD + d] * kd;
              dp[r] += dOs[(warp + 8 * r) * LD + d] * vd;
            }
          }
          const int j = k0 + lane;
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int il = warp + 8 * r, i = q0 + il;
            float p = 0.f, ds = 0.f;
            if (i < N && j < N) {
              const float x = s[r] * sl2 + logit_add(a, bias_s, tt, w, i, j) * kLog2e - lse_s[i];
              p = exp2f(x);
              ds = p * (dp[r] - D_s[i]);
            }
            Ps[il * kTile + lane] = p;
            dSs[il * kTile + lane] = ds;
          }
        }
        __syncthreads();  // (B) P and dS tiles are in place

        // dV += P^T dO, dK += dS^T Q: thread owns (key, channel) pairs e = tid + 256 r.
#pragma unroll
        for (int r = 0; r < KV_PER_THREAD; ++r) {
          const int e = tid + kThreads * r, jl = e / HD, d = e % HD;
          float av = 0.f, ak = 0.f;
#pragma unroll 8
          for (int il = 0; il < kTile; ++il) {
            av += Ps[il * kTile + jl] * dOs[il * LD + d];
            ak += dSs[il * kTile + jl] * Qs[il * LD + d];
          }
          dv[r] += av;
          dk[r] += ak;
        }
        // dQ += scale * dS K: thread owns (query, channel) pairs of this query block.
#pragma unroll
        for (int r = 0; r < KV_PER_THREAD; ++r) {
          const int e = tid + kThreads * r, il = e / HD, d = e % HD;
          float aq = 0.f;
#pragma unroll 8
          for (int jl = 0; jl < kTile; ++jl) aq += dSs[il * kTile + jl] * Ks[jl * LD + d];
          dQs[(q0 + il) * HD + d] += a.scale * aq;
        }
        // Bias gradient: the owner of row t adds this tile's dS over the pairs that use row t.
        if (need_dbias) {
          for (int t = tid; t < a.T; t += kThreads) {
            float acc = 0.f;
            for_each_pair_of_row(t, q0, kTile, k0, kTile, N, a.Wh, a.Ww,
                                 [&](int i, int j) { acc += dSs[(i - q0) * kTile + (j - k0)]; });
            dbias_acc[t] += acc;
          }
        }
        __syncthreads();  // (C) done with this Q / dO / P / dS tile
      }

      // Final dK, dV of this key block: stage them in Ks / Vs (free now) for coalesced stores and the
      // pad-gradient sums.
#pragma unroll
      for (int r = 0; r < KV_PER_THREAD; ++r) {
        const int e = tid + kThreads * r, jl = e / HD, d = e % HD;
        Ks[jl * LD + d] = dk[r] * a.scale;
        Vs[jl * LD + d] = dv[r];
      }
      __syncthreads();  // (D)
      for (int u = tid; u < kTile * (HD / V); u += kThreads) {
        const int jl = u / (HD / V), d = (u % (HD / V)) * V, j = k0 + jl;
        if (j >= N || d >= a.hd) continue;
        const int p = tt.pix[j];
        if (a.map && p < 0) continue;  // padding key: goes to the pad gradient below
        store_vec(grad_row<T>(a, 1, w, h, j, p) + d, a.hd - d, a.vec, Ks + jl * LD + d);
        store_vec(grad_row<T>(a, 2, w, h, j, p) + d, a.hd - d, a.vec, Vs + jl * LD + d);
      }
      if (need_dpad && tid < 2 * HD) {
        const float* src = tid < HD ? Ks : Vs;
        const int d = tid % HD;
        float acc = 0.f;
        for (int jl = 0; jl < kTile && k0 + jl < N; ++jl)
          if (tt.pix[k0 + jl] < 0) acc += src[jl * LD + d];
        dpad_acc[tid] += acc;
      }
      __syncthreads();  // (E) Ks / Vs may be overwritten by the next key block
    }

    // dQ of the window (padding queries have dq = 0: their dO is 0, so their dS row is 0).
    for (int u = tid; u < N * (HD / V); u += kThreads) {
      const int i = u / (HD / V), d = (u % (HD / V)) * V;
      const int p = tt.pix[i];
      if (d >= a.hd || (a.map && p < 0)) continue;
      store_vec(grad_row<T>(a, 0, w, h, i, p) + d, a.hd - d, a.vec, dQs + i * HD + d);
    }
  }

  // Per-block partials, each written by the thread that owns it (no barrier needed).
  const int64_t blk = (int64_t)h * plan.groups + g;
  if (need_dbias)
    for (int t = tid; t < a.T; t += kThreads) dbias_part[blk * a.T + t] = dbias_acc[t];
  if (need_dpad && tid < 2 * HD) dpad_part[blk * 2 * HD + tid] = dpad_acc[tid];
}

// Sums the per-block partials in block order: dbias (T, heads) and dpad (3C,) = (0 | dk sums | dv sums).
__global__ void window_attention_bwd_reduce(const float* dbias_part, const float* dpad_part, int groups, int heads,
                                            int T, int hd, int HD, int C, float* dbias, float* dpad) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t nbias = dbias ? (int64_t)T * heads : 0;
  if (idx < nbias) {
    const int h = (int)(idx % heads), t = (int)(idx / heads);
    float s = 0.f;
    for (int g = 0; g < groups; ++g) s += dbias_part[((int64_t)h * groups + g) * T + t];
    dbias[idx] = s;
    return;
  }
  const int64_t c = idx - nbias;
  if (!dpad || c >= 3 * (int64_t)C) return;
  const int part = (int)(c / C), ch = (int)(c % C), h = ch / hd, d = ch % hd;
  float s = 0.f;
  if (part > 0)
    for (int g = 0; g < groups; ++g) s += dpad_part[((int64_t)h * groups + g) * 2 * HD + (part - 1) * HD + d];
  dpad[c] = s;
}

template <typename T, int HD>
void launch_typed(const WinArgs& a, const BwdPlan& p, bool need_dbias, bool need_dpad, float* dbias_part,
                  float* dpad_part, cudaStream_t stream) {
  auto kernel = window_attention_bwd_kernel<T, HD>;
  if (p.smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)p.smem);
    if (err != cudaSuccess) throw std::runtime_error(cudaGetErrorString(err));
  }
  const dim3 grid(p.groups, a.heads);
  kernel<<<grid, kThreads, p.smem, stream>>>(a, p, need_dbias, need_dpad, dbias_part, dpad_part);
}

template <typename T>
void launch_hd(const WinArgs& a, const BwdPlan& p, bool nb, bool np, float* bp, float* pp, cudaStream_t s) {
  switch (p.HD) {
    case 16: return launch_typed<T, 16>(a, p, nb, np, bp, pp, s);
    case 32: return launch_typed<T, 32>(a, p, nb, np, bp, pp, s);
    case 64: return launch_typed<T, 64>(a, p, nb, np, bp, pp, s);
    default: return launch_typed<T, 128>(a, p, nb, np, bp, pp, s);
  }
}

}  // namespace

int64_t window_attention_bwd_smem(const WinArgs& a) { return bwd_plan(a).smem; }

int64_t window_attention_bwd_workspace(const WinArgs& a, bool need_dbias, bool need_dpad) {
  const BwdPlan p = bwd_plan(a);
  const int64_t blocks = (int64_t)p.groups * a.heads;
  return (need_dbias ? blocks * a.T : 0) + (need_dpad ? blocks * 2 * p.HD : 0);
}

void launch_window_attention_bwd(const WinArgs& a, bool need_dbias, bool need_dpad, float* dbias, float* dpad,
                                 float* work, void* stream) {
  if (a.bw == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const BwdPlan p = bwd_plan(a);
  need_dbias = need_dbias && a.bias != nullptr;
  need_dpad = need_dpad && a.map;
  float* dbias_part = work;
  float* dpad_part = work + (need_dbias ? (int64_t)p.groups * a.heads * a.T : 0);
  switch (a.dtype) {
    case DType::kFloat: launch_hd<float>(a, p, need_dbias, need_dpad, dbias_part, dpad_part, s); break;
    case DType::kHalf: launch_hd<__half>(a, p, need_dbias, need_dpad, dbias_part, dpad_part, s); break;
    default: launch_hd<__nv_bfloat16>(a, p, need_dbias, need_dpad, dbias_part, dpad_part, s); break;
  }
  if (!need_dbias && !need_dpad) return;
  const int64_t outputs = (need_dbias ? (int64_t)a.T * a.heads : 0) + (need_dpad ? 3 * (int64_t)a.C : 0);
  const int threads = 256;
  window_attention_bwd_reduce<<<(unsigned)ceil_div((int)outputs, threads), threads, 0, s>>>(
      dbias_part, dpad_part, p.groups, a.heads, a.T, a.hd, p.HD, a.C, need_dbias ? dbias : nullptr,
      need_dpad ? dpad : nullptr);
}

}  // namespace esvit
