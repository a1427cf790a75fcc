// Query tiles' unions in one launch (the tile schedule's input; nsa_ext.schedules.tiles): for
// every (batch, tile of QT query tokens, KV head), the distinct blocks its canonical rows chose,
// each named by its first key along k's T axis (k_offset[token] + block * block_size, so blocks
// of different varlen sequences never share a name), ascending, padded with kNone (int64 max);
// the union's size; and, summed over the call into `totals`, (selections, union blocks): the
// schedule chooser's statistic. The same function as triton_ref/tile_union.py, without Triton's
// launcher, whose host cost (~0.1 ms a launch on the H200's host) made an eager tile call
// host-bound.
//
// A team of warps per tile sorts the tile's QT * S names in shared memory (bitonic, padded to a
// power of two kWidth), marks the first of each run, and writes the marked names to the places
// an exclusive scan of the marks gives them. Teams are one warp up to 256 names (eight teams per
// CTA, warp-synchronous), else up to 16 warps, one team per CTA. Each CTA adds its teams' counts
// to `totals` with one atomic pair (integer sums: the same totals in any order of the CTAs).
//
// canonical_union_kernel (below) computes the canonical rows and these unions in one launch
// where a tile's rows fit a warp; selection_fwd_auto takes it there.
#include <cuda_runtime.h>

#include <cstdint>

#include "canonical_row.cuh"
#include "selection_params.h"

