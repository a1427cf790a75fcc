// The C++ boundary of nsa_ext._C: the operators nsa_ext_cuda::selection_fwd and
// nsa_ext_cuda::canonical_blocks (TORCH_LIBRARY, CUDA implementations below; the fake
// implementations live in nsa_ext/_ext.py) and a small pybind11 module with the build's facts
// and the eager plans' dispatcher-free entry to selection_fwd_rows.
//
// torch.ops callers skip the Python validation, so every input is checked here, naming the
// argument. The operator takes the canonical selection (nsa_ext.selection.canonical_blocks) and
// the per-token geometry (nsa_ext.selection.row_geometry) that the Python backend computes; it
// allocates only its outputs (and, with num_splits > 1, an fp32 workspace whose size follows from
// the shapes alone), never synchronises with the host and launches one kernel (two when
// splitting: the forward over slices of each row's entries, then the merge), so a call can be
// captured in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#if !defined(NSA_EXT_NO_PYTHON) && !defined(NSA_EXT_NO_DIRECT_ENTRY)
#include <torch/csrc/utils/pybind.h>   // at::Tensor <-> torch.Tensor casters (libtorch_python)
#elif !defined(NSA_EXT_NO_PYTHON)
#include <pybind11/pybind11.h>
#endif
#include <torch/library.h>

#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "selection_params.h"

namespace nsa_ext {
namespace {

std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

std::string strides_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.stride(i));
  return s + "]";
}

constexpr const char* kFwd = "nsa_ext_cuda::selection_fwd: ";

void check_cuda_contiguous(const at::Tensor& t, const char* name, const at::Tensor& q,
                          const char* op = kFwd) {
  TORCH_CHECK(t.is_cuda(), op, name, " must be a CUDA tensor, got ", t.device().str());
  TORCH_CHECK(t.device() == q.device(), op, name, " must be on the first input's device (",
              q.device().str(), "), got ", t.device().str());
  TORCH_CHECK(t.is_contiguous(), op, name,
              " must be contiguous, got shape ", shape_of(t), " with strides ", strides_of(t));
}

// The message is built only for a failing check: this runs ~10 times in every eager call, where
// a std::vector and a std::string per check were a measurable part of the host time.
void check_shape(const at::Tensor& t, const char* name, std::initializer_list<int64_t> expected,
                 const char* meaning, const char* op = kFwd) {
  bool ok = t.dim() == int64_t(expected.size());
  int64_t i = 0;
  for (const int64_t size : expected) ok = ok && t.size(i++) == size;
  if (ok) return;
  std::string want = "[";
  i = 0;
  for (const int64_t size : expected) want += (i++ ? ", " : "") + std::to_string(size);
  want += "]";
  TORCH_CHECK(false, op, name, " must have shape ", want, " ", meaning, ", got ", shape_of(t));
}

bool has_mma_instance(int64_t dk, int64_t dv) {
#define NSA_EXT_MATCH(DK, DV) \
  if (dk == DK && dv == DV) return true;
  NSA_EXT_FOR_EACH_HEAD_DIM(NSA_EXT_MATCH)
#undef NSA_EXT_MATCH
  return false;
}

std::string mma_head_dims() {
  std::string s;
#define NSA_EXT_NAME(DK, DV) s += (s.empty() ? "" : ", ") + std::to_string(DK) + "/" + std::to_string(DV);
  NSA_EXT_FOR_EACH_HEAD_DIM(NSA_EXT_NAME)
#undef NSA_EXT_NAME
  return s;
}

template <ScalarKind kKind>
cudaError_t launch_mma(const SelectionFwdParams& p, cudaStream_t stream, bool* merged) {
#define NSA_EXT_LAUNCH(DK, DV) \
  if (p.head_dim_qk == DK && p.head_dim_v == DV) return launch_selection_fwd_mma<kKind, DK, DV>(p, stream, merged);
  NSA_EXT_FOR_EACH_HEAD_DIM(NSA_EXT_LAUNCH)
#undef NSA_EXT_LAUNCH
  return cudaErrorInvalidValue;   // unreachable: the dims were checked
}

// The checks every forward operator makes (torch.ops callers skip the Python validation).
struct ForwardShapes {
  int64_t B, TQ, HQ, Dk, TK, H, Dv, S;
};

