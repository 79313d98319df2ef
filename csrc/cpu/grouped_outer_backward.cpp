// dcedit::_grouped_outer_backward on the CPU: the gradients of grouped_outer,
//   dη_t = dS_g μ_t,  dμ_t = dS_gᵀ η_t  for t in group g,
// where dS_g is the output gradient (× alpha, / G for ssm) on the entries of S_g that reached the
// fused output: all of them for "add", grad[g] for "none", the winner's for "max", the entries of
// the winning sign for "sss"/"ssm" (SPEC.md: the gradient flows through the selected terms only).
//
// Two passes, as the Triton kernels on CUDA:
// 1. selection (max/sss/ssm): the forward's tile loop (outer_tile.h) recomputes each S_g tile once
//    and keeps one bit per group and entry, bit g%32 of int32 word g/32 (one o×i word per 32
//    groups).  The reference instead computes every S_g twice and holds P, N, S_g, the mask and
//    dS_g at once.
// 2. gradients: per group, dS_g is expanded from the bits into one reused o×i buffer and the two
//    row-block GEMMs go to torch's matmul (at::mm_out into the group's rows).
// Extra memory: the scaled gradient, the words and the one dS_g buffer (three o×i at G ≤ 32).
#include "cpu/fusion.h"
#include "cpu/outer_tile.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <type_traits>

