// CPU kernels for rlhf_kernels::kl_penalty and kl_shaped_rewards. One estimator
// function (value and derivative) serves both; clamps pass the gradient on their
// closed interval and |d| has derivative sign(d), as torch's clamp and abs do. The
// loops are branch-free per estimator, so the fp32 path vectorises (vector_math.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string_view>

#include "threading.h"
#include "vector_math.h"

namespace rlhf_kernels {
namespace {

enum class Estimator { kK1, kK2, kK3, kAbs, kLowVarKl };

Estimator parse_estimator(c10::string_view name) {
  const std::string_view s(name.data(), name.size());
  if (s == "k1") return Estimator::kK1;
  if (s == "k2") return Estimator::kK2;
  if (s == "k3") return Estimator::kK3;
  if (s == "abs") return Estimator::kAbs;
  if (s == "low_var_kl") return Estimator::kLowVarKl;
  TORCH_CHECK(false, "kl: estimator must be one of 'k1', 'k2', 'k3', 'abs', 'low_var_kl', got '", s, "'");
}

// verl's low_var_kl bounds (rlhf_kernels/reference/kl.py).
constexpr double kLowVarInnerClamp = 20.0;
constexpr double kLowVarOuterClamp = 10.0;

RLHF_INLINE float em1mx(float x) { return vector_math::exp_minus_one_minus_x(x); }
RLHF_INLINE double em1mx(double x) { return vector_math::exp_minus_one_minus_x(x); }

template <typename T>
RLHF_INLINE T select(bool condition, T a, T b) { return condition ? a : b; }
// Selects, so NaN passes through as torch.clamp(nan) is nan.
template <typename T>
RLHF_INLINE T clamp_to(T x, T bound) { return select(x < -bound, -bound, select(x > bound, bound, x)); }
template <typename T>
RLHF_INLINE T passes(T x, T bound) { return select((x < T(0) ? -x : x) <= bound, T(1), T(0)); }

// The estimate at d = lp - ref and d estimate / d d; clamp = +inf is no clamp (exact).
// The estimator is a template parameter so that each loop is branch-free.
template <typename T, Estimator E>
RLHF_INLINE T estimate(T d, T clamp, T& slope) {
  T value;
  if constexpr (E == Estimator::kK1) {
    value = d;
    slope = 1;
  } else if constexpr (E == Estimator::kK2) {
    value = T(0.5) * d * d;
    slope = d;
  } else if constexpr (E == Estimator::kK3) {
    // exp(-d) + d - 1 without cancellation near d = 0 (d = 1e-4: 5e-9, not 0) and +inf
    // at d = -inf (not inf - inf); the slope 1 - exp(-d) = d - k3 keeps its accuracy too.
    value = em1mx(-d);
    slope = select(d == std::numeric_limits<T>::infinity(), T(1), d - value);
  } else if constexpr (E == Estimator::kAbs) {
    value = d < 0 ? -d : d;
    slope = select(d > T(0), T(1), select(d < T(0), T(-1), T(0)));
  } else {  // low_var_kl: c = clamp(-d, +-20), clamp(exp(c) - c - 1, +-10)
    const T c = clamp_to(-d, T(kLowVarInnerClamp));
    const T raw = em1mx(c);  // exp(c) - c - 1, accurate near c = 0
    value = clamp_to(raw, T(kLowVarOuterClamp));
    slope = -passes(-d, T(kLowVarInnerClamp)) * (c + raw) * passes(raw, T(kLowVarOuterClamp));  // c + raw = exp(c) - 1
  }
  slope *= passes(value, clamp);
  return clamp_to(value, clamp);
}

template <typename T, Estimator E>
RLHF_INLINE void penalty_loop(const T* lp, const T* ref, T* out, T* grad, int64_t n, T clamp) {
  for (int64_t i = 0; i < n; ++i) {
    T slope;
    out[i] = estimate<T, E>(lp[i] - ref[i], clamp, slope);
    if (grad != nullptr) grad[i] = slope;
  }
}

template <typename T>
RLHF_INLINE void penalty_any(Estimator e, const T* lp, const T* ref, T* out, T* grad, int64_t n, T clamp) {
  switch (e) {
    case Estimator::kK1: return penalty_loop<T, Estimator::kK1>(lp, ref, out, grad, n, clamp);
    case Estimator::kK2: return penalty_loop<T, Estimator::kK2>(lp, ref, out, grad, n, clamp);
    case Estimator::kK3: return penalty_loop<T, Estimator::kK3>(lp, ref, out, grad, n, clamp);
    case Estimator::kAbs: return penalty_loop<T, Estimator::kAbs>(lp, ref, out, grad, n, clamp);
    default: return penalty_loop<T, Estimator::kLowVarKl>(lp, ref, out, grad, n, clamp);
  }
}

// Entry points per dtype: fp32 vectorised (target clones), fp64 plain.
RLHF_VECTORIZED static void run_penalty(Estimator e, const float* lp, const float* ref, float* out, float* grad,
                                        int64_t n, float clamp) {
  penalty_any(e, lp, ref, out, grad, n, clamp);
}
static void run_penalty(Estimator e, const double* lp, const double* ref, double* out, double* grad, int64_t n,
                        double clamp) {
  penalty_any(e, lp, ref, out, grad, n, clamp);
}

// kl_shaped_rewards' row body in one pass: k = mask * estimate (0 where mask is 0, even
// for NaN / inf inputs there) and r = -coef * k.
template <typename T, Estimator E>
RLHF_INLINE void shaped_loop(const T* lp, const T* ref, const T* m, T* k, T* r, int64_t n, T clamp, T coef) {
  for (int64_t i = 0; i < n; ++i) {
    T slope;
    const T value = vector_math::masked(m[i], estimate<T, E>(lp[i] - ref[i], clamp, slope));
    k[i] = value;
    r[i] = -coef * value;
  }
}

template <typename T>
RLHF_INLINE void shaped_any(Estimator e, const T* lp, const T* ref, const T* m, T* k, T* r, int64_t n, T clamp,
                            T coef) {
  switch (e) {
    case Estimator::kK1: return shaped_loop<T, Estimator::kK1>(lp, ref, m, k, r, n, clamp, coef);
    case Estimator::kK2: return shaped_loop<T, Estimator::kK2>(lp, ref, m, k, r, n, clamp, coef);
    case Estimator::kK3: return shaped_loop<T, Estimator::kK3>(lp, ref, m, k, r, n, clamp, coef);
    case Estimator::kAbs: return shaped_loop<T, Estimator::kAbs>(lp, ref, m, k, r, n, clamp, coef);
    default: return shaped_loop<T, Estimator::kLowVarKl>(lp, ref, m, k, r, n, clamp, coef);
  }
}

RLHF_VECTORIZED static void run_shaped(Estimator e, const float* lp, const float* ref, const float* m, float* k,
                                       float* r, int64_t n, float clamp, float coef) {
  shaped_any(e, lp, ref, m, k, r, n, clamp, coef);
}
static void run_shaped(Estimator e, const double* lp, const double* ref, const double* m, double* k, double* r,
                       int64_t n, double clamp, double coef) {
  shaped_any(e, lp, ref, m, k, r, n, clamp, coef);
}

void check_same(const char* op, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, op, ": inputs must be float32 or float64");
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && a.is_contiguous() && b.is_contiguous() &&
                  a.device().is_cpu() && b.device().is_cpu(),
              op, ": inputs must be contiguous CPU tensors of one shape and dtype");
}

