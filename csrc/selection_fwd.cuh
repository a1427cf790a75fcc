// Selection-attention forward on tensor cores (fp16/bf16, SM 8.0+).
//
// One thread block (4 warps) computes one query token t of batch b for one KV head h: up to
// 16 * kRowTiles of the G query heads of that KV group (rows of Q, padded to a multiple of 16;
// a larger group is cut into several thread blocks, blockIdx.z). It loads those rows of Q once
// into shared memory, then streams the row's selected keys through shared memory in stages of
// 64 keys (K and V, cp.async). A stage is four chunks of 16 keys; a chunk is 16 consecutive keys
// of one selected block, so any power-of-two block size >= 16 is a whole number of chunks, and
// blocks of 16 or 32 keys are gathered four or two to a stage.
//
// The warps share every stage (the schedule of the Triton group kernel): for Q·Kᵀ warp w takes
// keys 16w .. 16w+15 of the stage for all rows; the row maxima meet in shared memory, so every
// warp applies one running max (online softmax, fp32, base 2); P [rows, 64 keys] goes through
// shared memory and for P·V warp w takes value columns w * Dv/4 .. (w + 1) * Dv/4 - 1. So a
// thread holds kRowTiles * Dv/8 accumulators (16 at G <= 16, Dv = 128), registers stay under
// ~96 and five thread blocks (20 warps) share an SM at 128/128: on the H100 the number of
// resident warps, not the bytes in flight per warp, set the L2 -> shared-memory rate
// (notes/cuda.md). Q·Kᵀ and P·V run on mma.sync m16n8k16 with ldmatrix operands.
//
// One K/V buffer: the next stage's K is requested as soon as every warp is done with this
// stage's K (after the max exchange), its V once P·V is done; the other resident thread blocks
// hide the latency. Where the whole grid is one wave (decode: 1-3 blocks per SM) nothing hides
// it, and an instance with two K/V buffers runs instead (G <= 16): stages s + 1 and s + 2 in
// flight while stage s computes (launch()).
// Address work stays off the copy path (the kernel was issue-bound before): four threads
// describe each stage's chunks (first key, visible keys) in shared memory ahead of its copies,
// and every thread copies one fixed row of each chunk (tid / 8) at fixed 16-byte segments
// (tid % 8, + 8, ...), so a copy costs a predicate and an immediate offset. Q, K and V rows are
// unpadded in shared memory, the 16-byte units of each row permuted (unit u of row r sits at
// u ^ (r % 8)): ldmatrix's eight rows hit eight distinct bank groups, and each 128-byte piece of
// a key row lands in one 128-byte span. (With 16-byte row padding instead, a warp's copies
// straddled 32-byte sectors: on the H100 that made 1.5x the L2 sector reads and 2.7x the L2
// requests for the same bytes.)
//
// It writes o [Dv] (q's dtype) and lse (fp32, natural log) for each of its valid rows; a row that
// sees no key gets o = 0 and lse = -inf.
//
// Split-KV (decode, p.num_splits > 1): the grid's z axis also counts slices (z = slice * tiles +
// tile); a thread block takes only its slice's entries of the row (split_entries; the loop is
// the same, over fewer chunks) and writes the unnormalised partials acc [Dv], m, l of each row to
// the fp32 workspace, which launch_selection_merge (selection_merge.cu) turns into o and lse. On
// SM 9.0 a one-wave decode (the two-buffer instance, one row tile, <= 16 slices) instead launches
// each row's slices as one thread-block cluster that merges in shared memory (cluster_merge):
// no workspace round trip, no second launch.
//
// Input contract (the Python backend builds it with nsa_ext.selection.canonical_blocks): each
// row's blocks sorted ascending, de-duplicated, -1 padded, none past the query's own block; or
// (p.raw_indices) the caller's rows, which each thread block canonicalises itself first.
// Memory safety does not rest on it: a key is loaded only when 0 <= j <= pos and it lies inside
// k's T axis; others are zero-filled and masked.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "canonical_row.cuh"
#include "selection_params.h"

namespace nsa_ext {
namespace mma_kernel {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kChunkKeys = 16;
constexpr int kChunksPerStage = 4;
constexpr int kStageKeys = kChunkKeys * kChunksPerStage;   // 64
constexpr int kRowPad = 8;   // 16 bytes per row of P in shared memory: no bank conflicts
constexpr float kLn2 = 0.6931471805599453f;

template <ScalarKind kKind> struct Element;
template <> struct Element<ScalarKind::kFloat16> { using type = __half; };
template <> struct Element<ScalarKind::kBFloat16> { using type = __nv_bfloat16; };

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16 bytes global -> shared; src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(ptr)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(ptr)));
}

