// Selection-attention forward on tensor cores (fp16/bf16, SM 8.0+).
//
// One thread block (4 warps) computes one query token t of batch b for one KV head h: the G query
// heads of that KV group (rows of Q, padded to a multiple of 16; a large group is cut into
// several thread blocks of at most 64 rows, blockIdx.z). It loads those rows of Q once into
// shared memory, then streams the row's selected keys through shared memory in stages of 64
// keys (K and V, cp.async, double buffered). A stage is four chunks of 16 keys; a chunk is 16
// consecutive keys of one selected block, so any power-of-two block size >= 16 is a whole number
// of chunks, and blocks of 16 or 32 keys are gathered four or two to a stage. Warps are laid out
// WM x WN (WM warps along the query rows, WN along the chunks of a stage); each warp runs its own
// online softmax (fp32, base 2) over the chunks it takes, with Q·Kᵀ and P·V on mma.sync
// m16n8k16, and the WN partial results of a row are merged through shared memory at the end.
// It writes o [Dv] (q's dtype) and lse (fp32, natural log) for each of its valid rows; a row that
// sees no key gets o = 0 and lse = -inf.
//
// Split-KV (decode, p.num_splits > 1): the grid's z axis also counts slices; a thread block takes
// only its slice's entries of the row (split_entries; the loop is the same, over fewer chunks)
// and writes the unnormalised partials acc [Dv], m, l of each row to the fp32 workspace, which
// launch_selection_merge (selection_merge.cu) turns into o and lse.
//
// Input contract (the Python backend builds it with nsa_ext.selection.canonical_blocks): each
// row's blocks sorted ascending, de-duplicated, -1 padded, none past the query's own block.
// Memory safety does not rest on it: every key is loaded only when 0 <= j <= pos and it lies
// inside k's T axis; others are zero-filled and masked.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "selection_params.h"

namespace nsa_ext {
namespace mma_kernel {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kChunkKeys = 16;
constexpr int kChunksPerStage = 4;
constexpr int kStageKeys = kChunkKeys * kChunksPerStage;   // 64
constexpr int kMaxRowsPerCta = 16 * kWarps;                // WM = 4: 64 query rows
constexpr int kRowPad = 8;   // 16 bytes per smem row: ldmatrix rows fall in distinct banks
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

// SM 9.0: the bulk-copy engine (cp.async.bulk, completing on an mbarrier). One instruction moves
// a whole 256-byte key row, where cp.async needs sixteen 16-byte copies.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
#endif
}
__device__ __forceinline__ void fence_mbarrier_init() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// Orders this thread's earlier generic shared-memory accesses before later bulk copies into it.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, uint32_t bytes,
                                              uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
#endif
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
#endif
}

template <int kHeadDimQK, int kHeadDimV, int kStages>
struct SmemLayout {
  static constexpr int kStrideQK = kHeadDimQK + kRowPad;   // elements per smem row of Q and K
  static constexpr int kStrideV = kHeadDimV + kRowPad;
  static constexpr int kStrideO = kHeadDimV + 4;            // fp32 merge buffer
  // bytes, for a block of `rows` query rows and 16-bit elements
  static constexpr size_t q_bytes(int rows) { return size_t(rows) * kStrideQK * 2; }
  static constexpr size_t stage_bytes() {
    return size_t(kStageKeys) * (kStrideQK + kStrideV) * 2;
  }
  static constexpr size_t merge_bytes() {
    return size_t(kWarps) * 16 * kStrideO * 4 + 2 * size_t(kWarps) * 16 * 4;
  }
  static constexpr size_t total_bytes(int rows) {
    const size_t main = q_bytes(rows) + kStages * stage_bytes();
    return main > merge_bytes() ? main : merge_bytes();
  }
};

// Key index (within the sequence) of the first key of chunk `chunk` of a row, or -1 when past
// the row's chunks.
__device__ __forceinline__ int64_t chunk_start(const int32_t* row_blocks, int chunk,
                                               int total_chunks, int chunks_per_block,
                                               int block_size) {
  if (chunk >= total_chunks) return -1;
  const int64_t block = row_blocks[chunk / chunks_per_block];
  if (block < 0) return -1;
  return block * block_size + int64_t(chunk % chunks_per_block) * kChunkKeys;
}