// The checks of every forward: q, k, v, pos, k_offset, block_size; S is the selection rows'
// width (the canonical rows' or the caller's indices', checked by the caller).
ForwardShapes check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& pos,
                                     const at::Tensor& k_offset, int64_t block_size, int64_t S) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&pos, "pos"},
                         {&k_offset, "k_offset"}})
    check_cuda_contiguous(*t, name, q, op);

  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              op, "q must be float16, bfloat16 or float32, got ", c10::toString(dtype));
  TORCH_CHECK(k.scalar_type() == dtype, op, "k must have q's dtype (",
              c10::toString(dtype), "), got ", c10::toString(k.scalar_type()));
  TORCH_CHECK(v.scalar_type() == dtype, op, "v must have q's dtype (",
              c10::toString(dtype), "), got ", c10::toString(v.scalar_type()));
  TORCH_CHECK(pos.scalar_type() == at::kLong,
              op, "pos must be int64, got ", c10::toString(pos.scalar_type()));
  TORCH_CHECK(k_offset.scalar_type() == at::kLong,
              op, "k_offset must be int64, got ", c10::toString(k_offset.scalar_type()));

  TORCH_CHECK(q.dim() == 4, op, "q must be 4-d [B, TQ, HQ, Dk], got ",
              shape_of(q));
  TORCH_CHECK(k.dim() == 4, op, "k must be 4-d [B, TK, H, Dk], got ",
              shape_of(k));
  const int64_t B = q.size(0), TQ = q.size(1), HQ = q.size(2), Dk = q.size(3);
  const int64_t TK = k.size(1), H = k.size(2);
  TORCH_CHECK(H > 0 && HQ % H == 0, op, "q's heads (", std::to_string(HQ),
              ") must be a multiple of k's heads (", std::to_string(H), ")");
  check_shape(k, "k", {B, TK, H, Dk}, "[B, TK, H, Dk]", op);
  TORCH_CHECK(v.dim() == 4, op, "v must be 4-d [B, TK, H, Dv], got ",
              shape_of(v));
  const int64_t Dv = v.size(3);
  check_shape(v, "v", {B, TK, H, Dv}, "[B, TK, H, Dv]", op);
  check_shape(pos, "pos", {B, TQ}, "[B, TQ]", op);
  check_shape(k_offset, "k_offset", {B, TQ}, "[B, TQ]", op);
  TORCH_CHECK(block_size >= kMinBlockSize && (block_size & (block_size - 1)) == 0 &&
                  block_size <= (int64_t(1) << 30),
              op, "block_size must be a power of two >= ",
              std::to_string(kMinBlockSize), ", got ", std::to_string(block_size));
  if (dtype == at::kFloat) {
    TORCH_CHECK(Dk <= kFp32MaxHeadDim && Dv <= kFp32MaxHeadDim,
                op, "float32 head dims must be <= ",
                std::to_string(kFp32MaxHeadDim), ", got Dk=", std::to_string(Dk), ", Dv=",
                std::to_string(Dv));
  } else {
    TORCH_CHECK(has_mma_instance(Dk, Dv), op, "no kernel for Dk=",
                std::to_string(Dk), ", Dv=", std::to_string(Dv), " in ", c10::toString(dtype), " (built: ", mma_head_dims(), ")");
  }
  // 16-byte copies (cp.async) need 16-byte aligned rows; rows are Dk or Dv
  // elements long, so aligned base pointers suffice (the Python backend re-allocates others).
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0,
                op, name, " must start at a 16-byte aligned address");
  TORCH_CHECK(B * TQ < (int64_t(1) << 31) && H < 65536 && HQ / H < (int64_t(1) << 20),
              op, "grid too large: B*TQ=", std::to_string(B * TQ), ", H=",
              std::to_string(H));
  return {B, TQ, HQ, Dk, TK, H, Dv, S};
}

// ... and the canonical rows' tensors (selection_fwd, selection_fwd_tile).
ForwardShapes check_forward_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const at::Tensor& blocks,
                                   const at::Tensor& num_blocks, const at::Tensor& pos,
                                   const at::Tensor& k_offset, int64_t block_size) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&blocks, "blocks"}})
    check_cuda_contiguous(*t, name, q, op);
  check_cuda_contiguous(num_blocks, "num_blocks", q, op);
  TORCH_CHECK(blocks.scalar_type() == at::kInt,
              op, "blocks must be int32, got ", c10::toString(blocks.scalar_type()));
  TORCH_CHECK(num_blocks.scalar_type() == at::kInt,
              op, "num_blocks must be int32, got ", c10::toString(num_blocks.scalar_type()));
  TORCH_CHECK(blocks.dim() == 4, op, "blocks must be 4-d [B, TQ, H, S], got ",
              shape_of(blocks));
  const ForwardShapes shapes =
      check_attention_inputs(op, q, k, v, pos, k_offset, block_size, blocks.size(3));
  check_shape(blocks, "blocks", {shapes.B, shapes.TQ, shapes.H, shapes.S}, "[B, TQ, H, S]", op);
  check_shape(num_blocks, "num_blocks", {shapes.B, shapes.TQ, shapes.H}, "[B, TQ, H]", op);
  return shapes;
}

// The launch description shared by every forward kernel (splitting off).
SelectionFwdParams forward_params(const ForwardShapes& shapes, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& v,
                                  const int32_t* blocks, const int32_t* num_blocks,
                                  const at::Tensor& pos, const at::Tensor& k_offset, at::Tensor& o,
                                  at::Tensor& lse, int64_t block_size, double scale) {
  [[maybe_unused]] const auto [B, TQ, HQ, Dk, TK, H, Dv, S] = shapes;
  SelectionFwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.blocks = blocks;
  p.num_blocks = num_blocks;
  p.pos = pos.data_ptr<int64_t>();
  p.k_offset = k_offset.data_ptr<int64_t>();
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.batch = B;
  p.seqlen_q = TQ;
  p.seqlen_k = TK;
  p.heads_q = HQ;
  p.heads_kv = H;
  p.group = HQ / H;
  p.num_selected = S;
  p.head_dim_qk = int(Dk);
  p.head_dim_v = int(Dv);
  p.block_size = int(block_size);
  p.scale = float(scale);
  p.scale_log2 = float(scale * 1.4426950408889634);
  p.num_splits = 1;
  return p;
}

int64_t round_up_64(int64_t n) { return (n + 63) / 64 * 64; }

// The split-KV partials, fp32, in one buffer: [B*TQ*HQ, num_splits, Dv] accumulators, then the
// running max and the sum [B*TQ*HQ, num_splits] each, every section starting 256-byte aligned
// (as separate allocations would). 0 without splitting.
int64_t partial_floats(int64_t query_rows, int64_t num_splits, int64_t Dv) {
  if (num_splits <= 1) return 0;
  return round_up_64(query_rows * num_splits * Dv) + 2 * round_up_64(query_rows * num_splits);
}

// The caller's selection rows, for the tensor-core kernel to canonicalise itself
// (SelectionFwdParams::raw_indices); checked by check_canonical_inputs.
struct RawRows {
  const at::Tensor& indices;
  const std::optional<at::Tensor>& counts;
  int64_t count_limit;
};

