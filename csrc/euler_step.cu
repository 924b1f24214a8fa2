// Euler step of the sampler: out = x + dt_b * v, with the condition
// frames re-clamped, for the video and action streams in one launch. Each block owns kBlockElems elements of one
// sample of one stream (offsets within a sample fit 32 bits); the stream descriptors travel as a kernel parameter.
#include "common.cuh"

namespace motus_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kElemsPerThread = 4;
constexpr int64_t kBlockElems = kThreads * kElemsPerThread;

template <typename T>
__global__ void euler_kernel(const EulerArgs a, const int64_t start1, const int64_t blocks0, const int64_t blocks1) {
  const bool second = blockIdx.x >= start1;
  const EulerStream st = second ? a.streams[1] : a.streams[0];
  const int64_t prog = blockIdx.x - (second ? start1 : 0);
  const int64_t blocks = second ? blocks1 : blocks0;
  const int64_t b = prog / blocks;
  const int64_t base = b * st.per_sample;
  const T* x = static_cast<const T*>(st.x) + base;
  const T* v = static_cast<const T*>(st.v) + base;
  T* out = static_cast<T*>(st.out) + base;
  const float dt = to_float(static_cast<const T*>(a.dt)[b * a.dt_stride]);
  // offsets within a sample fit 32 bits (checked by the launcher): cheap index arithmetic
  const int n = static_cast<int>(st.per_sample), T_ = static_cast<int>(st.T), S = static_cast<int>(st.S);
  const int Tc = static_cast<int>(st.Tc);
#pragma unroll
  for (int k = 0; k < kElemsPerThread; ++k) {
    const int i = static_cast<int>((prog % blocks) * kBlockElems) + k * kThreads + static_cast<int>(threadIdx.x);
    if (i >= n) break;
    float r = to_float(x[i]) + dt * to_float(v[i]);
    if (st.cond) {
      const int f = (i / S) % T_;
      if (f < Tc) {
        // cond [B, C, Tc, S]: channel i / (T*S), frame f, position i % S
        const int64_t c_off = b * (n / T_) * Tc + static_cast<int64_t>(((i / (T_ * S)) * Tc + f) * S + i % S);
        r = to_float(static_cast<const T*>(st.cond)[c_off]);
      }
    }
    out[i] = from_float<T>(r);
  }
}

}  // namespace

void launch_euler_step(const EulerArgs& a, DType dtype, void* stream) {
  if (a.num_streams < 1 || a.num_streams > kMaxStreams) throw std::invalid_argument("euler_step: 1 or 2 streams");
  int64_t blocks[kMaxStreams] = {1, 1};
  int64_t programs[kMaxStreams] = {0, 0};
  for (int s = 0; s < a.num_streams; ++s) {
    if (a.streams[s].per_sample > 0x7fffffff) throw std::invalid_argument("euler_step: over 2^31 elements per sample");
    blocks[s] = std::max<int64_t>(1, (a.streams[s].per_sample + kBlockElems - 1) / kBlockElems);
    programs[s] = a.streams[s].per_sample ? a.streams[s].B * blocks[s] : 0;
  }
  const int64_t total = programs[0] + programs[1];
  if (total == 0) return;
  if (total > 0x7fffffff) throw std::invalid_argument("euler_step: too many blocks");
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    euler_kernel<T><<<static_cast<unsigned>(total), kThreads, 0, s>>>(a, programs[0], blocks[0], blocks[1]);
  });
  check_launch("euler_step kernel launch");
}

}  // namespace motus_fast