// One chunk of 16 keys for one warp's 16 query rows: S = Q Kᵀ on tensor cores, causal mask
// (all rows share the query position), online-softmax update of (m_row, l_row, acc) in base 2,
// acc += P V. cK [16 keys][Dk] and cV [16 keys][Dv] in shared memory, rows kSQK / kSV apart;
// Q from registers (q_frag) or from shared memory (sQ_warp, 16 rows). j0: the chunk's first key
// within the sequence (-1: nothing visible).
template <typename T, int kHeadDimQK, int kHeadDimV, int kSQK, int kSV, bool kQInRegs>
__device__ __forceinline__ void attend_chunk(const uint32_t (*q_frag)[4], const T* sQ_warp,
                                             const T* cK, const T* cV, int64_t j0, int64_t pos,
                                             int64_t key_limit, float scale_log2, int lane,
                                             float (&m_row)[2], float (&l_row)[2],
                                             float (&acc)[kHeadDimV / 8][4]) {
  constexpr int kStepsQK = kHeadDimQK / 16;
  constexpr int kTilesV = kHeadDimV / 8;
  // S [16 rows, 16 keys]: two n8 tiles (keys 0-7, 8-15).
  float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
  for (int ks = 0; ks < kStepsQK; ++ks) {
    uint32_t a[4];
    if constexpr (kQInRegs) {
#pragma unroll
      for (int e = 0; e < 4; ++e) a[e] = q_frag[ks][e];
    } else {
      ldmatrix_x4(a, sQ_warp + (lane % 16) * kSQK + ks * 16 + (lane / 16) * 8);
    }
    uint32_t kb[4];
    ldmatrix_x4(kb, cK + ((lane % 8) + (lane / 16) * 8) * kSQK + ks * 16 + ((lane / 8) % 2) * 8);
    mma_16816<T>(sc[0], a, kb[0], kb[1]);
    mma_16816<T>(sc[1], a, kb[2], kb[3]);
  }
  float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t j = j0 + nt * 8 + 2 * (lane % 4) + (e & 1);
      const bool visible = j0 >= 0 && j <= pos && j < key_limit;
      sc[nt][e] = visible ? sc[nt][e] * scale_log2 : -INFINITY;
      row_max[e / 2] = fmaxf(row_max[e / 2], sc[nt][e]);
    }
  }
  float corr[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_max[i] = fmaxf(row_max[i], __shfl_xor_sync(0xffffffffu, row_max[i], 1));
    row_max[i] = fmaxf(row_max[i], __shfl_xor_sync(0xffffffffu, row_max[i], 2));
    const float m_new = fmaxf(m_row[i], row_max[i]);
    // A row with nothing visible yet keeps m = -inf; subtract 0 then, never -inf - -inf.
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    corr[i] = fast_exp2(m_row[i] - m_use);
    m_row[i] = m_new;
    row_max[i] = m_use;
  }
  float row_sum[2] = {0.f, 0.f};
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      sc[nt][e] = fast_exp2(sc[nt][e] - row_max[e / 2]);
      row_sum[e / 2] += sc[nt][e];
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) l_row[i] = l_row[i] * corr[i] + row_sum[i];
  // Once the running maxima settle, corr is exactly 1 for every row of the warp: skip the
  // Dv/2 multiplies per thread then (a warp-uniform branch).
  if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
    for (int n = 0; n < kTilesV; ++n) {
      acc[n][0] *= corr[0];
      acc[n][1] *= corr[0];
      acc[n][2] *= corr[1];
      acc[n][3] *= corr[1];
    }
  }
  // P as the A operand (16 rows x 16 keys): the accumulator layout of the two n8 tiles.
  uint32_t pa[4];
  pa[0] = pack2<T>(sc[0][0], sc[0][1]);
  pa[1] = pack2<T>(sc[0][2], sc[0][3]);
  pa[2] = pack2<T>(sc[1][0], sc[1][1]);
  pa[3] = pack2<T>(sc[1][2], sc[1][3]);
  // O [16 rows, Dv] += P V, V [16 keys][Dv] read transposed, two n8 tiles per ldmatrix.
#pragma unroll
  for (int nd = 0; nd < kHeadDimV / 16; ++nd) {
    uint32_t vb[4];
    ldmatrix_x4_trans(vb, cV + (lane % 16) * kSV + nd * 16 + (lane / 16) * 8);
    mma_16816<T>(acc[2 * nd], pa, vb[0], vb[1]);
    mma_16816<T>(acc[2 * nd + 1], pa, vb[2], vb[3]);
  }
}