namespace nsa_ext {
namespace {

constexpr int64_t kNone = INT64_MAX;   // sorts after every real name
constexpr int kUnionWarpsPerBlock = 8;  // the fused kernel's tiles (warps) per CTA

template <int kWidth, int kTeamWarps>
struct UnionShape {
  static constexpr int kTeamThreads = kTeamWarps * 32;
  static constexpr int kTeams = kTeamWarps == 1 ? 8 : 1;     // teams (tiles) per CTA
  static constexpr int kThreads = kTeamThreads * kTeams;
  static constexpr int kPerThread = kWidth / kTeamThreads;    // contiguous names per thread
  static_assert(kPerThread >= 1 && kWidth % kTeamThreads == 0, "a team covers the width");
};

template <int kTeamWarps>
__device__ __forceinline__ void team_sync() {
  if constexpr (kTeamWarps == 1) {
    __syncwarp();
  } else {
    __syncthreads();   // one team per CTA
  }
}

// The CTA's (selections, union blocks), summed in shared memory by its tiles, added to the
// call's totals with one atomic pair (after every tile's shared-memory adds).
__device__ __forceinline__ void add_cta_sums(unsigned long long* totals,
                                             const unsigned long long* cta_sums) {
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicAdd(&totals[0], cta_sums[0]);
    atomicAdd(&totals[1], cta_sums[1]);
  }
}

template <int kWidth, int kTeamWarps>
__global__ void __launch_bounds__(UnionShape<kWidth, kTeamWarps>::kThreads)
    tile_union_kernel(const int32_t* __restrict__ blocks, const int64_t* __restrict__ k_offset,
                      int64_t* __restrict__ starts, int32_t* __restrict__ counts,
                      unsigned long long* __restrict__ totals, int64_t TQ, int64_t H, int S,
                      int QT, int64_t NT, int64_t block_size, int64_t n_tiles) {
  using Shape = UnionShape<kWidth, kTeamWarps>;
  __shared__ int64_t names[Shape::kTeams][kWidth];
  __shared__ int warp_sums[Shape::kTeams][kTeamWarps];
  __shared__ unsigned long long cta_sums[2];
  const int team = threadIdx.x / Shape::kTeamThreads;
  const int tid = threadIdx.x % Shape::kTeamThreads;
  const int lane = threadIdx.x % 32;
  const int warp = tid / 32;
  const int64_t tile_row = int64_t(blockIdx.x) * Shape::kTeams + team;   // (b, j, h) flattened
  const bool live = tile_row < n_tiles;     // a whole team: every thread still reaches the syncs
  const int width = QT * S;
  const int64_t h = tile_row % H;
  const int64_t j = (tile_row / H) % NT;
  const int64_t b = tile_row / (H * NT);
  int64_t* my = names[team];
  if (threadIdx.x < 2) cta_sums[threadIdx.x] = 0;

  int selected = 0;
  for (int i = tid; i < kWidth; i += Shape::kTeamThreads) {
    int64_t name = kNone;
    if (live && i < width) {
      const int r = i / S;
      const int64_t t = j * QT + r;
      if (t < TQ) {
        const int64_t token = b * TQ + t;
        const int32_t block = blocks[(token * H + h) * S + (i - r * S)];
        if (block >= 0) {
          name = k_offset[token] + int64_t(block) * block_size;
          ++selected;
        }
      }
    }
    my[i] = name;
  }
  team_sync<kTeamWarps>();

  // Bitonic sort, ascending: stage (k, d) compares i and i + d for every i whose bit d is clear,
  // ascending where bit k of i is clear.
#pragma unroll 1
  for (int k = 2; k <= kWidth; k <<= 1) {
#pragma unroll 1
    for (int d = k >> 1; d > 0; d >>= 1) {
      for (int p = tid; p < kWidth / 2; p += Shape::kTeamThreads) {
        const int lo = 2 * p - (p & (d - 1));
        const int hi = lo + d;
        const int64_t a = my[lo], c = my[hi];
        if ((a > c) == ((lo & k) == 0)) {
          my[lo] = c;
          my[hi] = a;
        }
      }
      team_sync<kTeamWarps>();
    }
  }

  // The first of each run, counted over this thread's contiguous names, then scanned.
  const int first_index = tid * Shape::kPerThread;
  int64_t prev = first_index > 0 ? my[first_index - 1] : kNone;
  unsigned marks = 0;          // bit e: name first_index + e is the first of its run
  int mine = 0;
#pragma unroll
  for (int e = 0; e < Shape::kPerThread; ++e) {
    const int64_t name = my[first_index + e];
    const bool first = name != kNone && (first_index + e == 0 || name != prev);
    marks |= unsigned(first) << e;
    mine += first;
    prev = name;
  }
  int before = mine;           // inclusive scan across the warp
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, before, d);
    if (lane >= d) before += other;
  }
  int union_size = __shfl_sync(0xffffffffu, before, 31);
  before -= mine;              // exclusive within the warp
  int sel = selected;
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) sel += __shfl_xor_sync(0xffffffffu, sel, d);
  if constexpr (kTeamWarps > 1) {
    if (lane == 0) warp_sums[team][warp] = union_size;
    __syncthreads();
    int offset = 0, total = 0;
#pragma unroll
    for (int w = 0; w < kTeamWarps; ++w) {
      const int s = warp_sums[team][w];
      offset += w < warp ? s : 0;
      total += s;
    }
    before += offset;
    union_size = total;
    __syncthreads();
    if (lane == 0) warp_sums[team][warp] = sel;
    __syncthreads();
    sel = 0;
#pragma unroll
    for (int w = 0; w < kTeamWarps; ++w) sel += warp_sums[team][w];
  }
  if (live) {
    int64_t* out = starts + tile_row * width;
    int slot = before;
#pragma unroll
    for (int e = 0; e < Shape::kPerThread; ++e)
      if (marks >> e & 1u) out[slot++] = my[first_index + e];
    for (int i = union_size + tid; i < width; i += Shape::kTeamThreads) out[i] = kNone;
    if (tid == 0) counts[tile_row] = union_size;
  }
  if (totals != nullptr) {
    __syncthreads();         // cta_sums zeroed
    if (live && tid == 0) {
      atomicAdd(&cta_sums[0], static_cast<unsigned long long>(sel));
      atomicAdd(&cta_sums[1], static_cast<unsigned long long>(union_size));
    }
    add_cta_sums(totals, cta_sums);
  }
}

