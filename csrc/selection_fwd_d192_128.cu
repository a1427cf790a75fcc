// Tensor-core instances for Dk = 192, Dv = 128 (fp16, bf16): one file per head-dim pair so that
// ninja compiles the pairs in parallel.
#include "selection_fwd.cuh"

namespace nsa_ext {
template cudaError_t launch_selection_fwd_mma<ScalarKind::kFloat16, 192, 128>(const SelectionFwdParams&, cudaStream_t, bool*);
template cudaError_t launch_selection_fwd_mma<ScalarKind::kBFloat16, 192, 128>(const SelectionFwdParams&, cudaStream_t, bool*);
}  // namespace nsa_ext