std::tuple<at::Tensor, at::Tensor> kl_penalty_cpu(
    const at::Tensor& logprobs, const at::Tensor& ref_logprobs, c10::string_view estimator_name,
    std::optional<double> clamp, bool need_grad) {
  check_same("kl_penalty", logprobs, ref_logprobs);
  const Estimator estimator = parse_estimator(estimator_name);
  at::Tensor kl = at::empty_like(logprobs);
  at::Tensor grad = need_grad ? at::empty_like(logprobs) : at::empty({0}, logprobs.options());
  AT_DISPATCH_FLOATING_TYPES(logprobs.scalar_type(), "rlhf_kernels::kl_penalty (CPU)", [&] {
    const scalar_t* lp = logprobs.const_data_ptr<scalar_t>();
    const scalar_t* ref = ref_logprobs.const_data_ptr<scalar_t>();
    scalar_t* out = kl.mutable_data_ptr<scalar_t>();
    scalar_t* g = need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    const scalar_t bound = clamp ? scalar_t(*clamp) : std::numeric_limits<scalar_t>::infinity();
    // Per element: logprobs and ref read, kl (and its slope) written.
    const int64_t element_bytes = (need_grad ? 4 : 3) * int64_t(sizeof(scalar_t));
    const int64_t n = logprobs.numel();
    const threading::Plan plan = threading::plan(n * element_bytes, threading::kKl);
    threading::parallel_for_elements(plan, n, element_bytes, [&](int64_t begin, int64_t end) {
      run_penalty(estimator, lp + begin, ref + begin, out + begin, g == nullptr ? nullptr : g + begin, end - begin,
                  bound);
    });
  });
  return {kl, grad};
}

