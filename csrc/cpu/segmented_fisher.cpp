// dcedit::segmented_fisher on the CPU: F = (1/E) Σ_e (Σ_{t∈e} η_t μ_tᵀ)², computed tile by tile
// (outer_tile.h) so that only one edit's gradient tile exists at a time, never E o×i matrices.
#include "cpu/outer_tile.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace dcedit_cpu {
namespace {

// F += S² over one kTile×kTile tile, compiled per ISA (outer_tile.h: DCEDIT_ISA_CLONES).
template <typename acc_t>
DCEDIT_ALWAYS_INLINE void square_add(acc_t* __restrict F, const acc_t* __restrict S) {
  for (int64_t j = 0; j < kTile * kTile; ++j) F[j] += S[j] * S[j];
}
DCEDIT_ISA_CLONES void square_add_tile(float* F, const float* S) { square_add(F, S); }
DCEDIT_ISA_CLONES void square_add_tile(double* F, const double* S) { square_add(F, S); }

template <typename acc_t>
void segmented_fisher_tiles(const TokenMatrix<acc_t>& eta, const TokenMatrix<acc_t>& mu,
                            const std::vector<int64_t>& edit_offsets, int64_t o, int64_t i,
                            acc_t* out) {
  const int64_t E = static_cast<int64_t>(edit_offsets.size()) - 1;
  for_each_output_tile<acc_t>(o, i, [&](const OutputTile& tile, TileWorkspace<acc_t>& ws) {
    const acc_t* S = ws.s.data();
    acc_t* F = ws.p.data();
    std::fill(ws.p.begin(), ws.p.end(), acc_t(0));
    for (int64_t e = 0; e < E; ++e) {
      if (edit_offsets[e + 1] == edit_offsets[e]) continue;  // an empty edit adds 0
      segment_tile(eta, mu, edit_offsets[e], edit_offsets[e + 1], tile, ws);
      square_add_tile(F, S);
    }
    const acc_t edits = static_cast<acc_t>(E);
    write_tile(out, i, tile, [&](int64_t j) { return F[j] / edits; });
  });
}

at::Tensor segmented_fisher_cpu(const at::Tensor& eta, const at::Tensor& mu,
                                const at::Tensor& edit_offsets) {
  check_token_inputs(eta, mu);
  const std::vector<int64_t> host_offsets =
      read_offsets(edit_offsets, "edit_offsets", eta.size(0), eta.device());
  const int64_t o = eta.size(1), i = mu.size(1);
  const bool fp64 = eta.scalar_type() == at::kDouble || mu.scalar_type() == at::kDouble;
  at::Tensor out = at::empty({o, i}, eta.options().dtype(fp64 ? at::kDouble : at::kFloat));
  if (out.numel() == 0) return out;
  const at::Tensor eta_c = eta.contiguous(), mu_c = mu.contiguous();
  if (fp64) {
    segmented_fisher_tiles<double>(token_matrix<double>(eta_c), token_matrix<double>(mu_c),
                                   host_offsets, o, i, out.mutable_data_ptr<double>());
  } else {
    segmented_fisher_tiles<float>(token_matrix<float>(eta_c), token_matrix<float>(mu_c),
                                  host_offsets, o, i, out.mutable_data_ptr<float>());
  }
  return out;
}

}  // namespace
}  // namespace dcedit_cpu

TORCH_LIBRARY_IMPL(dcedit, CPU, m) {
  m.impl("segmented_fisher", &dcedit_cpu::segmented_fisher_cpu);
}