// Merge the partial results of the warps that share query rows (warps_n of them per row tile:
// warp = wm + wn * warps_m) through shared memory `smem` (free by now: every K/V read is done),
// and write o and lse of the block's valid rows; when splitting (p.num_splits > 1), write slice
// `split`'s unnormalised partials (acc, m in natural log, l) to the workspace instead. Every
// thread of the block calls it.
template <typename T, int kHeadDimV>
__device__ __forceinline__ void merge_and_store(unsigned char* smem, const SelectionFwdParams& p,
                                                int warps_m, int64_t bt, int h, int64_t g0,
                                                int split,
                                                const float (&m_row)[2], float (&l_row)[2],
                                                const float (&acc)[kHeadDimV / 8][4]) {
  constexpr int kSO = kHeadDimV + 4;
  constexpr int kTilesV = kHeadDimV / 8;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warps_n = kWarps / warps_m;
  const int rows_cta = 16 * warps_m;
  const int64_t G = p.group;
  float* sO = reinterpret_cast<float*>(smem);            // [kWarps][16][kSO]
  float* sM = sO + kWarps * 16 * kSO;                     // [kWarps][16]
  float* sL = sM + kWarps * 16;                           // [kWarps][16]
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l_row[i] += __shfl_xor_sync(0xffffffffu, l_row[i], 1);
    l_row[i] += __shfl_xor_sync(0xffffffffu, l_row[i], 2);
  }
  {
    const int r = lane / 4;
    float* o_warp = sO + warp * 16 * kSO;
#pragma unroll
    for (int n = 0; n < kTilesV; ++n) {
      const int col = n * 8 + 2 * (lane % 4);
      o_warp[r * kSO + col] = acc[n][0];
      o_warp[r * kSO + col + 1] = acc[n][1];
      o_warp[(r + 8) * kSO + col] = acc[n][2];
      o_warp[(r + 8) * kSO + col + 1] = acc[n][3];
    }
    if (lane % 4 == 0) {
      sM[warp * 16 + r] = m_row[0];
      sM[warp * 16 + r + 8] = m_row[1];
      sL[warp * 16 + r] = l_row[0];
      sL[warp * 16 + r + 8] = l_row[1];
    }
  }
  __syncthreads();

  T* o = static_cast<T*>(p.o);
  for (int i = tid; i < rows_cta * (kHeadDimV / 2); i += kThreads) {
    const int r = i / (kHeadDimV / 2);
    const int col = 2 * (i % (kHeadDimV / 2));
    const int64_t g = g0 + r;
    if (g >= G) continue;
    const int rw = r / 16, rr = r % 16;   // warp row, row within the warp's tile
    float m_max = -INFINITY;
    for (int n = 0; n < warps_n; ++n) m_max = fmaxf(m_max, sM[(rw + n * warps_m) * 16 + rr]);
    float l_sum = 0.f, o0 = 0.f, o1 = 0.f;
    if (m_max != -INFINITY) {
      for (int n = 0; n < warps_n; ++n) {
        const int w = rw + n * warps_m;
        const float m_w = sM[w * 16 + rr];
        if (m_w == -INFINITY) continue;
        const float f = fast_exp2(m_w - m_max);
        l_sum += sL[w * 16 + rr] * f;
        o0 += sO[(w * 16 + rr) * kSO + col] * f;
        o1 += sO[(w * 16 + rr) * kSO + col + 1] * f;
      }
    }
    const int64_t out_row = bt * p.heads_q + int64_t(h) * G + g;
    if (p.num_splits > 1) {
      // An empty slice: m = -inf, l = 0, acc = 0 (o0, o1 were never added to).
      const int64_t slot = out_row * p.num_splits + split;
      *reinterpret_cast<float2*>(p.part_acc + slot * kHeadDimV + col) = make_float2(o0, o1);
      if (col == 0) {
        p.part_m[slot] = m_max == -INFINITY ? -INFINITY : m_max * kLn2;
        p.part_l[slot] = l_sum;
      }
      continue;
    }
    const float inv = l_sum > 0.f ? 1.f / l_sum : 0.f;
    *reinterpret_cast<uint32_t*>(o + out_row * kHeadDimV + col) = pack2<T>(o0 * inv, o1 * inv);
    if (col == 0)
      p.lse[out_row] = l_sum > 0.f ? m_max * kLn2 + logf(l_sum) : -INFINITY;
  }
}

// The row's chunk count: only the query's own block (the last one, as the list is sorted) can
// reach past pos.
__device__ __forceinline__ int count_chunks(const int32_t* row_blocks, int num_blocks, int64_t pos,
                                            int block_size) {
  if (num_blocks <= 0) return 0;
  const int chunks_per_block = block_size / kChunkKeys;
  const int64_t last = row_blocks[num_blocks - 1];
  const int64_t own = pos / block_size;
  return (num_blocks - 1) * chunks_per_block +
         (last == own ? int((pos % block_size) / kChunkKeys) + 1 : chunks_per_block);
}

