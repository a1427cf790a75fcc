// Selection attention, forward, query-tile schedule on Hopper: the *pair* step (experiment).
//
// selection_tile_sm90.cuh's kernel takes one 64-key chunk of the tile's union per step: S is a
// 64 x 64 tile (8 m64n64k16 MMAs at Dk = 128), and every step pays the same fixed chain beside
// its MMAs (the copy waits, two wgmma round trips, the row maxima's shuffles and the warp votes,
// the cursor step and the closing barrier). This kernel takes two union chunks per step: their
// K boxes land side by side in one 128-key panel, S is one 64 x 128 tile (m64n128k16, as
// FlashAttention-3's 128-key blocks at head dim 128), the softmax runs once over 128 keys and
// P V is one group of eight k16 MMAs. Its price is shared memory and registers: a step's K and V
// are 32 KB each, so Q + two K stages + V take 112 KB and two CTAs share an SM (three do with
// 64-key steps); the registers (64 of S, 32 of P) fit the 255 that two CTAs allow.
// d128 and block size 64 only (a chunk is a union block: the row cursors step once per chunk);
// the launcher keeps the 64-key kernel everywhere else. A tile with an odd union size ends on a
// half step: its second box repeats the first block (finite data, read from L2), and no row
// keeps a key of it.
#pragma once

#include "hopper/selection_tile_sm90.cuh"

