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
  int variant;        // kernel variant for tuning (nsa_ext_cuda::_set_kernel_variant); 0: default
  int sm_major;       // compute capability of the device (9: bulk copies)
};

template <ScalarKind kKind, int kHeadDimQK, int kHeadDimV>
cudaError_t launch_selection_fwd_mma(const SelectionFwdParams& params, cudaStream_t stream);

cudaError_t launch_selection_fwd_fp32(const SelectionFwdParams& params, cudaStream_t stream);

}  // namespace nsa_ext