// d += a (16x16, row) * b (16x8, col), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One float -> T, rounded to nearest (the merge kernel's conversion).
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats -> one register of two 16-bit values, the first in the low half (mma's order).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

static_assert(kChunkKeys == 16, "count_chunks and the kernel's block_shift: 16 keys a chunk");

// The row's chunk count: only the query's own block (the last one, as the list is sorted) can
// reach past pos. Block sizes are powers of two: shifts, not 64-bit divisions.
__device__ __forceinline__ int count_chunks(const int32_t* row_blocks, int num_blocks, int64_t pos,
                                            int block_shift) {
  if (num_blocks <= 0) return 0;
  const int chunks_per_block = 1 << (block_shift - 4);   // kChunkKeys = 16 keys a chunk
  const int64_t last = row_blocks[num_blocks - 1];
  const int64_t own = pos >> block_shift;
  return (num_blocks - 1) * chunks_per_block +
         (last == own ? int((pos & ((int64_t(1) << block_shift) - 1)) >> 4) + 1 : chunks_per_block);
}

// Unit `unit` (16 bytes) of shared-memory row `row` in the swizzled layout.
__device__ __forceinline__ int swizzle(int row, int unit) { return unit ^ (row & 7); }

// kBuffers K/V buffers of one stage each: 1 (the kernel's usual form: several blocks per SM hide
// a block's copies) or 2 (grids of one wave, decode: two stages in flight per block).
template <int kHeadDimQK, int kHeadDimV, int kRowTiles, int kBuffers = 1>
struct SmemLayout {
  static constexpr int kRows = 16 * kRowTiles;
  static constexpr int kStrideP = kStageKeys + kRowPad;
  // Stages whose chunks are described at once (the current one and those in flight): a power
  // of two, a stage's descriptors sit in slot stage & (kSlots - 1).
  static constexpr int kSlots = kBuffers == 1 ? 2 : 4;
  static constexpr size_t q_bytes() { return size_t(kRows) * kHeadDimQK * 2; }
  static constexpr size_t k_bytes() { return size_t(kBuffers) * kStageKeys * kHeadDimQK * 2; }
  static constexpr size_t v_bytes() { return size_t(kBuffers) * kStageKeys * kHeadDimV * 2; }
  static constexpr size_t p_bytes() { return size_t(kRows) * kStrideP * 2; }
  // row maxima and sums [kWarps][kRows] fp32; per chunk [kSlots][4]: K and V element offsets
  // (int64) and visible keys (int32)
  // and the row's canonical entries and their count when the kernel canonicalises it itself
  // (p.raw_indices; 132 bytes, which change no instance's blocks per SM).
  static constexpr size_t misc_bytes() {
    return 2 * size_t(kWarps) * kRows * 4 + kSlots * kChunksPerStage * (8 + 8 + 4) +
           (kCanonicalMaxSelected + 1) * 4;
  }
  static constexpr size_t total_bytes() {
    return q_bytes() + k_bytes() + v_bytes() + p_bytes() + misc_bytes();
  }
  // Where the chunk descriptors start (after the row maxima and sums): the kernel reads a stage's
  // offsets and visible keys 16 bytes at a time.
  static constexpr size_t descriptor_offset() {
    return q_bytes() + k_bytes() + v_bytes() + p_bytes() + 2 * size_t(kWarps) * kRows * 4;
  }
  static_assert(descriptor_offset() % 16 == 0 && (kSlots * kChunksPerStage * 8) % 16 == 0,
                "16-byte reads of the chunk descriptors");
  // Thread blocks per SM: what the shared memory allows (227 KB per SM, 1 KB reserved per
  // block), at most 5 / 4 / 3 for 1 / 2 / 4 row tiles (registers: 65536 / (blocks * 128)).
  static constexpr int blocks_per_sm() {
    const size_t fit = (227 * 1024) / (total_bytes() + 1024);
    const size_t cap = kRowTiles == 1 ? 5 : kRowTiles == 2 ? 4 : 3;
    return fit >= cap ? int(cap) : fit < 1 ? 1 : int(fit);
  }
};

// Split-KV merged in a thread-block cluster (SM 9.0): the row's num_splits slices are the
// cluster's blocks (cluster dims (1, 1, num_splits), one row tile, so blockIdx.z = slice = rank).
// Each block has put its partials -- acc [rows][Dv], m (natural log) and l per row -- in its own
// shared memory; after a cluster barrier, row r is merged by block r % num_splits, one warp per
// row, reading every slice's partials from the other blocks' shared memory (DSMEM). The weights
// are the merge kernel's (split_merge_weight) and the sum runs in its order (slices ascending,
// batches of kBatch), so o and lse are the same bits as selection_merge.cu's. A
// second barrier keeps every block's shared memory alive until the others are done reading.
// Saves the merge kernel (a launch and the workspace's round trip: ~2 us of a B = 1 decode).
template <typename T, int kDv>
__device__ __forceinline__ void cluster_merge(const SelectionFwdParams& p, float* sXAcc,
                                              float* sXM, float* sXL, int rows, int64_t out_row0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int kCols = kDv / 32;          // columns per lane
  // Slices whose columns a lane loads together: 64 registers, and no more than a cluster's 16.
  constexpr int kBatch = 64 / kCols < 16 ? 64 / kCols : 16;
  cg::cluster_group cluster = cg::this_cluster();
  // Every slice's partials are in its shared memory: a release / acquire barrier of the cluster.
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n"
               ::: "memory");
  const int ns = p.num_splits, rank = int(cluster.block_rank());
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T* o = static_cast<T*>(p.o);
  for (int r = rank + ns * warp; r < rows; r += ns * kWarps) {
    const int s_lane = lane < ns ? lane : 0;
    const float m_lane = lane < ns ? cluster.map_shared_rank(sXM, s_lane)[r] : -INFINITY;
    const float l_lane = lane < ns ? cluster.map_shared_rank(sXL, s_lane)[r] : 0.f;
    float m_max, l_sum;
    const float w_lane = split_merge_weight(m_lane, l_lane, m_max, l_sum);
    float sum[kCols];
#pragma unroll
    for (int i = 0; i < kCols; ++i) sum[i] = 0.f;
    for (int s0 = 0; s0 < ns; s0 += kBatch) {
      float part[kBatch][kCols];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const float* peer = s0 + j < ns ? cluster.map_shared_rank(sXAcc, s0 + j) + r * kDv : nullptr;
#pragma unroll
        for (int i = 0; i < kCols; ++i) part[j][i] = peer ? peer[lane + 32 * i] : 0.f;
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const float w = __shfl_sync(0xffffffffu, w_lane, (s0 + j) & 31);
#pragma unroll
        for (int i = 0; i < kCols; ++i) sum[i] += part[j][i] * w;
      }
    }
    const int64_t out_row = out_row0 + r;
#pragma unroll
    for (int i = 0; i < kCols; ++i) o[out_row * kDv + lane + 32 * i] = from_float<T>(sum[i]);
    if (lane == 0) p.lse[out_row] = split_merge_lse(m_max, l_sum);
  }
  // No block leaves while another still reads its shared memory. Relaxed: this block's reads
  // are done (their values are in o), and its stores to o need no ordering against the others
  // (cluster.sync()'s release here was a GPU-scope fence that waited for those stores: ~70 %
  // of the merge's stall samples at B = 1 under ncu).
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\nbarrier.cluster.wait.aligned;\n"
               ::: "memory");
