// Canonical selection rows in one launch (the CUDA backend's preprocessing; SPEC.md's set
// semantics): each row's entries that are within its first `count` entries and in
// 0 <= idx <= pos // block_size, sorted ascending, each value once, padded with -1; and how many
// there are. The same function as nsa_ext.selection.canonical_blocks (a dozen PyTorch launches,
// which cost ~0.2 ms at T = 8k and dominate a CUDA-graph decode step).
//
// Half a warp per row for S <= 16, a warp for S <= 32 (canonical_row.cuh).
#include <cuda_runtime.h>

#include <cstdint>

#include "canonical_row.cuh"
#include "selection_params.h"

namespace nsa_ext {
namespace {

constexpr int kWarpsPerBlock = 8;

// kWidth lanes per row (16 for S <= 16: two rows per warp, half the shuffle stages of a whole-warp
// sort; else 32). Position arithmetic is 32-bit where the sizes allow and the block-size division
// a shift where block_size is a power of two (block_shift >= 0): a 64-bit division is ~70
// instructions, more than the rest of a row's work.
template <int kWidth, typename Index, typename Count>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    canonical_blocks_kernel(const Index* __restrict__ indices, const int64_t* __restrict__ pos,
                            const Count* __restrict__ counts, int64_t count_limit, int64_t rows,
                            int64_t heads_kv, int S, int64_t block_size, int block_shift,
                            int32_t* __restrict__ blocks, int32_t* __restrict__ num_blocks) {
  constexpr int kRowsPerWarp = 32 / kWidth;
  const int lane = threadIdx.x % 32;
  const int64_t first = (int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32) * kRowsPerWarp;
  if (first >= rows) return;   // whole warps leave together
  const int64_t row = first + lane / kWidth;
  const bool active = row < rows;     // the second half of the last warp may have no row
  int64_t last_visible = -1, count = 0;
  if (active) {
    const int64_t token = rows <= INT32_MAX ? int64_t(uint32_t(row) / uint32_t(heads_kv))
                                            : row / heads_kv;
    row_limits(pos[token], counts, row, count_limit, block_size, block_shift, last_visible, count);
  }
  int32_t* out = active ? blocks + row * S : nullptr;
  const Index* in = indices + (active ? row : first) * S;
  const int n = canonical_row_lanes<kWidth>(in, active ? S : 0, count, last_visible, out, lane);
  if (active && lane % kWidth == 0) num_blocks[row] = n;
}

template <typename Index, typename Count>
cudaError_t launch_typed(const void* indices, const int64_t* pos, const void* counts,
                         int64_t count_limit, int64_t rows, int64_t heads_kv, int S,
                         int64_t block_size, int32_t* blocks, int32_t* num_blocks,
                         cudaStream_t stream) {
  const int block_shift = block_shift_of(block_size);
  const auto* in = static_cast<const Index*>(indices);
  const auto* cnt = static_cast<const Count*>(counts);
  if (S <= 16) {
    const int64_t grid = (rows + 2 * kWarpsPerBlock - 1) / (2 * kWarpsPerBlock);
    canonical_blocks_kernel<16, Index, Count><<<unsigned(grid), kWarpsPerBlock * 32, 0, stream>>>(
        in, pos, cnt, count_limit, rows, heads_kv, S, block_size, block_shift, blocks, num_blocks);
  } else {
    const int64_t grid = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
    canonical_blocks_kernel<32, Index, Count><<<unsigned(grid), kWarpsPerBlock * 32, 0, stream>>>(
        in, pos, cnt, count_limit, rows, heads_kv, S, block_size, block_shift, blocks, num_blocks);
  }
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