template <typename T, int kHeadDimQK, int kHeadDimV, int kStages, int kMinBlocksPerSm>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    selection_fwd_mma_kernel(const SelectionFwdParams p, const int warps_m) {
  using Layout = SmemLayout<kHeadDimQK, kHeadDimV, kStages>;
  constexpr int kSQK = Layout::kStrideQK;
  constexpr int kSV = Layout::kStrideV;
  constexpr int kSegQK = kHeadDimQK / 8;   // 16-byte segments per row
  constexpr int kSegV = kHeadDimV / 8;
  constexpr int kStepsQK = kHeadDimQK / 16;
  constexpr int kTilesV = kHeadDimV / 8;
  // Q fragments stay in registers for small Dk; for Dk > 128 they are re-read from shared
  // memory for each chunk, which keeps the accumulators (Dv/2 floats a thread) out of spills.
  constexpr bool kQInRegs = kHeadDimQK <= 64;

  extern __shared__ __align__(16) unsigned char smem[];
  const int rows_cta = 16 * warps_m;
  T* sQ = reinterpret_cast<T*>(smem);                                  // [rows_cta][kSQK]
  T* sK = reinterpret_cast<T*>(smem + Layout::q_bytes(rows_cta));      // [kStages][64][kSQK]
  T* sV = sK + kStages * kStageKeys * kSQK;                            // [kStages][64][kSV]

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int warps_n = kWarps / warps_m;
  const int wm = warp % warps_m;
  const int wn = warp / warps_m;

  const int64_t bt = blockIdx.x;            // b * TQ + t
  const int h = blockIdx.y;
  const int64_t b = bt / p.seqlen_q;
  const int64_t G = p.group;
  // blockIdx.z = split * row_tiles + tile. The epilogue re-derives g0 and the slice from
  // blockIdx: held across the main loop, they cost registers (spills at 128/128).
  const int row_tiles = int(gridDim.z) / p.num_splits;
  const int64_t g0 = int64_t(blockIdx.z % row_tiles) * rows_cta;   // first group row of this block
  const int64_t row = bt * p.heads_kv + h;             // selection row
  const int64_t pos = p.pos[bt];
  const int64_t k_offset = p.k_offset[bt];
  const int64_t kv_row0 = b * p.seqlen_k + k_offset;   // row of key 0 of the sequence in [B*TK]
  const int64_t key_limit = p.seqlen_k - k_offset;     // keys of the tensor from the sequence on
  const int block_size = p.block_size;
  const int chunks_per_block = block_size / kChunkKeys;

  // Clamped so that a malformed count can never index past the row. This block takes the
  // entries of its slice: row_blocks and the chunk numbers below are relative to its start.
  const int2 entries = split_entries(p, max(0, min(p.num_blocks[row], int(p.num_selected))),
                                     int(blockIdx.z) / row_tiles);
  const int32_t* row_blocks = p.blocks + row * p.num_selected + entries.x;
  const int num_blocks = entries.y - entries.x;
  const int total_chunks = count_chunks(row_blocks, num_blocks, pos, block_size);
  const int num_stages = (total_chunks + kChunksPerStage - 1) / kChunksPerStage;

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  // Key 0 of the sequence for head h; key j is j rows of H * D elements further.
  const T* k_seq = k + (kv_row0 * p.heads_kv + h) * kHeadDimQK;
  const T* v_seq = v + (kv_row0 * p.heads_kv + h) * kHeadDimV;
  const int64_t k_stride = p.heads_kv * kHeadDimQK;
  const int64_t v_stride = p.heads_kv * kHeadDimV;

  // Q rows [rows_cta, Dk]: zeros past the group's end.
  {
    const T* q_rows = q + (bt * p.heads_q + int64_t(h) * G) * kHeadDimQK;
    for (int i = tid; i < rows_cta * kSegQK; i += kThreads) {
      const int r = i / kSegQK, seg = i % kSegQK;
      const bool valid = g0 + r < G;
      const T* src = valid ? q_rows + (g0 + r) * kHeadDimQK + seg * 8 : q;
      cp_async_16(sQ + r * kSQK + seg * 8, src, valid);
    }
  }

  // Stage s: chunks 4s .. 4s+3 of the row -> K/V buffer s % kStages, [64 keys][Dk | Dv].
  auto load_stage = [&](int stage) {
    T* dK = sK + (stage % kStages) * kStageKeys * kSQK;
    T* dV = sV + (stage % kStages) * kStageKeys * kSV;
    int64_t start[kChunksPerStage];
#pragma unroll
    for (int c = 0; c < kChunksPerStage; ++c)
      start[c] = chunk_start(row_blocks, stage * kChunksPerStage + c, total_chunks,
                             chunks_per_block, block_size);
#pragma unroll
    for (int i = 0; i < (kStageKeys * kSegQK) / kThreads; ++i) {
      const int idx = tid + i * kThreads;
      const int r = idx / kSegQK, seg = idx % kSegQK;
      const int c = r / kChunkKeys;
      const int64_t s0 = c == 0 ? start[0] : c == 1 ? start[1] : c == 2 ? start[2] : start[3];
      const int64_t j = s0 + (r % kChunkKeys);
      const bool valid = s0 >= 0 && j <= pos && j < key_limit;
      const T* src = valid ? k_seq + j * k_stride + seg * 8 : k;
      cp_async_16(dK + r * kSQK + seg * 8, src, valid);
    }
#pragma unroll
    for (int i = 0; i < (kStageKeys * kSegV) / kThreads; ++i) {
      const int idx = tid + i * kThreads;
      const int r = idx / kSegV, seg = idx % kSegV;
      const int c = r / kChunkKeys;
      const int64_t s0 = c == 0 ? start[0] : c == 1 ? start[1] : c == 2 ? start[2] : start[3];
      const int64_t j = s0 + (r % kChunkKeys);
      const bool valid = s0 >= 0 && j <= pos && j < key_limit;
      // V rows of masked keys must be zeros, not stale data: P = 0 times NaN is NaN.
      const T* src = valid ? v_seq + j * v_stride + seg * 8 : v;
      cp_async_16(dV + r * kSV + seg * 8, src, valid);
    }
  };

  // Prologue: Q travels with stage 0; one commit group per stage, empty ones included, so that
  // wait_group<kStages - 1> always means "stage s has landed".
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_stages) load_stage(s);
    cp_async_commit();
  }

  // Per thread: rows lane/4 and lane/4 + 8 of this warp's 16-row tile.
  float m_row[2] = {-INFINITY, -INFINITY};
  float l_row[2] = {0.f, 0.f};
  float acc[kTilesV][4];
