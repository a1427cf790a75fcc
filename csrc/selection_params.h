// The one description of a selection-forward launch shared by the binding (C++, Torch headers)
// and the kernels (.cu files, CUDA headers only: they compile without Torch, which keeps each
// instantiation's build short).
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace nsa_ext {

// Every (Dk, Dv) pair with a tensor-core instance, for fp16 and bf16. One .cu file per pair
// (selection_fwd_d<Dk>_<Dv>.cu). Other dims: the Python backend names them unsupported and the
// dispatcher falls back. fp32 takes the CUDA-core kernel, any Dk, Dv <= kFp32MaxHeadDim.
#define NSA_EXT_FOR_EACH_HEAD_DIM(X) X(64, 64) X(128, 128) X(192, 128) X(256, 256)
constexpr int kFp32MaxHeadDim = 256;
constexpr int kMinBlockSize = 16;   // a chunk of 16 keys is the k-dim of one P·V mma

enum class ScalarKind : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

struct SelectionFwdParams {
  const void* q;           // [B, TQ, HQ, Dk], contiguous
  const void* k;           // [B, TK, H, Dk], contiguous
  const void* v;           // [B, TK, H, Dv], contiguous
  const int32_t* blocks;   // [B, TQ, H, S]: each row's set sorted ascending, -1 padded, causally trimmed
  const int32_t* num_blocks;  // [B, TQ, H]: entries of each row that are blocks
  const int64_t* pos;      // [B, TQ]: absolute key position of each query within its sequence
  const int64_t* k_offset; // [B, TQ]: first key of the query's sequence along k's T axis
  void* o;                 // [B, TQ, HQ, Dv], q's dtype
  float* lse;              // [B, TQ, HQ]
  int64_t batch, seqlen_q, seqlen_k, heads_q, heads_kv, group, num_selected;
  int head_dim_qk, head_dim_v;
  int block_size;
  float scale;        // softmax scale
  float scale_log2;   // scale * log2(e): the kernels work in base 2
  // Split-KV (decode): with num_splits > 1 the CTAs of slice s take the canonical entries
  // [s * entries_per_split, min((s + 1) * entries_per_split, num_blocks[row])) of their row and
  // write fp32 partials instead of o and lse; launch_selection_merge combines them.
  int num_splits;          // 1: o and lse written directly, no workspace
  int entries_per_split;   // ceil(S / num_splits)
  float* part_acc;         // [B*TQ*HQ, num_splits, Dv]: unnormalised sum of exp(s - m) * v
  float* part_m;           // [B*TQ*HQ, num_splits]: max scaled score (natural log), -inf if none
  float* part_l;           // [B*TQ*HQ, num_splits]: sum of exp(s - m), 0 if none
  // Rows as the caller gave them (the tensor-core row kernel only; null elsewhere): with
  // raw_indices set, `blocks` and `num_blocks` are unused and each thread block canonicalises
  // its own row (canonical_row.cuh; S <= kCanonicalMaxSelected) -- one launch fewer than the
  // canonical-rows kernel before the forward, which an eager decode call feels.
  const void* raw_indices;   // [B, TQ, H, S] int32 or int64
  const void* raw_counts;    // [B, TQ, H] int32 or int64, or null: count_limit for every row
  int64_t count_limit;
  bool raw_indices_int64, raw_counts_int64;
  // The schedule chosen on the device (nsa_ext_cuda::selection_fwd_auto; null elsewhere): the
  // row and the tile kernel are both enqueued after the tile unions, and each reads the call's
  // (selections, union blocks) that the union kernel summed and returns at once unless the
  // choice is its own -- tile where union * 100 <= gate_tile_max_union_pct * selections
  // (gate_picks_tile). No host synchronisation, so the call is capturable in a CUDA graph.
  const int64_t* gate_totals;
  int gate_tile_max_union_pct;
  // Split-KV merged inside the forward (set by the row kernel's launcher, never by callers):
  // the num_splits slices of a row are one thread-block cluster (SM 9.0), which combines their
  // partials through distributed shared memory and writes o and lse; the workspace and the
  // merge kernel are then unused (selection_fwd.cuh, cluster_merge).
  bool cluster_merge;
};

#ifdef __CUDACC__
// cudaFuncSetAttribute(kernel, MaxDynamicSharedMemorySize, smem) (and, with `max_carveout`, the
// whole unified L1 / shared memory as shared memory) once per kernel, device and host thread
// instead of on every launch: the attribute stays set on the device, and an eager decode step's
// cost is host time, of which every driver call is a part. Each launcher keeps one
// `static thread_local SmemAttributes` of its own (the launchers are templates, one per kernel
// instance: a mask shared between kernels would skip the second one's call). A failed call is
// returned and not remembered.
struct SmemAttributes {
  uint64_t done = 0;   // bit d: set on device d (devices 0..63; others are set every launch)

  template <typename Kernel>
  cudaError_t set(Kernel kernel, int smem, bool max_carveout) {
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
    if (bit && (done & bit)) return cudaSuccess;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err == cudaSuccess && max_carveout)
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                 cudaSharedmemCarveoutMaxShared);
    if (err == cudaSuccess) done |= bit;
    return err;
  }
};

