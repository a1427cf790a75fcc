// Selection-attention forward for fp32 inputs, on CUDA cores, exact enough for SPEC.md's fp32
// tolerance (mean <= 1e-5, max <= 1e-4): fp32 products and sums, accurate expf/logf.
//
// One thread block (4 warps) per (query token, KV head); each warp takes query heads of the group
// in turn. A warp holds its query row in registers (Dk/32 values a lane), walks the row's
// selected blocks key by key (j <= pos), reduces each dot product across the warp and keeps an
// online softmax; it writes o [Dv] and lse. Keys are read from global memory (L1/L2): this path
// is for correctness, not speed. With p.num_splits > 1 the block takes only its slice of the row's
// entries (blockIdx.z) and writes the partials acc, m, l to the workspace instead.
#include <cuda_runtime.h>

#include <cstdint>

#include "selection_params.h"

namespace nsa_ext {
namespace {

constexpr int kWarps = 4;
constexpr int kPerLane = kFp32MaxHeadDim / 32;

__global__ void __launch_bounds__(kWarps * 32)
    selection_fwd_fp32_kernel(const SelectionFwdParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bt = blockIdx.x;
  const int h = blockIdx.y;
  const int split = blockIdx.z;
  const int64_t b = bt / p.seqlen_q;
  const int64_t row = bt * p.heads_kv + h;
  const int2 entries =
      split_entries(p, max(0, min(p.num_blocks[row], int(p.num_selected))), split);
  const int32_t* row_blocks = p.blocks + row * p.num_selected + entries.x;
  const int num_blocks = entries.y - entries.x;
  const int64_t pos = p.pos[bt];
  const int64_t k_offset = p.k_offset[bt];
  const int64_t kv_row0 = b * p.seqlen_k + k_offset;
  const int64_t key_limit = p.seqlen_k - k_offset;
  const int Dk = p.head_dim_qk, Dv = p.head_dim_v;
  const float* q = static_cast<const float*>(p.q);
  const float* k = static_cast<const float*>(p.k);
  const float* v = static_cast<const float*>(p.v);
  float* o = static_cast<float*>(p.o);

  for (int64_t g = warp; g < p.group; g += kWarps) {
    const int64_t q_row = bt * p.heads_q + int64_t(h) * p.group + g;
    float qr[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      qr[i] = d < Dk ? q[q_row * Dk + d] : 0.f;
    }
    float m = -INFINITY, l = 0.f;
    float acc[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[i] = 0.f;
    for (int n = 0; n < num_blocks; ++n) {
      const int64_t block = row_blocks[n];
      if (block < 0) continue;
      const int64_t first = block * p.block_size;
      int64_t last = first + p.block_size - 1;
      last = last < pos ? last : pos;
      last = last < key_limit - 1 ? last : key_limit - 1;
      for (int64_t j = first; j <= last; ++j) {
        const float* k_row = k + ((kv_row0 + j) * p.heads_kv + h) * Dk;
        const float* v_row = v + ((kv_row0 + j) * p.heads_kv + h) * Dv;
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int d = lane + 32 * i;
          if (d < Dk) dot = fmaf(qr[i], k_row[d], dot);
        }
#pragma unroll
        for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        const float s = dot * p.scale;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);   // m = -inf at the first key: 0
        const float w = expf(s - m_new);
        l = l * corr + w;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int d = lane + 32 * i;
          acc[i] = acc[i] * corr + (d < Dv ? w * v_row[d] : 0.f);
        }
        m = m_new;
      }
    }
    if (p.num_splits > 1) {
      // Unnormalised; an empty slice leaves m = -inf, l = 0, acc = 0.
      const int64_t slot = q_row * p.num_splits + split;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < Dv) p.part_acc[slot * Dv + d] = acc[i];
      }
      if (lane == 0) {
        p.part_m[slot] = m;
        p.part_l[slot] = l;
      }
      continue;
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < Dv) o[q_row * Dv + d] = acc[i] * inv;
    }
    if (lane == 0) p.lse[q_row] = l > 0.f ? m + logf(l) : -INFINITY;
  }
}

}  // namespace

cudaError_t launch_selection_fwd_fp32(const SelectionFwdParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(p.batch * p.seqlen_q), unsigned(p.heads_kv), unsigned(p.num_splits));
  selection_fwd_fp32_kernel<<<grid, kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace nsa_ext