#pragma unroll
  for (int n = 0; n < kTilesV; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  uint32_t q_frag[kQInRegs ? kStepsQK : 1][4];

  const T* sQ_warp = sQ + (wm * 16) * kSQK;
  for (int s = 0; s < num_stages; ++s) {
    if (s + kStages - 1 < num_stages) load_stage(s + kStages - 1);
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncthreads();
    if (kQInRegs && s == 0) {
#pragma unroll
      for (int ks = 0; ks < kStepsQK; ++ks)
        ldmatrix_x4(q_frag[kQInRegs ? ks : 0],
                    sQ_warp + (lane % 16) * kSQK + ks * 16 + (lane / 16) * 8);
    }
    const T* bufK = sK + (s % kStages) * kStageKeys * kSQK;
    const T* bufV = sV + (s % kStages) * kStageKeys * kSV;
    for (int c = wn; c < kChunksPerStage; c += warps_n) {
      const int chunk = s * kChunksPerStage + c;
      if (chunk >= total_chunks) break;
      const T* cK = bufK + c * kChunkKeys * kSQK;   // [16 keys][Dk]
      const T* cV = bufV + c * kChunkKeys * kSV;    // [16 keys][Dv]

      const int64_t j0 = chunk_start(row_blocks, chunk, total_chunks, chunks_per_block, block_size);
      attend_chunk<T, kHeadDimQK, kHeadDimV, kSQK, kSV, kQInRegs>(
          q_frag, sQ_warp, cK, cV, j0, pos, key_limit, p.scale_log2, lane, m_row, l_row, acc);
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();

  const int tiles = int(gridDim.z) / p.num_splits;
  merge_and_store<T, kHeadDimV>(smem, p, warps_m, bt, h, int64_t(int(blockIdx.z) % tiles) * rows_cta,
                                int(blockIdx.z) / tiles, m_row, l_row, acc);
}

// Warp-pipelined variant for groups of at most 16 query heads (one row tile): each of the four
// warps streams its own chunks (warp w takes chunks w, w + 4, ...) through its own ring of
// kDepth shared-memory slots [16 keys][Dk | Dv] with cp.async, and waits only for its own loads
// (cp.async.wait_group + __syncwarp), so no block-wide barrier sits in the main loop and each
// warp keeps kDepth - 1 chunks in flight while it computes one. Same contract and outputs as
// selection_fwd_mma_kernel; partial results are merged by merge_and_store.
template <int kHeadDimQK, int kHeadDimV, int kDepth>
struct WarpSmemLayout {
  static constexpr int kStrideQK = kHeadDimQK + kRowPad;
  static constexpr int kStrideV = kHeadDimV + kRowPad;
  static constexpr size_t q_bytes() { return size_t(16) * kStrideQK * 2; }
  static constexpr size_t slot_elems() { return size_t(kChunkKeys) * (kStrideQK + kStrideV); }
  static constexpr size_t ring_bytes() { return size_t(kWarps) * kDepth * slot_elems() * 2; }
  // + one mbarrier per slot (bulk-copy path)
  static constexpr size_t main_bytes() { return q_bytes() + ring_bytes() + size_t(kWarps) * kDepth * 8; }
  static constexpr size_t merge_bytes() {
    return size_t(kWarps) * 16 * (kHeadDimV + 4) * 4 + 2 * size_t(kWarps) * 16 * 4;
  }
  static constexpr size_t total_bytes() { return main_bytes() > merge_bytes() ? main_bytes() : merge_bytes(); }
};

template <typename T, int kHeadDimQK, int kHeadDimV, int kDepth, int kMinBlocksPerSm, bool kBulk>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    selection_fwd_warp_kernel(const SelectionFwdParams p) {
  using Layout = WarpSmemLayout<kHeadDimQK, kHeadDimV, kDepth>;
  constexpr int kSQK = Layout::kStrideQK;
  constexpr int kSV = Layout::kStrideV;
  constexpr int kSegQK = kHeadDimQK / 8;
  constexpr int kSegV = kHeadDimV / 8;
  constexpr int kTilesV = kHeadDimV / 8;
  constexpr bool kQInRegs = kHeadDimQK <= 64;
  constexpr int kStepsQK = kHeadDimQK / 16;

  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  T* sQ = reinterpret_cast<T*>(smem);                                   // [16][kSQK]
  T* ring = reinterpret_cast<T*>(smem + Layout::q_bytes()) +
            size_t(warp) * kDepth * Layout::slot_elems();               // this warp's slots
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Layout::q_bytes() + Layout::ring_bytes()) +
                   warp * kDepth;                                       // one per slot

  const int64_t bt = blockIdx.x;
  const int h = blockIdx.y;
  const int64_t b = bt / p.seqlen_q;
  const int64_t G = p.group;
  const int64_t row = bt * p.heads_kv + h;
  const int64_t pos = p.pos[bt];
  const int64_t k_offset = p.k_offset[bt];
  const int64_t kv_row0 = b * p.seqlen_k + k_offset;
  const int64_t key_limit = p.seqlen_k - k_offset;
  const int block_size = p.block_size;
  const int chunks_per_block = block_size / kChunkKeys;
  // This block's slice of the row's entries (all of them without splitting): blockIdx.z.
  const int2 entries =
      split_entries(p, max(0, min(p.num_blocks[row], int(p.num_selected))), int(blockIdx.z));
  const int32_t* row_blocks = p.blocks + row * p.num_selected + entries.x;
  const int num_blocks = entries.y - entries.x;
  const int total_chunks = count_chunks(row_blocks, num_blocks, pos, block_size);
  // This warp's chunks: warp, warp + 4, ...
  const int my_chunks = total_chunks > warp ? (total_chunks - warp + kWarps - 1) / kWarps : 0;

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* k_seq = k + (kv_row0 * p.heads_kv + h) * kHeadDimQK;
  const T* v_seq = v + (kv_row0 * p.heads_kv + h) * kHeadDimV;
  const int64_t k_stride = p.heads_kv * kHeadDimQK;
  const int64_t v_stride = p.heads_kv * kHeadDimV;

  // Q [16 rows, Dk] by the whole block, zeros past the group; waited for before the loop.
  {
    const T* q_rows = q + (bt * p.heads_q + int64_t(h) * G) * kHeadDimQK;
    for (int i = tid; i < 16 * kSegQK; i += kThreads) {
      const int r = i / kSegQK, seg = i % kSegQK;
      const bool valid = r < G;
      cp_async_16(sQ + r * kSQK + seg * 8, valid ? q_rows + r * kHeadDimQK + seg * 8 : q, valid);
    }
    cp_async_commit();
  }

  // The warp's i-th chunk -> slot i % kDepth: K rows then V rows, 16 keys each.
  auto load_chunk = [&](int i) {
    const int chunk = warp + i * kWarps;
    const int64_t j0 = chunk_start(row_blocks, chunk, total_chunks, chunks_per_block, block_size);
    T* dK = ring + (i % kDepth) * Layout::slot_elems();
    T* dV = dK + kChunkKeys * kSQK;
#pragma unroll
    for (int e = 0; e < (kChunkKeys * kSegQK) / 32; ++e) {
      const int idx = lane + e * 32;
      const int r = idx / kSegQK, seg = idx % kSegQK;
      const int64_t j = j0 + r;
      const bool valid = j0 >= 0 && j <= pos && j < key_limit;
      cp_async_16(dK + r * kSQK + seg * 8, valid ? k_seq + j * k_stride + seg * 8 : k, valid);
    }
#pragma unroll
    for (int e = 0; e < (kChunkKeys * kSegV) / 32; ++e) {
      const int idx = lane + e * 32;
      const int r = idx / kSegV, seg = idx % kSegV;
      const int64_t j = j0 + r;
      const bool valid = j0 >= 0 && j <= pos && j < key_limit;
      // Masked keys' V rows must be zeros, not stale data: P = 0 times NaN is NaN.
      cp_async_16(dV + r * kSV + seg * 8, valid ? v_seq + j * v_stride + seg * 8 : v, valid);
    }
  };

  // Bulk path: lanes 0-15 copy K rows 0-15 of the chunk, lanes 16-31 the V rows; the slot's
  // mbarrier expects the bytes of the visible rows. Masked keys' V rows are zeroed with
  // ordinary stores (P = 0 times stale NaN would be NaN); their K rows are masked in S.
  auto issue_chunk = [&](int i) {
    const int chunk = warp + i * kWarps;
    const int64_t j0 = chunk_start(row_blocks, chunk, total_chunks, chunks_per_block, block_size);
    T* dK = ring + (i % kDepth) * Layout::slot_elems();
    T* dV = dK + kChunkKeys * kSQK;
    uint64_t* bar = bars + (i % kDepth);
    const int r = lane % kChunkKeys;
    const bool is_v = lane >= kChunkKeys;
    const int64_t j = j0 + r;
    const bool valid = j0 >= 0 && j <= pos && j < key_limit;
    const int rows = __popc(__ballot_sync(0xffffffffu, valid) & 0xffffu);
    fence_proxy_async();
    if (lane == 0) mbarrier_arrive_expect_tx(bar, uint32_t(rows) * (kHeadDimQK + kHeadDimV) * 2);
    __syncwarp();
    if (valid) {
      if (is_v)
        bulk_copy_g2s(dV + r * kSV, v_seq + j * v_stride, kHeadDimV * 2, bar);
      else
        bulk_copy_g2s(dK + r * kSQK, k_seq + j * k_stride, kHeadDimQK * 2, bar);
    } else if (is_v) {
      uint4* row_v = reinterpret_cast<uint4*>(dV + r * kSV);
#pragma unroll
      for (int e = 0; e < kSegV; ++e) row_v[e] = make_uint4(0u, 0u, 0u, 0u);
    }
  };

  if constexpr (kBulk) {
    if (lane < kDepth) mbarrier_init(bars + lane, 1);
    fence_mbarrier_init();
    cp_async_wait<0>();   // Q
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kDepth - 1; ++i)
      if (i < my_chunks) issue_chunk(i);
  } else {
#pragma unroll
    for (int i = 0; i < kDepth - 1; ++i) {
      if (i < my_chunks) load_chunk(i);
      cp_async_commit();
    }
    // Q is the oldest group of every thread: once it has landed everywhere, Q is complete.
    cp_async_wait<kDepth - 1>();
    __syncthreads();
  }

  float m_row[2] = {-INFINITY, -INFINITY};
  float l_row[2] = {0.f, 0.f};
  float acc[kTilesV][4];
#pragma unroll
  for (int n = 0; n < kTilesV; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  uint32_t q_frag[kQInRegs ? kStepsQK : 1][4];
  if constexpr (kQInRegs) {
#pragma unroll
    for (int ks = 0; ks < kStepsQK; ++ks)
      ldmatrix_x4(q_frag[ks], sQ + (lane % 16) * kSQK + ks * 16 + (lane / 16) * 8);
  }

  for (int i = 0; i < my_chunks; ++i) {
    if constexpr (kBulk) {
      if (i + kDepth - 1 < my_chunks) issue_chunk(i + kDepth - 1);
      mbarrier_wait(bars + (i % kDepth), uint32_t((i / kDepth) & 1));
    } else {
      if (i + kDepth - 1 < my_chunks) load_chunk(i + kDepth - 1);
      cp_async_commit();
      cp_async_wait<kDepth - 1>();
    }
    __syncwarp();   // the other lanes' copies (and zeroed rows) of chunk i are visible
    const T* cK = ring + (i % kDepth) * Layout::slot_elems();
    const T* cV = cK + kChunkKeys * kSQK;
    const int64_t j0 =
        chunk_start(row_blocks, warp + i * kWarps, total_chunks, chunks_per_block, block_size);
    attend_chunk<T, kHeadDimQK, kHeadDimV, kSQK, kSV, kQInRegs>(
        q_frag, sQ, cK, cV, j0, pos, key_limit, p.scale_log2, lane, m_row, l_row, acc);
    __syncwarp();   // every lane is done with slot i % kDepth before it is refilled
  }
  cp_async_wait<0>();
  __syncthreads();
  merge_and_store<T, kHeadDimV>(smem, p, /*warps_m=*/1, bt, h, /*g0=*/0, int(blockIdx.z), m_row,
                                l_row, acc);
}

}  // namespace mma_kernel