template <int kWidth, int kTeamWarps>
cudaError_t launch_width(const TileUnionParams& p, cudaStream_t stream) {
  using Shape = UnionShape<kWidth, kTeamWarps>;
  const int64_t grid = (p.n_tiles + Shape::kTeams - 1) / Shape::kTeams;
  tile_union_kernel<kWidth, kTeamWarps><<<unsigned(grid), Shape::kThreads, 0, stream>>>(
      p.blocks, p.k_offset, p.starts, p.counts,
      reinterpret_cast<unsigned long long*>(p.totals), p.seqlen_q, p.heads_kv, p.num_selected,
      p.tokens_per_tile, p.num_tiles, p.block_size, p.n_tiles);
  return cudaGetLastError();
}

// Canonical rows and tile unions in one launch (selection_fwd_auto's prologue where a tile's
// rows fit a warp: canonical_union_fits). One warp per tile, kPerLane passes; pass p
// canonicalises 32 / kWidth of the tile's rows (written to `blocks` / `num_blocks` as
// launch_canonical_blocks writes them) and keeps each lane's sorted key. Every pass's loads
// (pos, counts, k_offset, the row's entries) are issued before any pass sorts: a warp has one
// tile, and its latency is these loads' chain. The keys become names (k_offset[token] + block *
// block_size, below B * TK < 2^31, which the tile kernel requires: 32-bit, 0xFFFFFFFF absent),
// name i = p * 32 + lane. The rows arrive as ascending runs of kWidth, so the bitonic sort starts
// at its merge of runs of kWidth (odd runs reversed first): shuffles across lanes, exchanges
// between a lane's own names for distances of 32 and more; the first of each run of equal names
// goes to its place by ballot. The same outputs as the two kernels it replaces.
template <int kWidth, int kPerLane, typename Index, typename Count>
__global__ void __launch_bounds__(kUnionWarpsPerBlock * 32, 3)
    canonical_union_kernel(const Index* __restrict__ indices, const int64_t* __restrict__ pos,
                           const Count* __restrict__ counts, int64_t count_limit,
                           const int64_t* __restrict__ k_offset, int64_t TQ, int64_t H, int S,
                           int QT, int64_t NT, int64_t block_size, int block_shift,
                           int64_t n_tiles, int32_t* __restrict__ blocks,
                           int32_t* __restrict__ num_blocks, int64_t* __restrict__ starts,
                           int32_t* __restrict__ union_counts,
                           unsigned long long* __restrict__ totals) {
  constexpr uint32_t kAbsent = 0xFFFFFFFFu;
  constexpr int kRowsPerPass = 32 / kWidth;
  constexpr int kNames = 32 * kPerLane;
  __shared__ unsigned long long cta_sums[2];
  const int lane = threadIdx.x % 32;
  const int64_t tile = int64_t(blockIdx.x) * kUnionWarpsPerBlock + threadIdx.x / 32;
  if (threadIdx.x < 2) cta_sums[threadIdx.x] = 0;
  __syncthreads();
  int selected = 0, union_size = 0;
  if (tile < n_tiles) {        // whole warps: every lane of a live warp takes the shuffles
    const int64_t h = tile % H;
    const int64_t j = (tile / H) % NT;
    const int64_t b = tile / (H * NT);
    const int sub = lane % kWidth;
    uint32_t name[kPerLane];
    int64_t row_of[kPerLane], offset[kPerLane];
    bool active[kPerLane];
#pragma unroll
    for (int pass = 0; pass < kPerLane; ++pass) {      // the loads
      const int r = pass * kRowsPerPass + lane / kWidth;
      const int64_t t = j * QT + r;
      active[pass] = r < QT && t < TQ;
      const int64_t token = b * TQ + (active[pass] ? t : 0);
      row_of[pass] = token * H + h;
      int64_t last_visible = -1, count = 0;
      offset[pass] = 0;
      if (active[pass]) {
        row_limits(pos[token], counts, row_of[pass], count_limit, block_size, block_shift,
                   last_visible, count);
        offset[pass] = k_offset[token];
      }
      name[pass] = canonical_key(indices + row_of[pass] * S, active[pass] ? S : 0, count,
                                 last_visible, sub);
    }
#pragma unroll
    for (int pass = 0; pass < kPerLane; ++pass) {      // the rows, sorted runs of kWidth
      const int n = canonical_sort_lanes<kWidth>(
          name[pass], active[pass] ? S : 0, active[pass] ? blocks + row_of[pass] * S : nullptr,
          lane);
      if (active[pass] && sub == 0) {
        num_blocks[row_of[pass]] = n;
        selected += n;
      }
      const uint32_t key = name[pass];
      name[pass] = key == kAbsent ? kAbsent : uint32_t(offset[pass] + int64_t(key) * block_size);
      // Bitonic merging wants the runs whose bit kWidth of i is set descending: reverse them.
      const bool odd = ((pass * 32 + lane) & kWidth) != 0;
      const uint32_t mirrored = __shfl_sync(0xffffffffu, name[pass], lane ^ (kWidth - 1));
      name[pass] = odd ? mirrored : name[pass];
    }
#pragma unroll
    for (int k = 2 * kWidth; k <= kNames; k <<= 1) {
#pragma unroll
      for (int d = k >> 1; d > 0; d >>= 1) {
        if (d >= 32) {         // partners in the same lane: names p and p + d / 32
#pragma unroll
          for (int lo = 0; lo < kPerLane; ++lo) {
            const int hi = lo + d / 32;
            if ((lo & (d / 32)) != 0 || hi >= kPerLane) continue;
            const bool ascending = ((lo * 32) & k) == 0;
            const uint32_t a = name[lo], c = name[hi];
            name[lo] = ascending ? min(a, c) : max(a, c);
            name[hi] = ascending ? max(a, c) : min(a, c);
          }
          continue;
        }
#pragma unroll
        for (int pass = 0; pass < kPerLane; ++pass) {
          const uint32_t other = __shfl_xor_sync(0xffffffffu, name[pass], d);
          const bool ascending = ((pass * 32 + lane) & k) == 0;
          const bool lower = (lane & d) == 0;
          name[pass] = (lower == ascending) ? min(name[pass], other) : max(name[pass], other);
        }
      }
    }
    // The first of each run of equal names, in order.
    const int width = QT * S;
    int64_t* out = starts + tile * width;
    const unsigned below = (1u << lane) - 1u;
    uint32_t previous_last = kAbsent;    // name 32 * pass - 1 (none before name 0)
#pragma unroll
    for (int pass = 0; pass < kPerLane; ++pass) {
      const uint32_t up = __shfl_up_sync(0xffffffffu, name[pass], 1);
      const uint32_t left = lane == 0 ? previous_last : up;
      const bool keep = name[pass] != kAbsent && (name[pass] != left || (pass == 0 && lane == 0));
      const unsigned ballot = __ballot_sync(0xffffffffu, keep);
      if (keep) out[union_size + __popc(ballot & below)] = int64_t(name[pass]);
      union_size += __popc(ballot);
      previous_last = __shfl_sync(0xffffffffu, name[pass], 31);
    }
    for (int i = union_size + lane; i < width; i += 32) out[i] = kNone;
    if (lane == 0) union_counts[tile] = union_size;
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) selected += __shfl_xor_sync(0xffffffffu, selected, d);
  }
  if (lane == 0 && tile < n_tiles) {
    atomicAdd(&cta_sums[0], static_cast<unsigned long long>(selected));
    atomicAdd(&cta_sums[1], static_cast<unsigned long long>(union_size));
  }
  add_cta_sums(totals, cta_sums);
}

