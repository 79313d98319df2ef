// dcedit::apply_shift_ on the CPU: weight += alpha·(delta ⊙ kept) in place, in fp32 arithmetic
// (fp64 for fp64 weights) rounded once to weight's dtype, the entries not kept left as they were,
// exactly as dcedit_kernels/reference/apply_shift.py computes it.  Returns the previous weight
// values: copying them back restores the weight bit for bit, which subtracting the shift cannot do
// once the sum has been rounded to bf16.  Old and new values are written in the same pass over
// weight.
#include "cpu/checks.h"
#include "cpu/topk_select.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

namespace dcedit_cpu {
namespace {

template <typename scalar_t>
void shift_in_place(scalar_t* weight, scalar_t* previous, const at::Tensor& delta,
                    const at::Tensor& fisher, const KeepRule& rule, double alpha) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  // The reference multiplies an acc_t tensor by the Python float alpha: alpha rounds to acc_t.
  const acc_t a = static_cast<acc_t>(alpha);
  const int64_t n = delta.numel();
  at::parallel_for(0, n, int64_t(1) << 15, [&](int64_t begin, int64_t end) {
    acc_t d[kMaskBlock], kept[kMaskBlock];
    for (int64_t j0 = begin; j0 < end; j0 += kMaskBlock) {
      const int64_t len = std::min(kMaskBlock, end - j0);
      load_as(delta, j0, len, d);  // delta.to(acc)
      if (!rule.all) kept_flags(fisher, rule, j0, len, kept);
      // alpha·d is rounded to acc_t before the add, as in the reference.  It is a separate loop
      // through memory on purpose: a fused multiply-add (which compilers may form from one
      // expression on FMA targets) would skip that rounding and break bit-exactness.
      for (int64_t j = 0; j < len; ++j) d[j] = a * d[j];
      scalar_t* w = weight + j0;
      scalar_t* old = previous + j0;
      // An entry the mask leaves out keeps its bits, whatever delta and alpha hold there (a select,
      // as the reference's torch.where: adding alpha·0 would turn an unkept inf into NaN and a -0
      // weight into +0).
      for (int64_t j = 0; j < len; ++j) {
        const scalar_t before = w[j];
        old[j] = before;
        const bool shifted = rule.all || kept[j] != acc_t(0);
        w[j] = shifted ? static_cast<scalar_t>(static_cast<acc_t>(before) + d[j]) : before;
      }
    }
  });
}

// `Tensor&` as the CUDA kernel's: a _C with both kernels aborts at import if their C++ signatures differ.
at::Tensor apply_shift_cpu(at::Tensor& weight, const at::Tensor& delta, double alpha,
                           const std::optional<at::Tensor>& fisher, std::optional<double> keep,
                           std::optional<double> threshold) {
  // Every check, the allocation of `previous` and the Fisher selection happen before weight is
  // written, so a failure leaves it as it was.
  check_float_dtype(weight, "weight");
  check_float_dtype(delta, "delta");
  TORCH_CHECK_VALUE(weight.device().is_cpu(), "weight must be a CPU tensor here, got ", weight.device());
  // An inference tensor changes in place only inside inference mode, as torch's in-place ops and
  // the Python checks (`check_shiftable_weight`) refuse: inference tensors skip the ADInplaceOrView
  // and Autograd keys, so the raw op reached this kernel and wrote one, which undo_shift_ could not
  // restore.
  TORCH_CHECK_VALUE(!weight.is_inference() || c10::InferenceMode::is_enabled(),
                    "weight must not be an inference tensor (created under torch.inference_mode()) outside "
                    "inference mode: it can be changed in place only inside torch.inference_mode()");
  // An expand()ed weight cannot take a different value per element (torch's copy_ refused it
  // only after the shift had been computed, with a RuntimeError).
  TORCH_CHECK_VALUE(at::has_internal_overlap(weight) != at::MemOverlap::Yes,
                    "weight must not have elements that share memory (an expanded view), got strides ",
                    weight.strides(), " for shape ", weight.sizes());
  check_same_device(delta, "delta", weight, "weight");
  TORCH_CHECK_VALUE(delta.sizes() == weight.sizes(), "delta must have the shape of weight ",
                    weight.sizes(), ", got ", delta.sizes());
  if (fisher.has_value()) {
    const at::Tensor& f = *fisher;
    check_float_dtype(f, "fisher");
    check_same_device(f, "fisher", weight, "weight");
    TORCH_CHECK_VALUE(f.sizes() == weight.sizes(), "fisher must have the shape of weight ",
                      weight.sizes(), ", got ", f.sizes());
    // A mask selects among n >= 1 entries, as fisher_mask's check (`check_apply_shift` runs it):
    // an empty weight with fisher raised ValueError on the reference path and was shifted here.
    TORCH_CHECK_VALUE(delta.numel() > 0, "delta must not be empty");
    check_keep_or_threshold(keep, threshold);
  } else {
    TORCH_CHECK_VALUE(!keep.has_value() && !threshold.has_value(),
                      "keep and threshold select entries by Fisher information: pass fisher too, "
                      "or neither (got fisher=None with ",
                      keep.has_value() ? "keep" : "threshold", ")");
  }

  // `previous` has weight's layout, as the reference's weight.clone() and the fake (empty_like):
  // under torch.compile, inductor asserts that an op's output strides are the fake's.
  at::Tensor previous = at::empty_like(weight);
  if (weight.numel() == 0) return previous;
  // The threads write weight block by block while they read delta and fisher: an input that shares
  // only part of weight's memory (weight = buf[:n], delta = buf[n/2:n/2+n]) would be read after
  // another thread overwrote it.  Such an input is read from a copy, as the reference reads values
  // computed before its write.  The same tensor (full overlap) is safe: each element is read
  // before it is written, by the thread that writes it.  (A strided weight is shifted in a copy.)
  const auto read_copy = [&](const at::Tensor& t) {
    const at::Tensor c = t.contiguous();
    if (!weight.is_contiguous()) return c;
    const at::MemOverlapStatus overlap = at::get_overlap_status(weight, c);
    return overlap == at::MemOverlapStatus::No || overlap == at::MemOverlapStatus::Full ? c : c.clone();
  };
  const at::Tensor delta_c = read_copy(delta);
  const at::Tensor fisher_c = fisher.has_value() ? read_copy(*fisher) : at::Tensor();
  KeepRule rule;
  if (fisher.has_value()) {
    rule = make_keep_rule(fisher_c, keep, threshold);
  } else {
    rule.all = true;
  }
  // A strided weight (e.g. a transposed view) is shifted in a contiguous copy, then copied back;
  // its old values go to a contiguous scratch and from there into previous, which keeps weight's
  // layout (empty_like above keeps a transposed view's strides, as the reference's clone() does).
  const bool direct = weight.is_contiguous();
  at::Tensor work = direct ? weight : weight.contiguous();
  at::Tensor saved = direct ? previous : at::empty(weight.sizes(), weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "dcedit_apply_shift", [&] {
    shift_in_place<scalar_t>(work.mutable_data_ptr<scalar_t>(), saved.mutable_data_ptr<scalar_t>(),
                             delta_c, fisher_c, rule, alpha);
  });
  if (!direct) {
    weight.copy_(work);
    previous.copy_(saved);
  }
  return previous;
}

}  // namespace
}  // namespace dcedit_cpu

TORCH_LIBRARY_IMPL(dcedit, CPU, m) { m.impl("apply_shift_", &dcedit_cpu::apply_shift_cpu); }
