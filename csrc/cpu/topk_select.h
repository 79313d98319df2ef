// Which Fisher entries are kept, shared by fisher_mask.cpp and apply_shift.cpp (SPEC.md):
//   keep=q:        k = ceil(q·n), t = the k-th largest Fisher value, kept = fisher >= t (ties kept)
//   threshold=x:   kept = fisher > x
// with exactly the reference's rounding (dcedit_kernels/reference/fisher_mask.py): comparisons
// happen in fisher's dtype, and a Python-float threshold is rounded to that dtype first (via fp32
// for fp16/bf16, as torch does for `fp16_tensor > 0.1`).
//
// The k-th largest value is found by a radix select on order-preserving unsigned keys of the float
// bits (a few histogram passes, each a parallel streaming read), not a sort: O(n) time, O(bins)
// memory, and exact for any n (torch.quantile stops at 2^24 entries).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace dcedit_cpu {

// fp16/bf16/fp32 values compare (and are keyed) as fp32, which holds them exactly; fp64 as fp64.
template <typename scalar_t>
using compare_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Unsigned key with the same order as the float: flip all bits of negatives, set the sign bit of
// positives.  Every NaN maps to the largest key because torch.kthvalue ranks NaN above +inf.
// (-0 and +0 get different keys but compare equal, and the kept test below compares floats.)
template <typename F>
inline auto order_key(F v) {
  using U = std::conditional_t<sizeof(F) == 4, uint32_t, uint64_t>;
  constexpr U kSign = U(1) << (sizeof(U) * 8 - 1);
  if (std::isnan(v)) return static_cast<U>(~U(0));
  U u;
  std::memcpy(&u, &v, sizeof u);
  return static_cast<U>((u & kSign) ? ~u : (u | kSign));
}

template <typename F, typename U>
inline F from_order_key(U key) {
  constexpr U kSign = U(1) << (sizeof(U) * 8 - 1);
  const U u = (key & kSign) ? static_cast<U>(key & ~kSign) : static_cast<U>(~key);
  F v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// The k-th largest (1 <= k <= n) of values[0:n], as a value of scalar_t.
//
// Digits: 11 bits for 32-bit keys (3 passes; a 2048-bin histogram of uint32 is 8 KiB and stays in
// L1), 16 bits for 64-bit keys (4 passes, 256 KiB per histogram, in L2).  Each pass histograms the
// keys that share the digits fixed so far, split into one block per thread; the per-block counts
// are summed in block order, so the result does not depend on the thread count.
template <typename scalar_t>
scalar_t kth_largest(const scalar_t* values, int64_t n, int64_t k) {
  using cmp_t = compare_t<scalar_t>;
  using key_t = std::conditional_t<sizeof(cmp_t) == 4, uint32_t, uint64_t>;
  constexpr int kKeyBits = static_cast<int>(sizeof(key_t) * 8);
  constexpr int kDigitBits = sizeof(key_t) == 4 ? 11 : 16;
  constexpr int64_t kBins = int64_t(1) << kDigitBits;
  TORCH_INTERNAL_ASSERT(k >= 1 && k <= n, "kth_largest: k=", k, " out of [1, ", n, "]");

  // Blocks of at least 64Ki values (smaller ones cost more in histogram merging than they save)
  // and at most 2^31 (uint32 counts).
  const int64_t max_block = int64_t(1) << 31;
  const int64_t n_blocks = std::max<int64_t>(
      {int64_t(1), std::min<int64_t>(at::get_num_threads(), n >> 16), (n + max_block - 1) / max_block});
  const int64_t block = (n + n_blocks - 1) / n_blocks;
  std::vector<uint32_t> hist(static_cast<size_t>(n_blocks * kBins));
  std::vector<int64_t> total(static_cast<size_t>(kBins));

  key_t prefix = 0, prefix_mask = 0;  // the key's digits fixed so far
  int64_t rank = k;                   // rank of the answer among keys matching the prefix
  for (int remaining = kKeyBits; remaining > 0;) {
    const int width = std::min(kDigitBits, remaining);
    const int shift = remaining - width;
    const key_t digit_mask = static_cast<key_t>((key_t(1) << width) - 1);
    std::fill(hist.begin(), hist.end(), 0u);
    at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        uint32_t* h = hist.data() + b * kBins;
        const int64_t end = std::min(n, (b + 1) * block);
        for (int64_t j = b * block; j < end; ++j) {
          const key_t key = order_key(static_cast<cmp_t>(values[j]));
          if ((key & prefix_mask) == prefix) ++h[(key >> shift) & digit_mask];
        }
      }
    });
    std::fill(total.begin(), total.end(), 0);
    for (int64_t b = 0; b < n_blocks; ++b)
      for (int64_t d = 0; d < kBins; ++d) total[d] += hist[b * kBins + d];
    // Walk the digits from the largest down to the bin holding the rank-th largest key.
    int64_t digit = static_cast<int64_t>(digit_mask);
    while (rank > total[digit]) rank -= total[digit--];
    prefix |= static_cast<key_t>(static_cast<key_t>(digit) << shift);
    prefix_mask |= static_cast<key_t>(digit_mask << shift);
    remaining = shift;
  }
  return static_cast<scalar_t>(from_order_key<cmp_t>(prefix));
}

