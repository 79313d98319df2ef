// dcedit::grouped_lowrank on the CPU: MEND's residual low-rank layer for every group at once,
//   out_t = h_t + clamp((((gain_t ⊙ h_t) v_gᵀ) u_gᵀ + bias_g) ⊙ scale_g + shift_g, min=0),
// in fp32 (fp64 when any input is fp64), bit for bit the reference's arithmetic.
//
// The two GEMMs per group are torch's (at::mm, the reference's own calls).  What this file saves
// is the elementwise traffic around them: bias, scale, shift, the clamp and the residual are one
// pass from the second GEMM's result into the group's rows of the output,
// where the reference makes a temporary for each and a final torch.cat (seven passes over T×d
// instead of one; on the MoEditor edit benchmark's CPU shapes they took more time than the GEMMs).
#include "cpu/checks.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace dcedit_cpu {
namespace {

void check_float(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  check_float_dtype(t, name);
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor here, got ", t.device());
}

// rows (n × d, contiguous) ← h + clamp((pre + b) ⊙ s + c, 0) for pre = z u_gᵀ (n × d, contiguous),
// one pass.  Each step is its own statement and rounded as the reference rounds it (no fused
// multiply-add: ISO C++ mode keeps GCC from contracting, and the default x86-64 target has no FMA).
template <typename acc_t>
void epilogue(acc_t* rows, const acc_t* pre_rows, const at::Tensor& h_rows, int64_t n, int64_t d,
              const acc_t* b, const acc_t* s, const acc_t* c) {
  const acc_t* h = h_rows.const_data_ptr<acc_t>();
  const int64_t ld_h = h_rows.stride(0);  // rows of h_rows are contiguous
  at::parallel_for(0, n, std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(d, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      acc_t* out = rows + r * d;
      const acc_t* in = pre_rows + r * d;
      const acc_t* hr = h + r * ld_h;
      for (int64_t j = 0; j < d; ++j) {
        acc_t pre = in[j] + b[j];
        if (s != nullptr) pre = pre * s[j];
        if (c != nullptr) pre = pre + c[j];
        const acc_t kept = pre < acc_t(0) ? acc_t(0) : pre;  // NaN stays NaN, as clamp
        out[j] = hr[j] + kept;
      }
    }
  });
}

at::Tensor grouped_lowrank_cpu(const at::Tensor& h, const at::Tensor& offsets, const at::Tensor& u,
                               const at::Tensor& v, const at::Tensor& bias,
                               const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& shift,
                               const std::optional<at::Tensor>& gain) {
  // Every check runs before the output exists (the Python wrapper checks the same, naming the
  // argument; these guard direct torch.ops calls).
  check_float(h, "h", 2);
  const int64_t T = h.size(0), d = h.size(1);
  const std::vector<int64_t> off = read_offsets(offsets, "offsets", T, h.device(), "h");
  const int64_t G = static_cast<int64_t>(off.size()) - 1;
  check_float(u, "u", 3);
  TORCH_CHECK_VALUE(u.size(0) == G && u.size(1) == d, "u must have shape (G=", G, ", d=", d,
                    ", r), got ", u.sizes());
  const int64_t r = u.size(2);
  check_float(v, "v", 3);
  TORCH_CHECK_VALUE(v.sizes() == at::IntArrayRef({G, r, d}), "v must have shape (", G, ", ", r,
                    ", ", d, "), got ", v.sizes());
  check_float(bias, "bias", 2);
  TORCH_CHECK_VALUE(bias.sizes() == at::IntArrayRef({G, d}), "bias must have shape (", G, ", ", d,
                    "), got ", bias.sizes());
  bool fp64 = h.scalar_type() == at::kDouble || u.scalar_type() == at::kDouble ||
              v.scalar_type() == at::kDouble || bias.scalar_type() == at::kDouble;
  const std::pair<const char*, const std::optional<at::Tensor>*> per_group[] = {{"scale", &scale},
                                                                                {"shift", &shift}};
  for (const auto& [name, t] : per_group) {
    if (!t->has_value()) continue;
    check_float(**t, name, 2);
    TORCH_CHECK_VALUE((*t)->sizes() == at::IntArrayRef({G, d}), name, " must have shape (", G,
                      ", ", d, "), got ", (*t)->sizes());
    fp64 = fp64 || (*t)->scalar_type() == at::kDouble;
  }
  if (gain.has_value()) {
    check_float(*gain, "gain", 2);
    TORCH_CHECK_VALUE(gain->sizes() == h.sizes(), "gain must have shape ", h.sizes(), ", got ",
                      gain->sizes());
    fp64 = fp64 || gain->scalar_type() == at::kDouble;
  }
  const auto acc = fp64 ? at::kDouble : at::kFloat;

  at::Tensor out = at::empty({T, d}, h.options().dtype(acc));
  if (T == 0 || d == 0) return out;
  // The reference's inputs: h in acc (a view when it already is), x = h ⊙ gain.  x keeps h's
  // layout because torch's GEMM rounds differently for a transposed operand; the epilogue reads
  // rows of a contiguous h (a copy only when h is strided).
  const at::Tensor hh = h.to(acc);
  const at::Tensor x = gain.has_value() ? hh.mul(gain->to(acc)) : hh;
  const at::Tensor h_rows = hh.contiguous();
  const at::Tensor b_acc = bias.to(acc).contiguous();
  const at::Tensor s_acc = scale.has_value() ? scale->to(acc).contiguous() : at::Tensor();
  const at::Tensor c_acc = shift.has_value() ? shift->to(acc).contiguous() : at::Tensor();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t s0 = off[g], n = off[g + 1] - s0;
    if (n == 0) continue;
    at::Tensor rows = out.narrow(0, s0, n);  // contiguous: whole rows of a row-major output
    const at::Tensor z = at::mm(x.narrow(0, s0, n), v.select(0, g).to(acc).t());
    // Into a fresh tensor, as the reference's `@`, not mm_out into `rows`: torch's GEMM can round
    // differently into an output that starts mid-buffer (a one-token group whose u_g is stored
    // transposed, u = w.transpose(1, 2), lost bit-identity there).
    const at::Tensor pre = at::mm(z, u.select(0, g).to(acc).t()).contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "dcedit_grouped_lowrank_epilogue", [&] {
      epilogue<scalar_t>(rows.mutable_data_ptr<scalar_t>(), pre.const_data_ptr<scalar_t>(),
                         h_rows.narrow(0, s0, n), n, d,
                         b_acc.const_data_ptr<scalar_t>() + g * d,
                         s_acc.defined() ? s_acc.const_data_ptr<scalar_t>() + g * d : nullptr,
                         c_acc.defined() ? c_acc.const_data_ptr<scalar_t>() + g * d : nullptr);
    });
  }
  return out;
}

}  // namespace
}  // namespace dcedit_cpu

TORCH_LIBRARY_IMPL(dcedit, CPU, m) { m.impl("grouped_lowrank", &dcedit_cpu::grouped_lowrank_cpu); }
