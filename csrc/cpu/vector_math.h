// Row loops of the CPU log-prob kernels over contiguous fp32, written so that
// GCC vectorises them: a branch-free polynomial exp, and 16 independent lane
// accumulators in every reduction (a single running sum would be a serial
// dependency chain that -O3 may not reorder without -ffast-math). Each hot
// function is cloned for AVX-512 and AVX2 with a portable default, picked at load
// time by CPU feature (clones named by "arch=" are picked by CPU model and missed
// every AMD machine: token_logprobs forward on 4096 x 32000, 2 threads of an EPYC,
// took 118 ms that way, 78 ms with the avx2 clone, 57 ms with avx512f).
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RLHF_VECTORIZED __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RLHF_VECTORIZED
#endif
// Forced: GCC will not inline a plain helper into a target clone on its own, and a
// call per element defeats the vectoriser.
#define RLHF_INLINE static inline __attribute__((always_inline))

namespace rlhf_kernels {
namespace vector_math {

constexpr int kLanes = 16;

// exp(x) for x <= 88 (Cephes' expf: range reduction by ln 2, degree-6 polynomial;
// within 2 ulp of std::exp). Arguments below -87.3 give 2^-126 ~ 1.2e-38 rather than
// a subnormal or 0: the callers only add these to sums >= 1 or use them as
// probabilities, where that is far below fp32 resolution.
RLHF_INLINE float exp(float x) {
  // Ternaries, not std::min/max: those are not inlined into the target clones.
  x = x < -87.3365447f ? -87.3365447f : x;
  x = x > 88.0f ? 88.0f : x;
  // Round x / ln 2 to the nearest integer with the 1.5 * 2^23 trick (SSE2-friendly).
  const float shifter = 12582912.0f;
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  x -= n * 0.693359375f;
  x -= n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2 |u|) <= 1: no overflow.
RLHF_INLINE float tanh(float u) {
  const float e = exp(-2.0f * (u < 0.0f ? -u : u));
  const float t = (1.0f - e) / (1.0f + e);
  return u < 0.0f ? -t : t;
}

// In place, z[v] = f(z[v]); returns max_v z[v] (one pass for both).
template <typename F>
RLHF_INLINE float map_row_max(float* z, int64_t n, F f) {
  float lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<float>::infinity();
  int64_t v = 0;
  for (; v + kLanes <= n; v += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float value = f(z[v + l]);
      z[v + l] = value;
      lanes[l] = value > lanes[l] ? value : lanes[l];
    }
  }
  float top = lanes[0];
  for (int l = 1; l < kLanes; ++l) top = lanes[l] > top ? lanes[l] : top;
  for (; v < n; ++v) {
    z[v] = f(z[v]);
    top = z[v] > top ? z[v] : top;
  }
  return top;
}

// In place, z[v] = scale * z[v] / T, or softcap * tanh(scale * z[v] / softcap) / T when
// softcap > 0; returns max_v z[v]. Two loops, not a select: a vectorised select would
// evaluate the tanh for every element either way.
RLHF_VECTORIZED static float transform_row_max(float* z, int64_t n, float scale, float softcap, float inv_temperature) {
  if (softcap > 0.0f) {
    const float inner = scale / softcap, outer = softcap * inv_temperature;
    return map_row_max(z, n, [=](float x) __attribute__((always_inline)) { return outer * vector_math::tanh(inner * x); });
  }
  const float factor = scale * inv_temperature;
  return map_row_max(z, n, [=](float x) __attribute__((always_inline)) { return factor * x; });
}

// sum_v exp(z_v - top), and sum_v exp(z_v - top) z_v when sum_exp_z is not null.
RLHF_VECTORIZED static void row_sum_exp(const float* z, int64_t n, float top, float& sum_exp, float* sum_exp_z) {
  float lanes_e[kLanes] = {}, lanes_ez[kLanes] = {};
  int64_t v = 0;
  if (sum_exp_z == nullptr) {  // separate loops: no dead multiply-add per element
    for (; v + kLanes <= n; v += kLanes)
      for (int l = 0; l < kLanes; ++l) lanes_e[l] += vector_math::exp(z[v + l] - top);
  } else {
    for (; v + kLanes <= n; v += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float e = vector_math::exp(z[v + l] - top);
        lanes_e[l] += e;
        lanes_ez[l] += e * z[v + l];
      }
    }
  }
  float total_e = 0.0f, total_ez = 0.0f;
  for (int l = 0; l < kLanes; ++l) {
    total_e += lanes_e[l];
    total_ez += lanes_ez[l];
  }
  for (; v < n; ++v) {
    const float e = vector_math::exp(z[v] - top);
    total_e += e;
    total_ez += e * z[v];
  }
  sum_exp = total_e;
  if (sum_exp_z != nullptr) *sum_exp_z = total_ez;
}

// In place, z[v] becomes d x[v] = (-g p - g_H p (z - mean_z)) dz/dx with p = exp(z - lse)
// and dz/dx = transform_derivative(z). The label's +g dz/dx term is the caller's.
// dz/dx from z itself: scale / T, times 1 - t^2 with t = z T / softcap under a softcap.
RLHF_INLINE float transform_derivative(float z, float scale, float softcap, float inv_temperature) {
  if (softcap <= 0.0f) return scale * inv_temperature;
  const float t = z / (softcap * inv_temperature);
  return scale * inv_temperature * (1.0f - t * t);
}

RLHF_VECTORIZED static void row_grad(
    float* z, int64_t n, float lse, float g, float g_entropy, float mean_z, float scale, float softcap,
    float inv_temperature) {
  if (softcap > 0.0f) {
    for (int64_t v = 0; v < n; ++v) {
      const float p = vector_math::exp(z[v] - lse);
      z[v] = (-g * p - g_entropy * p * (z[v] - mean_z)) * transform_derivative(z[v], scale, softcap, inv_temperature);
    }
  } else {
    const float linear = scale * inv_temperature;
    for (int64_t v = 0; v < n; ++v) {
      const float p = vector_math::exp(z[v] - lse);
      z[v] = (-g * p - g_entropy * p * (z[v] - mean_z)) * linear;
    }
  }
}

}  // namespace vector_math
}  // namespace rlhf_kernels