// The device's choice of schedule (SelectionFwdParams::gate_totals): the measured crossover of
// nsa_ext/schedules/chooser.py (pick_measured) on the whole call's counts; a call that selected
// nothing has the ratio 1.
__device__ __forceinline__ bool gate_picks_tile(const SelectionFwdParams& p) {
  const int64_t selections = p.gate_totals[0], unions = p.gate_totals[1];
  const int64_t pct = p.gate_tile_max_union_pct;
  return selections > 0 ? unions * 100 <= pct * selections : pct >= 100;
}

// Entries [x, y) of a row with `row_entries` canonical entries that slice `split` takes (all of
// them when not splitting); empty (x == y) for a slice past the row's end.
__device__ __forceinline__ int2 split_entries(const SelectionFwdParams& p, int row_entries,
                                              int split) {
  if (p.num_splits <= 1) return make_int2(0, row_entries);
  const int begin = min(split * p.entries_per_split, row_entries);
  return make_int2(begin, min(begin + p.entries_per_split, row_entries));
}

// The split-KV merge's weights, one statement for the merge kernel (selection_merge.cu) and the
// cluster merge (selection_fwd.cuh), which therefore give the same bits. Lane s < num_splits
// holds slice s's m (natural log, -inf when the slice saw no key) and l, the other lanes -inf
// and 0; every lane of the warp calls it. Sets M = max_s m_s and L = sum_s l_s exp(m_s - M) in
// every lane and returns lane s's weight exp(m_s - M) / L (0 for an empty slice, and for every
// slice of a row that saw no key). expf / logf are the accurate ones: the fp32 path's
// tolerance is 1e-5.
__device__ __forceinline__ float split_merge_weight(float m_lane, float l_lane, float& m_max,
                                                    float& l_sum) {
  m_max = m_lane;
#pragma unroll
  for (int off = 16; off > 0; off /= 2)
    m_max = fmaxf(m_max, __shfl_xor_sync(0xffffffffu, m_max, off));
  const float w = m_lane == -INFINITY ? 0.f : expf(m_lane - m_max);
  l_sum = l_lane * w;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) l_sum += __shfl_xor_sync(0xffffffffu, l_sum, off);
  return w * (l_sum > 0.f ? 1.f / l_sum : 0.f);
}

// The merged row's lse: M + log L, -inf for a row that saw no key.
__device__ __forceinline__ float split_merge_lse(float m_max, float l_sum) {
  return l_sum > 0.f ? m_max + logf(l_sum) : -INFINITY;
}
#endif

// `merged` (may be null): set when the launch merged the split-KV slices itself (SM 9.0
// clusters, SelectionFwdParams::cluster_merge); launch_selection_merge is then not needed.
template <ScalarKind kKind, int kHeadDimQK, int kHeadDimV>
cudaError_t launch_selection_fwd_mma(const SelectionFwdParams& params, cudaStream_t stream,
                                     bool* merged = nullptr);

cudaError_t launch_selection_fwd_fp32(const SelectionFwdParams& params, cudaStream_t stream);

// Canonical rows (selection_canonical.cu), S <= kCanonicalMaxSelected: indices [rows, S] int32
// or int64, pos [rows / heads_kv] int64, counts [rows] int32 / int64 or null (then count_limit)
// -> blocks [rows, S] int32 (sorted, unique, causally trimmed, -1 padded), num_blocks [rows].
constexpr int kCanonicalMaxSelected = 32;
cudaError_t launch_canonical_blocks(const void* indices, bool indices_int64, const int64_t* pos,
                                    const void* counts, bool counts_int64, int64_t count_limit,
                                    int64_t rows, int64_t heads_kv, int S, int64_t block_size,
                                    int32_t* blocks, int32_t* num_blocks, cudaStream_t stream);