// Passes (names per lane) a tile's rows need: QT rows, 32 / kWidth of them per pass, rounded up
// to 2, 4 or 8; 0 where they need more.
int canonical_union_passes(int64_t num_selected, int64_t tokens_per_tile) {
  if (num_selected < 1 || num_selected > 32 || tokens_per_tile < 1) return 0;
  const int64_t rows_per_pass = num_selected <= 16 ? 2 : 1;
  const int64_t passes = (tokens_per_tile + rows_per_pass - 1) / rows_per_pass;
  return passes <= 2 ? 2 : passes <= 4 ? 4 : passes <= 8 ? 8 : 0;
}

template <int kWidth, int kPerLane, typename Index, typename Count>
cudaError_t launch_canonical_union_typed(const CanonicalUnionParams& p, cudaStream_t stream) {
  const int64_t grid = (p.n_tiles + kUnionWarpsPerBlock - 1) / kUnionWarpsPerBlock;
  const int block_shift = block_shift_of(p.block_size);
  canonical_union_kernel<kWidth, kPerLane, Index, Count>
      <<<unsigned(grid), kUnionWarpsPerBlock * 32, 0, stream>>>(
          static_cast<const Index*>(p.indices), p.pos, static_cast<const Count*>(p.counts),
          p.count_limit, p.k_offset, p.seqlen_q, p.heads_kv, p.num_selected, p.tokens_per_tile,
          p.num_tiles, p.block_size, block_shift, p.n_tiles, p.blocks, p.num_blocks, p.starts,
          p.union_counts, reinterpret_cast<unsigned long long*>(p.totals));
  return cudaGetLastError();
}

