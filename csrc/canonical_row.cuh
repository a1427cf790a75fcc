// One selection row in canonical form, computed by a segment of a warp's lanes (SPEC.md's set
// semantics): the row's entries that are within its first `count` entries and in
// 0 <= idx <= last_visible (= pos // block_size), sorted ascending, each value once, padded with
// -1; and how many there are. Shared by the canonical-rows kernel (selection_canonical.cu: two
// rows per warp for S <= 16, one for S <= 32, written to global memory) and the row-schedule
// forward (selection_fwd.cuh: each thread block's warp 0 canonicalises its own row into shared
// memory with the two steps below, which saves the eager decode call a launch).
//
// kWidth = 16 or 32 lanes per row, S <= kWidth: lane i of the segment holds entry i as a 32-bit
// key (an invalid entry, or a lane past S, holds 0xFFFFFFFF, which sorts last; the outputs are
// int32, so a visible block index is below 2^31), a bitonic sort across the segment (shuffles),
// a repeat is equal to its left neighbour, and a ballot gives each kept value its output slot.
#pragma once

#include <cstdint>

namespace nsa_ext {

// log2(block_size) where block_size is a power of two, else -1: the kernels that canonicalise
// many rows divide positions by a shift where they can (a 64-bit division is ~70 instructions,
// more than the rest of a row's work).
inline int block_shift_of(int64_t block_size) {
  if (block_size <= 0 || (block_size & (block_size - 1)) != 0) return -1;
  int shift = 0;
  while ((int64_t(1) << shift) < block_size) ++shift;
  return shift;
}

// A row's limits for canonical_row_lanes: its last visible block (pos // block_size, by the shift
// where block_shift >= 0) and how many of its entries count (counts[row], or count_limit without
// a counts tensor).
template <typename Count>
__device__ __forceinline__ void row_limits(int64_t pos, const Count* __restrict__ counts,
                                           int64_t row, int64_t count_limit, int64_t block_size,
                                           int block_shift, int64_t& last_visible,
                                           int64_t& count) {
  last_visible = block_shift >= 0 ? (pos >> block_shift) : pos / block_size;
  count = counts ? int64_t(counts[row]) : count_limit;
}

// The two steps of canonical_row_lanes, for a caller that issues several rows' loads before it
// sorts any of them (selection_union.cu). Step 1, a lane's key: entry `sub` of the row if it is
// within S and `count` and in 0 <= idx <= last_visible, else 0xFFFFFFFF (absent: sorts last).
// Its two halves apart: canonical_entry loads the entry (every entry within S, whatever the
// count: the load then waits for nothing), canonical_key_of applies the limits, so that a caller
// can issue the entry's load beside the loads its limits come from (pos, counts) instead of after
// them (the row forward's decode prologue, selection_fwd.cuh).
template <typename Index>
__device__ __forceinline__ int64_t canonical_entry(const Index* __restrict__ row_indices, int S,
                                                   int sub) {
  return sub < S ? int64_t(row_indices[sub]) : int64_t(-1);
}
__device__ __forceinline__ uint32_t canonical_key_of(int64_t idx, int sub, int64_t count,
                                                     int64_t last_visible) {
  const int64_t last = last_visible < INT32_MAX ? last_visible : INT32_MAX;
  return sub < count && idx >= 0 && idx <= last ? uint32_t(idx) : 0xFFFFFFFFu;
}
template <typename Index>
__device__ __forceinline__ uint32_t canonical_key(const Index* __restrict__ row_indices, int S,
                                                  int64_t count, int64_t last_visible, int sub) {
  return canonical_key_of(canonical_entry(row_indices, S, sub), sub, count, last_visible);
}

// Step 2: every lane of the warp calls it (full-mask shuffles); `lane` is the lane in the warp,
// the segment is lanes [lane - lane % kWidth, + kWidth); sorts the segment's keys, writes the
// distinct ones and the -1 padding to `out` (S entries), returns their count in every lane of the
// segment, and leaves in `key` the lane's key after the sort, before de-duplication (the
// segment's keys ascending, repeats kept, absent last: the sorted runs that the fused
// canonical-rows + union kernel merges).
template <int kWidth>
__device__ __forceinline__ int canonical_sort_lanes(uint32_t& key, int S, int32_t* out, int lane) {
  static_assert(kWidth == 16 || kWidth == 32, "a row spans half a warp or a whole warp");
  constexpr uint32_t kAbsent = 0xFFFFFFFFu;
  const int sub = lane % kWidth;
  // Bitonic sort, ascending over the segment (xor partners stay inside it).
#pragma unroll
  for (int k = 2; k <= kWidth; k <<= 1) {
#pragma unroll
    for (int j = k >> 1; j > 0; j >>= 1) {
      const uint32_t other = __shfl_xor_sync(0xffffffffu, key, j);
      const bool ascending = (sub & k) == 0;
      const bool lower = (sub & j) == 0;
      key = (lower == ascending) ? min(key, other) : max(key, other);
    }
  }
  const uint32_t left = __shfl_up_sync(0xffffffffu, key, 1, kWidth);
  const bool keep = key != kAbsent && (sub == 0 || key != left);
  const unsigned ballot = __ballot_sync(0xffffffffu, keep);
  const unsigned kept =
      kWidth == 32 ? ballot : (ballot >> (lane - sub)) & ((1u << (kWidth & 31)) - 1u);
  const int n = __popc(kept);
  if (keep) out[__popc(kept & ((1u << sub) - 1u))] = int32_t(key);
  if (sub >= n && sub < S) out[sub] = -1;
  return n;
}

// Both steps: every lane of the warp calls it; `out` gets S entries; returns the count in every
// lane of the segment.
template <int kWidth, typename Index>
__device__ __forceinline__ int canonical_row_lanes(const Index* __restrict__ row_indices, int S,
                                                   int64_t count, int64_t last_visible,
                                                   int32_t* out, int lane) {
  uint32_t key = canonical_key(row_indices, S, count, last_visible, lane % kWidth);
  return canonical_sort_lanes<kWidth>(key, S, out, lane);
}

}  // namespace nsa_ext
