// Selection attention, forward, query-tile schedule on Hopper (SM 9.0a): wgmma + TMA.
//
// The schedule is nsa_ext/schedules/tile.py's (triton_ref/selection_tile.py is its reference):
// one CTA per (batch, KV head, tile of QT = 64 / G consecutive query tokens); its 64
// (token, query head) rows are the M of every warpgroup MMA. The CTA walks the *union* of its
// rows' canonical sets (sorted, each block once: nsa_ext.schedules.tiles.tile_unions) and loads
// each union block's K and V once for all 64 rows, with the bulk tensor copy engine (TMA, one
// 3-d descriptor per tensor, 128-byte swizzle): K into a ring of two stages, V into one buffer,
// each completed on its own mbarrier.
// Per 64-key chunk:
//   S = Q K^T   wgmma m64n64k16, Q and K from shared memory (K-major), Dk / 16 instructions;
//   mask        rows that did not choose the block (a cursor per row into its own sorted
//               canonical row, as in the Triton kernel) and keys past each row's causal limit;
//   softmax     online, base 2, in the accumulator registers (a row lives in a quad of lanes);
//   O += P V    wgmma m64n{Dv}k16, P from registers (the S accumulators, converted in place:
//               the accumulator layout of two n8 tiles is the A-fragment layout of one k16
//               slice), V from shared memory read N-major (transposed by the instruction).
// One warpgroup (128 threads); thread 0 issues chunk i's V copy and chunk i + 1's K copy while
// chunk i's S MMAs run (V is read only after S and the softmax, so half a chunk of work still
// covers its copy; K has the whole chunk). One V buffer instead of two stages of K and V is what
// lets three CTAs share an SM at Dk = Dv = 128 (69 KB of shared memory and <= 168 registers
// each, where two stages of both took 85 KB and allowed two): the kernel is latency-bound, and
// more CTAs per SM overlap more of one CTA's copies and softmax with the others' MMAs
// (notes/hopper.md). (A FlashAttention-3-style variant with S(i) and P V(i-1) in flight together
// and three copy stages measured 20-25 % slower on the H200, and so did one CTA per SM with up to
// eight stages; so did four CTAs per SM with one K slot, sixteenth session.)
//
// Shared-memory layout: every operand is cut into panels of 64 rows x 64 elements (128 bytes a
// row, 8 KB), the 128-byte swizzle atom's width: Q [Dk/64 panels][64 rows], per K stage
// K [Dk/64][64 keys], then the V buffer [Dv/64][64 keys]. The swizzle XORs a row's 16-byte chunk index with
// the row index mod 8; TMA writes Q, K and V that way, and the
// descriptors below tell the tensor cores (panels are 1024-byte aligned, as the swizzle needs).
// After V, 4 KB for the tile's canonical rows (kRowSetEntries int32).
//
// Writes o [B, TQ, HQ, Dv] in q's dtype and lse [B, TQ, HQ] fp32 (natural log; o = 0 and
// lse = -inf for a row that attends to no key), as every other kernel of the package.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

#include "hopper/wgmma_ops.h"
#include "selection_params.h"

