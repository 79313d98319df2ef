// The fusion modes of grouped_outer (SPEC.md), parsed once for the forward and backward kernels,
// and the per-entry rules both apply.
#pragma once

#include <c10/util/Exception.h>

#include <string>
#include <string_view>

namespace dcedit_cpu {

enum class Fusion { None, Add, Max, SignSumSum, SignSumMean };

inline Fusion parse_fusion(std::string_view name) {
  if (name == "none") return Fusion::None;
  if (name == "add") return Fusion::Add;
  if (name == "max") return Fusion::Max;
  if (name == "sss") return Fusion::SignSumSum;
  if (name == "ssm") return Fusion::SignSumMean;
  TORCH_CHECK_VALUE(false, "fusion must be one of 'none', 'add', 'max', 'sss', 'ssm', got '",
                    std::string(name), "'");
}

// The per-entry rules that the forward and its backward (which recomputes which group or sign won)
// must apply identically, in one place.  Branch-free, so that the tile loops calling them vectorise.

// max: a magnitude beats the running best only where strictly larger (the first group keeps ties),
// or where it is NaN and the best is not (torch's argmax ranks NaN above everything).
template <typename T>
inline bool beats(T magnitude, T best) {
  return (magnitude > best) | ((magnitude != magnitude) & (best == best));
}

// sss/ssm: the parts of S summed into P and N.  NaN goes into both, as torch.clamp lets it.
template <typename T>
inline T positive_part(T s) {
  return s < T(0) ? T(0) : s;
}
template <typename T>
inline T negative_part(T s) {
  return s > T(0) ? T(0) : s;
}

// sss/ssm: the result is P where P ≥ −N, else N (SPEC.md; ties go to P).
template <typename T>
inline bool positive_wins(T P, T N) {
  return P >= -N;
}

}  // namespace dcedit_cpu
