// Row loops of the CPU log-prob kernels over contiguous fp32, written so that
// GCC vectorises them: a branch-free polynomial exp, and 16 independent lane
// accumulators in every reduction (a single running sum would be a serial
// dependency chain that -O3 may not reorder without -ffast-math). Each hot
// function is cloned for AVX-512 and AVX2 with a portable default, picked at load
// time by CPU feature (clones named by "arch=" are picked by CPU model and missed
// every AMD machine: token_logprobs forward on 4096 x 32000, 2 threads of an EPYC,
// took 118 ms that way, 78 ms with the avx2 clone, 57 ms with avx512f).
#pragma once
#include <cmath>
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

// Cephes' expf core: r in [ln(FLT_MIN), ln(FLT_MAX)] reduced by ln 2; returns y with
// exp(r) = y 2^n (degree-6 polynomial, within 2 ulp of std::exp) and sets n.
RLHF_INLINE float exp_mantissa(float r, float& n) {
  // Round r / ln 2 to the nearest integer with the 1.5 * 2^23 trick (SSE2-friendly).
  const float shifter = 12582912.0f;
  n = (r * 1.44269504088896341f + shifter) - shifter;
  r -= n * 0.693359375f;
  r -= n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  return y * r * r + r + 1.0f;
}

// 2^n as a float, for integer-valued n in [-126, 127].
RLHF_INLINE float power_of_two(int32_t n) {
  const uint32_t bits = static_cast<uint32_t>(n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return scale;
}

constexpr float kExpLow = -87.3365447f;  // ln(FLT_MIN)

// exp(x) for every float x (within 2 ulp of std::exp on [-87.3, 88.7]). Exact at the
// ends, so masked logits (-inf or finfo.min, far below the row's max) weigh exactly 0
// and never enter a sum as 1.2e-38 times a huge negative logit: below ln(FLT_MIN) the
// result is 0 (the subnormal range is flushed: the callers add these to sums >= 1 or use
// them as probabilities), above ln(FLT_MAX) it is +inf, and NaN stays NaN. The 2^n scale
// is two normal factors, so n = 128 (x in (88.38, 88.72]) is exact too.
RLHF_INLINE float exp(float x) {
  constexpr float kHigh = 88.7228394f;  // ln(FLT_MAX), rounded up: the top overflows by itself
  // Ternaries, not std::min/max: those are not inlined into the target clones.
  // NaN passes both (comparisons are false) and makes y NaN below.
  float r = x < kExpLow ? kExpLow : x;
  r = r > kHigh ? kHigh : r;
  float n;
  float y = exp_mantissa(r, n);
  // 2^n = 2^h 2^(n - h), h = floor(n / 2): both factors normal for n in [-126, 128].
  const int32_t whole = static_cast<int32_t>(n);
  const int32_t half = whole >> 1;
  y = y * power_of_two(half) * power_of_two(whole - half);
  y = x < kExpLow ? 0.0f : y;
  return x > kHigh ? std::numeric_limits<float>::infinity() : y;
}

// exp(x) for x <= 0 (and NaN; valid up to x = 87): the log-sum-exp loops' arguments,
// z - max and z - lse, never exceed 0. There n >= -126, so one normal 2^n factor
// suffices and there is no overflow end to test. The same bits as exp() (each scales the
// same y by 2^n with at most one rounding), in about half the time: a 32000-float
// row_sum_exp took 0.16 ns an element on one EPYC thread, 0.30 with exp().
RLHF_INLINE float exp_nonpositive(float x) {
  const float r = x < kExpLow ? kExpLow : x;
  float n;
  const float y = exp_mantissa(r, n) * power_of_two(static_cast<int32_t>(n));
  return x < kExpLow ? 0.0f : y;
}

// exp(x) - 1 - x without the cancellation of exp(x) - 1 near 0: the Taylor series
// x^2/2 + ... + x^10/10! below |x| = 0.5 (truncation < 1e-10 relative), exp(x) - 1 - x
// above (within a few ulp there); +inf at x = +inf (not inf - inf), NaN for NaN. It is
// k3 = exp(-d) + d - 1 at x = -d, and Schulman's (ratio - 1) - log ratio.
RLHF_INLINE float exp_minus_one_minus_x(float x) {
  float s = 1.0f / 3628800;
  s = s * x + 1.0f / 362880;
  s = s * x + 1.0f / 40320;
  s = s * x + 1.0f / 5040;
  s = s * x + 1.0f / 720;
  s = s * x + 1.0f / 120;
  s = s * x + 1.0f / 24;
  s = s * x + 1.0f / 6;
  s = s * x + 0.5f;
  const float series = s * x * x;
  const float direct = vector_math::exp(x) - 1.0f - x;
  const float value = (x < 0.0f ? -x : x) < 0.5f ? series : direct;
  return x == std::numeric_limits<float>::infinity() ? x : value;
}

// float64: expm1(x) - x (relative error ~ 2 eps / |x|), the series to x^6 below 1e-3.
static inline double exp_minus_one_minus_x(double x) {
  if (x == std::numeric_limits<double>::infinity()) return x;
  if (std::abs(x) < 1e-3) return x * x * (0.5 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x * (1.0 / 720)))));
  return std::expm1(x) - x;
}