std::tuple<at::Tensor, at::Tensor> kl_shaped_rewards_cpu(
    const at::Tensor& scores, const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& mask,
    double kl_coef, c10::string_view estimator_name, std::optional<double> clamp,
    const std::optional<at::Tensor>& score_index) {
  check_same("kl_shaped_rewards", logprobs, ref_logprobs);
  check_same("kl_shaped_rewards", logprobs, mask);
  TORCH_CHECK(logprobs.dim() == 2 && logprobs.size(1) > 0, "kl_shaped_rewards: inputs must be [B, T] with T >= 1");
  const int64_t B = logprobs.size(0);
  const int64_t T = logprobs.size(1);
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == B && scores.scalar_type() == logprobs.scalar_type() &&
                  scores.is_contiguous(),
              "kl_shaped_rewards: scores must be a contiguous [", B, "] tensor of the inputs' dtype");
  if (score_index.has_value()) {
    TORCH_CHECK(score_index->dim() == 1 && score_index->size(0) == B && score_index->scalar_type() == at::kLong &&
                    score_index->is_contiguous(),
                "kl_shaped_rewards: score_index must be a contiguous int64 [", B, "] tensor");
  }
  if (score_index.has_value()) {  // before any write: never an out-of-range write, in any mode
    const int64_t* index = score_index->const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(index[b] >= 0 && index[b] < T, "kl_shaped_rewards: score_index must be in [0, ", T,
                        "), got ", index[b], " at row ", b);
    }
  }
  const Estimator estimator = parse_estimator(estimator_name);
  at::Tensor rewards = at::empty_like(logprobs);
  at::Tensor kl = at::empty_like(logprobs);
  AT_DISPATCH_FLOATING_TYPES(logprobs.scalar_type(), "rlhf_kernels::kl_shaped_rewards (CPU)", [&] {
    const scalar_t* lp = logprobs.const_data_ptr<scalar_t>();
    const scalar_t* ref = ref_logprobs.const_data_ptr<scalar_t>();
    const scalar_t* m = mask.const_data_ptr<scalar_t>();
    const scalar_t* s = scores.const_data_ptr<scalar_t>();
    const int64_t* index = score_index.has_value() ? score_index->const_data_ptr<int64_t>() : nullptr;
    scalar_t* r = rewards.mutable_data_ptr<scalar_t>();
    scalar_t* k = kl.mutable_data_ptr<scalar_t>();
    const scalar_t bound = clamp ? scalar_t(*clamp) : std::numeric_limits<scalar_t>::infinity();
    const scalar_t coef = scalar_t(kl_coef);
    // Per row: logprobs, ref and mask read, rewards and kl written.
    const int64_t row_bytes = 5 * T * int64_t(sizeof(scalar_t));
    const threading::Plan plan = threading::plan(B * row_bytes, threading::kKl);
    threading::parallel_for(plan, 0, B, row_bytes, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t offset = b * T;
        run_shaped(estimator, lp + offset, ref + offset, m + offset, k + offset, r + offset, T, bound, coef);
        int64_t where = -1;
        if (index != nullptr) {
          where = index[b];  // checked above
        } else {  // the last position where mask != 0, searched from the end (right padding is short)
          for (int64_t t = T - 1; t >= 0; --t) {
            if (m[offset + t] != 0) {
              where = t;
              break;
            }
          }
        }
        if (where >= 0) r[b * T + where] += s[b];
      }
    });
  });
  return {rewards, kl};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("kl_penalty", &kl_penalty_cpu);
  m.impl("kl_shaped_rewards", &kl_shaped_rewards_cpu);
}

}  // namespace rlhf_kernels
