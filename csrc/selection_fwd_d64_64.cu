// Tensor-core instances for Dk = 64, Dv = 64 (fp16, bf16): one file per head-dim pair so that
// ninja compiles the pairs in parallel.
#include "selection_fwd.cuh"

namespace nsa_ext {
template cudaError_t launch_selection_fwd_mma<ScalarKind::kFloat16, 64, 64>(const SelectionFwdParams&, cudaStream_t, bool*);
template cudaError_t launch_selection_fwd_mma<ScalarKind::kBFloat16, 64, 64>(const SelectionFwdParams&, cudaStream_t, bool*);
}  // namespace nsa_ext
