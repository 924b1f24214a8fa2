// torch registration of the CUDA C++ ops: TORCH_LIBRARY(motus_fast_cuda). Validates the tensors, allocates the
// outputs and calls the launchers of adaln.cu / euler_step.cu on the current CUDA stream. Forward only: these serve
// the inference path (motus_fast.ops uses the Triton kernels wherever a gradient is needed).
//
// Plain C++ (no CUDA headers): the stream comes from the device-generic guard interface.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "motus_ops.h"

namespace motus_fast {
namespace {

DType dtype_of(const at::Tensor& t, const char* name) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", s);
  return s == at::kFloat ? DType::kFloat32 : s == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
}

void* current_stream(const at::Tensor& t) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device()).native_handle();
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must be ", x.scalar_type(), " like x, got ",
              t.scalar_type());
}

// (batch stride, row stride) of a [B|1, L|1, D] tensor as seen from [B, L, D]: 0 where it broadcasts.
std::pair<int64_t, int64_t> strides(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.dim() == 3 && (t.size(0) == x.size(0) || t.size(0) == 1) &&
                  (t.size(1) == x.size(1) || t.size(1) == 1) && t.size(2) == x.size(2),
              name, " must be [B|1, L|1, D] for x ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, name, " needs a unit feature stride");
  return {t.size(0) == 1 ? 0 : t.stride(0), t.size(1) == 1 ? 0 : t.stride(1)};
}

AdalnArgs adaln_args(const at::Tensor& x, const std::optional<at::Tensor>& y, const std::optional<at::Tensor>& gate,
                     const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& scale, double eps,
                     bool rms) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3, "x must be a CUDA [B, L, D] tensor, got ", x.sizes(), " on ", x.device());
  TORCH_CHECK(shift.has_value() == scale.has_value(), "give both shift and scale, or neither");
  TORCH_CHECK(x.size(2) <= adaln_max_width(dtype_of(x, "x")), "rows wider than ",
              adaln_max_width(dtype_of(x, "x")), " features are not supported, got ", x.size(2));
  AdalnArgs a;
  a.B = x.size(0), a.L = x.size(1), a.D = x.size(2);
  a.eps = static_cast<float>(eps), a.rms = rms;
  auto bind = [&](const at::Tensor& t, const char* name, const void*& ptr, int64_t& sb, int64_t& sl) {
    check_like(t, x, name);
    std::tie(sb, sl) = strides(t, x, name);
    ptr = t.data_ptr();
  };
  bind(x, "x", a.x, a.x_sb, a.x_sl);
  if (y) {
    TORCH_CHECK(y->sizes() == x.sizes(), "y must have x's shape ", x.sizes(), ", got ", y->sizes());
    bind(*y, "y", a.y, a.y_sb, a.y_sl);
  }
  if (gate) bind(*gate, "gate", a.gate, a.gate_sb, a.gate_sl);
  if (shift) {
    bind(*shift, "shift", a.shift, a.shift_sb, a.shift_sl);
    bind(*scale, "scale", a.scale, a.scale_sb, a.scale_sl);
  }
  return a;
}