namespace nsa_ext {
namespace hopper {

constexpr int kRows = kTileRows;     // M of a wgmma: (token, query head) rows per CTA
constexpr int kChunkKeys = 64;       // keys per step: one TMA box along T, the N of Q K^T
constexpr int kThreads = 128;        // one warpgroup
// Two K stages (and one V buffer), so three CTAs fit on an SM at d128. As many stages as fit one
// CTA per SM (8 / 6 / 5 / 3 for d64 / d128 / d192-128 / d256) measured 1.4x slower on the H200:
// several CTAs' overlap is worth more than deeper copies (notes/hopper.md).
constexpr int kCopyStages = 2;
constexpr int kPanelBytes = 64 * 128;
// Shared memory for the tile's canonical rows (one per token, S entries): used when QT x S
// entries fit (G = 16: S <= 256; G = 1: S <= 16), read from global memory otherwise.
constexpr int kRowSetEntries = 1024;
constexpr int kMaxDynamicSmem = 227 * 1024;   // per CTA on SM 9.0

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// A shared-memory matrix descriptor, 128-byte swizzle. K-major operands (Q, K): rows of 128
// bytes, 8-row groups 1024 bytes apart (stride byte offset); the leading offset is unused.
// N-major V: the leading offset steps to the next panel of 64 columns (8192 bytes), the stride
// offset to the next 8 keys (1024 bytes).
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t leading, uint32_t stride) {
  return ((addr & 0x3FFFF) >> 4) | (uint64_t((leading >> 4) & 0x3FFF) << 16) |
         (uint64_t((stride >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

// The descriptor of an operand `byte_offset` bytes past the one `base` describes. The start
// address (>> 4) is the low 14 bits; shared addresses stay below 2^18, so adding the offset there
// never carries into the leading offset above it. Built once per kernel from the panels' bases
// and offset by a constant per MMA: the full encoding per MMA (~5 uniform-datapath instructions
// each, 20 MMAs a chunk at d128) was ~100 of the 632 instructions a warp ran per chunk (ncu,
// tenth session).
__device__ __forceinline__ uint64_t desc_plus(uint64_t base, uint32_t byte_offset) {
  return (base & 0xFFFFFFFF00000000ull) | uint32_t(uint32_t(base) + (byte_offset >> 4));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// Keeps the compiler from moving reads or writes of accumulator registers across a wgmma
// fence or wait (the instructions write them asynchronously).
template <int N>
__device__ __forceinline__ void pin(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// The mbarrier and copy helpers take 32-bit shared-memory addresses, computed once per kernel:
// from generic pointers ptxas re-derived each address (the shared window, the CTA's id in the
// cluster) at every use. Fewer uniform-datapath instructions per chunk, and no measured change in
// time (notes/hopper.md, fifteenth session).
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}

__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t phase) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(phase)
        : "memory");
  }
}

__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int32_t c0, int32_t c1, int32_t c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int32_t c0, int32_t c1, int32_t c2, int32_t c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// 2^x in one MUFU.EX2 (flushing subnormal results to zero): exp2f adds a range check and a
// rescale per call for subnormals, ~2 more instructions on each of a chunk's 32 scores per thread.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// A global load issued where it is written. The chunk loop loads the union starts one chunk
// ahead, while the S MMAs run: a plain load would be moved to its use (ptxas did, next to the
// copy it addresses, and warp 0 waited there while the warpgroup's MMAs waited for warp 0).
__device__ __forceinline__ int64_t load_now(const int64_t* p) {
  int64_t v;
  asm volatile("ld.global.s64 %0, [%1];\n" : "=l"(v) : "l"(p) : "memory");
  return v;
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}


// --- Pieces of a tile's work that both tile kernels take (this file's, 64 keys a step, and
// selection_tile_pair_sm90.cuh's, 128) ---

// Work item w = (b * H + h) * NT + tile (tile fastest; 32-bit division: the launcher keeps
// B * NT * H < 2^31).
struct TileItem {
  int64_t b, h, tile;
};

__device__ __forceinline__ TileItem decode_item(uint32_t w, uint32_t NT, uint32_t H32) {
  const uint32_t bh = w / NT;
  TileItem it;
  it.tile = w - bh * NT;
  it.b = bh / H32;
  it.h = bh - uint32_t(it.b) * H32;
  return it;
}

// Q of a tile by the copy engine, completing on `full_q`: one box per 64-column panel, the
// tile's QT tokens x G heads, rows m = r * G + g in order; tokens past TQ read as zeros.
template <int kPanelsK>
__device__ __forceinline__ void issue_q_tile(uint32_t q_addr, const CUtensorMap* q_map,
                                             uint32_t full_q, int G, int QT, const TileItem& it) {
  mbar_expect_tx(full_q, kPanelsK * QT * G * 128);
#pragma unroll
  for (int c = 0; c < kPanelsK; ++c)
    tma_load_4d(q_addr + c * kPanelBytes, q_map, full_q, c * 64, int32_t(it.h * G),
                int32_t(it.tile * QT), int32_t(it.b));
}

// Rows past the tile (G not dividing 64) are outside every Q box: zeros, once, by ordinary
// stores (whole 128-byte rows, so the swizzle does not matter).
template <int kPanelsK>
__device__ __forceinline__ void zero_rows_past_tile(uint8_t* q_smem, int tile_rows, int tid) {
  for (int c = tile_rows * 8 + tid; c < kRows * 8; c += kThreads)
#pragma unroll
    for (int panel = 0; panel < kPanelsK; ++panel)
      *reinterpret_cast<uint4*>(q_smem + panel * kPanelBytes + c * 16) = make_uint4(0, 0, 0, 0);
}

// A thread's two accumulator rows m0 = 16 * warp + lane / 4 and m0 + 8: each one's query's causal
// limit and key offset as key positions along B * TK (32-bit: the launcher checks B * TK < 2^31),
// its canonical row (in shared memory, `row_sets`, where the tile's rows fit: `sets_in_smem`;
// else global memory) and that row's length. A row past the tile or the sequence keeps no key
// (lim = -1, no blocks).
struct TileRows {
  int32_t lim[2], kv0[2];
  const int32_t* blocks[2];
  int n[2];
};

__device__ __forceinline__ TileRows tile_rows(const SelectionFwdParams& p, const TileItem& it,
                                              int QT, bool sets_in_smem,
                                              const int32_t* row_sets, int warp, int lane) {
  const int G = int(p.group);
  const int S = int(p.num_selected);
  const int64_t t0 = it.tile * QT;
  TileRows rows;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int m = 16 * warp + (lane >> 2) + 8 * i;
    const int r = m / G;
    const int64_t t = t0 + r;
    rows.lim[i] = -1;
    rows.kv0[i] = 0;
    rows.blocks[i] = p.blocks;
    rows.n[i] = 0;
    if (r < QT && t < p.seqlen_q) {
      const int64_t tok = it.b * p.seqlen_q + t;
      rows.kv0[i] = int32_t(p.k_offset[tok]);
      rows.lim[i] = rows.kv0[i] + int32_t(p.pos[tok]);
      rows.blocks[i] = sets_in_smem ? row_sets + r * S : p.blocks + (tok * p.heads_kv + it.h) * S;
      rows.n[i] = p.num_blocks[tok * p.heads_kv + it.h];
    }
  }
  return rows;
}

// The online softmax's running maxima after a step whose row maxima (scaled, base 2, reduced
// over the quad) are `mx`. Lazy rescaling: a row keeps its (stale) maximum while the step's
// scores stay within 2^kRescaleSlack of it -- exact, since o / l and lse = m + log2 l all use the
// same m, and P <= 2^kRescaleSlack keeps its relative precision in bf16 / fp16 -- so a warp
// multiplies its accumulators by alpha only where one of its rows' maximum grew past that (~70
// instructions a chunk, notes/hopper.md fourteenth session). Returns whether any row of the warp
// grew; alpha (1 where a row did not, 0 for a row's first keys) and m_use (the maximum the
// exponentials subtract; 0 for a row that saw no key yet, keeping -inf - -inf away from exp2).
__device__ __forceinline__ bool step_max(const float (&mx)[2], float (&m_run)[2],
                                         float (&alpha)[2], float (&m_use)[2]) {
  bool grow[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) grow[i] = mx[i] > m_run[i] + kRescaleSlack;   // -inf + slack
  const bool warp_grow = __any_sync(0xffffffff, grow[0] || grow[1]);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (grow[i]) {
      const float m_new = fmaxf(m_run[i], mx[i]);
      alpha[i] = exp2_ftz(m_run[i] - m_new);
      m_run[i] = m_new;
    }
    m_use[i] = m_run[i] == -INFINITY ? 0.f : m_run[i];
  }
  return warp_grow;
}

