// Input checks shared by the CPU kernels: bad input raises ValueError (TORCH_CHECK_VALUE) naming
// the argument, before anything is allocated or written.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace dcedit_cpu {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(is_float_dtype(t.scalar_type()), name,
                    " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

// `t` (named `name`) on the device of `ref` (named `ref_name`).
inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the same device as ", ref_name,
                    " (", ref.device(), "), got ", t.device());
}

// Checks eta (T, o) and mu (T, i) of one edited weight; everything on the CPU.
inline void check_token_inputs(const at::Tensor& eta, const at::Tensor& mu) {
  TORCH_CHECK_VALUE(eta.dim() == 2, "eta must be 2-D (T, o), got shape ", eta.sizes());
  TORCH_CHECK_VALUE(mu.dim() == 2, "mu must be 2-D (T, i), got shape ", mu.sizes());
  check_float_dtype(eta, "eta");
  check_float_dtype(mu, "mu");
  TORCH_CHECK_VALUE(eta.device().is_cpu(), "eta must be a CPU tensor here, got ", eta.device());
  check_same_device(mu, "mu", eta, "eta");
  TORCH_CHECK_VALUE(mu.size(0) == eta.size(0), "mu must have as many rows (tokens) as eta (",
                    eta.size(0), "), got ", mu.size(0));
}

// Validates a CSR offsets vector over `rows` tokens and returns it on the host as int64:
// int32/int64, 1-D with >= 2 entries, offsets[0] = 0, offsets[-1] = rows, non-decreasing.
// `device_of`: the argument whose device offsets must share (named in the error).
inline std::vector<int64_t> read_offsets(const at::Tensor& offsets, const char* name, int64_t rows,
                                         const at::Device& device, const char* device_of = "eta") {
  TORCH_CHECK_VALUE(offsets.device() == device, name, " must be on the same device as ", device_of,
                    " (", device, "), got ", offsets.device());
  const auto dtype = offsets.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kInt || dtype == at::kLong, name, " must be int32 or int64, got ",
                    dtype);
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() >= 2, name,
                    " must be 1-D with G+1 >= 2 entries, got shape ", offsets.sizes());
  // As the Python checks (`_checks.check_offsets`): int32 offsets cannot reach more rows, and the
  // last-offset check below said only that it did not equal the row count.
  TORCH_CHECK_VALUE(dtype != at::kInt || rows <= std::numeric_limits<int32_t>::max(), name,
                    " is int32, which counts at most ", std::numeric_limits<int32_t>::max(),
                    " rows, but there are ", rows, " rows: pass int64 ", name);
  const int64_t n = offsets.numel();
  const int64_t stride = offsets.stride(0);
  std::vector<int64_t> host(n);
  if (dtype == at::kInt) {
    const int32_t* p = offsets.const_data_ptr<int32_t>();
    for (int64_t j = 0; j < n; ++j) host[j] = p[j * stride];
  } else {
    const int64_t* p = offsets.const_data_ptr<int64_t>();
    for (int64_t j = 0; j < n; ++j) host[j] = p[j * stride];
  }
  TORCH_CHECK_VALUE(host[0] == 0, name, "[0] must be 0, got ", host[0]);
  TORCH_CHECK_VALUE(host[n - 1] == rows, name, "[-1] must equal the number of rows (", rows,
                    "), got ", host[n - 1]);
  for (int64_t j = 1; j < n; ++j) {
    TORCH_CHECK_VALUE(host[j] >= host[j - 1], name, " must be non-decreasing, but ", name, "[", j,
                      "] = ", host[j], " < ", name, "[", j - 1, "] = ", host[j - 1]);
  }
  return host;
}

}  // namespace dcedit_cpu