#else
  __trap();   // the launcher sets cluster_merge only for SM 9.0+ code (ClusterMergeSupport)
#endif
}

template <typename T, int kHeadDimQK, int kHeadDimV, int kRowTiles, int kMinBlocksPerSm,
          int kBuffers>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    selection_fwd_kernel(const SelectionFwdParams p) {
  using Layout = SmemLayout<kHeadDimQK, kHeadDimV, kRowTiles, kBuffers>;
  constexpr int kSlotMask = Layout::kSlots - 1;
  constexpr int kRows = Layout::kRows;
  constexpr int kSP = Layout::kStrideP;
  constexpr int kSegQK = kHeadDimQK / 8;
  constexpr int kSegV = kHeadDimV / 8;
  constexpr int kStepsQK = kHeadDimQK / 16;
  constexpr int kColsPerWarp = kHeadDimV / kWarps;
  constexpr int kTilesW = kColsPerWarp / 8;
  constexpr int kLanesPerRow = kThreads / kChunkKeys;   // 8: a chunk's 16 rows, 8 threads each
  static_assert(kColsPerWarp % 16 == 0, "each warp's value columns: whole ldmatrix tiles");
  static_assert(kSegQK % kLanesPerRow == 0 && kSegV % kLanesPerRow == 0,
                "head dims: multiples of 64");

  // selection_fwd_auto enqueued the tile kernel too: the one the device chose runs.
  if (p.gate_totals != nullptr && gate_picks_tile(p)) return;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  T* sQ = reinterpret_cast<T*>(smem);                                          // [kRows][Dk]
  T* sK = reinterpret_cast<T*>(smem + Layout::q_bytes());                      // [kBuffers][64][Dk]
  T* sV = reinterpret_cast<T*>(smem + Layout::q_bytes() + Layout::k_bytes());  // [kBuffers][64][Dv]
  T* sP = reinterpret_cast<T*>(smem + Layout::q_bytes() + Layout::k_bytes() + Layout::v_bytes());
  float* sMax = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(sP) + Layout::p_bytes());
  float* sSum = sMax + kWarps * kRows;                                   // [kWarps][kRows] each
  // Per chunk of the current stage and those in flight [kSlots][4]: offsets (elements) of its
  // first key's K and V rows from the sequence's key 0, and its visible keys.
  int64_t* sOffK = reinterpret_cast<int64_t*>(sSum + kWarps * kRows);
  int64_t* sOffV = sOffK + Layout::kSlots * kChunksPerStage;
  int* sVisible = reinterpret_cast<int*>(sOffV + Layout::kSlots * kChunksPerStage);
  int32_t* sRow = sVisible + Layout::kSlots * kChunksPerStage;   // [kCanonicalMaxSelected], count
  // Cluster merge's exchange, in the K buffers (every copy has landed and every warp is done
  // with K by the time it is written): acc [kRows][Dv], then m [kRows] and l [kRows], fp32.
  float* sXAcc = reinterpret_cast<float*>(sK);
  float* sXM = sXAcc + kRows * kHeadDimV;
  float* sXL = sXM + kRows;
  static_assert(size_t(kRows) * (kHeadDimV + 2) * 4 <= Layout::k_bytes() || kBuffers == 1,
                "the cluster exchange fits in the K buffers");

  // Work items (b * TQ + t, KV head, row tile x split), the first fastest: the launch's grid is
  // (B * TQ, H, tiles * splits) and each block takes its own item, or -- selection_fwd_auto's
  // launch, where the device may choose the tile kernel instead -- a grid of at most the blocks
  // that fit at once, each striding over the items: an unchosen kernel then costs a few hundred
  // blocks that read the choice and return, not one per item (131072 at T = 32k, ~83 us).
  // (The loop's bounds are recomputed from the parameters, not held in registers across the
  // body: the d128 instances are at their register bound.)
  const int tiles = int((p.group + kRows - 1) / kRows);
  for (int64_t item = blockIdx.x + int64_t(gridDim.x) * (blockIdx.y + int64_t(gridDim.y) * blockIdx.z);
       item < p.batch * p.seqlen_q * p.heads_kv * tiles * p.num_splits;
       item += int64_t(gridDim.x) * gridDim.y * gridDim.z) {
    // The item's coordinates. Ungated, the grid is (B * TQ, H, tiles * splits), one block per
    // item: the block's own indices, no 64-bit divisions on the way to the row's first loads
    // (at decode the whole kernel is that chain, notes/eager.md).
    int64_t bt;   // b * TQ + t
    int h, z;
    if (p.gate_totals == nullptr) {
      bt = blockIdx.x;
      h = int(blockIdx.y);
      z = int(blockIdx.z);
    } else {
      bt = item % (p.batch * p.seqlen_q);
      h = int((item / (p.batch * p.seqlen_q)) % p.heads_kv);
      z = int(item / (p.batch * p.seqlen_q * p.heads_kv));
    }
    const int split = tiles == 1 ? z : z / tiles;
    const int64_t g0 = int64_t(tiles == 1 ? 0 : z % tiles) * kRows;   // first group row of this block
    const int64_t G = p.group;
    const int64_t row = bt * p.heads_kv + h;   // selection row
    const int block_size = p.block_size;
    const int chunks_per_block = block_size / kChunkKeys;   // a power of two
    const int cpb_shift = __ffs(chunks_per_block) - 1;
    const int block_shift = cpb_shift + 4;                  // log2(block_size): kChunkKeys = 16
    // The row's raw entry for lane `lane` of warp 0 (p.raw_indices), loaded beside pos and the
    // count, not after them: each is a trip to memory, and at decode they head the kernel's chain.
    int64_t raw_entry = -1;
    int64_t raw_count = p.count_limit;
    if (p.raw_indices != nullptr && warp == 0) {
      const int S = int(p.num_selected);
      raw_entry = p.raw_indices_int64
                      ? canonical_entry(static_cast<const int64_t*>(p.raw_indices) + row * S, S, lane)
                      : canonical_entry(static_cast<const int32_t*>(p.raw_indices) + row * S, S, lane);
      if (p.raw_counts != nullptr)
        raw_count = p.raw_counts_int64 ? static_cast<const int64_t*>(p.raw_counts)[row]
                                       : static_cast<const int32_t*>(p.raw_counts)[row];
    }
    const int64_t pos = p.pos[bt];
    const int64_t k_offset = p.k_offset[bt];
    const int64_t b = p.seqlen_q == 1 ? bt : bt / p.seqlen_q;
    const int64_t kv_row0 = b * p.seqlen_k + k_offset;   // row of key 0 of the sequence in [B*TK]
    // Keys 0 .. key_end - 1 of the sequence are visible to this query and inside the tensor.
    const int64_t key_end = min(pos + 1, p.seqlen_k - k_offset);
    const T* q = static_cast<const T*>(p.q);
    // Q rows [kRows, Dk]: zeros past the group's end. Issued first: the copy overlaps the row's
    // canonicalisation below.
    {
      const T* q_rows = q + (bt * p.heads_q + int64_t(h) * G + g0) * kHeadDimQK;
      for (int i = tid; i < kRows * kSegQK; i += kThreads) {
        const int r = i / kSegQK, seg = i % kSegQK;
        const bool valid = g0 + r < G;
        cp_async_16(sQ + r * kHeadDimQK + swizzle(r, seg) * 8,
                    valid ? q_rows + r * kHeadDimQK + seg * 8 : q, valid);
      }
      cp_async_commit();
    }

    // The row's canonical entries: given (p.blocks), or canonicalised here by warp 0 from the
    // caller's indices (every thread block of the row computes the same set).
    const int32_t* row_all = p.blocks + row * p.num_selected;
    int row_count = 0;
    if (p.raw_indices != nullptr) {
      if (warp == 0) {
        uint32_t key = canonical_key_of(raw_entry, lane, raw_count, pos >> block_shift);
        const int n = canonical_sort_lanes<32>(key, int(p.num_selected), sRow, lane);
        if (lane == 0) sRow[kCanonicalMaxSelected] = n;
      }
      __syncthreads();
      row_all = sRow;
      row_count = sRow[kCanonicalMaxSelected];
    } else {
      row_count = p.num_blocks[row];
    }
    // Clamped so that a malformed count can never index past the row; this block's slice of it.
    const int2 entries = split_entries(p, max(0, min(row_count, int(p.num_selected))), split);
    const int32_t* row_blocks = row_all + entries.x;
    const int total_chunks = count_chunks(row_blocks, entries.y - entries.x, pos, block_shift);
    const int num_stages = (total_chunks + kChunksPerStage - 1) / kChunksPerStage;

    const int64_t k_stride = p.heads_kv * kHeadDimQK;   // key j is j rows of H * D elements further
    const int64_t v_stride = p.heads_kv * kHeadDimV;
    // This thread's row within a chunk and first 16-byte segment of it.
    const int crow = tid / kLanesPerRow, cseg = tid % kLanesPerRow;
    // Key 0 of the sequence at this thread's segment, and key crow: a copy adds the chunk's offset.
    const T* k_seg = static_cast<const T*>(p.k) + (kv_row0 * p.heads_kv + h) * kHeadDimQK + cseg * 8;
    const T* v_seg = static_cast<const T*>(p.v) + (kv_row0 * p.heads_kv + h) * kHeadDimV + cseg * 8;
    const T* k_thread = k_seg + crow * k_stride;
    const T* v_thread = v_seg + crow * v_stride;
    // Row crow of every chunk has crow % 8 == crow's: one swizzled unit for all of them.
    T* sK_thread = sK + crow * kHeadDimQK + swizzle(crow, cseg) * 8;
    T* sV_thread = sV + crow * kHeadDimV + swizzle(crow, cseg) * 8;

    // Threads 0-3: chunk tid of `stage` -> slot stage % kSlots (first key; visible keys, 0 if
    // none).
    auto describe_stage = [&](int stage) {
      if (tid < kChunksPerStage) {
        const int chunk = stage * kChunksPerStage + tid;
        int64_t first = 0;
        int visible = 0;
        if (chunk < total_chunks) {
          const int64_t block = row_blocks[chunk >> cpb_shift];
          if (block >= 0) {
            first = block * block_size + int64_t(chunk & (chunks_per_block - 1)) * kChunkKeys;
            visible = int(max(int64_t(0), min(int64_t(kChunkKeys), key_end - first)));
          }
        }
        sOffK[(stage & kSlotMask) * kChunksPerStage + tid] = first * k_stride;
        sOffV[(stage & kSlotMask) * kChunksPerStage + tid] = first * v_stride;
        sVisible[(stage & kSlotMask) * kChunksPerStage + tid] = visible;
      }
    };
    // K (or V) rows of `stage` into its buffer (stage % kBuffers); rows of keys that are not
    // visible become zeros (V's must: P = 0 times stale NaN would be NaN).
    // A copy that is not valid reads nothing (src-size 0); it is pointed at the sequence's key 0.
    // Each group of kGroup chunks: its descriptors are read first, in one 16-byte load of
    // offsets per two chunks and one load of visible keys, then its copies are issued. Read one
    // by one behind each chunk's validity test, they were a chain of dependent shared loads (a
    // copy to shared memory may alias them, so none moves above an earlier copy): 29 % of a
    // decode block's stall samples (ncu, B = 32; notes/eager.md, twenty-third session). The
    // whole stage at once where a block is alone on its SM (two buffers: decode, registers to
    // spare); pairs where several blocks share an SM, hide each other's chains and are at their
    // register bound.
    constexpr int kGroup = kBuffers >= 2 ? 4 : 2;
    static_assert(kChunksPerStage % 4 == 0, "a stage's descriptors: read in groups of 2 or 4");
    auto load_rows = [&](int stage, const T* src_thread, const T* src_seg, const int64_t* offsets,
                         T* dst_thread, int row_elems, auto seg_count) {
      constexpr int kSeg = decltype(seg_count)::value;
#pragma unroll
      for (int c0 = 0; c0 < kChunksPerStage; c0 += kGroup) {
        const int slot0 = (stage & kSlotMask) * kChunksPerStage + c0;
        int visible[kGroup];
        int64_t offset[kGroup];
        if constexpr (kGroup == 4) {
          const int4 v4 = *reinterpret_cast<const int4*>(sVisible + slot0);
          visible[0] = v4.x, visible[1] = v4.y, visible[2] = v4.z, visible[3] = v4.w;
        } else {
          const int2 v2 = *reinterpret_cast<const int2*>(sVisible + slot0);
          visible[0] = v2.x, visible[1] = v2.y;
        }
#pragma unroll
        for (int i = 0; i < kGroup; i += 2) {
          const longlong2 o2 = *reinterpret_cast<const longlong2*>(offsets + slot0 + i);
          offset[i] = o2.x, offset[i + 1] = o2.y;
        }
#pragma unroll
        for (int i = 0; i < kGroup; ++i) {
          const bool valid = crow < visible[i];
          const T* src = valid ? src_thread + offset[i] : src_seg;
          T* dst = dst_thread + ((stage % kBuffers) * kStageKeys + (c0 + i) * kChunkKeys) * row_elems;
#pragma unroll
          for (int e = 0; e < kSeg / kLanesPerRow; ++e)
            cp_async_16(dst + e * kLanesPerRow * 8, src + e * kLanesPerRow * 8, valid);
        }
      }
    };
    auto load_k = [&](int stage) {
      load_rows(stage, k_thread, k_seg, sOffK, sK_thread, kHeadDimQK,
                std::integral_constant<int, kSegQK>{});
    };
    auto load_v = [&](int stage) {
      load_rows(stage, v_thread, v_seg, sOffV, sV_thread, kHeadDimV,
                std::integral_constant<int, kSegV>{});
    };

    // Copies in flight: kBuffers stages. With one buffer, stage s + 1's K is requested once
    // every warp is done with stage s's K, its V once P V is done; with two, stage s + 2's K and
    // V once stage s is done (stage s + 1's are in flight meanwhile).
#pragma unroll
    for (int b = 0; b < kBuffers; ++b) describe_stage(b);
    __syncthreads();
#pragma unroll
    for (int b = 0; b < kBuffers; ++b) {
      if (b < num_stages) { load_k(b); load_v(b); }
      cp_async_commit();
    }

    // Per thread, row tile rt: rows rt * 16 + lane / 4 and + 8; m is the same in every warp.
    const int r0 = lane / 4;
    float m_row[kRowTiles][2], l_row[kRowTiles][2];   // l: this thread's share of the row sums
    float acc[kRowTiles][kTilesW][4];
#pragma unroll
    for (int rt = 0; rt < kRowTiles; ++rt) {
      m_row[rt][0] = m_row[rt][1] = -INFINITY;
      l_row[rt][0] = l_row[rt][1] = 0.f;
#pragma unroll
      for (int n = 0; n < kTilesW; ++n) acc[rt][n][0] = acc[rt][n][1] = acc[rt][n][2] = acc[rt][n][3] = 0.f;
    }

    for (int s = 0; s < num_stages; ++s) {
      cp_async_wait<kBuffers - 1>();   // every group but the newest kBuffers - 1: stage s's
      __syncthreads();   // stage s (and Q) landed for every thread; iteration s - 1 is done
      describe_stage(s + kBuffers);   // read after the next barrier
      const int buffer = s % kBuffers;

      // S [rows, this warp's 16 keys]; keys past `visible` are masked.
      const int visible = sVisible[(s & kSlotMask) * kChunksPerStage + warp];
      float sc[kRowTiles][2][4];
#pragma unroll
      for (int rt = 0; rt < kRowTiles; ++rt)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[rt][0][e] = sc[rt][1][e] = 0.f;
      if (visible > 0) {
        const T* cK = sK + (buffer * kStageKeys + warp * kChunkKeys) * kHeadDimQK;
#pragma unroll
        for (int ks = 0; ks < kStepsQK; ++ks) {
          // Rows (lane % 8) + 8 (lane / 16) of the chunk and lane % 16 of a Q tile: row % 8 = lane % 8.
          uint32_t kb[4];
          ldmatrix_x4(kb, cK + ((lane % 8) + (lane / 16) * 8) * kHeadDimQK +
                              swizzle(lane, ks * 2 + (lane / 8) % 2) * 8);
#pragma unroll
          for (int rt = 0; rt < kRowTiles; ++rt) {
            uint32_t a[4];
            ldmatrix_x4(a, sQ + (rt * 16 + lane % 16) * kHeadDimQK + swizzle(lane, ks * 2 + lane / 16) * 8);
            mma_16816<T>(sc[rt][0], a, kb[0], kb[1]);
            mma_16816<T>(sc[rt][1], a, kb[2], kb[3]);
          }
        }
      }
#pragma unroll
      for (int rt = 0; rt < kRowTiles; ++rt) {
        float part_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) sc[rt][nt][e] *= p.scale_log2;
        if (visible < kChunkKeys) {   // the query's own block, or a chunk past the row's end
#pragma unroll
          for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if (nt * 8 + 2 * (lane % 4) + (e & 1) >= visible) sc[rt][nt][e] = -INFINITY;
        }
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) part_max[e / 2] = fmaxf(part_max[e / 2], sc[rt][nt][e]);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          part_max[i] = fmaxf(part_max[i], __shfl_xor_sync(0xffffffffu, part_max[i], 1));
          part_max[i] = fmaxf(part_max[i], __shfl_xor_sync(0xffffffffu, part_max[i], 2));
        }
        if (lane % 4 == 0) {
          sMax[warp * kRows + rt * 16 + r0] = part_max[0];
          sMax[warp * kRows + rt * 16 + r0 + 8] = part_max[1];
        }
      }
      __syncthreads();   // maxima in, stage s + kBuffers described, every warp done with this K
      if constexpr (kBuffers == 1) {
        if (s + 1 < num_stages) load_k(s + 1);
        cp_async_commit();
      }
      bool rescale = false;
