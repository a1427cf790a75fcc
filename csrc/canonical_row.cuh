// One selection row in canonical form, computed by one warp (SPEC.md's set semantics): the
// row's entries that are within its first `count` entries and in 0 <= idx <= last_visible
// (= pos // block_size), sorted ascending, each value once, padded with -1; and how many there
// are. Shared by the canonical-rows kernel (selection_canonical.cu: one row per warp, written to
// global memory) and the row-schedule forward (selection_fwd.cuh: each thread block's warp 0
// canonicalises its own row into shared memory, which saves the eager decode call a launch).
//
// S <= 32: lane i holds entry i (an invalid one, or a lane past S, holds the largest int64,
// which sorts last), a bitonic sort across the lanes (shuffles), a repeat is equal to its left
// neighbour, and a ballot gives each kept value its output slot.
#pragma once

#include <cstdint>

namespace nsa_ext {

// Every lane of the warp calls it (full-mask shuffles); `out` gets S entries; returns the count
// in every lane.
template <typename Index>
__device__ __forceinline__ int canonical_row_warp(const Index* __restrict__ row_indices, int S,
                                                  int64_t count, int64_t last_visible,
                                                  int32_t* out, int lane) {
  constexpr int64_t kAbsent = INT64_MAX;
  int64_t key = kAbsent;
  if (lane < S && lane < count) {
    const int64_t idx = int64_t(row_indices[lane]);
    if (idx >= 0 && idx <= last_visible) key = idx;
  }
  // Bitonic sort, ascending over the 32 lanes.
#pragma unroll
  for (int k = 2; k <= 32; k <<= 1) {
#pragma unroll
    for (int j = k >> 1; j > 0; j >>= 1) {
      const int64_t other = __shfl_xor_sync(0xffffffffu, key, j);
      const bool ascending = (lane & k) == 0;
      const bool lower = (lane & j) == 0;
      key = (lower == ascending) ? min(key, other) : max(key, other);
    }
  }
  const int64_t left = __shfl_up_sync(0xffffffffu, key, 1);
  const bool keep = key != kAbsent && (lane == 0 || key != left);
  const unsigned kept = __ballot_sync(0xffffffffu, keep);
  const int n = __popc(kept);
  if (keep) out[__popc(kept & ((1u << lane) - 1u))] = int32_t(key);
  if (lane >= n && lane < S) out[lane] = -1;
  return n;
}

}  // namespace nsa_ext