// The forward on checked inputs: canonical rows `blocks` / `num_blocks`, or (fp16/bf16 only)
// `raw` rows and null blocks. `partials`: partial_floats(...) fp32 values of workspace, or
// nullptr to allocate them here.
std::tuple<at::Tensor, at::Tensor> run_forward(const ForwardShapes& shapes, const at::Tensor& q,
                                               const at::Tensor& k, const at::Tensor& v,
                                               const int32_t* blocks, const int32_t* num_blocks,
                                               const at::Tensor& pos, const at::Tensor& k_offset,
                                               int64_t block_size, double scale,
                                               int64_t num_splits, float* partials,
                                               const RawRows* raw = nullptr,
                                               const int64_t* gate_totals = nullptr,
                                               int gate_tile_max_union_pct = 0) {
  [[maybe_unused]] const auto [B, TQ, HQ, Dk, TK, H, Dv, S] = shapes;
  const auto dtype = q.scalar_type();
  TORCH_CHECK(num_splits >= 1, "nsa_ext_cuda::selection_fwd: num_splits must be >= 1, got ",
              std::to_string(num_splits));
  // The grid's z axis holds num_splits x the row tiles of a group (one up to G = 32, else one
  // per 64 or 32 query heads: csrc/selection_fwd.cuh's launch_selection_fwd_mma); bound by 32.
  const int64_t row_tiles = HQ / H <= 32 ? 1 : (HQ / H + 31) / 32;
  TORCH_CHECK(num_splits < 65536 && num_splits * row_tiles < 65536,
              "nsa_ext_cuda::selection_fwd: num_splits too large: ", std::to_string(num_splits),
              " slices x ", std::to_string(row_tiles), " row tiles must stay below 65536");

  const c10::cuda::CUDAGuard guard(q.device());
  auto o = at::empty({B, TQ, HQ, Dv}, q.options());
  auto lse = at::empty({B, TQ, HQ}, q.options().dtype(at::kFloat));
  if (B * TQ == 0 || HQ == 0) return {o, lse};

  SelectionFwdParams p = forward_params(shapes, q, k, v, blocks, num_blocks, pos, k_offset, o, lse,
                                        block_size, scale);
  p.num_splits = int(num_splits);
  p.entries_per_split = int(S > 0 ? (S + num_splits - 1) / num_splits : 0);
  p.gate_totals = gate_totals;
  p.gate_tile_max_union_pct = gate_tile_max_union_pct;
  if (raw != nullptr) {
    TORCH_CHECK(dtype != at::kFloat, "nsa_ext_cuda: the float32 kernel takes canonical rows only");
    p.raw_indices = raw->indices.data_ptr();
    p.raw_indices_int64 = raw->indices.scalar_type() == at::kLong;
    p.raw_counts = raw->counts ? raw->counts->data_ptr() : nullptr;
    p.raw_counts_int64 = raw->counts && raw->counts->scalar_type() == at::kLong;
    p.count_limit = raw->count_limit;
  }
  // Split-KV partials: every slot is written by the forward kernel (empty slices too), so
  // uninitialised memory suffices.
  at::Tensor owned_partials;
  if (num_splits > 1) {
    const int64_t query_rows = B * TQ * HQ;
    if (partials == nullptr) {
      owned_partials = at::empty({partial_floats(query_rows, num_splits, Dv)},
                                 q.options().dtype(at::kFloat));
      partials = owned_partials.data_ptr<float>();
    }
    p.part_acc = partials;
    p.part_m = p.part_acc + round_up_64(query_rows * num_splits * Dv);
    p.part_l = p.part_m + round_up_64(query_rows * num_splits);
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  cudaError_t err = cudaSuccess;
  ScalarKind kind = ScalarKind::kFloat32;
  bool merged = false;   // the forward merged the slices itself (SM 9.0 clusters)
  switch (dtype) {
    case at::kHalf: kind = ScalarKind::kFloat16; err = launch_mma<ScalarKind::kFloat16>(p, stream, &merged); break;
    case at::kBFloat16: kind = ScalarKind::kBFloat16; err = launch_mma<ScalarKind::kBFloat16>(p, stream, &merged); break;
    default: err = launch_selection_fwd_fp32(p, stream); break;
  }
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_splits > 1 && !merged) {
    C10_CUDA_CHECK(launch_selection_merge(p, kind, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor> selection_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const at::Tensor& blocks,
                                                      const at::Tensor& num_blocks,
                                                      const at::Tensor& pos,
                                                      const at::Tensor& k_offset,
                                                      int64_t block_size, double scale,
                                                      int64_t num_splits) {
  const ForwardShapes shapes = check_forward_inputs(kFwd, q, k, v, blocks, num_blocks, pos,
                                                    k_offset, block_size);
  return run_forward(shapes, q, k, v, blocks.data_ptr<int32_t>(), num_blocks.data_ptr<int32_t>(),
                     pos, k_offset, block_size, scale, num_splits, nullptr);
}

// The checks the tile kernel adds to check_attention_inputs' (selection_fwd_tile,
// selection_fwd_auto): an SM 9.0 device and build, fp16 / bf16, QT = 64 / G, 64-key chunks.
void check_tile_call(const char* op, const ForwardShapes& shapes, const at::Tensor& q,
                     int64_t tokens_per_tile, int64_t block_size, int64_t max_ctas) {
  [[maybe_unused]] const auto [B, TQ, HQ, Dk, TK, H, Dv, S] = shapes;
#ifndef NSA_EXT_HOPPER
  TORCH_CHECK(false, op, "this build has no Hopper kernel (built for ", NSA_EXT_ARCHS,
              "; it needs 9.0 in NSA_EXT_CUDA_ARCHS)");
#endif
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, op,
              "q must be float16 or bfloat16, got ", c10::toString(dtype));
  const cudaDeviceProp* props = nullptr;
  {
    int device = q.device().index();
    static thread_local cudaDeviceProp cached[16];
    static thread_local bool have[16] = {};
    TORCH_CHECK(device >= 0 && device < 16, op, "device index ", std::to_string(device), " out of range");
    if (!have[device]) {
      C10_CUDA_CHECK(cudaGetDeviceProperties(&cached[device], device));
      have[device] = true;
    }
    props = &cached[device];
  }
  TORCH_CHECK(props->major == 9 && props->minor == 0, op, "the Hopper kernel runs on SM 9.0, this is SM ",
              std::to_string(props->major), ".", std::to_string(props->minor));
  const int64_t G = HQ / H;
  TORCH_CHECK(G <= kTileRows && tokens_per_tile == kTileRows / G, op,
              "tokens_per_tile must be 64 / G (G <= 64): G=", std::to_string(G),
              ", tokens_per_tile=", std::to_string(tokens_per_tile));
  TORCH_CHECK(block_size % 64 == 0, op, "block_size must be a multiple of 64, got ",
              std::to_string(block_size));
  TORCH_CHECK(B * TK < (int64_t(1) << 31), op, "B*TK=", std::to_string(B * TK),
              " past the copy engine's 32-bit coordinates");
  const int64_t NT = (TQ + tokens_per_tile - 1) / tokens_per_tile;
  TORCH_CHECK(B * NT * H < (int64_t(1) << 31), op, "grid too large: B*NT*H=", std::to_string(B * NT * H));
  TORCH_CHECK(max_ctas >= 0, op, "max_ctas must be >= 0 (0: as many CTAs as fit), got ",
              std::to_string(max_ctas));
}

// The tile kernel on checked inputs, writing `o` / `lse`; `gate_totals`: selection_fwd_auto's
// device choice (SelectionFwdParams::gate_totals), null to run unconditionally.
void launch_tile(const ForwardShapes& shapes, const at::Tensor& q, const at::Tensor& k,
                 const at::Tensor& v, const int32_t* blocks, const int32_t* num_blocks,
                 const at::Tensor& pos, const at::Tensor& k_offset, const int64_t* union_starts,
                 const int32_t* union_counts, int64_t union_width, int64_t tokens_per_tile,
                 int64_t block_size, double scale, int64_t max_ctas, at::Tensor& o,
                 at::Tensor& lse, const int64_t* gate_totals = nullptr,
                 int gate_tile_max_union_pct = 0) {
  [[maybe_unused]] const auto [B, TQ, HQ, Dk, TK, H, Dv, S] = shapes;
  if (B * TQ == 0 || HQ == 0) return;
  TileParams tp{};
  tp.fwd = forward_params(shapes, q, k, v, blocks, num_blocks, pos, k_offset, o, lse, block_size,
                          scale);
  tp.fwd.gate_totals = gate_totals;
  tp.fwd.gate_tile_max_union_pct = gate_tile_max_union_pct;
  tp.union_starts = union_starts;
  tp.union_counts = union_counts;
  tp.num_tiles = (TQ + tokens_per_tile - 1) / tokens_per_tile;
  tp.union_width = union_width;
  tp.tokens_per_tile = int(tokens_per_tile);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
#ifdef NSA_EXT_HOPPER
  C10_CUDA_CHECK(launch_selection_tile_sm90(
      tp, q.scalar_type() == at::kHalf ? ScalarKind::kFloat16 : ScalarKind::kBFloat16, max_ctas,
      stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  (void)stream;
#endif
}

// nsa_ext_cuda::selection_fwd_tile: the query-tile schedule (csrc/hopper/) over the unions of
// nsa_ext.schedules.tiles.tile_unions; SM 9.0 only, one launch, no workspace, no host sync.
std::tuple<at::Tensor, at::Tensor> selection_fwd_tile_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& blocks,
    const at::Tensor& num_blocks, const at::Tensor& pos, const at::Tensor& k_offset,
    const at::Tensor& union_starts, const at::Tensor& union_counts, int64_t tokens_per_tile,
    int64_t block_size, double scale, int64_t max_ctas) {
  const char* op = "nsa_ext_cuda::selection_fwd_tile: ";
  const ForwardShapes shapes = check_forward_inputs(op, q, k, v, blocks, num_blocks, pos,
                                                    k_offset, block_size);
  [[maybe_unused]] const auto [B, TQ, HQ, Dk, TK, H, Dv, S] = shapes;
  check_tile_call(op, shapes, q, tokens_per_tile, block_size, max_ctas);
  const int64_t NT = (TQ + tokens_per_tile - 1) / tokens_per_tile;
  for (auto [t, name] : {std::pair{&union_starts, "union_starts"}, {&union_counts, "union_counts"}})
    check_cuda_contiguous(*t, name, q, op);
  TORCH_CHECK(union_starts.scalar_type() == at::kLong, op, "union_starts must be int64");
  TORCH_CHECK(union_counts.scalar_type() == at::kInt, op, "union_counts must be int32");
  TORCH_CHECK(union_starts.dim() == 4, op, "union_starts must be 4-d [B, NT, H, U], got ",
              shape_of(union_starts));
  check_shape(union_starts, "union_starts", {B, NT, H, union_starts.size(3)}, "[B, NT, H, U]", op);
  check_shape(union_counts, "union_counts", {B, NT, H}, "[B, NT, H]", op);

  const c10::cuda::CUDAGuard guard(q.device());
  auto o = at::empty({B, TQ, HQ, Dv}, q.options());
  auto lse = at::empty({B, TQ, HQ}, q.options().dtype(at::kFloat));
  if (B * TQ == 0 || HQ == 0) return {o, lse};
  if (TK == 0) {   // nothing to attend to (and no tensor map of an empty tensor)
    o.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {o, lse};
  }
  launch_tile(shapes, q, k, v, blocks.data_ptr<int32_t>(), num_blocks.data_ptr<int32_t>(), pos,
              k_offset, union_starts.data_ptr<int64_t>(), union_counts.data_ptr<int32_t>(),
              union_starts.size(3), tokens_per_tile, block_size, scale, max_ctas, o, lse);
  return {o, lse};
}

// The union kernel (selection_union.cu) on checked canonical rows [B, TQ, H, S]: `starts`
// [B, NT, H, QT * S], `counts` [B, NT, H], `totals` (or null) += (selections, union blocks).
void launch_union(const int32_t* blocks, const int64_t* k_offset, int64_t B, int64_t TQ,
                  int64_t H, int64_t S, int64_t block_size, int64_t tokens_per_tile,
                  int64_t* starts, int32_t* counts, int64_t* totals, cudaStream_t stream) {
  TileUnionParams p{};
  p.blocks = blocks;
  p.k_offset = k_offset;
  p.starts = starts;
  p.counts = counts;
  p.totals = totals;
  p.seqlen_q = TQ;
  p.heads_kv = H;
  p.num_tiles = (TQ + tokens_per_tile - 1) / tokens_per_tile;
  p.n_tiles = B * p.num_tiles * H;
  p.block_size = block_size;
  p.num_selected = int(S);
  p.tokens_per_tile = int(tokens_per_tile);
  C10_CUDA_CHECK(launch_tile_union(p, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// nsa_ext_cuda::tile_union: the tile schedule's unions in one launch (selection_union.cu), the
// same as triton_ref/tile_union.py; `totals` (int64 [2], zeroed by the caller) gets the call's
// (selections, union blocks) added.
std::tuple<at::Tensor, at::Tensor> tile_union_cuda(const at::Tensor& blocks,
                                                   const at::Tensor& k_offset, int64_t block_size,
                                                   int64_t tokens_per_tile,
                                                   const std::optional<at::Tensor>& totals) {
  const char* op = "nsa_ext_cuda::tile_union: ";
  TORCH_CHECK(blocks.is_cuda() && blocks.dim() == 4 && blocks.scalar_type() == at::kInt, op,
              "blocks must be a 4-d [B, TQ, H, S] int32 CUDA tensor, got ", shape_of(blocks), " ",
              c10::toString(blocks.scalar_type()), " on ", blocks.device().str());
  check_cuda_contiguous(blocks, "blocks", blocks, op);
  const int64_t B = blocks.size(0), TQ = blocks.size(1), H = blocks.size(2), S = blocks.size(3);
  check_cuda_contiguous(k_offset, "k_offset", blocks, op);
  TORCH_CHECK(k_offset.scalar_type() == at::kLong, op, "k_offset must be int64");
  check_shape(k_offset, "k_offset", {B, TQ}, "[B, TQ]", op);
  TORCH_CHECK(block_size >= 1, op, "block_size must be positive, got ", std::to_string(block_size));
  TORCH_CHECK(tokens_per_tile >= 1 && S >= 1 && tokens_per_tile * S <= kTileUnionMaxWidth, op,
              "tokens_per_tile * S must be in 1..", std::to_string(kTileUnionMaxWidth), ", got ",
              std::to_string(tokens_per_tile), " * ", std::to_string(S));
  if (totals) {
    check_cuda_contiguous(*totals, "totals", blocks, op);
    TORCH_CHECK(totals->scalar_type() == at::kLong && totals->numel() == 2, op,
                "totals must be an int64 tensor of 2 elements, got ", shape_of(*totals), " ",
                c10::toString(totals->scalar_type()));
  }
  const int64_t NT = (TQ + tokens_per_tile - 1) / tokens_per_tile;
  const c10::cuda::CUDAGuard guard(blocks.device());
  auto starts = at::empty({B, NT, H, tokens_per_tile * S}, blocks.options().dtype(at::kLong));
  auto counts = at::empty({B, NT, H}, blocks.options().dtype(at::kInt));
  launch_union(blocks.data_ptr<int32_t>(), k_offset.data_ptr<int64_t>(), B, TQ, H, S, block_size,
               tokens_per_tile, starts.data_ptr<int64_t>(), counts.data_ptr<int32_t>(),
               totals ? totals->data_ptr<int64_t>() : nullptr,
               c10::cuda::getCurrentCUDAStream(blocks.device().index()).stream());
  return {starts, counts};
}

struct CanonicalShapes {
  int64_t B, TQ, H, S;
};

// The checks of the canonical-rows launch (torch.ops callers skip the Python validation).
CanonicalShapes check_canonical_inputs(const char* op, const at::Tensor& indices,
                                       const at::Tensor& pos,
                                       const std::optional<at::Tensor>& counts,
                                       int64_t block_size) {
  TORCH_CHECK(indices.is_cuda() && indices.dim() == 4, op,
              "block_indices must be a 4-d [B, TQ, H, S] CUDA tensor, got ", shape_of(indices),
              " on ", indices.device().str());
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op,
              "block_indices must be int32 or int64, got ", c10::toString(indices.scalar_type()));
  const int64_t B = indices.size(0), TQ = indices.size(1), H = indices.size(2), S = indices.size(3);
  TORCH_CHECK(S <= kCanonicalMaxSelected, op, "at most ", std::to_string(kCanonicalMaxSelected),
              " entries per row, got S=", std::to_string(S));
  TORCH_CHECK(block_size >= 1, op, "block_size must be positive, got ", std::to_string(block_size));
  check_cuda_contiguous(indices, "block_indices", indices, op);
  check_cuda_contiguous(pos, "pos", indices, op);
  TORCH_CHECK(pos.scalar_type() == at::kLong, op, "pos must be int64");
  check_shape(pos, "pos", {B, TQ}, "[B, TQ]", op);
  if (counts) {
    check_cuda_contiguous(*counts, "block_counts", indices, op);
    TORCH_CHECK(counts->scalar_type() == at::kInt || counts->scalar_type() == at::kLong, op,
                "block_counts must be int32 or int64");
    check_shape(*counts, "block_counts", {B, TQ, H}, "[B, TQ, H]", op);
  }
  return {B, TQ, H, S};
}

// Canonical rows into `blocks` [B, TQ, H, S] and `num_blocks` [B, TQ, H] (int32, contiguous,
// on the current device).
void fill_canonical(const CanonicalShapes& shapes, const at::Tensor& indices,
                    const at::Tensor& pos, const std::optional<at::Tensor>& counts,
                    int64_t count_limit, int64_t block_size, at::Tensor& blocks,
                    at::Tensor& num_blocks) {
  const auto [B, TQ, H, S] = shapes;
  if (B * TQ * H == 0) return;
  if (S == 0) {
    num_blocks.zero_();
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(indices.device().index()).stream();
  C10_CUDA_CHECK(launch_canonical_blocks(
      indices.data_ptr(), indices.scalar_type() == at::kLong, pos.data_ptr<int64_t>(),
      counts ? counts->data_ptr() : nullptr, counts && counts->scalar_type() == at::kLong,
      count_limit, B * TQ * H, H, int(S), block_size, blocks.data_ptr<int32_t>(),
      num_blocks.data_ptr<int32_t>(), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// nsa_ext_cuda::canonical_blocks: the backend's canonical rows in one launch (S <= 32).
std::tuple<at::Tensor, at::Tensor> canonical_blocks_cuda(const at::Tensor& indices,
                                                         const at::Tensor& pos,
                                                         const std::optional<at::Tensor>& counts,
                                                         int64_t count_limit, int64_t block_size) {
  const CanonicalShapes shapes =
      check_canonical_inputs("nsa_ext_cuda::canonical_blocks: ", indices, pos, counts, block_size);
  const auto [B, TQ, H, S] = shapes;
  const c10::cuda::CUDAGuard guard(indices.device());
  auto blocks = at::empty({B, TQ, H, S}, indices.options().dtype(at::kInt));
  auto num_blocks = at::empty({B, TQ, H}, indices.options().dtype(at::kInt));
  fill_canonical(shapes, indices, pos, counts, count_limit, block_size, blocks, num_blocks);
  return {blocks, num_blocks};
}

constexpr int64_t kInKernelCanonicalMaxRows = 8192;

// nsa_ext_cuda::selection_fwd_rows: canonical rows + the row-schedule forward (+ the split-KV
// merge) in one call from Python: the eager fast path of the CUDA backend (one operator
// dispatch instead of two; the same checks and the same results as the two operators). An
// eager decode call is bound by host time, where each launch and allocation counts: with
// fp16/bf16 and few rows the forward kernel canonicalises each row itself (no canonical-rows
// launch, no workspace for the rows), and the split-KV partials are the only workspace; fp32
// and large calls keep the canonical-rows kernel, its rows in the workspace beside the partials.
std::tuple<at::Tensor, at::Tensor> selection_fwd_rows_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& indices,
    const std::optional<at::Tensor>& counts, int64_t count_limit, const at::Tensor& pos,
    const at::Tensor& k_offset, int64_t block_size, double scale, int64_t num_splits) {
  const char* op = "nsa_ext_cuda::selection_fwd_rows: ";
  const CanonicalShapes canon = check_canonical_inputs(op, indices, pos, counts, block_size);
  const auto [B, TQ, H, S] = canon;
  TORCH_CHECK(q.dim() == 4 && v.dim() == 4, op, "q and v must be 4-d, got ", shape_of(q),
              " and ", shape_of(v));
  TORCH_CHECK(num_splits >= 1, op, "num_splits must be >= 1, got ", std::to_string(num_splits));
  // Rows canonicalised by the forward kernel (fp16/bf16) in calls of up to
  // kInKernelCanonicalMaxRows rows. Measured on the H200 (notes/eager.md): decode -4.6 us of
  // host time, chunk TQ=512 (2048 rows) unchanged, prefills of 32768+ rows 0.3-0.8 % slower
  // (every thread block waits for its warp's sort; one kernel over all rows costs less there).
  const bool in_kernel = q.scalar_type() != at::kFloat && B * TQ * H <= kInKernelCanonicalMaxRows;
  const ForwardShapes shapes =
      check_attention_inputs(op, q, k, v, pos, k_offset, block_size, S);
  check_shape(indices, "block_indices", {shapes.B, shapes.TQ, shapes.H, S}, "[B, TQ, H, S]", op);
  const int64_t blocks_words = in_kernel ? 0 : round_up_64(B * TQ * H * S);
  const int64_t counts_words = in_kernel ? 0 : round_up_64(B * TQ * H);
  const int64_t partials = partial_floats(q.size(0) * q.size(1) * q.size(2), num_splits, v.size(3));
  const c10::cuda::CUDAGuard guard(indices.device());
  // int32 words; the partials reinterpret theirs as fp32 (both 4 bytes).
  at::Tensor workspace;
  if (blocks_words + counts_words + partials > 0)
    workspace = at::empty({blocks_words + counts_words + partials}, indices.options().dtype(at::kInt));
  float* partial_base =
      partials ? reinterpret_cast<float*>(workspace.data_ptr<int32_t>() + blocks_words + counts_words)
               : nullptr;
  if (in_kernel) {
    const RawRows raw{indices, counts, count_limit};
    return run_forward(shapes, q, k, v, nullptr, nullptr, pos, k_offset, block_size, scale,
                       num_splits, partial_base, &raw);
  }
  auto blocks = workspace.narrow(0, 0, B * TQ * H * S).view({B, TQ, H, S});
  auto num_blocks = workspace.narrow(0, blocks_words, B * TQ * H).view({B, TQ, H});
  fill_canonical(canon, indices, pos, counts, count_limit, block_size, blocks, num_blocks);
  return run_forward(shapes, q, k, v, blocks.data_ptr<int32_t>(), num_blocks.data_ptr<int32_t>(),
                     pos, k_offset, block_size, scale, num_splits, partial_base);
}

// nsa_ext_cuda::selection_fwd_auto: the row and the tile schedule with the choice between them
// taken on the device, in one call from Python (the CUDA backend's path for unsplit calls whose
// choice is row or tile: nsa_ext/backends/cuda.py, device_choice; eager or captured). Canonical
// rows and the tile unions with the call's (selections, union blocks) -- one kernel where a
// tile's rows fit a warp (canonical_union_fits: G >= 4 at S <= 16), else two -- then both forward
// kernels on the same outputs:
// each reads the counts and returns at once unless it is the choice -- tile where
// union * 100 <= tile_max_union_pct * selections (the measured crossover the host chooser
// applies to the same counts), else row. No host synchronisation; the unchosen kernel costs its
// empty launch (a few us at the row grid of a 2048-row chunk, notes/eager.md). fp16 / bf16 on
// SM 9.0 with the tile kernel's shapes; S <= 32.
std::tuple<at::Tensor, at::Tensor> selection_fwd_auto_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& indices,
    const std::optional<at::Tensor>& counts, int64_t count_limit, const at::Tensor& pos,
    const at::Tensor& k_offset, int64_t block_size, double scale, int64_t tile_max_union_pct,
    int64_t max_ctas) {
  const char* op = "nsa_ext_cuda::selection_fwd_auto: ";
  const CanonicalShapes canon = check_canonical_inputs(op, indices, pos, counts, block_size);
  const auto [B, TQ, H, S] = canon;
  TORCH_CHECK(q.dim() == 4 && v.dim() == 4, op, "q and v must be 4-d, got ", shape_of(q),
              " and ", shape_of(v));
  const ForwardShapes shapes = check_attention_inputs(op, q, k, v, pos, k_offset, block_size, S);
  check_shape(indices, "block_indices", {shapes.B, shapes.TQ, shapes.H, S}, "[B, TQ, H, S]", op);
  const int64_t G = shapes.HQ / H;
  TORCH_CHECK(G <= kTileRows, op, "the tile kernel takes at most ", std::to_string(kTileRows),
              " query heads per KV head, got G=", std::to_string(G));
  const int64_t QT = kTileRows / std::max<int64_t>(G, 1);
  check_tile_call(op, shapes, q, QT, block_size, max_ctas);
  TORCH_CHECK(tile_max_union_pct >= 0 && tile_max_union_pct <= 100, op,
              "tile_max_union_pct must be in 0..100, got ", std::to_string(tile_max_union_pct));

  const c10::cuda::CUDAGuard guard(indices.device());
  const int64_t rows = B * TQ * H, NT = (TQ + QT - 1) / QT, tiles = B * NT * H;
  // int64 words: the canonical rows and their counts (int32, two a word), the union counts
  // (int32), the totals, the union starts.
  const int64_t blocks_words = round_up_64((rows * S + 1) / 2);
  const int64_t num_words = round_up_64((rows + 1) / 2);
  const int64_t counts_words = round_up_64((tiles + 1) / 2);
  const int64_t totals_words = 64;
  const bool with_tile = rows > 0 && S > 0 && shapes.TK > 0 && QT * S <= kTileUnionMaxWidth;
  const int64_t starts_words = with_tile ? tiles * QT * S : 0;
  auto workspace = at::empty({blocks_words + num_words + counts_words + totals_words + starts_words},
                             indices.options().dtype(at::kLong));
  int64_t* base = workspace.data_ptr<int64_t>();
  int32_t* blocks = reinterpret_cast<int32_t*>(base);
  int32_t* num_blocks = reinterpret_cast<int32_t*>(base + blocks_words);
  int32_t* union_counts = reinterpret_cast<int32_t*>(base + blocks_words + num_words);
  int64_t* totals = base + blocks_words + num_words + counts_words;
  int64_t* starts = totals + totals_words;
  auto blocks_view = workspace.narrow(0, 0, blocks_words).view(at::kInt).narrow(0, 0, rows * S)
                         .view({B, TQ, H, S});
  auto num_view = workspace.narrow(0, blocks_words, num_words).view(at::kInt).narrow(0, 0, rows)
                      .view({B, TQ, H});
  if (!with_tile) {  // nothing to choose: no selection, no keys (the row kernel writes the zeros)
    fill_canonical(canon, indices, pos, counts, count_limit, block_size, blocks_view, num_view);
    return run_forward(shapes, q, k, v, blocks, num_blocks, pos, k_offset, block_size, scale, 1,
                       nullptr);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  C10_CUDA_CHECK(cudaMemsetAsync(totals, 0, 2 * sizeof(int64_t), stream));
  if (canonical_union_fits(S, QT)) {   // one kernel for the rows and the unions
    CanonicalUnionParams cu{};
    cu.indices = indices.data_ptr();
    cu.indices_int64 = indices.scalar_type() == at::kLong;
    cu.pos = pos.data_ptr<int64_t>();
    cu.counts = counts ? counts->data_ptr() : nullptr;
    cu.counts_int64 = counts && counts->scalar_type() == at::kLong;
    cu.count_limit = count_limit;
    cu.k_offset = k_offset.data_ptr<int64_t>();
    cu.blocks = blocks;
    cu.num_blocks = num_blocks;
    cu.starts = starts;
    cu.union_counts = union_counts;
    cu.totals = totals;
    cu.seqlen_q = TQ;
    cu.heads_kv = H;
    cu.num_tiles = NT;
    cu.n_tiles = tiles;
    cu.block_size = block_size;
    cu.num_selected = int(S);
    cu.tokens_per_tile = int(QT);
    C10_CUDA_CHECK(launch_canonical_union(cu, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    fill_canonical(canon, indices, pos, counts, count_limit, block_size, blocks_view, num_view);
    launch_union(blocks, k_offset.data_ptr<int64_t>(), B, TQ, H, S, block_size, QT, starts,
                 union_counts, totals, stream);
  }
  auto [o, lse] = run_forward(shapes, q, k, v, blocks, num_blocks, pos, k_offset, block_size,
                              scale, 1, nullptr, nullptr, totals, int(tile_max_union_pct));
  launch_tile(shapes, q, k, v, blocks, num_blocks, pos, k_offset, starts, union_counts, QT * S,
              QT, block_size, scale, max_ctas, o, lse, totals, int(tile_max_union_pct));
  return {o, lse};
}

}  // namespace nsa_ext

namespace {

std::string quoted(const std::string& s) { return "\"" + s + "\""; }

// The build's facts as JSON: archs, torch and CUDA versions, kernel instances.
std::string build_info_json() {
  std::string archs;
  {
    const std::string text = NSA_EXT_ARCHS;
    size_t start = 0;
    while (start <= text.size()) {
      const size_t end = text.find(',', start);
      const std::string item = text.substr(start, end == std::string::npos ? end : end - start);
      if (!item.empty()) archs += (archs.empty() ? "" : ", ") + quoted(item);
      if (end == std::string::npos) break;
      start = end + 1;
    }
  }
  std::string dims;
#define NSA_EXT_PAIR(DK, DV) \
  dims += (dims.empty() ? "" : ", ") + std::string("[") + std::to_string(DK) + ", " + std::to_string(DV) + "]";
  NSA_EXT_FOR_EACH_HEAD_DIM(NSA_EXT_PAIR)
#undef NSA_EXT_PAIR
  const std::string cuda = std::to_string(CUDART_VERSION / 1000) + "." +
                           std::to_string((CUDART_VERSION % 1000) / 10);
  return "{\"archs\": [" + archs + "], \"torch_version\": " + quoted(NSA_EXT_TORCH_VERSION) +
         ", \"cuda_version\": " + quoted(cuda) + ", \"head_dims\": [" + dims +
         "], \"fp32_max_head_dim\": " + std::to_string(nsa_ext::kFp32MaxHeadDim) +
         ", \"min_block_size\": " + std::to_string(nsa_ext::kMinBlockSize) +
         ", \"dtypes\": [\"float16\", \"bfloat16\", \"float32\"]" +
#ifdef NSA_EXT_HOPPER
         ", \"hopper_tile\": true" +
#else
         ", \"hopper_tile\": false" +
#endif
         ", \"tile_union\": true" + ", \"fwd_auto\": true" + ", \"op\": \"nsa_ext_cuda::selection_fwd\"}";
}

}  // namespace

TORCH_LIBRARY(nsa_ext_cuda, m) {
  m.def(
      "selection_fwd(Tensor q, Tensor k, Tensor v, Tensor blocks, Tensor num_blocks, Tensor pos, "
      "Tensor k_offset, int block_size, float scale, int num_splits=1) -> (Tensor o, Tensor lse)");
  m.def(
      "selection_fwd_rows(Tensor q, Tensor k, Tensor v, Tensor block_indices, Tensor? block_counts, "
      "int count_limit, Tensor pos, Tensor k_offset, int block_size, float scale, "
      "int num_splits=1) -> (Tensor o, Tensor lse)");
  m.def(
      "selection_fwd_tile(Tensor q, Tensor k, Tensor v, Tensor blocks, Tensor num_blocks, "
      "Tensor pos, Tensor k_offset, Tensor union_starts, Tensor union_counts, int tokens_per_tile, "
      "int block_size, float scale, int max_ctas=0) -> (Tensor o, Tensor lse)");
  // Build facts through the dispatcher too, for a build without the pybind11 module.
  m.def("build_info() -> str", []() { return build_info_json(); });
  m.def(
      "canonical_blocks(Tensor block_indices, Tensor pos, Tensor? block_counts, int count_limit, "
      "int block_size) -> (Tensor blocks, Tensor num_blocks)");
  m.def(
      "tile_union(Tensor blocks, Tensor k_offset, int block_size, int tokens_per_tile, "
      "Tensor(a!)? totals) -> (Tensor starts, Tensor counts)");
  m.def(
      "selection_fwd_auto(Tensor q, Tensor k, Tensor v, Tensor block_indices, Tensor? block_counts, "
      "int count_limit, Tensor pos, Tensor k_offset, int block_size, float scale, "
      "int tile_max_union_pct, int max_ctas=0) -> (Tensor o, Tensor lse)");
}

TORCH_LIBRARY_IMPL(nsa_ext_cuda, CUDA, m) {
  m.impl("selection_fwd", &nsa_ext::selection_fwd_cuda);
  m.impl("selection_fwd_tile", &nsa_ext::selection_fwd_tile_cuda);
  m.impl("selection_fwd_rows", &nsa_ext::selection_fwd_rows_cuda);
  m.impl("canonical_blocks", &nsa_ext::canonical_blocks_cuda);
  m.impl("tile_union", &nsa_ext::tile_union_cuda);
  m.impl("selection_fwd_auto", &nsa_ext::selection_fwd_auto_cuda);
}

#ifndef NSA_EXT_NO_PYTHON
PYBIND11_MODULE(_C, m) {
  m.doc() = "nsa_ext's CUDA kernels; the operator is torch.ops.nsa_ext_cuda.selection_fwd";
  m.def("build_info_json", []() { return build_info_json(); },
        "The build's facts (archs, torch and CUDA versions, kernel instances) as JSON");
  // The eager plans' entry (nsa_ext/eager_plan.py): the same function as the operator
  // selection_fwd_rows, called without the dispatcher. Only plain eager calls take it (no
  // autograd, tracing, modes or fake tensors to serve), and an eager decode call is bound by
  // host time, so the boxed dispatch of 11 arguments is worth skipping there.
#ifndef NSA_EXT_NO_DIRECT_ENTRY
  m.def("selection_fwd_rows", &nsa_ext::selection_fwd_rows_cuda, pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("block_indices"),
        pybind11::arg("block_counts"), pybind11::arg("count_limit"), pybind11::arg("pos"),
        pybind11::arg("k_offset"), pybind11::arg("block_size"), pybind11::arg("scale"),
        pybind11::arg("num_splits"),
        "nsa_ext_cuda::selection_fwd_rows without the dispatcher (plain eager calls only)");
  m.def("selection_fwd_auto", &nsa_ext::selection_fwd_auto_cuda, pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("block_indices"),
        pybind11::arg("block_counts"), pybind11::arg("count_limit"), pybind11::arg("pos"),
        pybind11::arg("k_offset"), pybind11::arg("block_size"), pybind11::arg("scale"),
        pybind11::arg("tile_max_union_pct"), pybind11::arg("max_ctas"),
        "nsa_ext_cuda::selection_fwd_auto without the dispatcher (plain eager calls only)");
#endif
}
#endif
