// Split-KV merge: one warp per query row r = (b, t, hq) combines the row's num_splits partials
// of the forward kernels (selection_fwd.cuh, selection_fwd_fp32.cu): it reads m [num_splits],
// l [num_splits] and acc [num_splits, Dv] (fp32, m in natural log) from the workspace and
// writes o [Dv] (q's dtype) and lse:
//   M = max_s m_s,  L = sum_s l_s exp(m_s - M),  o = sum_s acc_s exp(m_s - M) / L,  lse = M + log L.
// Slices with m_s = -inf (no key) weigh nothing; a row with none at all gets o = 0, lse = -inf.
// The weights and lse are split_merge_weight / split_merge_lse (selection_params.h), shared with
// the forward's cluster merge (selection_fwd.cuh), which sums in the same order: same bits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "selection_params.h"

namespace nsa_ext {
namespace {

constexpr int kWarps = 4;   // rows per thread block

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Columns of the output each lane sums: Dv <= 32 * kCols (the largest head dim of the kernels is
// 256, kCols = 8).
template <typename T, int kCols>
__global__ void __launch_bounds__(kWarps * 32) selection_merge_kernel(const SelectionFwdParams p) {
  // Slices whose columns a lane loads before it sums any of them: 64 registers of partials.
  constexpr int kBatch = 64 / kCols;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rows = p.batch * p.seqlen_q * p.heads_q;
  const int ns = p.num_splits, Dv = p.head_dim_v;
  T* o = static_cast<T*>(p.o);
  for (int64_t r = int64_t(blockIdx.x) * kWarps + warp; r < rows;
       r += int64_t(gridDim.x) * kWarps) {
    const float* m_r = p.part_m + r * ns;
    const float* l_r = p.part_l + r * ns;
    const float* acc_r = p.part_acc + r * ns * Dv;
    // A batch of slices' columns, loaded together (zeros past the last slice): the loads of a
    // row do not wait for one another or for the weights. (Per column and per slice in turn,
    // each load behind the last, a B = 1 decode's merge took 18 us of a 35 us call on the H200;
    // two slices at a time, ~8 us: notes/eager.md.)
    float part[kBatch][kCols];
    auto load_batch = [&](int s0) {
#pragma unroll
      for (int j = 0; j < kBatch; ++j)
#pragma unroll
        for (int i = 0; i < kCols; ++i) {
          const int d = lane + 32 * i;
          part[j][i] = s0 + j < ns && d < Dv ? acc_r[int64_t(s0 + j) * Dv + d] : 0.f;
        }
    };
    float sum[kCols];
#pragma unroll
    for (int i = 0; i < kCols; ++i) sum[i] = 0.f;
    float m_max = -INFINITY, l_sum = 0.f;
    if (ns <= 32) {
      // One slice per lane: its m and l, one load each, issued with the first batch's columns.
      const float m_lane = lane < ns ? m_r[lane] : -INFINITY;
      const float l_lane = lane < ns ? l_r[lane] : 0.f;
      load_batch(0);
      // Each slice's weight computed once by the lane that holds it. An empty slice weighs 0;
      // its accumulators are zeros (the forward kernels write them).
      const float w_lane = split_merge_weight(m_lane, l_lane, m_max, l_sum);
      for (int s0 = 0; s0 < ns; s0 += kBatch) {
        if (s0 > 0) load_batch(s0);
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
          const float w = __shfl_sync(0xffffffffu, w_lane, (s0 + j) & 31);
#pragma unroll
          for (int i = 0; i < kCols; ++i) sum[i] += part[j][i] * w;
        }
      }
    } else {
      // More slices than lanes (a long row cut finely): the same sums, 32 slices' weights at
      // a time.
      for (int s = lane; s < ns; s += 32) m_max = fmaxf(m_max, m_r[s]);
#pragma unroll
      for (int off = 16; off > 0; off /= 2)
        m_max = fmaxf(m_max, __shfl_xor_sync(0xffffffffu, m_max, off));
      if (m_max != -INFINITY) {
        for (int s = lane; s < ns; s += 32)
          if (m_r[s] != -INFINITY) l_sum += l_r[s] * expf(m_r[s] - m_max);
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) l_sum += __shfl_xor_sync(0xffffffffu, l_sum, off);
      const float inv = l_sum > 0.f ? 1.f / l_sum : 0.f;
      for (int s0 = 0; s0 < ns; s0 += 32) {
        const int s_lane = s0 + lane;
        const float m_lane = s_lane < ns ? m_r[s_lane] : -INFINITY;
        const float w_lane = m_lane == -INFINITY ? 0.f : expf(m_lane - m_max) * inv;
        for (int j0 = 0; j0 < 32 && s0 + j0 < ns; j0 += kBatch) {
          load_batch(s0 + j0);
#pragma unroll
          for (int j = 0; j < kBatch; ++j) {
            const float w = __shfl_sync(0xffffffffu, w_lane, (j0 + j) & 31);
#pragma unroll
            for (int i = 0; i < kCols; ++i) sum[i] += part[j][i] * w;
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      const int d = lane + 32 * i;
      if (d < Dv) o[r * Dv + d] = from_float<T>(sum[i]);
    }
    if (lane == 0) p.lse[r] = split_merge_lse(m_max, l_sum);
  }
}

template <typename T>
void launch_typed(const SelectionFwdParams& p, dim3 grid, cudaStream_t stream) {
  const int Dv = int(p.head_dim_v);
  if (Dv <= 64)
    selection_merge_kernel<T, 2><<<grid, kWarps * 32, 0, stream>>>(p);
  else if (Dv <= 128)
    selection_merge_kernel<T, 4><<<grid, kWarps * 32, 0, stream>>>(p);
  else
    selection_merge_kernel<T, 8><<<grid, kWarps * 32, 0, stream>>>(p);
}

}  // namespace

cudaError_t launch_selection_merge(const SelectionFwdParams& p, ScalarKind kind,
                                   cudaStream_t stream) {
  const int64_t rows = p.batch * p.seqlen_q * p.heads_q;
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  const dim3 grid(unsigned(blocks < (int64_t(1) << 30) ? blocks : (int64_t(1) << 30)));
  switch (kind) {
    case ScalarKind::kFloat16: launch_typed<__half>(p, grid, stream); break;
    case ScalarKind::kBFloat16: launch_typed<__nv_bfloat16>(p, grid, stream); break;
    default: launch_typed<float>(p, grid, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace nsa_ext
