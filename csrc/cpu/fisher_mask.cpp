// dcedit::fisher_mask on the CPU: (delta ⊙ kept, kept count), kept as in topk_select.h.
// Output fp32 (fp64 for an fp64 delta, the reference's compute_dtype(delta)); the count is a 0-dim
// int64 tensor so that callers need not synchronise.
#include "cpu/checks.h"
#include "cpu/topk_select.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

namespace dcedit_cpu {
namespace {

template <typename acc_t>
int64_t mask_delta(const at::Tensor& delta, const at::Tensor& fisher, const KeepRule& rule,
                   acc_t* out) {
  const int64_t n = delta.numel();
  // Fixed blocks (not one per thread) so that the count is summed in the same order on any
  // number of threads; each block is at least 64 Ki elements of streaming work.
  constexpr int64_t kBlock = int64_t(1) << 16;
  const int64_t n_blocks = (n + kBlock - 1) / kBlock;
  std::vector<int64_t> counts(static_cast<size_t>(n_blocks), 0);
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    acc_t d[kMaskBlock], kept[kMaskBlock];
    for (int64_t b = b0; b < b1; ++b) {
      int64_t count = 0;
      const int64_t end = std::min(n, (b + 1) * kBlock);
      for (int64_t j0 = b * kBlock; j0 < end; j0 += kMaskBlock) {
        const int64_t len = std::min(kMaskBlock, end - j0);
        load_as(delta, j0, len, d);
        kept_flags(fisher, rule, j0, len, kept);
        for (int64_t j = 0; j < len; ++j) {
          out[j0 + j] = kept[j] != acc_t(0) ? d[j] : acc_t(0);  // a select: an unkept inf gives 0
          count += kept[j] != acc_t(0);
        }
      }
      counts[b] = count;
    }
  });
  int64_t total = 0;
  for (int64_t c : counts) total += c;
  return total;
}

std::tuple<at::Tensor, at::Tensor> fisher_mask_cpu(const at::Tensor& delta,
                                                   const at::Tensor& fisher,
                                                   std::optional<double> keep,
                                                   std::optional<double> threshold) {
  // Every check runs before any output exists.
  check_float_dtype(delta, "delta");
  check_float_dtype(fisher, "fisher");
  TORCH_CHECK_VALUE(delta.device().is_cpu(), "delta must be a CPU tensor here, got ", delta.device());
  check_same_device(fisher, "fisher", delta, "delta");
  TORCH_CHECK_VALUE(fisher.sizes() == delta.sizes(), "fisher must have the shape of delta ",
                    delta.sizes(), ", got ", fisher.sizes());
  // As the Python checks (`check_fisher_mask`) and so the reference path: k = ceil(keep·n) has no
  // k-th largest value at n = 0.  Without it, this kernel returned an empty result and a 0 count
  // where DCEDIT_DISABLE_C=1 raised ValueError (a threshold too, as the Python check refuses).
  TORCH_CHECK_VALUE(delta.numel() > 0, "delta must not be empty");
  check_keep_or_threshold(keep, threshold);

  const bool fp64 = delta.scalar_type() == at::kDouble;
  at::Tensor out = at::empty(delta.sizes(), delta.options().dtype(fp64 ? at::kDouble : at::kFloat));
  at::Tensor count = at::empty({}, delta.options().dtype(at::kLong));
  const at::Tensor delta_c = delta.contiguous(), fisher_c = fisher.contiguous();
  const KeepRule rule = make_keep_rule(fisher_c, keep, threshold);
  *count.mutable_data_ptr<int64_t>() =
      fp64 ? mask_delta<double>(delta_c, fisher_c, rule, out.mutable_data_ptr<double>())
           : mask_delta<float>(delta_c, fisher_c, rule, out.mutable_data_ptr<float>());
  return {out, count};
}

}  // namespace
}  // namespace dcedit_cpu

TORCH_LIBRARY_IMPL(dcedit, CPU, m) { m.impl("fisher_mask", &dcedit_cpu::fisher_mask_cpu); }
