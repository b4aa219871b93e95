// Device helpers shared by the kernels: fp32 <-> storage type conversion and 16-byte vector loads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace esvit {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Elements of T in one 16-byte vector.
template <typename T> struct VecWidth { static constexpr int value = 16 / (int)sizeof(T); };

// Load VecWidth<T> consecutive elements at src into dst as floats; elements at index >= valid read as
// 0 (and are not touched in memory). `vec` says src is 16-byte aligned and the row length is a multiple
// of the vector width (decided once on the host), so a full vector is one 16-byte load.
template <typename T>
__device__ __forceinline__ void load_vec(const T* src, int valid, bool vec, float* dst) {
  constexpr int V = VecWidth<T>::value;
  if (vec && valid >= V) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < V; ++k) dst[k] = to_float(e[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) dst[k] = k < valid ? to_float(src[k]) : 0.f;
  }
}

// Store the first min(valid, V) of src to dst (16-byte store when `vec` and the vector is full).
template <typename T>
__device__ __forceinline__ void store_vec(T* dst, int valid, bool vec, const float* src) {
  constexpr int V = VecWidth<T>::value;
  if (vec && valid >= V) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int k = 0; k < V; ++k) e[k] = from_float<T>(src[k]);
    *reinterpret_cast<uint4*>(dst) = raw;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (k < valid) dst[k] = from_float<T>(src[k]);
  }
}

// Scalar read of a float tensor whose dtype is only known at run time (masks, bias tables, pad vectors
// of any float dtype); dtype: 0 = float32, 1 = float16, 2 = bfloat16. The branch is uniform.
__device__ __forceinline__ float load_any(const void* p, int dtype, int64_t i) {
  if (dtype == 0) return static_cast<const float*>(p)[i];
  if (dtype == 1) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace esvit
