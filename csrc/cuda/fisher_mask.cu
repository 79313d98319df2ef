// dcedit::fisher_mask on CUDA: (delta ⊙ kept, number kept), kept as in topk_select.cuh.
//
// Matches dcedit_kernels/reference/fisher_mask.py bit for bit: the output is delta converted to
// fp32 (fp64 when delta is fp64) where kept, else +0: a select, as the reference's torch.where
// (a multiply by 0/1 would give NaN for a dropped inf or NaN).  The count comes out of the same
// pass as a 0-dim int64 device tensor, so the op never waits for the GPU.  An empty delta is
// refused, as by the CPU kernel and the Python checks (no k-th largest value at n = 0).
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_reduce.cuh>
#include <torch/library.h>

#include "topk_select.cuh"

namespace dcedit::cuda {
namespace {

constexpr int kMaskThreads = 256;

template <typename acc_t>
__global__ void __launch_bounds__(kMaskThreads)
    fisher_masked_delta_kernel(FloatElements delta, FloatElements fisher, KeptRule rule,
                               acc_t* __restrict__ out, int64_t n,
                               unsigned long long* __restrict__ kept_count) {
  using BlockReduce = cub::BlockReduce<unsigned long long, kMaskThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;

  const double t = rule.threshold_value();
  const bool inclusive = rule.inclusive();
  unsigned long long kept_here = 0;
  const int64_t stride = int64_t(gridDim.x) * kMaskThreads;
  for (int64_t i = int64_t(blockIdx.x) * kMaskThreads + threadIdx.x; i < n; i += stride) {
    const bool kept = KeptRule::keeps(inclusive, fisher.load<double>(i), t);
    kept_here += kept ? 1u : 0u;
    out[i] = kept ? delta.load<acc_t>(i) : acc_t(0);
  }
  const unsigned long long block_kept = BlockReduce(reduce_storage).Sum(kept_here);
  if (threadIdx.x == 0 && block_kept != 0) atomicAdd(kept_count, block_kept);
}

std::tuple<at::Tensor, at::Tensor> fisher_mask_cuda(const at::Tensor& delta,
                                                    const at::Tensor& fisher,
                                                    std::optional<double> keep,
                                                    std::optional<double> threshold) {
  // Every check runs before anything is allocated or launched.
  check_float_tensor(delta, "delta");
  check_float_tensor(fisher, "fisher");
  TORCH_CHECK_VALUE(delta.device() == fisher.device(),
                    "all tensors must be on one device: delta on ", delta.device(), ", fisher on ",
                    fisher.device());
  TORCH_CHECK_VALUE(fisher.sizes() == delta.sizes(), "fisher must have shape ", delta.sizes(),
                    " (delta's), got ", fisher.sizes());
  // As the Python checks (`check_fisher_mask`) and so the reference path: k = ceil(keep·n) has no
  // k-th largest value at n = 0.  Without it, the CPU kernel returned an empty result and a 0 count
  // where DCEDIT_DISABLE_C=1 raised ValueError (a threshold too, as the Python check refuses).
  TORCH_CHECK_VALUE(delta.numel() > 0, "delta must not be empty");
  check_keep_or_threshold(keep, threshold);

  // c10::DeviceGuard reaches the CUDA guard through torch's registry; c10/cuda/CUDAGuard.h would
  // add ~50k preprocessed lines (the caching allocator) to every compile of this file.
  const c10::DeviceGuard device_guard(delta.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const bool fp64 = delta.scalar_type() == at::kDouble;
  at::Tensor out = at::empty(delta.sizes(), delta.options().dtype(fp64 ? at::kDouble : at::kFloat));
  at::Tensor kept_count = at::zeros({}, delta.options().dtype(at::kLong));
  const int64_t n = delta.numel();  // > 0: checked above

  const at::Tensor delta_c = delta.contiguous();
  const at::Tensor fisher_c = fisher.contiguous();
  const KeptSelection selection = select_kept(fisher_c, keep, threshold, stream);

  const int blocks = grid_for(n, kMaskThreads, resident_blocks(delta.get_device(), kMaskThreads));
  // int64 and unsigned long long have the same width; the count never exceeds n < 2^63.
  auto* count = reinterpret_cast<unsigned long long*>(kept_count.data_ptr<int64_t>());
  if (fp64) {
    fisher_masked_delta_kernel<double><<<blocks, kMaskThreads, 0, stream>>>(
        float_elements(delta_c), float_elements(fisher_c), selection.rule,
        out.data_ptr<double>(), n, count);
  } else {
    fisher_masked_delta_kernel<float><<<blocks, kMaskThreads, 0, stream>>>(
        float_elements(delta_c), float_elements(fisher_c), selection.rule, out.data_ptr<float>(),
        n, count);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, kept_count};
}

}  // namespace
}  // namespace dcedit::cuda

TORCH_LIBRARY_IMPL(dcedit, CUDA, m) { m.impl("fisher_mask", &dcedit::cuda::fisher_mask_cuda); }
