// Split-KV merge: one warp per query row r = (b, t, hq) combines the row's num_splits partials
// of the forward kernels (selection_fwd.cuh, selection_fwd_fp32.cu): it reads m [num_splits],
// l [num_splits] and acc [num_splits, Dv] (fp32, m in natural log) from the workspace and
// writes o [Dv] (q's dtype) and lse:
//   M = max_s m_s,  L = sum_s l_s exp(m_s - M),  o = sum_s acc_s exp(m_s - M) / L,  lse = M + log L.
// Slices with m_s = -inf (no key) weigh nothing; a row with none at all gets o = 0, lse = -inf.
// expf/logf are the accurate ones: the fp32 path's tolerance is 1e-5.
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

// Columns of the output each lane sums: Dv <= 256 (the largest head dim of the kernels).
constexpr int kMaxColumnsPerLane = 8;

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) selection_merge_kernel(const SelectionFwdParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rows = p.batch * p.seqlen_q * p.heads_q;
  const int ns = p.num_splits, Dv = p.head_dim_v;
  T* o = static_cast<T*>(p.o);
  for (int64_t r = int64_t(blockIdx.x) * kWarps + warp; r < rows;
       r += int64_t(gridDim.x) * kWarps) {
    const float* m_r = p.part_m + r * ns;
    const float* l_r = p.part_l + r * ns;
    const float* acc_r = p.part_acc + r * ns * Dv;
    float m_max = -INFINITY;
    for (int s = lane; s < ns; s += 32) m_max = fmaxf(m_max, m_r[s]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2)
      m_max = fmaxf(m_max, __shfl_xor_sync(0xffffffffu, m_max, off));
    float l_sum = 0.f;
    if (m_max != -INFINITY) {
      for (int s = lane; s < ns; s += 32)
        if (m_r[s] != -INFINITY) l_sum += l_r[s] * expf(m_r[s] - m_max);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) l_sum += __shfl_xor_sync(0xffffffffu, l_sum, off);
    const float inv = l_sum > 0.f ? 1.f / l_sum : 0.f;
    // o = sum_s acc_s w_s with w_s = exp(m_s - M) / L, each slice's weight computed once by the
    // lane that holds it and passed by shuffle; the slices' loads of a lane's columns do not wait
    // for one another. (Per column and per slice in turn, each load behind the last, a B = 1
    // decode's merge took 18 us of a 35 us call on the H200: notes/eager.md.) An empty slice
    // (m = -inf) weighs 0; its accumulators are zeros (the forward kernels write them).
    float sum[kMaxColumnsPerLane];
#pragma unroll
    for (int i = 0; i < kMaxColumnsPerLane; ++i) sum[i] = 0.f;
    for (int s0 = 0; s0 < ns; s0 += 32) {
      const int s_lane = s0 + lane;
      const float m_lane = s_lane < ns ? m_r[s_lane] : -INFINITY;
      const float w_lane = m_lane == -INFINITY ? 0.f : expf(m_lane - m_max) * inv;
      const int n = ns - s0 < 32 ? ns - s0 : 32;
#pragma unroll 2
      for (int j = 0; j < n; ++j) {
        const float w = __shfl_sync(0xffffffffu, w_lane, j);
        const float* a = acc_r + int64_t(s0 + j) * Dv;
#pragma unroll
        for (int i = 0; i < kMaxColumnsPerLane; ++i) {
          const int d = lane + 32 * i;
          if (d < Dv) sum[i] += a[d] * w;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kMaxColumnsPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < Dv) o[r * Dv + d] = from_float<T>(sum[i]);
    }
    if (lane == 0) p.lse[r] = l_sum > 0.f ? m_max + logf(l_sum) : -INFINITY;
  }
}

}  // namespace

cudaError_t launch_selection_merge(const SelectionFwdParams& p, ScalarKind kind,
                                   cudaStream_t stream) {
  const int64_t rows = p.batch * p.seqlen_q * p.heads_q;
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  const dim3 grid(unsigned(blocks < (int64_t(1) << 30) ? blocks : (int64_t(1) << 30)));
  switch (kind) {
    case ScalarKind::kFloat16: selection_merge_kernel<__half><<<grid, kWarps * 32, 0, stream>>>(p); break;
    case ScalarKind::kBFloat16: selection_merge_kernel<__nv_bfloat16><<<grid, kWarps * 32, 0, stream>>>(p); break;
    default: selection_merge_kernel<float><<<grid, kWarps * 32, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace nsa_ext