#pragma unroll
      for (int rt = 0; rt < kRowTiles; ++rt) {
        float m_use[2], corr[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int r = rt * 16 + r0 + 8 * i;
          float stage_max = sMax[r];
#pragma unroll
          for (int w = 1; w < kWarps; ++w) stage_max = fmaxf(stage_max, sMax[w * kRows + r]);
          const float m_new = fmaxf(m_row[rt][i], stage_max);
          // Nothing visible yet: keep m = -inf and subtract 0, never -inf - -inf.
          m_use[i] = m_new == -INFINITY ? 0.f : m_new;
          corr[i] = fast_exp2(m_row[rt][i] - m_use[i]);
          m_row[rt][i] = m_new;
        }
        float row_sum[2] = {0.f, 0.f};
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            sc[rt][nt][e] = fast_exp2(sc[rt][nt][e] - m_use[e / 2]);
            row_sum[e / 2] += sc[rt][nt][e];
          }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) l_row[rt][i] = l_row[rt][i] * corr[i] + row_sum[i];
        // P [rows, 64 keys]: this warp's 16 columns, in the accumulator layout of its two tiles.
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int col = warp * kChunkKeys + nt * 8 + 2 * (lane % 4);
          T* p_row = sP + (rt * 16 + r0) * kSP + col;
          *reinterpret_cast<uint32_t*>(p_row) = pack2<T>(sc[rt][nt][0], sc[rt][nt][1]);
          *reinterpret_cast<uint32_t*>(p_row + 8 * kSP) = pack2<T>(sc[rt][nt][2], sc[rt][nt][3]);
        }
        rescale |= corr[0] != 1.f || corr[1] != 1.f;
        sc[rt][0][0] = corr[0];   // kept for the rescale below (sc is spent)
        sc[rt][0][1] = corr[1];
      }
      // Once the running maxima settle, corr is exactly 1 for every row: skip the multiplies then.
      // corr is the same in every warp (one shared max), so the branch is block-uniform.
      if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt)
