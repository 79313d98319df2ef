// The fusion modes of grouped_outer (SPEC.md), parsed once for the forward and backward kernels.
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

}  // namespace dcedit_cpu
