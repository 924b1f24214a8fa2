// Launchers of the CUDA C++ fused ops (csrc/*.cu), called by the torch registration in ops.cpp.
//
// This header is plain C++ (no CUDA or torch types) so that ops.cpp compiles with the host compiler alone: tensors
// arrive as raw pointers with element strides, the CUDA stream as void*.
#pragma once

#include <cstdint>

namespace motus_fast {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// AdaLN on B x L rows of D features (DESIGN.md section 5.3):
//   x' = x + gate * y                (residual: y != nullptr; gate == nullptr: ungated)
//   h  = N(x') * (1 + scale) + shift (N = LayerNorm, or RMSNorm if rms; shift == nullptr: no modulation)
// Inputs have element strides (batch, row) and a unit feature stride; a stride of 0 broadcasts (per-sample
// modulation has row stride 0). Outputs x_out (residual only) and h are contiguous [B, L, D].
struct AdalnArgs {
  const void* x = nullptr;
  const void* y = nullptr;
  const void* gate = nullptr;
  const void* shift = nullptr;
  const void* scale = nullptr;
  void* x_out = nullptr;
  void* h = nullptr;
  int64_t B = 0, L = 0, D = 0;
  int64_t x_sb = 0, x_sl = 0, y_sb = 0, y_sl = 0, gate_sb = 0, gate_sl = 0;
  int64_t shift_sb = 0, shift_sl = 0, scale_sb = 0, scale_sl = 0;
  float eps = 1e-6f;
  bool rms = false;
};

// Largest D one block handles (1024 threads x 4 vectors of 16 bytes).
int64_t adaln_max_width(DType dtype);
void launch_adaln(const AdalnArgs& args, DType dtype, void* stream);

// Euler step of up to kMaxStreams streams in one launch (DESIGN.md section 5.4):
//   out = x + dt_b * v
// then frames t < Tc of a stream with a condition are overwritten by cond [B, C, Tc, S]. Tensors are contiguous;
// a stream is viewed as [B, C, T, S] with per_sample = C * T * S elements per sample.
constexpr int kMaxStreams = 2;

struct EulerStream {
  const void* x = nullptr;
  const void* v = nullptr;
  const void* cond = nullptr;      // nullptr: no condition frames
  void* out = nullptr;
  int64_t B = 0, per_sample = 0, T = 1, S = 1, Tc = 0;
};

struct EulerArgs {
  EulerStream streams[kMaxStreams];
  int num_streams = 0;
  const void* dt = nullptr;  // dtype of the streams; 0-dim (dt_stride 0) or [B] (dt_stride 1)
  int64_t dt_stride = 0;
};

void launch_euler_step(const EulerArgs& args, DType dtype, void* stream);

}  // namespace motus_fast