namespace dcedit_cpu {
namespace {

constexpr int64_t kGroupsPerWord = 32;
constexpr int64_t kArea = kTile * kTile;

// The per-entry loops below are written without branches (bit arithmetic on restrict pointers)
// so that they vectorise: GCC 12 compiled `cond ? bit : 0` and an int select on a float compare
// into branches, which random signs mispredict half the time (sss and max selection ran 15-20×
// slower than the forward's tile loop at T=64, G=8; perf showed the scalar loop).

// max: group g takes the entries where |S| beats the running best magnitude (the forward's rule,
// fusion.h).
template <typename acc_t>
DCEDIT_ALWAYS_INLINE void track_winner(const acc_t* __restrict S, acc_t* __restrict best,
                                       int32_t* __restrict winner, int32_t g) {
  for (int64_t j = 0; j < kArea; ++j) {
    const acc_t mag = std::abs(S[j]);
    const bool wins = beats(mag, best[j]);
    const int32_t better = -static_cast<int32_t>(wins);  // all ones or zero
    best[j] = wins ? mag : best[j];
    winner[j] = (winner[j] & ~better) | (g & better);
  }
}

// sss/ssm: the forward's sums P, N (same order, so the same winning sign) and S's sign bits.
template <typename acc_t>
DCEDIT_ALWAYS_INLINE void accumulate_signs(const acc_t* __restrict S, acc_t* __restrict P,
                                           acc_t* __restrict N, uint32_t* __restrict pos_bits,
                                           uint32_t* __restrict neg_bits, int shift) {
  for (int64_t j = 0; j < kArea; ++j) {
    P[j] += positive_part(S[j]);
    N[j] += negative_part(S[j]);
    pos_bits[j] |= static_cast<uint32_t>(S[j] > acc_t(0)) << shift;
    neg_bits[j] |= static_cast<uint32_t>(S[j] < acc_t(0)) << shift;
  }
}

// The two folds compiled per ISA (outer_tile.h: DCEDIT_ISA_CLONES).
DCEDIT_ISA_CLONES void track_winner_tile(const float* S, float* best, int32_t* winner, int32_t g) {
  track_winner(S, best, winner, g);
}
DCEDIT_ISA_CLONES void track_winner_tile(const double* S, double* best, int32_t* winner,
                                         int32_t g) {
  track_winner(S, best, winner, g);
}
DCEDIT_ISA_CLONES void accumulate_signs_tile(const float* S, float* P, float* N, uint32_t* pos_bits,
                                             uint32_t* neg_bits, int shift) {
  accumulate_signs(S, P, N, pos_bits, neg_bits, shift);
}
DCEDIT_ISA_CLONES void accumulate_signs_tile(const double* S, double* P, double* N,
                                             uint32_t* pos_bits, uint32_t* neg_bits, int shift) {
  accumulate_signs(S, P, N, pos_bits, neg_bits, shift);
}

// words (W, o, i) int32: bit g%32 of words[g/32] says whether S_g's entry reached the output.
template <typename acc_t>
void selection_tiles(const TokenMatrix<acc_t>& eta, const TokenMatrix<acc_t>& mu,
                     const std::vector<int64_t>& offsets, int64_t o, int64_t i, Fusion fusion,
                     uint32_t* words) {
  const int64_t G = static_cast<int64_t>(offsets.size()) - 1;
  const int64_t W = ceil_div(G, kGroupsPerWord);
  const int64_t plane = o * i;
  for_each_output_tile<acc_t>(o, i, [&](const OutputTile& tile, TileWorkspace<acc_t>& ws) {
    const acc_t* S = ws.s.data();
    acc_t* P = ws.p.data();
    acc_t* N = ws.n.data();
    if (fusion == Fusion::Max) {
      // The forward's rule: group 0 (zeros when empty) seeds the winner, a later group takes
      // over only where strictly larger in magnitude (first group keeps ties) or NaN first.
      ws.index.assign(kArea, 0);
      segment_tile(eta, mu, offsets[0], offsets[1], tile, ws);
      for (int64_t j = 0; j < kArea; ++j) P[j] = std::abs(S[j]);
      for (int64_t g = 1; g < G; ++g) {
        if (offsets[g + 1] == offsets[g]) continue;  // zeros never beat anything
        segment_tile(eta, mu, offsets[g], offsets[g + 1], tile, ws);
        track_winner_tile(S, P, ws.index.data(), static_cast<int32_t>(g));
      }
      const int32_t* winner = ws.index.data();
      for (int64_t w = 0; w < W; ++w) {
        write_tile(words + w * plane, i, tile, [&](int64_t j) {
          const int64_t g = winner[j];
          return g / kGroupsPerWord == w ? uint32_t(1) << (g % kGroupsPerWord) : 0u;
        });
      }
      return;
    }
    // sss/ssm: the winning sign is known only after the last group, so each group's positive
    // and negative bits are both kept and one set is chosen per entry at the end.
    std::fill(ws.p.begin(), ws.p.end(), acc_t(0));
    std::fill(ws.n.begin(), ws.n.end(), acc_t(0));
    ws.bits.assign(2 * W * kArea, 0u);
    uint32_t* pos_bits = ws.bits.data();
    uint32_t* neg_bits = pos_bits + W * kArea;
    for (int64_t g = 0; g < G; ++g) {
      if (offsets[g + 1] == offsets[g]) continue;  // S_g = 0: neither sign, adds nothing
      segment_tile(eta, mu, offsets[g], offsets[g + 1], tile, ws);
      const int64_t w = g / kGroupsPerWord;
      accumulate_signs_tile(S, P, N, pos_bits + w * kArea, neg_bits + w * kArea,
                            static_cast<int>(g % kGroupsPerWord));
    }
    for (int64_t w = 0; w < W; ++w) {
      const uint32_t* pos = pos_bits + w * kArea;
      const uint32_t* neg = neg_bits + w * kArea;
      write_tile(words + w * plane, i, tile,
                 [&](int64_t j) { return positive_wins(P[j], N[j]) ? pos[j] : neg[j]; });
    }
  });
}

// dst = g_out where bit g of the words is set, else +0 (one o×i plane): a select, as the reference
// (and torch's clamp and gather backwards), so an infinite gradient off the selection gives 0,
// not inf·0 = NaN.  Branch-free: the value's bits ANDed with all ones or zero
// (a `bit ? g : 0` compiled to a branch).
template <typename acc_t>
void expand_selection(const acc_t* g_out, const uint32_t* words, int64_t plane, int64_t g,
                      acc_t* dst) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 8, uint64_t, uint32_t>;
  static_assert(sizeof(bits_t) == sizeof(acc_t), "acc_t is float or double");
  const uint32_t* word = words + (g / kGroupsPerWord) * plane;
  const int shift = static_cast<int>(g % kGroupsPerWord);
  at::parallel_for(0, plane, 1 << 14, [&](int64_t begin, int64_t end) {
    const uint32_t* __restrict wj = word + begin;
    const acc_t* __restrict gj = g_out + begin;
    acc_t* __restrict dj = dst + begin;
    for (int64_t j = 0; j < end - begin; ++j) {
      const bits_t keep = bits_t(0) - static_cast<bits_t>((wj[j] >> shift) & 1u);
      bits_t v;
      std::memcpy(&v, gj + j, sizeof v);
      v &= keep;
      std::memcpy(dj + j, &v, sizeof v);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> grouped_outer_backward_cpu(
    const at::Tensor& grad, const at::Tensor& eta, const at::Tensor& mu, const at::Tensor& offsets,
    c10::string_view fusion_name, double alpha) {
  // Every check runs before anything is allocated.
  check_token_inputs(eta, mu);
  const std::vector<int64_t> host_offsets = read_offsets(offsets, "offsets", eta.size(0), eta.device());
  const Fusion fusion = parse_fusion(std::string_view(fusion_name.data(), fusion_name.size()));
  const int64_t G = offsets.numel() - 1;
  const int64_t o = eta.size(1), i = mu.size(1);
  check_float_dtype(grad, "grad");
  check_same_device(grad, "grad", eta, "eta");
  const std::vector<int64_t> shape =
      fusion == Fusion::None ? std::vector<int64_t>{G, o, i} : std::vector<int64_t>{o, i};
  TORCH_CHECK_VALUE(grad.sizes() == c10::IntArrayRef(shape), "grad must have shape ",
                    c10::IntArrayRef(shape), ", got ", grad.sizes());

  const bool fp64 = eta.scalar_type() == at::kDouble || mu.scalar_type() == at::kDouble ||
                    grad.scalar_type() == at::kDouble;
  const auto acc = fp64 ? at::kDouble : at::kFloat;
  // The reference's order: (grad · alpha) / G, alpha rounded to the accumulation type.
  at::Tensor g_out = grad.to(acc).mul(alpha);
  if (fusion == Fusion::SignSumMean) g_out.div_(static_cast<double>(G));
  g_out = g_out.contiguous();

  const int64_t T = eta.size(0);
  if (fusion == Fusion::Add) {
    // Every group's dS_g is g_out: one GEMM over all rows each.
    return {at::mm(mu.to(acc), g_out.t()).to(eta.scalar_type()),
            at::mm(eta.to(acc), g_out).to(mu.scalar_type())};
  }
  at::Tensor d_eta = at::empty({T, o}, eta.options().dtype(acc));
  at::Tensor d_mu = at::empty({T, i}, mu.options().dtype(acc));

  at::Tensor words, masked;
  if (fusion != Fusion::None && o * i > 0 && T > 0) {
    words = at::empty({ceil_div(G, kGroupsPerWord), o, i}, eta.options().dtype(at::kInt));
    masked = at::empty({o, i}, eta.options().dtype(acc));
    const at::Tensor eta_c = eta.contiguous(), mu_c = mu.contiguous();
    auto* w = reinterpret_cast<uint32_t*>(words.mutable_data_ptr<int32_t>());
    if (fp64) {
      selection_tiles<double>(token_matrix<double>(eta_c), token_matrix<double>(mu_c),
                              host_offsets, o, i, fusion, w);
    } else {
      selection_tiles<float>(token_matrix<float>(eta_c), token_matrix<float>(mu_c), host_offsets,
                             o, i, fusion, w);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const int64_t s = host_offsets[g], n = host_offsets[g + 1] - s;
    if (n == 0) continue;
    at::Tensor d_s;
    if (fusion == Fusion::None) {
      d_s = g_out.select(0, g);
    } else if (words.defined()) {
      AT_DISPATCH_FLOATING_TYPES(acc, "dcedit_expand_selection", [&] {
        expand_selection<scalar_t>(g_out.const_data_ptr<scalar_t>(),
                                   reinterpret_cast<const uint32_t*>(words.const_data_ptr<int32_t>()),
                                   o * i, g, masked.mutable_data_ptr<scalar_t>());
      });
      d_s = masked;
    } else {
      d_s = g_out;  // o·i = 0: the products below are empty or zeros whatever d_s holds
    }
    // Rows of group g, converted to the accumulation type one group at a time (a view when they
    // already are).
    at::Tensor d_eta_g = d_eta.narrow(0, s, n), d_mu_g = d_mu.narrow(0, s, n);
    at::mm_out(d_eta_g, mu.narrow(0, s, n).to(acc), d_s.t());
    at::mm_out(d_mu_g, eta.narrow(0, s, n).to(acc), d_s);
  }
  return {d_eta.to(eta.scalar_type()), d_mu.to(mu.scalar_type())};
}

}  // namespace
}  // namespace dcedit_cpu

TORCH_LIBRARY_IMPL(dcedit, CPU, m) {
  m.impl("_grouped_outer_backward", &dcedit_cpu::grouped_outer_backward_cpu);
}