// Query tiles' unions (selection_union.cu): per (batch, tile of QT tokens, KV head) the sorted
// distinct first keys of the blocks its canonical rows chose, kNone-padded to QT * S, the
// union's size, and (totals, when set) the call's (selections, union blocks) added in.
constexpr int kTileUnionMaxWidth = 4096;   // QT * S names one team of warps sorts
struct TileUnionParams {
  const int32_t* blocks;     // [B, TQ, H, S] canonical rows
  const int64_t* k_offset;   // [B, TQ]: first key of each token's sequence along k's T axis
  int64_t* starts;           // [B, NT, H, QT * S]
  int32_t* counts;           // [B, NT, H]
  int64_t* totals;           // [2] or null
  int64_t seqlen_q, heads_kv, num_tiles, n_tiles, block_size;   // n_tiles = B * NT * H
  int num_selected, tokens_per_tile;
};
cudaError_t launch_tile_union(const TileUnionParams& params, cudaStream_t stream);

// Canonical rows and tile unions in one launch (selection_union.cu): the outputs of
// launch_canonical_blocks and launch_tile_union (with totals), where canonical_union_fits:
// every tile's QT rows take at most eight passes of a warp (two rows a pass at S <= 16, one at
// S <= 32: QT <= 16 or QT <= 8), and names are below 2^31 (B * TK < 2^31, as the tile kernel
// requires).
struct CanonicalUnionParams {
  const void* indices;       // [B, TQ, H, S] int32 or int64 (indices_int64)
  const int64_t* pos;        // [B, TQ]
  const void* counts;        // [B, TQ, H] int32 or int64 (counts_int64), or null: count_limit
  const int64_t* k_offset;   // [B, TQ]
  int32_t* blocks;           // [B, TQ, H, S] canonical rows (out)
  int32_t* num_blocks;       // [B, TQ, H] (out)
  int64_t* starts;           // [B, NT, H, QT * S] (out)
  int32_t* union_counts;     // [B, NT, H] (out)
  int64_t* totals;           // [2], zeroed by the caller: += (selections, union blocks)
  int64_t count_limit, seqlen_q, heads_kv, num_tiles, n_tiles, block_size;
  int num_selected, tokens_per_tile;
  bool indices_int64, counts_int64;
};
bool canonical_union_fits(int64_t num_selected, int64_t tokens_per_tile);
cudaError_t launch_canonical_union(const CanonicalUnionParams& params, cudaStream_t stream);

// The query-tile schedule on Hopper (csrc/hopper/, built for sm_90a when the arch list holds
// 9.0; NSA_EXT_HOPPER is then defined): wgmma + TMA, G <= 64, block_size a multiple of 64,
// fp16/bf16, every NSA_EXT_FOR_EACH_HEAD_DIM pair.
struct TileParams {
  SelectionFwdParams fwd;          // q, o, lse, blocks, num_blocks, pos, k_offset, shapes, scale
  const int64_t* union_starts;     // [B, NT, H, U]: first keys (along k's T axis) of each
                                   // tile's union blocks, ascending
  const int32_t* union_counts;     // [B, NT, H]
  int64_t num_tiles;               // NT
  int64_t union_width;             // U
  int tokens_per_tile;             // QT = 64 / G
};
constexpr int kTileRows = 64;      // (token, query head) rows of one tile: QT * G <= 64
// The tile kernel rescales a row's output accumulators only when its maximum grows by more than
// this (base 2): its exponentials stay <= 2^8 = 256 (csrc/hopper/, lazy rescaling).
constexpr float kRescaleSlack = 8.f;
// The kernel is persistent: as many CTAs as fit on the GPU at once (or fewer per SM where that
// takes as many rounds over the work items), each striding over the (batch, tile, KV head) work
// items; max_ctas > 0 caps that grid (tests run many tiles per CTA).
cudaError_t launch_selection_tile_sm90(const TileParams& params, ScalarKind kind,
                                       int64_t max_ctas, cudaStream_t stream);

// Split-KV merge: part_acc / part_m / part_l -> o (q's dtype, `kind`) and lse.
cudaError_t launch_selection_merge(const SelectionFwdParams& params, ScalarKind kind,
                                   cudaStream_t stream);

}  // namespace nsa_ext
