// AdaLN forward: x' = x + gate * y (optional), h = N(x') * (1 + scale) + shift, one block per row of D features.
//
// Each thread keeps up to kMaxIters vectors of the row in registers (16-byte vectors when every pointer and stride
// allows it, else scalars), so the row is read from memory once: statistics in two register passes (mean, then
// the centred sum of squares, in fp32) and one pass that writes h. The residual is rounded to the stream's dtype
// before it is normalised, as the reference normalises the stored x'.
#include "common.cuh"

namespace motus_fast {
namespace {

constexpr int kMaxIters = 4;
constexpr int kMaxThreads = 1024;

template <typename T, int VEC, bool RESIDUAL>
__global__ void adaln_kernel(const AdalnArgs a) {
  __shared__ float smem[32];
  const int64_t b = blockIdx.y, l = blockIdx.x;
  const int nvec = static_cast<int>(a.D / VEC);
  const T* x = static_cast<const T*>(a.x) + b * a.x_sb + l * a.x_sl;
  const T* shift = a.shift ? static_cast<const T*>(a.shift) + b * a.shift_sb + l * a.shift_sl : nullptr;
  const T* scale = a.scale ? static_cast<const T*>(a.scale) + b * a.scale_sb + l * a.scale_sl : nullptr;
  T* h = static_cast<T*>(a.h) + (b * a.L + l) * a.D;

  float v[kMaxIters][VEC];
  float sum = 0.f;
#pragma unroll
  for (int it = 0; it < kMaxIters; ++it) {
    const int i = threadIdx.x + it * blockDim.x;
    if (i >= nvec) continue;
    load<T, VEC>(x + i * VEC, v[it]);
    if constexpr (RESIDUAL) {
      const T* y = static_cast<const T*>(a.y) + b * a.y_sb + l * a.y_sl;
      float yv[VEC];
      load<T, VEC>(y + i * VEC, yv);
      if (a.gate) {
        float g[VEC];
        load<T, VEC>(static_cast<const T*>(a.gate) + b * a.gate_sb + l * a.gate_sl + i * VEC, g);
#pragma unroll
        for (int k = 0; k < VEC; ++k) yv[k] *= g[k];
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[it][k] = to_float(from_float<T>(v[it][k] + yv[k]));  // stored precision
      store<T, VEC>(static_cast<T*>(a.x_out) + (b * a.L + l) * a.D + i * VEC, v[it]);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum += v[it][k];
  }
  const float mean = a.rms ? 0.f : block_sum(sum, smem) / static_cast<float>(a.D);
  float sq = 0.f;
#pragma unroll
  for (int it = 0; it < kMaxIters; ++it) {
    if (threadIdx.x + it * blockDim.x >= nvec) continue;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      v[it][k] -= mean;
      sq += v[it][k] * v[it][k];
    }
  }
  const float rstd = rsqrtf(block_sum(sq, smem) / static_cast<float>(a.D) + a.eps);
#pragma unroll
  for (int it = 0; it < kMaxIters; ++it) {
    const int i = threadIdx.x + it * blockDim.x;
    if (i >= nvec) continue;
    float out[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = v[it][k] * rstd;
    if (shift) {
      float sh[VEC], sc[VEC];
      load<T, VEC>(shift + i * VEC, sh);
      load<T, VEC>(scale + i * VEC, sc);
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = out[k] * (1.f + sc[k]) + sh[k];
    }
    store<T, VEC>(h + i * VEC, out);
  }
}

// 16-byte vectors when the width, every pointer and every non-zero stride allow them.
template <typename T>
bool can_vectorize(const AdalnArgs& a) {
  constexpr int VEC = 16 / sizeof(T);
  if (a.D % VEC) return false;
  for (const void* p : {a.x, a.y, a.gate, a.shift, a.scale, static_cast<const void*>(a.x_out),
                        static_cast<const void*>(a.h)}) {
    if (p && !aligned16(p)) return false;
  }
  for (int64_t s : {a.x_sb, a.x_sl, a.y_sb, a.y_sl, a.gate_sb, a.gate_sl, a.shift_sb, a.shift_sl, a.scale_sb,
                    a.scale_sl}) {
    if (s % VEC) return false;
  }
  return true;
}

template <typename T, int VEC>
void launch_vec(const AdalnArgs& a, cudaStream_t stream) {
  const int64_t nvec = a.D / VEC;
  const int64_t per_thread = (nvec + kMaxIters - 1) / kMaxIters;
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (per_thread + 31) / 32 * 32)));
  const dim3 grid(static_cast<unsigned>(a.L), static_cast<unsigned>(a.B));
  if (a.y) {
    adaln_kernel<T, VEC, true><<<grid, threads, 0, stream>>>(a);
  } else {
    adaln_kernel<T, VEC, false><<<grid, threads, 0, stream>>>(a);
  }
}

}  // namespace

int64_t adaln_max_width(DType dtype) {
  // the scalar path bounds every dtype: kMaxIters scalars for each of kMaxThreads threads
  (void)dtype;
  return static_cast<int64_t>(kMaxIters) * kMaxThreads;
}

void launch_adaln(const AdalnArgs& a, DType dtype, void* stream) {
  if (a.B == 0 || a.L == 0 || a.D == 0) return;
  if (a.D > adaln_max_width(dtype)) throw std::invalid_argument("adaln: row width above adaln_max_width");
  if (a.B > 65535) throw std::invalid_argument("adaln: batch above 65535");
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (can_vectorize<T>(a)) {
      launch_vec<T, 16 / sizeof(T)>(a, s);
    } else {
      launch_vec<T, 1>(a, s);
    }
  });
  check_launch("adaln kernel launch");
}

}  // namespace motus_fast
