// Tensor-core instances for Dk = 256, Dv = 256 (fp16, bf16): one file per head-dim pair so that
// ninja compiles the pairs in parallel.
#include "selection_fwd.cuh"

namespace nsa_ext {
template cudaError_t launch_selection_fwd_mma<ScalarKind::kFloat16, 256, 256>(const SelectionFwdParams&, cudaStream_t, bool*);
template cudaError_t launch_selection_fwd_mma<ScalarKind::kBFloat16, 256, 256>(const SelectionFwdParams&, cudaStream_t, bool*);
}  // namespace nsa_ext