namespace nsa_ext {
namespace hopper {

constexpr int kPairDk = 128;
constexpr int kPairDv = 128;
constexpr int kPairPanelBytes = 2 * kPanelBytes;                 // one 64-column panel, 128 keys
constexpr int kPairKBytes = kPairDk / 64 * kPairPanelBytes;      // one step's K: 32 KB
constexpr int kPairVBytes = kPairDv / 64 * kPairPanelBytes;      // one step's V: 32 KB
constexpr int kPairQBytes = kPairDk / 64 * kPanelBytes;
constexpr int kPairBarrierBytes = 64;   // 4 mbarriers, the next item's two starts and its count
// Two CTAs per SM: 228 KB less a 1 KB reserve per CTA leaves 113 KB each. Q 16 + K 2 x 32 +
// V 32 = 112 KB; the row sets take what is left after the barriers.
constexpr int kPairSmemBytes = 113 * 1024;
constexpr int kPairRowSetEntries =
    (kPairSmemBytes - kPairQBytes - 2 * kPairKBytes - kPairVBytes - kPairBarrierBytes) / 4;
static_assert(kPairRowSetEntries >= 64, "pair kernel: no room for a G = 16 tile's row sets");

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    selection_tile_pair_sm90_kernel(const __grid_constant__ CUtensorMap q_map,
                                    const __grid_constant__ CUtensorMap k_map,
                                    const __grid_constant__ CUtensorMap v_map,
                                    const TileParams tp) {
  constexpr int kPanelsK = kPairDk / 64;
  constexpr int kPanelsV = kPairDv / 64;
  const SelectionFwdParams& p = tp.fwd;
  if (p.gate_totals != nullptr && !gate_picks_tile(p)) return;

  // No static shared memory: the dynamic window starts at the CTA's first byte, 1024-aligned,
  // and the budget has no room for an alignment pad.
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t q_addr = smem_addr(smem_raw);
  if (q_addr & 1023u) __trap();
  const uint32_t k_addr = q_addr + kPairQBytes;            // two K stages
  const uint32_t v_addr = k_addr + 2 * kPairKBytes;        // one V buffer
  const uint32_t bar_addr = v_addr + kPairVBytes;
  uint8_t* bar_ptr = smem_raw + (bar_addr - q_addr);
  const uint32_t full_k = bar_addr;                        // stage s: full_k + 8 s
  const uint32_t full_v = full_k + 16;
  const uint32_t full_q = full_v + 8;
  int64_t* next_starts = reinterpret_cast<int64_t*>(bar_ptr + 32);   // the next item's first two
  int32_t* next_count = reinterpret_cast<int32_t*>(bar_ptr + 48);
  int32_t* row_sets = reinterpret_cast<int32_t*>(bar_ptr + kPairBarrierBytes);
  uint8_t* q_smem = smem_raw;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const uint32_t NT = uint32_t(tp.num_tiles);
  const uint32_t H32 = uint32_t(p.heads_kv);
  const uint32_t total = uint32_t(p.batch) * H32 * NT;
  const int G = int(p.group);
  const int QT = tp.tokens_per_tile;
  const int64_t TQ = p.seqlen_q;
  const int64_t H = p.heads_kv;
  const int S = int(p.num_selected);
  const bool sets_in_smem = QT * S <= kPairRowSetEntries;

  auto tile_row_of = [&](const TileItem& it) { return (it.b * NT + it.tile) * H + it.h; };
  // A step's two chunks (keys key_a and key_b along B * TK) side by side in one 128-key panel.
  auto issue_k = [&](uint32_t gs, int64_t h, int32_t key_a, int32_t key_b) {
    const uint32_t s = gs & 1;
    const uint32_t dst = k_addr + s * kPairKBytes;
    mbar_expect_tx(full_k + 8 * s, kPairKBytes);
#pragma unroll
    for (int c = 0; c < kPanelsK; ++c) {
      tma_load_3d(dst + c * kPairPanelBytes, &k_map, full_k + 8 * s, c * 64, int32_t(h), key_a);
      tma_load_3d(dst + c * kPairPanelBytes + kPanelBytes, &k_map, full_k + 8 * s, c * 64,
                  int32_t(h), key_b);
    }
  };
  auto issue_v = [&](int64_t h, int32_t key_a, int32_t key_b) {
    mbar_expect_tx(full_v, kPairVBytes);
#pragma unroll
    for (int c = 0; c < kPanelsV; ++c) {
      tma_load_3d(v_addr + c * kPairPanelBytes, &v_map, full_v, c * 64, int32_t(h), key_a);
      tma_load_3d(v_addr + c * kPairPanelBytes + kPanelBytes, &v_map, full_v, c * 64, int32_t(h),
                  key_b);
    }
  };
  auto issue_q = [&](const TileItem& it) {
    issue_q_tile<kPanelsK>(q_addr, &q_map, full_q, G, QT, it);
  };
  auto prefetch_next = [&](uint32_t w) {
    if (w >= total) return;
    const int64_t row = tile_row_of(decode_item(w, NT, H32));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(next_count)),
                 "l"(tp.union_counts + row)
                 : "memory");
    for (int j = 0; j < 2 && j < tp.union_width; ++j)
      asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_addr(next_starts + j)),
                   "l"(tp.union_starts + row * tp.union_width + j)
                   : "memory");
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  };

  uint32_t work = blockIdx.x;
  if (work >= total) return;
  if (tid == 0) {
    for (int s = 0; s < 2; ++s) mbar_init(full_k + 8 * s, 1);
    mbar_init(full_v, 1);
    mbar_init(full_q, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    const TileItem first = decode_item(work, NT, H32);
    const int64_t row = tile_row_of(first);
    issue_q(first);
    const int n = tp.union_counts[row];
    if (n > 0) {
      const int64_t* st = tp.union_starts + row * tp.union_width;
      const int32_t base = int32_t(first.b * p.seqlen_k);
      issue_k(0, first.h, base + int32_t(st[0]), base + int32_t(st[n > 1 ? 1 : 0]));
    }
  }
  zero_rows_past_tile<kPanelsK>(q_smem, QT * G, tid);

  const uint64_t q_desc = smem_desc(q_addr, 16, 1024);
  const uint64_t k_desc0 = smem_desc(k_addr, 16, 1024);
  const uint64_t v_desc = smem_desc(v_addr, kPairPanelBytes, 1024);
  const int quad = lane & 3;
  uint32_t gs0 = 0;          // global steps of this CTA before the current tile's first
  uint32_t q_phase = 0;

  for (;;) {
    const TileItem item = decode_item(work, NT, H32);
    const int64_t b = item.b, h = item.h;
    const int64_t t0 = item.tile * QT;
    const int64_t tile_row = tile_row_of(item);
    const int64_t* starts = tp.union_starts + tile_row * tp.union_width;
    const int n_chunks = tp.union_counts[tile_row];
    const int n_steps = (n_chunks + 1) >> 1;
    const int32_t kv_row_base = int32_t(b * p.seqlen_k);
    const uint32_t next_work = work + gridDim.x;
    if (tid == 0) prefetch_next(next_work);
    // The union start of chunk j; the missing second chunk of an odd union repeats the last.
    auto start_of = [&](int j) { return load_now(starts + (j < n_chunks ? j : n_chunks - 1)); };

    if (sets_in_smem)
      for (int c = tid; c < QT * S; c += kThreads) {
        const int64_t t = t0 + c / S;
        if (t < TQ) row_sets[c] = p.blocks[((b * TQ + t) * H + h) * S + c % S];
      }

    const TileRows rows = tile_rows(p, item, QT, sets_in_smem, row_sets, warp, lane);
    const int32_t(&lim)[2] = rows.lim;
    const int32_t(&kv0)[2] = rows.kv0;
    const int32_t* const(&row_blocks)[2] = rows.blocks;
    const int(&row_n)[2] = rows.n;
    int cursor[2] = {0, 0};
    // A row's next three canonical blocks as key positions (-2: none): a step may move it past
    // two, and the loads of the one after run a whole step ahead of their use.
    int32_t hd0[2], hd1[2], hd2[2];
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    mbar_wait(full_q, q_phase);
    auto key_at = [&](int i, int c) {
      return c < row_n[i] ? kv0[i] + row_blocks[i][c] * int32_t(p.block_size) : int32_t(-2);
    };
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      hd0[i] = key_at(i, 0);
      hd1[i] = key_at(i, 1);
      hd2[i] = key_at(i, 2);
    }

    float o_acc[kPairDv / 2];
#pragma unroll
    for (int i = 0; i < kPairDv / 2; ++i) o_acc[i] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY};
    float l_run[2] = {0.f, 0.f};
    // cur_*: this step's two chunk starts (every thread); copy_*: the next step's (thread 0, for
    // its K copy under this step's S). Both loaded one step ahead, while S runs.
    int64_t cur_a = n_chunks > 0 ? start_of(0) : 0, cur_b = n_chunks > 0 ? start_of(1) : 0;
    int64_t copy_a = 0, copy_b = 0;
    if (tid == 0 && n_steps > 1) {
      copy_a = start_of(2);
      copy_b = start_of(3);
    }

    for (int st = 0; st < n_steps; ++st) {
      const uint32_t gs = gs0 + st;
      const int s = gs & 1;
      const int64_t key_a = cur_a, key_b = cur_b;
      const bool has_b = 2 * st + 1 < n_chunks;
      const uint64_t k_desc = desc_plus(k_desc0, s * kPairKBytes);
      const int64_t nxt_a = copy_a, nxt_b = copy_b;
      mbar_wait(full_k + 8 * s, (gs >> 1) & 1);

      float sc[64];
#pragma unroll
      for (int i = 0; i < 64; ++i) sc[i] = 0.f;
      pin(sc);
      wgmma_fence();
#pragma unroll
      for (int c = 0; c < kPanelsK; ++c) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
          wgmma_qk<T, true, 128>(sc, desc_plus(q_desc, c * kPanelBytes + kk * 32),
                                 desc_plus(k_desc, c * kPairPanelBytes + kk * 32));
      }
      wgmma_commit();
      if (tid == 0) {
        issue_v(h, kv_row_base + int32_t(key_a), kv_row_base + int32_t(key_b));
        if (st + 1 < n_steps) {
          issue_k(gs + 1, h, kv_row_base + int32_t(nxt_a), kv_row_base + int32_t(nxt_b));
        } else if (next_work < total) {
          asm volatile("cp.async.wait_all;\n" ::: "memory");
          const int nn = *next_count;
          if (nn > 0) {
            const TileItem next = decode_item(next_work, NT, H32);
            const int32_t base = int32_t(next.b * p.seqlen_k);
            issue_k(gs + 1, next.h, base + int32_t(next_starts[0]),
                    base + int32_t(next_starts[nn > 1 ? 1 : 0]));
          }
        }
      }
      if (st + 1 < n_steps) {
        cur_a = start_of(2 * st + 2);
        cur_b = start_of(2 * st + 3);
      }
      if (tid == 0 && st + 2 < n_steps) {
        copy_a = start_of(2 * st + 4);
        copy_b = start_of(2 * st + 5);
      }
      wgmma_wait_all();
      pin(sc);

      // Element sc[4j + 2i + e]: row m0 + 8i, key 8j + 2 quad + e of the step's 128; n8 tiles
      // j < 8 are chunk a's, the rest chunk b's.
      bool member[2][2];
      int keep_upto[2][2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        member[0][i] = hd0[i] == int32_t(key_a);
        member[1][i] = has_b && (member[0][i] ? hd1[i] : hd0[i]) == int32_t(key_b);
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int32_t d = lim[i] - int32_t(c ? key_b : key_a) - 2 * quad;
          keep_upto[c][i] = !member[c][i] || d < 0 ? -1 : d > kChunkKeys ? kChunkKeys : int(d);
        }
      }
      constexpr int kLastColumn = 8 * 7 + 1;
      bool full[2], none[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        full[c] = __all_sync(0xffffffff, keep_upto[c][0] >= kLastColumn &&
                                             keep_upto[c][1] >= kLastColumn);
        none[c] = __all_sync(0xffffffff, keep_upto[c][0] < 0 && keep_upto[c][1] < 0);
      }
      const bool fold[2] = {full[0] && p.scale_log2 > 0.f, full[1] && p.scale_log2 > 0.f};
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        if (none[c]) continue;
        if (fold[c]) {
          float raw[2] = {-INFINITY, -INFINITY};
#pragma unroll
          for (int j = 0; j < 32; ++j) raw[(j >> 1) & 1] = fmaxf(raw[(j >> 1) & 1], sc[32 * c + j]);
#pragma unroll
          for (int i = 0; i < 2; ++i) mx[i] = fmaxf(mx[i], raw[i] * p.scale_log2);
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e)
#pragma unroll
              for (int i = 0; i < 2; ++i) {
                float& x = sc[32 * c + 4 * j + 2 * i + e];
                x = 8 * j + e <= keep_upto[c][i] ? x * p.scale_log2 : -INFINITY;
                mx[i] = fmaxf(mx[i], x);
              }
        }
      }
      uint32_t pa[8][4];
      if (!(none[0] && none[1])) {
        float alpha[2] = {1.f, 1.f}, m_use[2], rowsum[2] = {0.f, 0.f};
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 1));
          mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 2));
        }
        const bool warp_grow = step_max(mx, m_run, alpha, m_use);
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          if (none[c]) {
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) pa[4 * c + kk][0] = pa[4 * c + kk][1] =
                pa[4 * c + kk][2] = pa[4 * c + kk][3] = 0u;
            continue;
          }
          if (fold[c]) {
#pragma unroll
            for (int j = 0; j < 32; ++j) {
              float& x = sc[32 * c + j];
              x = exp2_ftz(fmaf(x, p.scale_log2, -m_use[(j >> 1) & 1]));
              rowsum[(j >> 1) & 1] += x;
            }
          } else {
#pragma unroll
            for (int j = 0; j < 32; ++j) {
              float& x = sc[32 * c + j];
              x = exp2_ftz(x - m_use[(j >> 1) & 1]);
              rowsum[(j >> 1) & 1] += x;
            }
          }
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) {
            const float* x = sc + 32 * c + 8 * kk;
            pa[4 * c + kk][0] = pack2<T>(x[0], x[1]);
            pa[4 * c + kk][1] = pack2<T>(x[2], x[3]);
            pa[4 * c + kk][2] = pack2<T>(x[4], x[5]);
            pa[4 * c + kk][3] = pack2<T>(x[6], x[7]);
          }
        }
        rescale_rows<kPairDv>(o_acc, l_run, alpha, rowsum, warp_grow);
      } else {
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) pa[kk][0] = pa[kk][1] = pa[kk][2] = pa[kk][3] = 0u;
      }
      pin(o_acc);
      mbar_wait(full_v, gs & 1);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 8; ++kk)
        wgmma_pv<T, kPairDv>(o_acc, pa[kk], desc_plus(v_desc, kk * 16 * 128));
      wgmma_commit();
      wgmma_wait_all();
      pin(o_acc);

      // Rows move past the blocks of this step they chose (each chunk is a whole block).
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int adv = int(member[0][i]) + int(member[1][i]);
        if (adv) {
          cursor[i] += adv;
          const int32_t n1 = adv == 1 ? hd2[i] : key_at(i, cursor[i] + 1);
          hd0[i] = adv == 1 ? hd1[i] : hd2[i];
          hd1[i] = n1;
          hd2[i] = key_at(i, cursor[i] + 2);
        }
      }
      __syncthreads();
      if (tid == 0 && st + 1 == n_steps && next_work < total)   // the next work item's Q
        issue_q(decode_item(next_work, NT, H32));
    }

    store_rows<T, kPairDv>(p, item, QT, o_acc, l_run, m_run, warp, lane);
    if (next_work >= total) break;
    __syncthreads();
    if (tid == 0 && n_steps == 0) {
      asm volatile("cp.async.wait_all;\n" ::: "memory");
      const TileItem next = decode_item(next_work, NT, H32);
      issue_q(next);
      const int nn = *next_count;
      if (nn > 0) {
        const int32_t base = int32_t(next.b * p.seqlen_k);
        issue_k(gs0, next.h, base + int32_t(next_starts[0]),
                base + int32_t(next_starts[nn > 1 ? 1 : 0]));
      }
    }
    gs0 += n_steps;
    q_phase ^= 1;
    work = next_work;
  }
}

}  // namespace hopper
}  // namespace nsa_ext