// k = ceil(keep·n) clamped to [1, n], computed in double like the reference's Python floats,
// keep·n shrunk by a relative 1e-15 first (reference/fisher_mask.py KEEP_ROUNDING: 0.07·100 is
// 7.000000000000001 in double, and keeps 7 entries, not 8).
inline int64_t keep_rank(double keep, int64_t n) {
  const double k = std::ceil(keep * static_cast<double>(n) * (1.0 - 1e-15));
  return std::min<int64_t>(std::max<int64_t>(static_cast<int64_t>(k), 1), n);
}

inline void check_keep_or_threshold(const std::optional<double>& keep,
                                    const std::optional<double>& threshold) {
  TORCH_CHECK_VALUE(keep.has_value() != threshold.has_value(),
                    "give exactly one of keep or threshold when fisher is given, got ",
                    keep.has_value() ? "both" : "neither");
  if (keep.has_value()) {
    TORCH_CHECK_VALUE(*keep > 0.0 && *keep <= 1.0, "keep must be in (0, 1], got ", *keep);
  }
  // fisher > NaN is false everywhere: a NaN threshold would silently keep nothing (the Python
  // checks refuse it too, _checks.check_fraction_or_threshold); ±inf are real requests.
  if (threshold.has_value()) {
    TORCH_CHECK_VALUE(!std::isnan(*threshold), "threshold must not be NaN");
  }
}

struct KeepRule {
  bool all = false;        // no Fisher information: every entry is kept
  bool inclusive = false;  // keep: fisher >= t; threshold: fisher > t
  double t = 0.0;          // a value of fisher's dtype, held exactly
};

// The rule for a contiguous `fisher` (after check_keep_or_threshold).  With `keep` this runs the
// radix select: a read-only pass over fisher, done before the caller writes anything.
inline KeepRule make_keep_rule(const at::Tensor& fisher, const std::optional<double>& keep,
                               const std::optional<double>& threshold) {
  KeepRule rule;
  const int64_t n = fisher.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fisher.scalar_type(), "dcedit_keep_rule", [&] {
    using cmp_t = compare_t<scalar_t>;
    if (keep.has_value()) {
      rule.inclusive = true;
      if (n > 0) {
        const scalar_t t = kth_largest(fisher.const_data_ptr<scalar_t>(), n, keep_rank(*keep, n));
        rule.t = static_cast<double>(static_cast<cmp_t>(t));
      }
    } else {
      // torch compares `fisher > x` after rounding x to fisher's dtype (fp16/bf16 through fp32).
      const scalar_t t = std::is_same_v<scalar_t, double>
                             ? static_cast<scalar_t>(*threshold)
                             : static_cast<scalar_t>(static_cast<float>(*threshold));
      rule.t = static_cast<double>(static_cast<cmp_t>(t));
    }
  });
  return rule;
}

// flags[j] = 1 where fisher[begin + j] is kept, else 0, in the arithmetic type out_t.  The masking
// ops select by it (not multiply: an unkept inf or NaN would give inf·0 = NaN), as the
// reference's torch.where does.
template <typename out_t>
void kept_flags(const at::Tensor& fisher, const KeepRule& rule, int64_t begin, int64_t len,
                out_t* flags) {
  if (rule.all) {
    std::fill(flags, flags + len, out_t(1));
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fisher.scalar_type(), "dcedit_kept", [&] {
    using cmp_t = compare_t<scalar_t>;
    const scalar_t* f = fisher.const_data_ptr<scalar_t>() + begin;
    const cmp_t t = static_cast<cmp_t>(rule.t);
    if (rule.inclusive) {
      for (int64_t j = 0; j < len; ++j) flags[j] = static_cast<cmp_t>(f[j]) >= t ? out_t(1) : out_t(0);
    } else {
      for (int64_t j = 0; j < len; ++j) flags[j] = static_cast<cmp_t>(f[j]) > t ? out_t(1) : out_t(0);
    }
  });
}

// dst[j] = src[begin + j] converted to acc_t, for a contiguous float tensor of any dtype (the
// reference's `delta.to(acc)`, one cache-sized block at a time instead of a whole copy).
template <typename acc_t>
void load_as(const at::Tensor& src, int64_t begin, int64_t len, acc_t* dst) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "dcedit_load", [&] {
    const scalar_t* s = src.const_data_ptr<scalar_t>() + begin;
    for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<acc_t>(s[j]);
  });
}

// Elements per inner block of the masking ops: two or three stack buffers of this many values
// (≤ 24 KiB) stay in L1 while a block is converted, masked and written.
constexpr int64_t kMaskBlock = 1024;

}  // namespace dcedit_cpu
