// dcedit::grouped_outer on the CPU: per-group shifts S_g = Σ_{t∈g} η_t μ_tᵀ fused elementwise
// (none / add / max / sss / ssm, SPEC.md), times alpha, computed tile by tile over the o×i output
// so that the fused forms never hold more than a few 64×64 tiles per thread (see outer_tile.h).
#include "cpu/fusion.h"
#include "cpu/outer_tile.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

namespace dcedit_cpu {
namespace {

// The per-entry folds, compiled per ISA (outer_tile.h: DCEDIT_ISA_CLONES).

// max: P keeps the winner so far; S replaces it where its magnitude beats P's (fusion.h).
template <typename acc_t>
DCEDIT_ALWAYS_INLINE void max_fold(acc_t* __restrict P, const acc_t* __restrict S) {
  for (int64_t j = 0; j < kTile * kTile; ++j) {
    P[j] = beats(std::abs(S[j]), std::abs(P[j])) ? S[j] : P[j];
  }
}
DCEDIT_ISA_CLONES void max_fold_tile(float* P, const float* S) { max_fold(P, S); }
DCEDIT_ISA_CLONES void max_fold_tile(double* P, const double* S) { max_fold(P, S); }

// sss/ssm: P and N sum the positive and negative parts (fusion.h).
template <typename acc_t>
DCEDIT_ALWAYS_INLINE void sign_fold(acc_t* __restrict P, acc_t* __restrict N,
                                    const acc_t* __restrict S) {
  for (int64_t j = 0; j < kTile * kTile; ++j) {
    P[j] += positive_part(S[j]);
    N[j] += negative_part(S[j]);
  }
}
DCEDIT_ISA_CLONES void sign_fold_tile(float* P, float* N, const float* S) { sign_fold(P, N, S); }
DCEDIT_ISA_CLONES void sign_fold_tile(double* P, double* N, const double* S) { sign_fold(P, N, S); }

template <typename acc_t>
void grouped_outer_tiles(const TokenMatrix<acc_t>& eta, const TokenMatrix<acc_t>& mu,
                         const std::vector<int64_t>& offsets, int64_t o, int64_t i, Fusion fusion,
                         acc_t alpha, acc_t* out) {
  const int64_t G = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t T = offsets.back();
  for_each_output_tile<acc_t>(o, i, [&](const OutputTile& tile, TileWorkspace<acc_t>& ws) {
    const acc_t* S = ws.s.data();
    acc_t* P = ws.p.data();
    acc_t* N = ws.n.data();
    switch (fusion) {
      case Fusion::None:
        for (int64_t g = 0; g < G; ++g) {
          segment_tile(eta, mu, offsets[g], offsets[g + 1], tile, ws);
          write_tile(out + g * o * i, i, tile, [&](int64_t j) { return S[j] * alpha; });
        }
        break;
      case Fusion::Add:
        // Σ_g S_g is the sum over every token: one pass over all T rows, no per-group state.
        segment_tile(eta, mu, 0, T, tile, ws);
        write_tile(out, i, tile, [&](int64_t j) { return S[j] * alpha; });
        break;
      case Fusion::Max: {
        // Group 0 (zeros when empty) seeds the winner; max_fold keeps the first group on ties.
        segment_tile(eta, mu, offsets[0], offsets[1], tile, ws);
        std::copy(ws.s.begin(), ws.s.end(), ws.p.begin());
        for (int64_t g = 1; g < G; ++g) {
          if (offsets[g + 1] == offsets[g]) continue;  // zeros never beat anything
          segment_tile(eta, mu, offsets[g], offsets[g + 1], tile, ws);
          max_fold_tile(P, S);
        }
        write_tile(out, i, tile, [&](int64_t j) { return P[j] * alpha; });
        break;
      }
      case Fusion::SignSumSum:
      case Fusion::SignSumMean: {
        std::fill(ws.p.begin(), ws.p.end(), acc_t(0));
        std::fill(ws.n.begin(), ws.n.end(), acc_t(0));
        for (int64_t g = 0; g < G; ++g) {
          if (offsets[g + 1] == offsets[g]) continue;  // adds zeros to P and N
          segment_tile(eta, mu, offsets[g], offsets[g + 1], tile, ws);
          sign_fold_tile(P, N, S);
        }
        const acc_t groups = static_cast<acc_t>(G);
        const bool mean = fusion == Fusion::SignSumMean;
        write_tile(out, i, tile, [&](int64_t j) {
          acc_t v = positive_wins(P[j], N[j]) ? P[j] : N[j];
          if (mean) v = v / groups;  // same operation order as the reference: (v / G) * alpha
          return v * alpha;
        });
        break;
      }
    }
  });
}

at::Tensor grouped_outer_cpu(const at::Tensor& eta, const at::Tensor& mu,
                             const at::Tensor& offsets, c10::string_view fusion_name,
                             double alpha) {
  // Every check runs before the output exists.
  check_token_inputs(eta, mu);
  const std::vector<int64_t> host_offsets = read_offsets(offsets, "offsets", eta.size(0), eta.device());
  const Fusion fusion = parse_fusion(std::string_view(fusion_name.data(), fusion_name.size()));

  const int64_t G = offsets.numel() - 1;
  const int64_t o = eta.size(1), i = mu.size(1);
  const bool fp64 = eta.scalar_type() == at::kDouble || mu.scalar_type() == at::kDouble;
  const auto out_dtype = fp64 ? at::kDouble : at::kFloat;
  at::Tensor out = fusion == Fusion::None ? at::empty({G, o, i}, eta.options().dtype(out_dtype))
                                          : at::empty({o, i}, eta.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  // .contiguous() copies only strided inputs; dtype conversion happens per tile while packing.
  const at::Tensor eta_c = eta.contiguous(), mu_c = mu.contiguous();
  if (fp64) {
    grouped_outer_tiles<double>(token_matrix<double>(eta_c), token_matrix<double>(mu_c),
                                host_offsets, o, i, fusion, alpha, out.mutable_data_ptr<double>());
  } else {
    // The reference multiplies an fp32 tensor by the Python float alpha: alpha is rounded to fp32.
    grouped_outer_tiles<float>(token_matrix<float>(eta_c), token_matrix<float>(mu_c), host_offsets,
                               o, i, fusion, static_cast<float>(alpha),
                               out.mutable_data_ptr<float>());
  }
  return out;
}

}  // namespace
}  // namespace dcedit_cpu

TORCH_LIBRARY_IMPL(dcedit, CPU, m) { m.impl("grouped_outer", &dcedit_cpu::grouped_outer_cpu); }