#pragma unroll
          for (int n = 0; n < kTilesW; ++n) {
            acc[rt][n][0] *= sc[rt][0][0];
            acc[rt][n][1] *= sc[rt][0][0];
            acc[rt][n][2] *= sc[rt][0][1];
            acc[rt][n][3] *= sc[rt][0][1];
          }
      }
      __syncthreads();   // P complete
      // O [rows, this warp's columns] += P [rows, 64] V [64, columns].
#pragma unroll
      for (int ks = 0; ks < kChunksPerStage; ++ks) {
        uint32_t pa[kRowTiles][4];
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt)
          ldmatrix_x4(pa[rt], sP + (rt * 16 + lane % 16) * kSP + ks * 16 + (lane / 16) * 8);
#pragma unroll
        for (int nd = 0; nd < kColsPerWarp / 16; ++nd) {
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, sV + (buffer * kStageKeys + ks * 16 + lane % 16) * kHeadDimV +
                                    swizzle(lane, (warp * kColsPerWarp + nd * 16) / 8 + lane / 16) * 8);
#pragma unroll
          for (int rt = 0; rt < kRowTiles; ++rt) {
            mma_16816<T>(acc[rt][2 * nd], pa[rt], vb[0], vb[1]);
            mma_16816<T>(acc[rt][2 * nd + 1], pa[rt], vb[2], vb[3]);
          }
        }
      }
      __syncthreads();   // every warp is done with this stage's V and with P
      if constexpr (kBuffers == 1) {
        if (s + 1 < num_stages) load_v(s + 1);
      } else if (s + kBuffers < num_stages) {
        load_k(s + kBuffers);
        load_v(s + kBuffers);
      }
      cp_async_commit();
    }
    cp_async_wait<0>();

    // Row sums: over the quad, then over the warps (each warp summed its own keys). sSum is not
    // used by the loop: no barrier needed before writing it.
