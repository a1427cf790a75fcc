// Canonical selection rows in one launch (the CUDA backend's preprocessing; SPEC.md's set
// semantics): each row's entries that are within its first `count` entries and in
// 0 <= idx <= pos // block_size, sorted ascending, each value once, padded with -1; and how many
// there are. The same function as nsa_ext.selection.canonical_blocks (a dozen PyTorch launches,
// which cost ~0.2 ms at T = 8k and dominate a CUDA-graph decode step).
//
// One warp per row, for S <= 32 (canonical_row.cuh).
#include <cuda_runtime.h>

#include <cstdint>

#include "canonical_row.cuh"
#include "selection_params.h"

namespace nsa_ext {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename Index, typename Count>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    canonical_blocks_kernel(const Index* __restrict__ indices, const int64_t* __restrict__ pos,
                            const Count* __restrict__ counts, int64_t count_limit, int64_t rows,
                            int64_t heads_kv, int S, int64_t block_size,
                            int32_t* __restrict__ blocks, int32_t* __restrict__ num_blocks) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;   // whole warps leave together
  const int64_t last_visible = pos[row / heads_kv] / block_size;
  const int64_t count = counts ? int64_t(counts[row]) : count_limit;
  const int n = canonical_row_warp(indices + row * S, S, count, last_visible, blocks + row * S, lane);
  if (lane == 0) num_blocks[row] = n;
}

template <typename Index, typename Count>
cudaError_t launch_typed(const void* indices, const int64_t* pos, const void* counts,
                         int64_t count_limit, int64_t rows, int64_t heads_kv, int S,
                         int64_t block_size, int32_t* blocks, int32_t* num_blocks,
                         cudaStream_t stream) {
  const int64_t grid = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  canonical_blocks_kernel<Index, Count><<<unsigned(grid), kWarpsPerBlock * 32, 0, stream>>>(
      static_cast<const Index*>(indices), pos, static_cast<const Count*>(counts), count_limit,
      rows, heads_kv, S, block_size, blocks, num_blocks);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_canonical_blocks(const void* indices, bool indices_int64, const int64_t* pos,
                                    const void* counts, bool counts_int64, int64_t count_limit,
                                    int64_t rows, int64_t heads_kv, int S, int64_t block_size,
                                    int32_t* blocks, int32_t* num_blocks, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (indices_int64)
    return counts_int64 ? launch_typed<int64_t, int64_t>(indices, pos, counts, count_limit, rows,
                                                         heads_kv, S, block_size, blocks,
                                                         num_blocks, stream)
                        : launch_typed<int64_t, int32_t>(indices, pos, counts, count_limit, rows,
                                                         heads_kv, S, block_size, blocks,
                                                         num_blocks, stream);
  return counts_int64 ? launch_typed<int32_t, int64_t>(indices, pos, counts, count_limit, rows,
                                                       heads_kv, S, block_size, blocks, num_blocks,
                                                       stream)
                      : launch_typed<int32_t, int32_t>(indices, pos, counts, count_limit, rows,
                                                       heads_kv, S, block_size, blocks, num_blocks,
                                                       stream);
}

}  // namespace nsa_ext