namespace mma_kernel {

template <typename T, int kHeadDimQK, int kHeadDimV, int kStages, int kMinBlocksPerSm>
cudaError_t launch_cta(const SelectionFwdParams& p, cudaStream_t stream) {
  using Layout = SmemLayout<kHeadDimQK, kHeadDimV, kStages>;
  const int warps_m = p.group <= 16 ? 1 : p.group <= 32 ? 2 : 4;
  const int rows_cta = 16 * warps_m;
  const size_t smem = Layout::total_bytes(rows_cta);
  auto kernel = selection_fwd_mma_kernel<T, kHeadDimQK, kHeadDimV, kStages, kMinBlocksPerSm>;
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(unsigned(p.batch * p.seqlen_q), unsigned(p.heads_kv),
                  unsigned((p.group + rows_cta - 1) / rows_cta * p.num_splits));
  kernel<<<grid, kThreads, smem, stream>>>(p, warps_m);
  return cudaGetLastError();
}

template <typename T, int kHeadDimQK, int kHeadDimV, int kDepth, int kMinBlocksPerSm, bool kBulk>
cudaError_t launch_warp(const SelectionFwdParams& p, cudaStream_t stream) {
  const size_t smem = WarpSmemLayout<kHeadDimQK, kHeadDimV, kDepth>::total_bytes();
  auto kernel =
      selection_fwd_warp_kernel<T, kHeadDimQK, kHeadDimV, kDepth, kMinBlocksPerSm, kBulk>;
  if constexpr (kBulk) {
    // The bulk path exists only in code compiled for SM 9.0+: a build whose sm_8x PTX was
    // JIT-compiled for this GPU takes the cp.async path instead.
    static int binary_version = -1;
    if (binary_version < 0) {
      cudaFuncAttributes attr;
      const cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
      if (err != cudaSuccess) return err;
      binary_version = attr.binaryVersion;
    }
    if (binary_version < 90)
      return launch_warp<T, kHeadDimQK, kHeadDimV, kDepth, kMinBlocksPerSm, false>(p, stream);
  }
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(unsigned(p.batch * p.seqlen_q), unsigned(p.heads_kv), unsigned(p.num_splits));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace mma_kernel

template <ScalarKind kKind, int kHeadDimQK, int kHeadDimV>
cudaError_t launch_selection_fwd_mma(const SelectionFwdParams& p, cudaStream_t stream) {
  using T = typename mma_kernel::Element<kKind>::type;
  static_assert(kHeadDimQK % 16 == 0 && kHeadDimV % 16 == 0, "head dims: multiples of 16");
  constexpr bool kSmall = kHeadDimQK + kHeadDimV <= 256;
  // Tuning variants, compiled for bf16 128/128 only (the bench's setting), chosen by
  // nsa_ext_cuda::_set_kernel_variant; 0 is the default everywhere.
  if constexpr (kKind == ScalarKind::kBFloat16 && kHeadDimQK == 128 && kHeadDimV == 128) {
    const bool small_group = p.group <= 16;
    switch (p.variant) {
      case 1: return mma_kernel::launch_cta<T, 128, 128, 2, 3>(p, stream);
      case 2: if (small_group) return mma_kernel::launch_warp<T, 128, 128, 3, 2, false>(p, stream); break;
      case 3: if (small_group) return mma_kernel::launch_warp<T, 128, 128, 2, 3, false>(p, stream); break;
      case 4: if (small_group && p.sm_major >= 9) return mma_kernel::launch_warp<T, 128, 128, 2, 3, true>(p, stream); break;
      case 5: if (small_group && p.sm_major >= 9) return mma_kernel::launch_warp<T, 128, 128, 3, 2, true>(p, stream); break;
      default: break;
    }
  }
  // One row tile (G <= 16): the warp-pipelined kernel with cp.async; larger groups: the
  // block-wide one, whose warps split the rows and share each stage. Up to Dk = Dv = 128 three
  // blocks share an SM (two slots of 16 keys per warp); larger head dims take fewer, so that
  // the shared memory fits. Bulk copies (variant 6, SM 9.0) measured slower on the H100
  // (notes/cuda.md: 26.7 vs 25.6 ms at T = 64k), so cp.async is the default everywhere.
  constexpr int kDepth = 2;
  constexpr int kWarpBlocks = kSmall ? 3 : 1;
  if (p.group <= 16) {
    if (p.sm_major >= 9 && p.variant == 6)
      return mma_kernel::launch_warp<T, kHeadDimQK, kHeadDimV, kDepth, kWarpBlocks, true>(p, stream);
    return mma_kernel::launch_warp<T, kHeadDimQK, kHeadDimV, kDepth, kWarpBlocks, false>(p, stream);
  }
  return mma_kernel::launch_cta<T, kHeadDimQK, kHeadDimV, 2, kSmall ? 3 : 1>(p, stream);
}

}  // namespace nsa_ext
