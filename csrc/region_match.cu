// Region matching: for each student token, the teacher token of highest cosine similarity.
//
// One block (8 warps) per (image, 32 student tokens). Teacher tokens are visited in tiles of 32; a tile's
// dot products are built over D in chunks of 64 staged in shared memory (student rows broadcast, teacher
// rows padded to avoid bank conflicts), the teacher norms in the same pass. Warp w owns student tokens
// w, w+8, w+16, w+24 of the block and lane l teacher token l of the tile, so each tile ends in a warp
// argmax (shuffles) merged into a running best kept in registers. The B x Ts x Tt similarity matrix is
// never stored. Ties go to the lowest teacher index: within a tile the shuffle reduction prefers the lower
// index on equal values, across tiles only a strictly larger value replaces the best. A NaN similarity
// counts as +inf: it wins, lowest index first, as NaN does in torch.max and in every backend. The student
// norm is
// a positive per-row constant and does not change the argmax, so only teacher rows are normalised
// (1 / max(|t|, 1e-12), as F.normalize).
#include <cuda_runtime.h>

#include <climits>

#include "common.cuh"
#include "kernels.h"

namespace esvit {
namespace {

constexpr int kRows = 32, kCols = 32, kChunk = 64, kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    region_match_kernel(const T* __restrict__ student, const T* __restrict__ teacher, int64_t* __restrict__ out,
                        int Ts, int Tt, int D, int row_blocks) {
  __shared__ float Ss[kRows][kChunk];
  __shared__ float Tsh[kCols][kChunk + 1];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.x / row_blocks, i0 = (blockIdx.x % row_blocks) * kRows;
  const T* S = student + (int64_t)b * Ts * D;
  const T* Tm = teacher + (int64_t)b * Tt * D;

  float best[4];
  int best_idx[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    best[r] = -INFINITY;
    best_idx[r] = 0;
  }

  for (int j0 = 0; j0 < Tt; j0 += kCols) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f}, nrm = 0.f;
    for (int d0 = 0; d0 < D; d0 += kChunk) {
      __syncthreads();  // previous chunk fully consumed
      for (int e = tid; e < kRows * kChunk; e += kThreads) {
        const int r = e / kChunk, d = e % kChunk;
        const int i = i0 + r, j = j0 + r, dd = d0 + d;
        Ss[r][d] = (i < Ts && dd < D) ? to_float(S[(int64_t)i * D + dd]) : 0.f;
        Tsh[r][d] = (j < Tt && dd < D) ? to_float(Tm[(int64_t)j * D + dd]) : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int d = 0; d < kChunk; ++d) {
        const float t = Tsh[lane][d];
        nrm += t * t;
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[r] += Ss[warp + 8 * r][d] * t;
      }
    }
    const float inv = 1.f / fmaxf(sqrtf(nrm), 1e-12f);
    const int j = j0 + lane;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float c = acc[r] * inv;
      // a NaN similarity wins, as in torch.max; so does +-inf (an inf student feature: the reference's cosine
      // is NaN, this one skips the student norm)
      float v = j < Tt ? (isfinite(c) ? c : INFINITY) : -INFINITY;
      int idx = j < Tt ? j : INT_MAX;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > v || (ov == v && oi < idx)) {
          v = ov;
          idx = oi;
        }
      }
      if (v > best[r]) {  // strictly: an equal value from a later tile has a higher index
        best[r] = v;
        best_idx[r] = idx;
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int i = i0 + warp + 8 * r;
      if (i < Ts) out[(int64_t)b * Ts + i] = best_idx[r];
    }
  }
}

template <typename T>
void launch_typed(const void* s, const void* t, int64_t* out, int B, int Ts, int Tt, int D, cudaStream_t stream) {
  const int row_blocks = (Ts + kRows - 1) / kRows;
  region_match_kernel<T><<<(unsigned)((int64_t)B * row_blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(s), static_cast<const T*>(t), out, Ts, Tt, D, row_blocks);
}

}  // namespace

void launch_region_match(const void* student, const void* teacher, int64_t* out, int B, int Ts, int Tt, int D,
                         DType dtype, void* stream) {
  if (B == 0 || Ts == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat: return launch_typed<float>(student, teacher, out, B, Ts, Tt, D, s);
    case DType::kHalf: return launch_typed<__half>(student, teacher, out, B, Ts, Tt, D, s);
    default: return launch_typed<__nv_bfloat16>(student, teacher, out, B, Ts, Tt, D, s);
  }
}

}  // namespace esvit