// max / min that propagate NaN as torch.maximum / torch.minimum do (a bare a > b ? a : b
// drops a NaN in a).
template <typename T>
RLHF_INLINE T max_nan(T a, T b) { return (a > b || a != a) ? a : b; }
template <typename T>
RLHF_INLINE T min_nan(T a, T b) { return (a < b || a != a) ? a : b; }

// m * x where m != 0, else 0: a mask-0 position never contributes, even when x is NaN
// or inf there (0 * inf is NaN).
template <typename T>
RLHF_INLINE T masked(T m, T x) { return m != T(0) ? m * x : T(0); }

// tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2 |u|) <= 1: no overflow.
RLHF_INLINE float tanh(float u) {
  const float e = exp(-2.0f * (u < 0.0f ? -u : u));
  const float t = (1.0f - e) / (1.0f + e);
  return u < 0.0f ? -t : t;
}

// kLanes floats as one GCC vector: the max below compiles to one vector max per 16
// floats in every clone. The same loop over a float[16] of lane maxima stayed scalar
// (GCC does not vectorise its select): 0.54 ns an element on one EPYC thread against
// 0.04, and it was the larger part of the CPU forward.
typedef float LaneVector __attribute__((vector_size(kLanes * sizeof(float))));

// Every lane -inf: the start of a running max.
RLHF_INLINE LaneVector lowest_lanes() {
  LaneVector lanes;
  for (int l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<float>::infinity();
  return lanes;
}

// The largest lane.
RLHF_INLINE float largest_lane(LaneVector lanes) {
  float top = lanes[0];
  for (int l = 1; l < kLanes; ++l) top = lanes[l] > top ? lanes[l] : top;
  return top;
}

// dz with -inf raised to -FLT_MAX: its weight exp(dz) is exactly 0 there, and 0 * -FLT_MAX
// is 0 where 0 * -inf is NaN. A clamp, which vectorises like exp's (a select on e > 0
// did not: 5x slower entropy).
RLHF_INLINE float finite_below(float dz) {
  constexpr float kLowest = -std::numeric_limits<float>::max();
  return dz < kLowest ? kLowest : dz;
}

// One bf16 element as the float it is exactly (the bf16 bits are the float's top half).
RLHF_INLINE float bf16_value(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

// kLanes elements from z + v as a LaneVector: fp32 as they are, bf16 widened (exact).
RLHF_INLINE LaneVector load_lanes(const float* z, int64_t v) {
  LaneVector lanes;
  std::memcpy(&lanes, z + v, sizeof(lanes));
  return lanes;
}
RLHF_INLINE LaneVector load_lanes(const uint16_t* x, int64_t v) {
  typedef uint16_t Halves __attribute__((vector_size(kLanes * sizeof(uint16_t))));
  typedef uint32_t Words __attribute__((vector_size(kLanes * sizeof(uint32_t))));
  Halves halves;
  std::memcpy(&halves, x + v, sizeof(halves));
  const Words words = __builtin_convertvector(halves, Words) << 16;
  LaneVector lanes;
  std::memcpy(&lanes, &words, sizeof(lanes));
  return lanes;
}
RLHF_INLINE float load_one(const float* z, int64_t v) { return z[v]; }
RLHF_INLINE float load_one(const uint16_t* x, int64_t v) { return bf16_value(x[v]); }

// The row a loop reads next, fetched into L2 while this one computes: a row of 32000
// fp32 logits is 125 KiB, read by the max pass from memory and by the sum pass from L2;
// without the hint the next row's memory reads start only when its max pass does, and
// the exponentials of this row (~0.16 ns an element) do not overlap them.
struct NextRow {
  const char* bytes = nullptr;
  int64_t size = 0;  // 0: nothing to fetch

  // The cache line that goes with the `line`-th 64-byte step of this row's loop: each
  // step fetches one line, so a next row no larger than this one is fetched whole.
  inline __attribute__((always_inline)) void fetch(int64_t line) const {
    if (line * 64 < size) __builtin_prefetch(bytes + line * 64, 0, 2);
  }
};

// max_v x[v] over fp32 or bf16 elements (row_max, bf16_row_max).
template <typename Element>
RLHF_INLINE float max_body(const Element* x, int64_t n) {
  LaneVector lanes = lowest_lanes();
  int64_t v = 0;
  for (; v + kLanes <= n; v += kLanes) {
    const LaneVector values = load_lanes(x, v);
    lanes = values > lanes ? values : lanes;
  }
  float top = largest_lane(lanes);
  for (; v < n; ++v) top = load_one(x, v) > top ? load_one(x, v) : top;
  return top;
}

// sum_v exp(z_v - top), and sum_v exp(z_v - top) (z_v - top) when sum_exp_dz is not
// null (kept relative to the max, so a row of finfo.min logits cannot overflow it:
// entropy = log S0 - S1 / S0). A weight of exactly 0 (a masked logit far below the max,
// or -inf) adds nothing: never 0 * -inf. One line of `next` is fetched every kLanes
// elements.
template <typename Element>
RLHF_INLINE void sum_exp_body(const Element* z, int64_t n, float top, float& sum_exp, float* sum_exp_dz,
                              const NextRow& next) {
  float lanes_e[kLanes] = {}, lanes_ez[kLanes] = {};
  int64_t v = 0;
  if (sum_exp_dz == nullptr) {  // separate loops: no dead multiply-add per element
    for (; v + kLanes <= n; v += kLanes) {
      next.fetch(v / kLanes);
      float values[kLanes];
      const LaneVector loaded = load_lanes(z, v);
      std::memcpy(values, &loaded, sizeof(values));
      for (int l = 0; l < kLanes; ++l) lanes_e[l] += exp_nonpositive(values[l] - top);
    }
  } else {
    for (; v + kLanes <= n; v += kLanes) {
      next.fetch(v / kLanes);
      float values[kLanes];
      const LaneVector loaded = load_lanes(z, v);
      std::memcpy(values, &loaded, sizeof(values));
      for (int l = 0; l < kLanes; ++l) {
        const float dz = values[l] - top;
        const float e = exp_nonpositive(dz);
        lanes_e[l] += e;
        lanes_ez[l] += e * finite_below(dz);
      }
    }
  }
  float total_e = 0.0f, total_ez = 0.0f;
  for (int l = 0; l < kLanes; ++l) {
    total_e += lanes_e[l];
    total_ez += lanes_ez[l];
  }
  for (; v < n; ++v) {
    const float dz = load_one(z, v) - top;
    const float e = exp_nonpositive(dz);
    total_e += e;
    total_ez += e * finite_below(dz);
  }
  sum_exp = total_e;
  if (sum_exp_dz != nullptr) *sum_exp_dz = total_ez;
}

RLHF_VECTORIZED static void row_sum_exp(const float* z, int64_t n, float top, float& sum_exp, float* sum_exp_dz,
                                        const NextRow& next = {}) {
  sum_exp_body(z, n, top, sum_exp, sum_exp_dz, next);
}

// The same over a bf16 row read where it is (each element widened in registers, exact):
// a bf16 row needs no fp32 copy when the logits take no transform.
RLHF_VECTORIZED static float bf16_row_max(const uint16_t* x, int64_t n) { return max_body(x, n); }
RLHF_VECTORIZED static void bf16_row_sum_exp(const uint16_t* x, int64_t n, float top, float& sum_exp,
                                             float* sum_exp_dz, const NextRow& next = {}) {
  sum_exp_body(x, n, top, sum_exp, sum_exp_dz, next);
}

// max_v z[v]; a NaN element is skipped here (the row's sum of exponentials is NaN).
RLHF_VECTORIZED static float row_max(const float* z, int64_t n) { return max_body(z, n); }

// In place, z[v] = scale * z[v] / T, or softcap * tanh(scale * z[v] / softcap) / T when
// softcap > 0 (nothing to do at scale / T = 1).
RLHF_VECTORIZED static void transform_row(float* z, int64_t n, float scale, float softcap, float inv_temperature) {
  if (softcap > 0.0f) {
    const float inner = scale / softcap, outer = softcap * inv_temperature;
    for (int64_t v = 0; v < n; ++v) z[v] = outer * vector_math::tanh(inner * z[v]);
  } else if (const float factor = scale * inv_temperature; factor != 1.0f) {
    for (int64_t v = 0; v < n; ++v) z[v] *= factor;
  }
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
  // p = 0 (a masked logit) gives exactly 0: p multiplies a finite z - mean_z (finite_below)
  // before anything else does, so never 0 * -inf nor 0 * an overflowed product.
  if (softcap > 0.0f) {
    for (int64_t v = 0; v < n; ++v) {
      const float p = exp_nonpositive(z[v] - lse);
      const float dz = -g * p - g_entropy * (p * finite_below(z[v] - mean_z));
      z[v] = dz * transform_derivative(z[v], scale, softcap, inv_temperature);
    }
  } else {
    const float linear = scale * inv_temperature;
    for (int64_t v = 0; v < n; ++v) {
      const float p = exp_nonpositive(z[v] - lse);
      z[v] = (-g * p - g_entropy * (p * finite_below(z[v] - mean_z))) * linear;
    }
  }
}

// bf16 <-> fp32 rows as bit operations the vectoriser turns into shifts and adds
// (c10::BFloat16's conversions run one element at a time: the staging of a bf16 row
// was the largest part of bf16 token_logprobs on CPU). bf16 -> fp32 is exact: the bf16
// bits are the top half of the float. fp32 -> bf16 rounds to nearest even and maps NaN
// to 0x7FC0, bit for bit what c10::BFloat16(float) does.
RLHF_VECTORIZED static void bf16_to_float(const uint16_t* x, int64_t n, float* z) {
  for (int64_t v = 0; v < n; ++v) {
    const uint32_t bits = static_cast<uint32_t>(x[v]) << 16;
    std::memcpy(z + v, &bits, sizeof(float));
  }
}

RLHF_VECTORIZED static void float_to_bf16(const float* z, int64_t n, uint16_t* x) {
  for (int64_t v = 0; v < n; ++v) {
    uint32_t bits;
    std::memcpy(&bits, z + v, sizeof(float));
    const uint32_t rounded = (bits + ((bits >> 16) & 1u) + 0x7FFFu) >> 16;
    x[v] = static_cast<uint16_t>(z[v] != z[v] ? 0x7FC0u : rounded);
  }
}

}  // namespace vector_math
}  // namespace rlhf_kernels