// l and O after a step: rescaled by alpha where the warp's maxima grew (step_max), then l gains
// the step's row sums (O gains P V by the MMAs).
template <int kDv>
__device__ __forceinline__ void rescale_rows(float (&o_acc)[kDv / 2], float (&l_run)[2],
                                             const float (&alpha)[2], const float (&rowsum)[2],
                                             bool warp_grow) {
  if (warp_grow) {
#pragma unroll
    for (int i = 0; i < 2; ++i) l_run[i] = l_run[i] * alpha[i] + rowsum[i];
#pragma unroll
    for (int j = 0; j < kDv / 8; ++j) {
      o_acc[4 * j + 0] *= alpha[0];
      o_acc[4 * j + 1] *= alpha[0];
      o_acc[4 * j + 2] *= alpha[1];
      o_acc[4 * j + 3] *= alpha[1];
    }
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i) l_run[i] += rowsum[i];
  }
}

// Epilogue: a row's sum lives in its quad; o = acc / l in q's dtype, lse = (m + log2 l) * ln 2
// (o = 0 and lse = -inf for a row that attended to no key).
template <typename T, int kDv>
__device__ __forceinline__ void store_rows(const SelectionFwdParams& p, const TileItem& it,
                                           int QT, const float (&o_acc)[kDv / 2],
                                           const float (&l_run)[2], const float (&m_run)[2],
                                           int warp, int lane) {
  const int G = int(p.group);
  const int quad = lane & 3;
  T* o = static_cast<T*>(p.o);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = l_run[i];
    l += __shfl_xor_sync(0xffffffff, l, 1);
    l += __shfl_xor_sync(0xffffffff, l, 2);
    const int m = 16 * warp + (lane >> 2) + 8 * i;
    const int r = m / G;
    const int64_t t = it.tile * QT + r;
    if (r >= QT || t >= p.seqlen_q) continue;
    const int64_t row = (it.b * p.seqlen_q + t) * p.heads_q + it.h * G + m % G;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* o_row = o + row * kDv;
#pragma unroll
    for (int j = 0; j < kDv / 8; ++j)
      *reinterpret_cast<uint32_t*>(o_row + 8 * j + 2 * quad) =
          pack2<T>(o_acc[4 * j + 2 * i] * inv, o_acc[4 * j + 2 * i + 1] * inv);
    if (quad == 0)
      p.lse[row] = l > 0.f ? (m_run[i] + log2f(l)) * 0.6931471805599453f : -INFINITY;
  }
}