#pragma unroll
    for (int rt = 0; rt < kRowTiles; ++rt)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float l = l_row[rt][i];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        if (lane % 4 == 0) sSum[warp * kRows + rt * 16 + r0 + 8 * i] = l;
      }
    __syncthreads();
    T* o = static_cast<T*>(p.o);
#pragma unroll
    for (int rt = 0; rt < kRowTiles; ++rt)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = rt * 16 + r0 + 8 * i;
        if (g0 + r >= G) continue;
        float l_sum = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) l_sum += sSum[w * kRows + r];
        const float m = m_row[rt][i];
        const int64_t out_row = bt * p.heads_q + int64_t(h) * G + g0 + r;
        if (p.num_splits > 1) {
          // An empty slice: m = -inf, l = 0, acc = 0. To the workspace, or (cluster merge) to
          // this block's shared memory, row r of the cluster's exchange.
          const int64_t slot = out_row * p.num_splits + split;
          const bool in_cluster = kBuffers == 2 && p.cluster_merge;
          float* acc_out = in_cluster ? sXAcc + r * kHeadDimV : p.part_acc + slot * kHeadDimV;
#pragma unroll
          for (int n = 0; n < kTilesW; ++n) {
            const int col = warp * kColsPerWarp + n * 8 + 2 * (lane % 4);
            *reinterpret_cast<float2*>(acc_out + col) =
                make_float2(acc[rt][n][2 * i], acc[rt][n][2 * i + 1]);
          }
          if (warp == 0 && lane % 4 == 0) {
            *(in_cluster ? sXM + r : p.part_m + slot) = m == -INFINITY ? -INFINITY : m * kLn2;
            *(in_cluster ? sXL + r : p.part_l + slot) = l_sum;
          }
          continue;
        }
        const float inv = l_sum > 0.f ? 1.f / l_sum : 0.f;
