// Host side of the Hopper tile kernel (selection_tile_sm90.cuh): the TMA descriptors of K and V
// and one instance per (dtype, Dk, Dv) of NSA_EXT_FOR_EACH_HEAD_DIM. Compiled for sm_90a only
// (CMakeLists.txt: wgmma exists on that target alone); the binding calls it on SM 9.0 devices.
#include <cudaTypedefs.h>

#include <algorithm>

#include "hopper/selection_tile_pair_sm90.cuh"
#include "hopper/selection_tile_sm90.cuh"

namespace nsa_ext {
namespace {

// cuTensorMapEncodeTiled through the runtime's driver entry point: no link against libcuda.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      ptr = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// K or V [B, TK, H, D] contiguous as a 3-d tensor (D, H, B*TK); a box is 64 elements of D (one
// 128-byte swizzle panel) x one head x 64 keys. Keys past B*TK read as zeros (and are masked:
// they lie past every query's causal limit).
cudaError_t encode_kv_map(CUtensorMap* map, const void* base, ScalarKind kind, int64_t D,
                          int64_t H, int64_t rows) {
  const auto encode = tensor_map_encoder();
  if (!encode) return cudaErrorNotSupported;
  const cuuint64_t dims[3] = {cuuint64_t(D), cuuint64_t(H), cuuint64_t(rows)};
  const cuuint64_t strides[2] = {cuuint64_t(D * 2), cuuint64_t(H * D * 2)};
  const cuuint32_t box[3] = {64, 1, hopper::kChunkKeys};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult res = encode(
      map, kind == ScalarKind::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      3, const_cast<void*>(base), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// Q [B, TQ, HQ, Dk] contiguous as a 4-d tensor (Dk, HQ, TQ, B); a box is 64 elements of Dk x
// the G heads of one KV head x the tile's QT tokens: rows m = r * G + g of the tile, as the
// kernel's accumulators take them. Tokens past TQ read as zeros (B is its own dimension, so a
// tile never reads the next sequence's queries).
cudaError_t encode_q_map(CUtensorMap* map, const SelectionFwdParams& p, ScalarKind kind, int G,
                         int QT) {
  const auto encode = tensor_map_encoder();
  if (!encode) return cudaErrorNotSupported;
  const int64_t D = p.head_dim_qk, HQ = p.heads_q;
  const cuuint64_t dims[4] = {cuuint64_t(D), cuuint64_t(HQ), cuuint64_t(p.seqlen_q),
                              cuuint64_t(p.batch)};
  const cuuint64_t strides[3] = {cuuint64_t(D * 2), cuuint64_t(HQ * D * 2),
                                 cuuint64_t(p.seqlen_q * HQ * D * 2)};
  const cuuint32_t box[4] = {64, cuuint32_t(G), cuuint32_t(QT), 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult res = encode(
      map, kind == ScalarKind::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      4, const_cast<void*>(p.q), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// CTAs of one kernel instance that fit on the current device at once (SMs x occupancy at
// `smem`), cached per device in that instance's `cache`.
struct Residency {
  int sms_of[64] = {};
  int per_sm_of[64] = {};
};

template <typename Kernel>
cudaError_t residency(Kernel kernel, int smem, Residency& cache, int64_t& sms, int64_t& per_sm) {
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  if (device < 0 || device >= 64) return cudaErrorInvalidDevice;
  if (!cache.sms_of[device]) {
    int n = 0, per = 0;
    e = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    if (e == cudaSuccess)
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, kernel, hopper::kThreads, smem);
    if (e != cudaSuccess) return e;
    cache.sms_of[device] = std::max(1, n);
    cache.per_sm_of[device] = std::max(1, per);
  }
  sms = cache.sms_of[device];
  per_sm = cache.per_sm_of[device];
  return cudaSuccess;
}

int64_t work_items(const TileParams& tp) { return tp.fwd.batch * tp.num_tiles * tp.fwd.heads_kv; }

// One instance of the 64-key kernel (selection_tile_sm90.cuh) or of the pair-step kernel
// (selection_tile_pair_sm90.cuh): its function and its shared memory per CTA.
template <typename T, int kDk, int kDv>
struct StepKernel {
  static constexpr int smem = hopper::tile_smem_bytes<kDk, kDv, hopper::kCopyStages>();
  static_assert(smem <= hopper::kMaxDynamicSmem, "tile kernel: shared memory past 227 KB");
  static constexpr auto kernel = hopper::selection_tile_sm90_kernel<T, kDk, kDv, hopper::kCopyStages>;
};

template <typename T>
struct PairKernel {
  static constexpr int smem = hopper::kPairSmemBytes;
  static constexpr auto kernel = hopper::selection_tile_pair_sm90_kernel<T>;
};

template <typename K>
cudaError_t resident(int64_t& sms, int64_t& per_sm) {
  static thread_local SmemAttributes attributes;     // this kernel instance's
  static thread_local Residency cache;
  // The whole 228 KB for shared memory: three CTAs of d128 (69 KB each) per SM, four of d64, two
  // of the pair kernel (113 KB).
  const cudaError_t err = attributes.set(K::kernel, K::smem, true);
  if (err != cudaSuccess) return err;
  return residency(K::kernel, K::smem, cache, sms, per_sm);
}

// Persistent CTAs: as many as fit on the GPU at once, each striding over the work items.
template <typename K>
cudaError_t launch(const TileParams& tp, const CUtensorMap& q_map, const CUtensorMap& k_map,
                   const CUtensorMap& v_map, int64_t max_ctas, cudaStream_t stream) {
  int64_t sms = 0, per_sm = 0;
  const cudaError_t err = resident<K>(sms, per_sm);
  if (err != cudaSuccess) return err;
  const int64_t work = work_items(tp);
  const auto rounds = [&](int64_t ctas) { return (work + ctas - 1) / ctas; };
  // Fewest CTAs per SM that take as many rounds over the work items as the full grid: a CTA
  // shares its SM with fewer others, so each of its tiles runs faster. At 512 items (a chunk of
  // TQ = 512 at G = 16) on 132 SMs two per SM beat three by 6 %, at 2048 the full grid won
  // (notes/tile_caps_h200_s14.txt; the random chunk's call -3.8 % with this rule,
  // notes/hopper_cuts_grid_ab_s15.txt); from ~3 rounds on this keeps the full grid.
  int64_t per = per_sm;
  while (per > 1 && rounds((per - 1) * sms) == rounds(per_sm * sms)) --per;
  int64_t grid = std::min<int64_t>(work, per * sms);
  if (max_ctas > 0) grid = std::min<int64_t>(grid, max_ctas);
  K::kernel<<<dim3(unsigned(grid)), hopper::kThreads, K::smem, stream>>>(q_map, k_map, v_map, tp);
  return cudaGetLastError();
}

// d128 with 64-key blocks: the pair-step kernel where its grid (two CTAs per SM) takes no more
// rounds over the work items than the 64-key kernel's (three): chunks of a few hundred tiles,
// where two CTAs per SM run either way and the pair kernel is 5-12 % faster (TQ = 256-512 at
// G = 16; even at 1024 items, 4 rounds against 3). Prefills keep the 64-key kernel: its three
// CTAs per SM beat the pair kernel's two by 7-11 % (notes/hopper.md, seventeenth session).
template <typename T>
cudaError_t launch_d128(const TileParams& tp, const CUtensorMap& q_map, const CUtensorMap& k_map,
                        const CUtensorMap& v_map, int64_t max_ctas, cudaStream_t stream) {
  using Step = StepKernel<T, 128, 128>;
  if (tp.fwd.block_size == hopper::kChunkKeys) {
    int64_t sms = 0, pair_per_sm = 0, step_per_sm = 0;
    cudaError_t err = resident<PairKernel<T>>(sms, pair_per_sm);
    if (err == cudaSuccess) err = resident<Step>(sms, step_per_sm);
    if (err != cudaSuccess) return err;
    const int64_t work = work_items(tp);
    const auto rounds = [&](int64_t per_sm) { return (work + sms * per_sm - 1) / (sms * per_sm); };
    if (rounds(pair_per_sm) <= rounds(step_per_sm))
      return launch<PairKernel<T>>(tp, q_map, k_map, v_map, max_ctas, stream);
  }
  return launch<Step>(tp, q_map, k_map, v_map, max_ctas, stream);
}

template <typename T>
cudaError_t launch_dims(const TileParams& tp, const CUtensorMap& q_map, const CUtensorMap& k_map,
                        const CUtensorMap& v_map, int64_t max_ctas, cudaStream_t stream) {
  if (tp.fwd.head_dim_qk == 128 && tp.fwd.head_dim_v == 128)
    return launch_d128<T>(tp, q_map, k_map, v_map, max_ctas, stream);
#define NSA_EXT_TILE(DK, DV)                                                                  \
  if (tp.fwd.head_dim_qk == DK && tp.fwd.head_dim_v == DV)                                     \
    return launch<StepKernel<T, DK, DV>>(tp, q_map, k_map, v_map, max_ctas, stream);
  NSA_EXT_FOR_EACH_HEAD_DIM(NSA_EXT_TILE)
#undef NSA_EXT_TILE
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_selection_tile_sm90(const TileParams& tp, ScalarKind kind, int64_t max_ctas,
                                       cudaStream_t stream) {
  const SelectionFwdParams& p = tp.fwd;
  if (kind == ScalarKind::kFloat32 || p.block_size % hopper::kChunkKeys ||
      (p.block_size & (p.block_size - 1)) || p.group > hopper::kRows)
    return cudaErrorInvalidValue;
  const int64_t grid = p.batch * tp.num_tiles * p.heads_kv;
  if (grid == 0) return cudaSuccess;
  CUtensorMap q_map, k_map, v_map;
  const int64_t rows = p.batch * p.seqlen_k;
  cudaError_t err = encode_q_map(&q_map, p, kind, int(p.group), tp.tokens_per_tile);
  if (err == cudaSuccess) err = encode_kv_map(&k_map, p.k, kind, p.head_dim_qk, p.heads_kv, rows);
  if (err == cudaSuccess) err = encode_kv_map(&v_map, p.v, kind, p.head_dim_v, p.heads_kv, rows);
  if (err != cudaSuccess) return err;
  return kind == ScalarKind::kBFloat16
             ? launch_dims<__nv_bfloat16>(tp, q_map, k_map, v_map, max_ctas, stream)
             : launch_dims<__half>(tp, q_map, k_map, v_map, max_ctas, stream);
}

}  // namespace nsa_ext