at::Tensor adaln_modulate(const at::Tensor& x, const std::optional<at::Tensor>& shift,
                          const std::optional<at::Tensor>& scale, double eps, bool rms) {
  AdalnArgs a = adaln_args(x, std::nullopt, std::nullopt, shift, scale, eps, rms);
  const c10::DeviceGuard guard(x.device());
  at::Tensor h = at::empty(x.sizes(), x.options());
  a.h = h.data_ptr();
  launch_adaln(a, dtype_of(x, "x"), current_stream(x));
  return h;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_adaln(const at::Tensor& x, const at::Tensor& y,
                                                        const std::optional<at::Tensor>& gate,
                                                        const std::optional<at::Tensor>& shift,
                                                        const std::optional<at::Tensor>& scale, double eps, bool rms) {
  AdalnArgs a = adaln_args(x, y, gate, shift, scale, eps, rms);
  const c10::DeviceGuard guard(x.device());
  at::Tensor x_out = at::empty(x.sizes(), x.options());
  at::Tensor h = at::empty(x.sizes(), x.options());
  a.x_out = x_out.data_ptr(), a.h = h.data_ptr();
  launch_adaln(a, dtype_of(x, "x"), current_stream(x));
  return {x_out, h};
}

std::vector<at::Tensor> euler_step(at::TensorList xs, at::TensorList vs, const at::Tensor& dt,
                                   const c10::List<std::optional<at::Tensor>>& conds) {
  const int64_t n = static_cast<int64_t>(xs.size());
  TORCH_CHECK(n >= 1 && static_cast<int64_t>(vs.size()) == n && static_cast<int64_t>(conds.size()) == n,
              "euler_step needs one v and one cond per stream");
  const at::Tensor& x0 = xs[0];
  TORCH_CHECK(x0.is_cuda() && x0.dim() >= 1, "xs[0] must be a CUDA [B, ...] tensor");
  const int64_t B = x0.size(0);
  check_like(dt, x0, "dt");
  TORCH_CHECK(dt.dim() == 0 || (dt.dim() == 1 && dt.size(0) == B), "dt must be 0-dim or [B=", B, "], got ",
              dt.sizes());
  const c10::DeviceGuard guard(x0.device());
  const at::Tensor dt_c = dt.contiguous();
  std::vector<at::Tensor> keep, outs;   // contiguous inputs stay alive until the launch is queued
  const DType dtype = dtype_of(x0, "xs[0]");
  for (int64_t g = 0; g < n; g += kMaxStreams) {
    EulerArgs a;
    a.dt = dt_c.data_ptr(), a.dt_stride = dt.dim() ? 1 : 0;
    a.num_streams = static_cast<int>(std::min<int64_t>(kMaxStreams, n - g));
    for (int s = 0; s < a.num_streams; ++s) {
      const int64_t i = g + s;
      const at::Tensor x = xs[i].contiguous();
      check_like(x, x0, "xs[i]");
      TORCH_CHECK(x.dim() >= 1 && x.size(0) == B, "xs[", i, "] must be [B=", B, ", ...], got ", x.sizes());
      TORCH_CHECK(vs[i].sizes() == x.sizes(), "vs[", i, "] must have shape ", x.sizes(), ", got ", vs[i].sizes());
      const at::Tensor v = vs[i].contiguous();
      check_like(v, x0, "vs[i]");
      EulerStream& st = a.streams[s];
      st.x = x.data_ptr(), st.v = v.data_ptr(), st.B = B, st.per_sample = B ? x.numel() / B : 0;
      // [B, C, T, S...] layout for the condition frames; below 3 dims one frame of the whole sample
      st.T = x.dim() >= 3 ? x.size(2) : 1;
      st.S = x.dim() >= 3 && x.size(1) * st.T > 0 ? st.per_sample / (x.size(1) * st.T)
                                                   : std::max<int64_t>(st.per_sample, 1);
      keep.insert(keep.end(), {x, v});
      const std::optional<at::Tensor> cond = conds.get(i);
      if (cond.has_value()) {
        const at::Tensor c = cond->contiguous();
        check_like(c, x0, "conds[i]");
        TORCH_CHECK(x.dim() >= 4 && c.dim() == x.dim() && c.size(0) == B && c.size(1) == x.size(1) &&
                        c.size(2) <= x.size(2) && c.sizes().slice(3) == x.sizes().slice(3),
                    "conds[", i, "] must be [B, C, Tc <= T, ...] for xs[", i, "] ", x.sizes(), ", got ", c.sizes());
        st.cond = c.data_ptr(), st.Tc = c.size(2);
        keep.push_back(c);
      }
      at::Tensor out = at::empty(x.sizes(), x.options());
      st.out = out.data_ptr();
      outs.push_back(out);
    }
    launch_euler_step(a, dtype, current_stream(x0));
  }
  return outs;
}

}  // namespace
}  // namespace motus_fast

TORCH_LIBRARY(motus_fast_cuda, m) {
  m.def("adaln_modulate(Tensor x, Tensor? shift, Tensor? scale, float eps, bool rms) -> Tensor");
  m.def("gated_residual_adaln(Tensor x, Tensor y, Tensor? gate, Tensor? shift, Tensor? scale, float eps, "
        "bool rms) -> (Tensor, Tensor)");
  m.def("euler_step(Tensor[] xs, Tensor[] vs, Tensor dt, Tensor?[] conds) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(motus_fast_cuda, CUDA, m) {
  m.impl("adaln_modulate", &motus_fast::adaln_modulate);
  m.impl("gated_residual_adaln", &motus_fast::gated_residual_adaln);
  m.impl("euler_step", &motus_fast::euler_step);
}