// Q, kStages K stages, one V buffer, the row sets, and 1 KB for the 1024-byte alignment.
template <int kDk, int kDv, int kStages>
constexpr int tile_smem_bytes() {
  return kDk / 64 * kPanelBytes + kStages * kDk / 64 * kPanelBytes + kDv / 64 * kPanelBytes +
         kRowSetEntries * 4 + 1024;
}

// CTAs per SM the instance is built for (ptxas keeps its registers within 65536 / (128 x this)):
// d64 four, d128 three (69 KB of shared memory each), wider ones one.
template <int kDk, int kDv>
constexpr int tile_ctas_per_sm() {
  return kDk + kDv <= 128 ? 4 : kDk + kDv <= 256 ? 3 : 1;
}

template <typename T, int kDk, int kDv, int kStages>
__global__ void __launch_bounds__(kThreads, tile_ctas_per_sm<kDk, kDv>())
    selection_tile_sm90_kernel(const __grid_constant__ CUtensorMap q_map,
                               const __grid_constant__ CUtensorMap k_map,
                               const __grid_constant__ CUtensorMap v_map, const TileParams tp) {
  constexpr int kPanelsK = kDk / 64;
  constexpr int kPanelsV = kDv / 64;
  static_assert(kStages == 2, "V's single buffer is refilled with chunk it + 1: two K stages");
  constexpr int kKBytes = kPanelsK * kPanelBytes;
  constexpr int kVBytes = kPanelsV * kPanelBytes;
  const SelectionFwdParams& p = tp.fwd;
  // selection_fwd_auto enqueued the row kernel too: the one the device chose runs.
  if (p.gate_totals != nullptr && !gate_picks_tile(p)) return;

  extern __shared__ uint8_t smem_raw[];
  // The 128-byte swizzle is a function of address bits 4..9: panels start 1024-byte aligned.
  // Shared-memory addresses (32-bit) of the operands and barriers, once per kernel.
  const uint32_t raw_addr = smem_addr(smem_raw);
  const uint32_t q_addr = (raw_addr + 1023) & ~1023u;
  const uint32_t k_addr = q_addr + kPanelsK * kPanelBytes;     // kStages K stages
  const uint32_t v_addr = k_addr + kStages * kKBytes;          // one V buffer
  uint8_t* q_smem = smem_raw + (q_addr - raw_addr);             // generic, for ordinary stores
  int32_t* row_sets = reinterpret_cast<int32_t*>(q_smem + (v_addr + kVBytes - q_addr));
  __shared__ __align__(8) uint64_t barriers[kStages + 2];      // K stages, V, Q
  const uint32_t full_k = smem_addr(barriers);                 // stage s: full_k + 8 s
  const uint32_t full_v = full_k + 8 * kStages;
  const uint32_t full_q = full_v + 8;
  // The next work item's first union start and union size, copied in by thread 0 at the start of
  // a tile (cp.async: no wait there) and read at the tile's last chunk, when its copies go out.
  __shared__ __align__(8) int64_t next_first_start;
  __shared__ __align__(8) int32_t next_union_count;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const uint32_t NT = uint32_t(tp.num_tiles);
  const uint32_t H32 = uint32_t(p.heads_kv);
  // Persistent CTAs: work item w = (b * H + h) * NT + tile (tile fastest, the order of the
  // earlier one-tile-per-CTA grid); the grid is at most the CTAs that fit at once, and each
  // strides over the items by the grid's size. A tile's prologue (its Q, its
  // first chunk's K and V) is copied during the previous tile's last chunk and epilogue: the
  // prologue and epilogue were ~17 % of a CTA's warp samples when each CTA ran one tile
  // (notes/hopper.md, twelfth session).
  const uint32_t total = uint32_t(p.batch) * H32 * NT;
  const int G = int(p.group);
  const int QT = tp.tokens_per_tile;
  const int64_t TQ = p.seqlen_q;
  const int64_t H = p.heads_kv;
  const int S = int(p.num_selected);
  // block_size is a power of two (the contract; the launcher checks) and a multiple of 64, so a
  // block's chunk count is a power of two: the loop's index arithmetic is shifts and masks (a
  // division by a runtime value is ~20 instructions, and the loop did up to five per chunk).
  const int chunk_shift = __ffs(p.block_size / kChunkKeys) - 1;
  const int chunk_mask = (1 << chunk_shift) - 1;
  const bool sets_in_smem = QT * S <= kRowSetEntries;

  auto tile_row_of = [&](const TileItem& it) { return (it.b * NT + it.tile) * H + it.h; };
  // Copies, by thread 0. K of global chunk `gc` goes to stage gc % 2; `key_row` is the chunk's
  // first key along B * TK.
  auto issue_k = [&](uint32_t gc, int64_t h, int32_t key_row) {
    const uint32_t s = gc & 1;
    const uint32_t dst = k_addr + s * kKBytes;
    mbar_expect_tx(full_k + 8 * s, kKBytes);
#pragma unroll
    for (int c = 0; c < kPanelsK; ++c)
      tma_load_3d(dst + c * kPanelBytes, &k_map, full_k + 8 * s, c * 64, int32_t(h), key_row);
  };
  auto issue_v = [&](int64_t h, int32_t key_row) {
    mbar_expect_tx(full_v, kVBytes);
#pragma unroll
    for (int c = 0; c < kPanelsV; ++c)
      tma_load_3d(v_addr + c * kPanelBytes, &v_map, full_v, c * 64, int32_t(h), key_row);
  };
  auto issue_q = [&](const TileItem& it) {
    issue_q_tile<kPanelsK>(q_addr, &q_map, full_q, G, QT, it);
  };
  // Thread 0: start copying work item w's union size and first start into shared memory.
  auto prefetch_next = [&](uint32_t w) {
    if (w >= total) return;
    const int64_t row = tile_row_of(decode_item(w, NT, H32));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(&next_union_count)),
                 "l"(tp.union_counts + row)
                 : "memory");
    if (tp.union_width > 0)      // (an empty union tensor has no first start to read)
      asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_addr(&next_first_start)),
                   "l"(tp.union_starts + row * tp.union_width)
                   : "memory");
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  };

  uint32_t work = blockIdx.x;
  if (work >= total) return;
  // The first tile's copies go out before anything else (the others wait on their barriers
  // after the __syncthreads that publishes the inits).
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init(full_k + 8 * s, 1);
    mbar_init(full_v, 1);
    mbar_init(full_q, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    const TileItem first = decode_item(work, NT, H32);
    const int64_t row = tile_row_of(first);
    issue_q(first);
    if (tp.union_counts[row] > 0) {
      const int32_t key = int32_t(first.b * p.seqlen_k + tp.union_starts[row * tp.union_width]);
      issue_k(0, first.h, key);     // (its V goes out under its S MMAs, as every chunk's)
    }
  }
  zero_rows_past_tile<kPanelsK>(q_smem, QT * G, tid);

  // Q and K are K-major (rows of 128 bytes, 8-row groups 1024 bytes apart); V is read N-major
  // (the next 64 columns one panel on, the next 8 keys 1024 bytes on).
  const uint64_t q_desc = smem_desc(q_addr, 16, 1024);
  const uint64_t k_desc0 = smem_desc(k_addr, 16, 1024);
  const uint64_t v_desc = smem_desc(v_addr, kPanelBytes, 1024);
  const int quad = lane & 3;
  uint32_t gc0 = 0;          // global chunks of this CTA before the current tile's first
  uint32_t q_phase = 0;

  for (;;) {
    const TileItem item = decode_item(work, NT, H32);
    const int64_t b = item.b, h = item.h;
    const int64_t t0 = item.tile * QT;
    const int64_t tile_row = tile_row_of(item);
    const int64_t* starts = tp.union_starts + tile_row * tp.union_width;
    const int n_iter = tp.union_counts[tile_row] << chunk_shift;
    const int32_t kv_row_base = int32_t(b * p.seqlen_k);
    const uint32_t next_work = work + gridDim.x;
    if (tid == 0) prefetch_next(next_work);

    // Each token's canonical row, once per tile, into shared memory where they fit: a row's
    // cursor step at a block's end then reads shared memory, not global memory whose latency
    // would sit right before the loop's closing barrier (every warp waits there for the slowest).
    if (sets_in_smem)
      for (int c = tid; c < QT * S; c += kThreads) {
        const int64_t t = t0 + c / S;
        if (t < TQ) row_sets[c] = p.blocks[((b * TQ + t) * H + h) * S + c % S];
      }

    // This thread's two rows of every accumulator. Key positions along B * TK fit 32 bits: six
    // registers fewer than int64 across the chunk loop, which the persistent loop's counters need.
    const TileRows rows = tile_rows(p, item, QT, sets_in_smem, row_sets, warp, lane);
    const int32_t(&lim)[2] = rows.lim;
    const int32_t(&kv0)[2] = rows.kv0;
    const int32_t* const(&row_blocks)[2] = rows.blocks;
    const int(&row_n)[2] = rows.n;
    int32_t head[2] = {-2, -2};
    int cursor[2] = {0, 0};
    // Ordinary stores (row sets; Q's zero rows) that the next reads need: the async proxy must
    // see the Q rows.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    mbar_wait(full_q, q_phase);
    // next_blk: each row's canonical block after its head, loaded one block ahead so that a
    // row's step at a block's end (right before the loop's closing barrier) waits for no load.
    int32_t next_blk[2] = {0, 0};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (row_n[i] > 0) head[i] = kv0[i] + row_blocks[i][0] * int32_t(p.block_size);
      if (row_n[i] > 1) next_blk[i] = row_blocks[i][1];
    }

    float o_acc[kDv / 2];