template <int kWidth, int kPerLane>
cudaError_t launch_canonical_union_shape(const CanonicalUnionParams& p, cudaStream_t stream) {
  if (p.indices_int64)
    return p.counts_int64
               ? launch_canonical_union_typed<kWidth, kPerLane, int64_t, int64_t>(p, stream)
               : launch_canonical_union_typed<kWidth, kPerLane, int64_t, int32_t>(p, stream);
  return p.counts_int64
             ? launch_canonical_union_typed<kWidth, kPerLane, int32_t, int64_t>(p, stream)
             : launch_canonical_union_typed<kWidth, kPerLane, int32_t, int32_t>(p, stream);
}

template <int kWidth>
cudaError_t launch_canonical_union_width(const CanonicalUnionParams& p, int passes,
                                         cudaStream_t stream) {
  switch (passes) {
    case 2: return launch_canonical_union_shape<kWidth, 2>(p, stream);
    case 4: return launch_canonical_union_shape<kWidth, 4>(p, stream);
    case 8: return launch_canonical_union_shape<kWidth, 8>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool canonical_union_fits(int64_t num_selected, int64_t tokens_per_tile) {
  return canonical_union_passes(num_selected, tokens_per_tile) > 0;
}

cudaError_t launch_canonical_union(const CanonicalUnionParams& p, cudaStream_t stream) {
  if (p.n_tiles == 0) return cudaSuccess;
  const int passes = canonical_union_passes(p.num_selected, p.tokens_per_tile);
  if (passes == 0 || p.totals == nullptr) return cudaErrorInvalidValue;
  return p.num_selected <= 16 ? launch_canonical_union_width<16>(p, passes, stream)
                              : launch_canonical_union_width<32>(p, passes, stream);
}

cudaError_t launch_tile_union(const TileUnionParams& p, cudaStream_t stream) {
  if (p.n_tiles == 0) return cudaSuccess;
  const int width = p.tokens_per_tile * p.num_selected;
  if (width <= 32) return launch_width<32, 1>(p, stream);
  if (width <= 64) return launch_width<64, 1>(p, stream);
  if (width <= 128) return launch_width<128, 1>(p, stream);
  if (width <= 256) return launch_width<256, 1>(p, stream);
  if (width <= 512) return launch_width<512, 2>(p, stream);
  if (width <= 1024) return launch_width<1024, 4>(p, stream);
  if (width <= 2048) return launch_width<2048, 8>(p, stream);
  if (width <= kTileUnionMaxWidth) return launch_width<4096, 16>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace nsa_ext
