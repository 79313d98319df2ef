// dcedit::apply_shift_ on CUDA: weight += alpha · (delta ⊙ kept), in place, returning the previous
// weight values so that `weight.copy_(previous)` restores it bit for bit.
//
// Matches dcedit_kernels/reference/apply_shift.py bit for bit.  The arithmetic is fp32 (fp64 for
// an fp64 weight) and the sum is rounded once to the weight dtype.  The reference runs
// `alpha * d` and `weight + ...` as two separate torch ops, i.e. two roundings; the kernel uses
// __fmul_rn/__fadd_rn (and the fp64 forms) so nvcc cannot contract them into one fused
// multiply-add, which would round once and differ in the last bit.  An entry the mask leaves out
// is written back unchanged (a select, as the reference's torch.where).  One pass reads each
// weight element once and writes both the new value and the saved copy.  With fisher=None every
// entry is kept (keep/threshold without fisher raise ValueError, as on the CPU).
#include <optional>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/InferenceMode.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "topk_select.cuh"

namespace dcedit::cuda {
namespace {

constexpr int kShiftThreads = 256;

template <typename weight_t>
using AccOf = std::conditional_t<std::is_same_v<weight_t, double>, double, float>;

__device__ inline float multiply_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double multiply_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ inline double add_rn(double a, double b) { return __dadd_rn(a, b); }

// `weight` is not __restrict__: a caller may pass the same storage as delta or fisher
// (apply_shift_(w, w)), which is safe here because element i is read before it is written and
// by the same thread.  An input that shares only part of weight's memory is read from a copy
// (apply_shift_contiguous): its element i is weight's element j != i, another thread's.
template <typename weight_t>
__global__ void __launch_bounds__(kShiftThreads)
    apply_shift_kernel(weight_t* weight, weight_t* __restrict__ previous,
                       FloatElements delta, FloatElements fisher, bool masked, KeptRule rule,
                       AccOf<weight_t> alpha, int64_t n) {
  using acc_t = AccOf<weight_t>;
  const double t = masked ? rule.threshold_value() : 0.0;
  const bool inclusive = rule.inclusive();
  const int64_t stride = int64_t(gridDim.x) * kShiftThreads;
  for (int64_t i = int64_t(blockIdx.x) * kShiftThreads + threadIdx.x; i < n; i += stride) {
    const weight_t old = weight[i];
    const bool shifted = !masked || KeptRule::keeps(inclusive, fisher.load<double>(i), t);
    previous[i] = old;
    // As the CPU kernel: an entry the mask leaves out keeps its bits (adding alpha·0 would write
    // NaN for an unkept inf or an infinite alpha, and turn a -0 weight into +0).
    weight[i] = shifted ? static_cast<weight_t>(add_rn(static_cast<acc_t>(old),
                                                       multiply_rn(alpha, delta.load<acc_t>(i))))
                        : old;
  }
}

// Runs the kernel on a contiguous weight; returns the previous values.
at::Tensor apply_shift_contiguous(at::Tensor& weight, const at::Tensor& delta, double alpha,
                                  const std::optional<at::Tensor>& fisher,
                                  const std::optional<double>& keep,
                                  const std::optional<double>& threshold, cudaStream_t stream) {
  at::Tensor previous = at::empty(weight.sizes(), weight.options());
  const int64_t n = weight.numel();
  if (n == 0) return previous;

  // As the CPU kernel: delta or fisher overlapping only part of weight is read from a copy.
  const auto read_copy = [&](const at::Tensor& t) {
    const at::Tensor c = t.contiguous();
    const at::MemOverlapStatus overlap = at::get_overlap_status(weight, c);
    return overlap == at::MemOverlapStatus::No || overlap == at::MemOverlapStatus::Full ? c : c.clone();
  };
  const at::Tensor delta_c = read_copy(delta);
  const bool masked = fisher.has_value();
  at::Tensor fisher_c;
  KeptSelection selection;
  if (masked) {
    fisher_c = read_copy(*fisher);
    selection = select_kept(fisher_c, keep, threshold, stream);
  }
  const FloatElements fisher_elements =
      masked ? float_elements(fisher_c) : FloatElements{nullptr, FloatKind::kFloat32};

  const int blocks =
      grid_for(n, kShiftThreads, resident_blocks(weight.get_device(), kShiftThreads));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "dcedit_apply_shift_", [&] {
    apply_shift_kernel<scalar_t><<<blocks, kShiftThreads, 0, stream>>>(
        weight.data_ptr<scalar_t>(), previous.data_ptr<scalar_t>(), float_elements(delta_c),
        fisher_elements, masked, selection.rule, static_cast<AccOf<scalar_t>>(alpha), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return previous;
}

at::Tensor apply_shift_cuda(at::Tensor& weight, const at::Tensor& delta, double alpha,
                            const std::optional<at::Tensor>& fisher, std::optional<double> keep,
                            std::optional<double> threshold) {
  // Every check runs before anything is written.
  check_float_tensor(weight, "weight");
  check_float_tensor(delta, "delta");
  // As the CPU kernel: an inference tensor changes in place only inside inference mode.
  TORCH_CHECK_VALUE(!weight.is_inference() || c10::InferenceMode::is_enabled(),
                    "weight must not be an inference tensor (created under torch.inference_mode()) outside "
                    "inference mode: it can be changed in place only inside torch.inference_mode()");
  // As the CPU kernel: an expand()ed weight cannot take a different value per element.
  TORCH_CHECK_VALUE(at::has_internal_overlap(weight) != at::MemOverlap::Yes,
                    "weight must not have elements that share memory (an expanded view), got strides ",
                    weight.strides(), " for shape ", weight.sizes());
  TORCH_CHECK_VALUE(delta.device() == weight.device(),
                    "all tensors must be on one device: weight on ", weight.device(),
                    ", delta on ", delta.device());
  TORCH_CHECK_VALUE(delta.sizes() == weight.sizes(), "delta must have shape ", weight.sizes(),
                    " (weight's), got ", delta.sizes());
  if (fisher.has_value()) {
    check_float_tensor(*fisher, "fisher");
    TORCH_CHECK_VALUE(fisher->device() == weight.device(),
                      "all tensors must be on one device: weight on ", weight.device(),
                      ", fisher on ", fisher->device());
    TORCH_CHECK_VALUE(fisher->sizes() == weight.sizes(), "fisher must have shape ",
                      weight.sizes(), " (weight's), got ", fisher->sizes());
    // As the CPU kernel and the Python checks: a mask selects among n >= 1 entries.
    TORCH_CHECK_VALUE(delta.numel() > 0, "delta must not be empty");
    check_keep_or_threshold(keep, threshold);
  } else {
    // As the CPU kernel and the Python checks: keep/threshold without fisher is a mistake, not
    // a request to shift every entry.
    TORCH_CHECK_VALUE(!keep.has_value() && !threshold.has_value(),
                      "keep and threshold select entries by Fisher information: pass fisher too, "
                      "or neither (got fisher=None with ",
                      keep.has_value() ? "keep" : "threshold", ")");
  }

  // c10::DeviceGuard reaches the CUDA guard through torch's registry; c10/cuda/CUDAGuard.h would
  // add ~50k preprocessed lines (the caching allocator) to every compile of this file.
  const c10::DeviceGuard device_guard(weight.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (weight.is_contiguous()) {
    return apply_shift_contiguous(weight, delta, alpha, fisher, keep, threshold, stream);
  }
  // A strided weight (a view, a transpose) is shifted through a contiguous copy and written
  // back, which keeps the kernel flat; the saved values come from the same copy and are returned
  // in weight's layout, as the reference's weight.clone() and the fake (empty_like): under
  // torch.compile inductor asserts that an op's output strides are the fake's.
  at::Tensor previous = at::empty_like(weight);
  at::Tensor packed = weight.contiguous();
  const at::Tensor saved = apply_shift_contiguous(packed, delta, alpha, fisher, keep, threshold, stream);
  weight.copy_(packed);
  previous.copy_(saved);
  return previous;
}

}  // namespace
}  // namespace dcedit::cuda

TORCH_LIBRARY_IMPL(dcedit, CUDA, m) { m.impl("apply_shift_", &dcedit::cuda::apply_shift_cuda); }