#pragma unroll
        for (int n = 0; n < kTilesW; ++n) {
          const int col = warp * kColsPerWarp + n * 8 + 2 * (lane % 4);
          *reinterpret_cast<uint32_t*>(o + out_row * kHeadDimV + col) =
              pack2<T>(acc[rt][n][2 * i] * inv, acc[rt][n][2 * i + 1] * inv);
        }
        if (warp == 0 && lane % 4 == 0)
          p.lse[out_row] = l_sum > 0.f ? m * kLn2 + logf(l_sum) : -INFINITY;
      }
    if constexpr (kBuffers == 2) {
      if (p.cluster_merge)
        cluster_merge<T, kHeadDimV>(p, sXAcc, sXM, sXL, int(min(int64_t(kRows), G - g0)),
                                    bt * p.heads_q + int64_t(h) * G + g0);
    }
    __syncthreads();   // the next item's copies and row set overwrite this one's shared memory
  }
}

// The current device (an index below 64) and its SM count (cached per device).
inline cudaError_t current_device_sms(int& device, int& sms) {
  static thread_local int sms_of[64] = {};
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  if (device < 0 || device >= 64) return cudaErrorInvalidDevice;
  if (!sms_of[device]) {
    e = cudaDeviceGetAttribute(&sms_of[device], cudaDevAttrMultiProcessorCount, device);
    if (e != cudaSuccess) return e;
  }
  sms = sms_of[device];
  return cudaSuccess;
}

// A launch of `grid` whose blocks form clusters of `slices` along z (the attribute must outlive
// the config: the caller's).
inline cudaLaunchConfig_t cluster_launch_config(dim3 grid, size_t smem, cudaStream_t stream,
                                                int slices, cudaLaunchAttribute& attribute) {
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = 1;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = unsigned(slices);
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return config;
}

// Whether slices of `slices` blocks can be one cluster each for a kernel on the current device:
// its code is SM 9.0+ (the build may carry only older code that the driver compiles), and the
// device can hold such a cluster at all (past 8 blocks, a non-portable size, which the kernel
// must allow first). One per kernel instance (`static thread_local` in its launcher, like
// SmemAttributes: the attribute is the kernel's own), cached per device and size; a failed query
// says no. Not asked while `stream` is being captured (the launch then takes the workspace and
// the merge kernel; the first launch outside a capture asks): the one-time attribute set and
// occupancy query stay out of the caller's capture.
struct ClusterMergeSupport {
  signed char known[64][17] = {};   // 0 unknown, 1 yes, -1 no

  template <typename Kernel>
  bool allows(Kernel kernel, int device, int slices, size_t smem, cudaStream_t stream) {
    if (slices < 2 || slices > 16 || device < 0 || device >= 64) return false;
    signed char& k = known[device][slices];
    if (k == 0) {
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess ||
          capture != cudaStreamCaptureStatusNone) {
        (void)cudaGetLastError();
        return false;
      }
      k = -1;
      cudaFuncAttributes attributes{};
      if (cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess &&
          attributes.binaryVersion >= 90 &&
          (slices <= 8 ||
           cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) ==
               cudaSuccess)) {
        cudaLaunchAttribute attribute;
        const cudaLaunchConfig_t config =
            cluster_launch_config(dim3(1, 1, unsigned(slices)), smem, nullptr, slices, attribute);
        int clusters = 0;
        if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess &&
            clusters > 0)
          k = 1;
      }
      (void)cudaGetLastError();   // a refused query leaves no error behind for the next launch
    }
    return k > 0;
  }
};