#pragma unroll
    for (int i = 0; i < kDv / 2; ++i) o_acc[i] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY};
    float l_run[2] = {0.f, 0.f};
    // copy_start (thread 0): the union start of chunk it + 1; chunk_start (every thread): the
    // current chunk's. Both are loaded one chunk ahead, while the S MMAs run.
    int64_t chunk_start = n_iter > 0 ? starts[0] : 0;
    int64_t copy_start = (tid == 0 && 1 < n_iter) ? starts[1 >> chunk_shift] : 0;

    for (int it = 0; it < n_iter; ++it) {
      const uint32_t gc = gc0 + it;
      const int s = gc & 1;
      const int64_t next_start = copy_start;
      // K of the stream's next chunk, into the stage S(gc - 1) finished with (every thread passed
      // the closing barrier after it): this tile's chunk it + 1, or after its last chunk the next
      // work item's first.
      auto issue_next_k = [&] {
        if (it + 1 < n_iter) {
          issue_k(gc + 1, h, kv_row_base + int32_t(next_start + ((it + 1) & chunk_mask) * kChunkKeys));
        } else if (next_work < total) {
          asm volatile("cp.async.wait_all;\n" ::: "memory");
          if (next_union_count > 0) {
            const TileItem next = decode_item(next_work, NT, H32);
            issue_k(gc + 1, next.h, int32_t(next.b * p.seqlen_k + next_first_start));
          }
        }
      };
      const int64_t block_start = chunk_start;
      const int64_t key0 = block_start + (it & chunk_mask) * kChunkKeys;
      const uint64_t k_desc = desc_plus(k_desc0, s * kKBytes);
      mbar_wait(full_k + 8 * s, (gc >> 1) & 1);

      float sc[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) sc[i] = 0.f;
      pin(sc);
      wgmma_fence();
#pragma unroll
      for (int c = 0; c < kPanelsK; ++c) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
          wgmma_qk<T, true>(sc, desc_plus(q_desc, c * kPanelBytes + kk * 32),
                            desc_plus(k_desc, c * kPanelBytes + kk * 32));
      }
      wgmma_commit();
      // Thread 0's copies go out while the tensor cores run S: this chunk's V (its buffer was
      // released by P V(gc - 1) before the last closing barrier) and the next chunk's K. Warp 0's
      // path is the warpgroup's (the warps meet at the closing barrier and at every wgmma), and
      // issued before S (K) or after the barrier (V) the copies sat on it: -2.5 to -5 % on the
      // prefill rows, -14 % on a random chunk (notes/hopper_late_issue_ab_s16.txt).
      if (tid == 0) {
        issue_v(h, kv_row_base + int32_t(key0));
        issue_next_k();
      }
      // The next chunk's start, and thread 0's next copy's, load while the MMAs run.
      if (it + 1 < n_iter && ((it + 1) & chunk_mask) == 0)
        chunk_start = load_now(starts + ((it + 1) >> chunk_shift));
      if (tid == 0 && it + 2 < n_iter && ((it + 2) & chunk_mask) == 0)
        copy_start = load_now(starts + ((it + 2) >> chunk_shift));
      wgmma_wait_all();
      pin(sc);

      // Mask and online softmax. Element sc[4j + 2i + e] is row m0 + 8i, key 8j + 2 * quad + e.
      const bool member[2] = {head[0] == int32_t(block_start), head[1] == int32_t(block_start)};
      // One threshold per row folds membership and causality into a compare of the element's
      // compile-time column 8j + e: keep key0 + 8j + 2 quad + e <= lim, i.e. 8j + e <= lim - key0
      // - 2 quad, clamped to [-1, 64] (-1 keeps nothing: a row that did not choose the block).
      int keep_upto[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int32_t d = lim[i] - int32_t(key0) - 2 * quad;
        keep_upto[i] = !member[i] || d < 0 ? -1 : d > kChunkKeys ? kChunkKeys : int(d);
      }
      // Most warps see one of two uniform cases (at G = 16 a warp's 16 rows are one token's
      // heads, which share a selection): every element kept (a chosen block, not the diagonal
      // chunk) or none (a block only the tile's other tokens chose). The first skips the mask and,
      // for scale > 0, folds the scale into the exponent's FFMA (max commutes with a positive
      // scale, rounding included); the second skips the softmax and O's rescale (P = 0, alpha = 1).
      // Only a mixed warp runs the general masked path. ~96 fewer instructions per full chunk.
      // The d64 instance (four CTAs per SM, <= 128 registers) keeps the general path alone: the
      // three paths spill there.
      constexpr bool kUniformCases = kDk + kDv > 128;
      constexpr int kLastColumn = 8 * 7 + 1;   // the largest 8j + e of a thread's elements
      const bool warp_full = kUniformCases && __all_sync(0xffffffff, keep_upto[0] >= kLastColumn &&
                                                                         keep_upto[1] >= kLastColumn);
      const bool warp_none =
          kUniformCases && __all_sync(0xffffffff, keep_upto[0] < 0 && keep_upto[1] < 0);
      const bool fold = warp_full && p.scale_log2 > 0.f;
      float mx[2] = {-INFINITY, -INFINITY};
      if (fold) {
#pragma unroll
        for (int j = 0; j < 32; ++j) mx[(j >> 1) & 1] = fmaxf(mx[(j >> 1) & 1], sc[j]);
      } else if (!warp_none) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              float& x = sc[4 * j + 2 * i + e];
              x = 8 * j + e <= keep_upto[i] ? x * p.scale_log2 : -INFINITY;
              mx[i] = fmaxf(mx[i], x);
            }
          }
        }
      }
      float alpha[2] = {1.f, 1.f}, m_use[2] = {0.f, 0.f}, rowsum[2] = {0.f, 0.f};
      // P as the A operand: k16 slice kk holds keys 16kk..16kk+15 = n8 tiles 2kk and 2kk+1.
      uint32_t pa[4][4];
      if (!warp_none) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 1));
          mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 2));
          if (fold) mx[i] *= p.scale_log2;
        }
        const bool warp_grow = step_max(mx, m_run, alpha, m_use);
        if (fold) {
#pragma unroll
          for (int j = 0; j < 32; ++j) {
            float& x = sc[j];
            x = exp2_ftz(fmaf(x, p.scale_log2, -m_use[(j >> 1) & 1]));
            rowsum[(j >> 1) & 1] += x;
          }
        } else {
#pragma unroll
          for (int j = 0; j < 32; ++j) {
            float& x = sc[j];
            x = exp2_ftz(x - m_use[(j >> 1) & 1]);
            rowsum[(j >> 1) & 1] += x;
          }
        }
        rescale_rows<kDv>(o_acc, l_run, alpha, rowsum, warp_grow);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          pa[kk][0] = pack2<T>(sc[8 * kk + 0], sc[8 * kk + 1]);
          pa[kk][1] = pack2<T>(sc[8 * kk + 2], sc[8 * kk + 3]);
          pa[kk][2] = pack2<T>(sc[8 * kk + 4], sc[8 * kk + 5]);
          pa[kk][3] = pack2<T>(sc[8 * kk + 6], sc[8 * kk + 7]);
        }
      } else {
        // P = 0 as 16 packed registers (zeroing S's 32 instead was hoisted by ptxas onto every
        // warp's path: 16 CS2R per chunk).
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) pa[kk][0] = pa[kk][1] = pa[kk][2] = pa[kk][3] = 0u;
      }
      pin(o_acc);
      mbar_wait(full_v, gc & 1);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_pv<T, kDv>(o_acc, pa[kk], desc_plus(v_desc, kk * 16 * 128));
      wgmma_commit();
      wgmma_wait_all();
      pin(o_acc);

      // Rows move past a block after its last chunk.
      if ((it & chunk_mask) == chunk_mask) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          if (member[i]) {
            ++cursor[i];
            head[i] = cursor[i] < row_n[i] ? kv0[i] + next_blk[i] * int32_t(p.block_size)
                                           : int32_t(-2);
            if (cursor[i] + 1 < row_n[i]) next_blk[i] = row_blocks[i][cursor[i] + 1];
          }
        }
      }
      // Every thread's MMAs on K stage s, on V and on Q are done: thread 0 may refill them (V and
      // the next K under the next chunk's S, the next tile's Q here).
      __syncthreads();
      if (tid == 0 && it + 1 == n_iter && next_work < total)   // the next work item's Q
        issue_q(decode_item(next_work, NT, H32));
    }

    store_rows<T, kDv>(p, item, QT, o_acc, l_run, m_run, warp, lane);
    if (next_work >= total) break;
    // A tile without chunks issued nothing for the next one in its (empty) loop: its Q (and
    // first K) go out here. Every thread is past this tile's reads of the row sets and of Q.
    __syncthreads();
    if (tid == 0 && n_iter == 0) {
      asm volatile("cp.async.wait_all;\n" ::: "memory");
      const TileItem next = decode_item(next_work, NT, H32);
      issue_q(next);
      if (next_union_count > 0) issue_k(gc0, next.h, int32_t(next.b * p.seqlen_k + next_first_start));
    }
    gc0 += n_iter;
    q_phase ^= 1;
    work = next_work;
  }
}

}  // namespace hopper
}  // namespace nsa_ext