// `merged` (may be null) is set when the launch merged the split-KV slices itself (cluster
// merge): the caller then skips launch_selection_merge.
template <typename T, int kHeadDimQK, int kHeadDimV, int kRowTiles, int kBuffers>
cudaError_t launch_buffers(const SelectionFwdParams& p, cudaStream_t stream, bool* merged) {
  using Layout = SmemLayout<kHeadDimQK, kHeadDimV, kRowTiles, kBuffers>;
  constexpr size_t smem = Layout::total_bytes();
  auto kernel = selection_fwd_kernel<T, kHeadDimQK, kHeadDimV, kRowTiles, Layout::blocks_per_sm(),
                                     kBuffers>;
  if (smem > 48 * 1024) {
    static thread_local SmemAttributes attributes;     // this kernel instance's
    const cudaError_t err = attributes.set(kernel, int(smem), false);
    if (err != cudaSuccess) return err;
  }
  const int64_t tiles = (p.group + Layout::kRows - 1) / Layout::kRows;
  dim3 grid(unsigned(p.batch * p.seqlen_q), unsigned(p.heads_kv), unsigned(tiles * p.num_splits));
  if (p.gate_totals != nullptr) {
    // Gated (selection_fwd_auto): at most the blocks that fit on the device at once, striding
    // over the items (the kernel's loop), so that the launch costs little when it is not chosen.
    static thread_local int per_sm_of[64] = {};   // this instance's blocks per SM, per device
    int device = 0, sms = 0;
    cudaError_t e = current_device_sms(device, sms);
    if (e == cudaSuccess && !per_sm_of[device])
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm_of[device], kernel, kThreads, smem);
    if (e != cudaSuccess) return e;
    const int64_t resident = int64_t(std::max(1, sms)) * std::max(1, per_sm_of[device]);
    const int64_t items = int64_t(grid.x) * grid.y * grid.z;
    grid = dim3(unsigned(std::min<int64_t>(items, resident)), 1, 1);
  } else if constexpr (kBuffers == 2) {
    // The split-KV slices of a row as one cluster (one row tile: blockIdx.z is the slice).
    int device = 0, sms = 0;
    const cudaError_t e = current_device_sms(device, sms);
    if (e != cudaSuccess) return e;
    static thread_local ClusterMergeSupport clusters;   // this kernel instance's
    if (tiles == 1 && clusters.allows(kernel, device, p.num_splits, smem, stream)) {
      SelectionFwdParams clustered = p;
      clustered.cluster_merge = true;
      cudaLaunchAttribute attribute;
      const cudaLaunchConfig_t config =
          cluster_launch_config(grid, smem, stream, p.num_splits, attribute);
      const cudaError_t err = cudaLaunchKernelEx(&config, kernel, clustered);
      if (err == cudaSuccess && merged != nullptr) *merged = true;
      return err;
    }
  }
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Two K/V buffers where the whole grid fits in one wave of the two-buffer kernel (decode: few
// blocks per SM, so each block's own copies in flight set its time; H200, notes/eager.md), one
// elsewhere: in a prefill five one-buffer blocks per SM hide each other's copies, and the
// two-buffer kernel's shared memory allows three. One row tile only (G <= 16, decode's usual
// group), and never under selection_fwd_auto's gated launch (its grid strides over the items).
// The two-buffer launch merges split-KV slices in clusters where it can (`merged`).
template <typename T, int kHeadDimQK, int kHeadDimV, int kRowTiles>
cudaError_t launch(const SelectionFwdParams& p, cudaStream_t stream, bool* merged) {
  if constexpr (kRowTiles == 1) {
    using Layout2 = SmemLayout<kHeadDimQK, kHeadDimV, 1, 2>;
    if (p.gate_totals == nullptr) {
      int device = 0, sms = 0;
      const cudaError_t e = current_device_sms(device, sms);
      if (e != cudaSuccess) return e;
      const int64_t items = p.batch * p.seqlen_q * p.heads_kv * p.num_splits;
      if (items <= int64_t(sms) * Layout2::blocks_per_sm())
        return launch_buffers<T, kHeadDimQK, kHeadDimV, 1, 2>(p, stream, merged);
    }
  }
  return launch_buffers<T, kHeadDimQK, kHeadDimV, kRowTiles, 1>(p, stream, merged);
}

}  // namespace mma_kernel

template <ScalarKind kKind, int kHeadDimQK, int kHeadDimV>
cudaError_t launch_selection_fwd_mma(const SelectionFwdParams& p, cudaStream_t stream,
                                     bool* merged) {
  using T = typename mma_kernel::Element<kKind>::type;
  static_assert(kHeadDimQK % 64 == 0 && kHeadDimV % 64 == 0, "head dims: multiples of 64");
  // Rows per thread block: the group in one block up to 32 query heads; past that blocks of 64
  // rows (32 when Dv > 128, whose 64-row accumulators would not fit the registers).
  constexpr int kWideTiles = kHeadDimV <= 128 ? 4 : 2;
  if (p.group <= 16) return mma_kernel::launch<T, kHeadDimQK, kHeadDimV, 1>(p, stream, merged);
  if (p.group <= 32) return mma_kernel::launch<T, kHeadDimQK, kHeadDimV, 2>(p, stream, merged);
  return mma_kernel::launch<T, kHeadDimQK, kHeadDimV, kWideTiles>(p, stream, merged);
}

}  // namespace nsa_ext
