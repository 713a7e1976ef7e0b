// CPU kernels for rlhf_kernels::ppo_policy_loss and ppo_value_loss: rows in
// parallel, one pass per row computing the per-token loss, its gradient (stored,
// so the backward is a scale) and the row's sums. The per-token math is
// branch-free (selects, +-inf for an option that is off) and the row loop keeps
// 16 lane accumulators, so the fp32 path vectorises (vector_math.h); fp64 runs
// the same template with std::exp. Ties of max/min split the gradient in half, as
// torch.maximum / torch.minimum do, so the gradients equal autograd through the
// reference exactly.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "threading.h"
#include "vector_math.h"

namespace rlhf_kernels {
namespace {

constexpr int kLanes = vector_math::kLanes;

void check_ppo_inputs(const char* op, std::initializer_list<at::Tensor> tensors, const at::Tensor& row_weight) {
  const at::Tensor& first = *tensors.begin();
  TORCH_CHECK(first.dim() == 2, op, ": inputs must be [B, T], got ", first.sizes());
  TORCH_CHECK(first.scalar_type() == at::kFloat || first.scalar_type() == at::kDouble, op,
              ": inputs must be float32 or float64, got ", first.scalar_type());
  for (const auto& x : tensors) {
    TORCH_CHECK(x.sizes() == first.sizes() && x.scalar_type() == first.scalar_type() && x.is_contiguous() &&
                    x.device().is_cpu(),
                op, ": every input must be a contiguous CPU ", first.scalar_type(), " tensor of shape ", first.sizes());
  }
  TORCH_CHECK(row_weight.dim() == 1 && row_weight.size(0) == first.size(0) &&
                  row_weight.scalar_type() == first.scalar_type() && row_weight.is_contiguous(),
              op, ": row_weight must be a contiguous [", first.size(0), "] ", first.scalar_type(), " tensor");
}

RLHF_INLINE float exp_of(float x) { return vector_math::exp(x); }
RLHF_INLINE double exp_of(double x) { return std::exp(x); }
RLHF_INLINE float em1mx(float x) { return vector_math::exp_minus_one_minus_x(x); }
RLHF_INLINE double em1mx(double x) { return vector_math::exp_minus_one_minus_x(x); }
using vector_math::masked;
using vector_math::max_nan;
using vector_math::min_nan;

template <typename T>
RLHF_INLINE T select(bool condition, T a, T b) { return condition ? a : b; }

// d max(a, b) / d a: 1, 0, or 1/2 on a tie (torch.maximum's convention).
template <typename T>
RLHF_INLINE T max_grad_first(T a, T b) { return select(a > b, T(1), select(a < b, T(0), T(0.5))); }

template <typename T>
struct PolicyOptions {
  T low, high;      // 1 - clip_low, 1 + clip_high
  T dual_clip;      // +inf: off
  T ratio_clamp;    // +inf: off
};

// One token: adds to the four sums, returns d(loss * mask) / d logprob before the row weight.
template <typename T>
RLHF_INLINE T policy_token(T lp, T old, T a, T m, const PolicyOptions<T>& o, T& loss_sum, T& clipped_sum,
                           T& dual_sum, T& k3_sum) {
  const T raw = lp - old;
  const T clamp_grad = select((raw < T(0) ? -raw : raw) <= o.ratio_clamp, T(1), T(0));
  T log_ratio = select(raw < -o.ratio_clamp, -o.ratio_clamp, raw);
  log_ratio = select(log_ratio > o.ratio_clamp, o.ratio_clamp, log_ratio);
  const T ratio = exp_of(log_ratio);
  const T unclipped = -a * ratio;
  T ratio_clipped = select(ratio < o.low, o.low, ratio);
  ratio_clipped = select(ratio_clipped > o.high, o.high, ratio_clipped);
  const T clipped = -a * ratio_clipped;
  T loss = max_nan(unclipped, clipped);  // NaN propagates, as torch.maximum
  const T in_range = select(ratio >= o.low && ratio <= o.high, T(1), T(0));
  T dloss = -a * (max_grad_first(unclipped, clipped) + max_grad_first(clipped, unclipped) * in_range);
  // Dual clip, for negative advantages only: loss = min(loss, -a c).
  const bool negative = a < T(0);
  const T bound = select(negative, -a * o.dual_clip, std::numeric_limits<T>::infinity());
  dual_sum += m * select(loss > bound, T(1), T(0));
  dloss *= max_grad_first(bound, loss);
  loss = min_nan(loss, bound);  // a NaN loss stays NaN (a select on loss < bound gave +inf)
  // Selects, not products: NaN / inf at a mask-0 position never reaches the sums.
  loss_sum += masked(m, loss);
  clipped_sum += m * select(clipped > unclipped, T(1), T(0));
  k3_sum += masked(m, em1mx(log_ratio));
  return masked(m, dloss * ratio * clamp_grad);
}

// One row of T tokens; grad may be null (forward only). Writes the row's four sums.
template <typename T>
RLHF_INLINE void policy_row(const T* lp, const T* old, const T* adv, const T* m, int64_t n, T row_weight,
                            const PolicyOptions<T>& o, T* grad, T* stats) {
  T loss[kLanes] = {}, clipped[kLanes] = {}, dual[kLanes] = {}, k3[kLanes] = {};
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T g = policy_token(lp[t + l], old[t + l], adv[t + l], m[t + l], o, loss[l], clipped[l], dual[l], k3[l]);
      if (grad != nullptr) grad[t + l] = row_weight * g;
    }
  }
  for (; t < n; ++t) {
    const T g = policy_token(lp[t], old[t], adv[t], m[t], o, loss[0], clipped[0], dual[0], k3[0]);
    if (grad != nullptr) grad[t] = row_weight * g;
  }
  T sums[4] = {};
  for (int l = 0; l < kLanes; ++l) {
    sums[0] += loss[l];
    sums[1] += clipped[l];
    sums[2] += dual[l];
    sums[3] += k3[l];
  }
  stats[0] = row_weight * sums[0];
  stats[1] = sums[1];
  stats[2] = sums[2];
  stats[3] = sums[3];
}

// The entry points per dtype: fp32 vectorised (target clones), fp64 plain.
RLHF_VECTORIZED static void run_policy_row(const float* lp, const float* old, const float* adv, const float* m,
                                           int64_t n, float row_weight, const PolicyOptions<float>& o, float* grad,
                                           float* stats) {
  policy_row(lp, old, adv, m, n, row_weight, o, grad, stats);
}
static void run_policy_row(const double* lp, const double* old, const double* adv, const double* m, int64_t n,
                           double row_weight, const PolicyOptions<double>& o, double* grad, double* stats) {
  policy_row(lp, old, adv, m, n, row_weight, o, grad, stats);
}

std::tuple<at::Tensor, at::Tensor> ppo_policy_loss_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const at::Tensor& mask, const at::Tensor& row_weight, double clip_low, double clip_high,
    std::optional<double> dual_clip, std::optional<double> log_ratio_clamp, bool need_grad) {
  check_ppo_inputs("ppo_policy_loss", {logprobs, old_logprobs, advantages, mask}, row_weight);
  const int64_t B = logprobs.size(0);
  const int64_t T = logprobs.size(1);
  at::Tensor row_stats = at::empty({B, 4}, logprobs.options());  // every row writes its 4 sums
  at::Tensor grad = need_grad ? at::empty_like(logprobs) : at::empty({0}, logprobs.options());

  AT_DISPATCH_FLOATING_TYPES(logprobs.scalar_type(), "rlhf_kernels::ppo_policy_loss (CPU)", [&] {
    const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
    const PolicyOptions<scalar_t> options{
        scalar_t(1 - clip_low), scalar_t(1 + clip_high), dual_clip ? scalar_t(*dual_clip) : inf,
        log_ratio_clamp ? scalar_t(*log_ratio_clamp) : inf};
    const scalar_t* lp = logprobs.const_data_ptr<scalar_t>();
    const scalar_t* old = old_logprobs.const_data_ptr<scalar_t>();
    const scalar_t* adv = advantages.const_data_ptr<scalar_t>();
    const scalar_t* m = mask.const_data_ptr<scalar_t>();
    const scalar_t* weight = row_weight.const_data_ptr<scalar_t>();
    scalar_t* stats = row_stats.mutable_data_ptr<scalar_t>();
    scalar_t* g = need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    // Per row: four inputs read, the gradient written when asked.
    const int64_t row_bytes = (need_grad ? 5 : 4) * T * int64_t(sizeof(scalar_t));
    const threading::Plan plan = threading::plan(B * row_bytes, threading::kPpoPolicy);
    threading::parallel_for(plan, 0, B, row_bytes, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t offset = b * T;
        scalar_t* row_grad = g == nullptr ? nullptr : g + offset;
        run_policy_row(lp + offset, old + offset, adv + offset, m + offset, T, weight[b], options, row_grad,
                       stats + 4 * b);
      }
    });
  });
  return {row_stats, grad};
}

// One token of the value loss: adds to the sums, returns d(loss * mask) / d value
// before the row weight. The clipped prediction is clamp(v, old - clip, old + clip)
// (TRL's and verl's clip_by_value): inside the band it is v itself, so the clipped
// and unclipped errors are equal there and never count as clipped by rounding
// (old + (v - old) can differ from v in the last bit).
template <typename T, bool kHasClip>
RLHF_INLINE T value_token(T v, T old, T ret, T m, T clip, T& loss_sum, T& clipped_sum) {
  const T error = v - ret;
  const T unclipped = error * error;
  const T low = old - clip, high = old + clip;
  // A compile-time choice: a select on a run-time bool kept GCC from vectorising.
  T clipped_value = v;
  if constexpr (kHasClip) clipped_value = select(v < low, low, select(v > high, high, v));
  const T clipped_error = clipped_value - ret;
  const T clipped = clipped_error * clipped_error;
  const T delta_grad = select(v < low, T(0), select(v > high, T(0), T(1)));
  loss_sum += masked(m, T(0.5) * max_nan(unclipped, clipped));
  clipped_sum += m * select(clipped > unclipped, T(1), T(0));
  return masked(m, max_grad_first(unclipped, clipped) * error +
                       max_grad_first(clipped, unclipped) * clipped_error * delta_grad);
}

template <typename T, bool kHasClip>
RLHF_INLINE void value_row(const T* v, const T* old, const T* ret, const T* m, int64_t n, T row_weight, T clip,
                           T* grad, T* stats) {
  T loss[kLanes] = {}, clipped[kLanes] = {};
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T g = value_token<T, kHasClip>(v[t + l], old[t + l], ret[t + l], m[t + l], clip, loss[l], clipped[l]);
      if (grad != nullptr) grad[t + l] = row_weight * g;
    }
  }
  for (; t < n; ++t) {
    const T g = value_token<T, kHasClip>(v[t], old[t], ret[t], m[t], clip, loss[0], clipped[0]);
    if (grad != nullptr) grad[t] = row_weight * g;
  }
  T loss_sum = 0, clipped_sum = 0;
  for (int l = 0; l < kLanes; ++l) {
    loss_sum += loss[l];
    clipped_sum += clipped[l];
  }
  stats[0] = row_weight * loss_sum;
  stats[1] = clipped_sum;
}

RLHF_VECTORIZED static void run_value_row(const float* v, const float* old, const float* ret, const float* m,
                                          int64_t n, float row_weight, bool has_clip, float clip, float* grad,
                                          float* stats) {
  if (has_clip) return value_row<float, true>(v, old, ret, m, n, row_weight, clip, grad, stats);
  value_row<float, false>(v, old, ret, m, n, row_weight, clip, grad, stats);
}
static void run_value_row(const double* v, const double* old, const double* ret, const double* m, int64_t n,
                          double row_weight, bool has_clip, double clip, double* grad, double* stats) {
  if (has_clip) return value_row<double, true>(v, old, ret, m, n, row_weight, clip, grad, stats);
  value_row<double, false>(v, old, ret, m, n, row_weight, clip, grad, stats);
}

std::tuple<at::Tensor, at::Tensor> ppo_value_loss_cpu(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns, const at::Tensor& mask,
    const at::Tensor& row_weight, std::optional<double> clip, bool need_grad) {
  check_ppo_inputs("ppo_value_loss", {values, old_values, returns, mask}, row_weight);
  const int64_t B = values.size(0);
  const int64_t T = values.size(1);
  at::Tensor row_stats = at::empty({B, 2}, values.options());  // every row writes its 2 sums
  at::Tensor grad = need_grad ? at::empty_like(values) : at::empty({0}, values.options());

  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "rlhf_kernels::ppo_value_loss (CPU)", [&] {
    const scalar_t clip_value = clip ? scalar_t(*clip) : std::numeric_limits<scalar_t>::infinity();
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const scalar_t* old = old_values.const_data_ptr<scalar_t>();
    const scalar_t* ret = returns.const_data_ptr<scalar_t>();
    const scalar_t* m = mask.const_data_ptr<scalar_t>();
    const scalar_t* weight = row_weight.const_data_ptr<scalar_t>();
    scalar_t* stats = row_stats.mutable_data_ptr<scalar_t>();
    scalar_t* g = need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t row_bytes = (need_grad ? 5 : 4) * T * int64_t(sizeof(scalar_t));
    const threading::Plan plan = threading::plan(B * row_bytes, threading::kPpoValue);
    threading::parallel_for(plan, 0, B, row_bytes, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t offset = b * T;
        scalar_t* row_grad = g == nullptr ? nullptr : g + offset;
        run_value_row(v + offset, old + offset, ret + offset, m + offset, T, weight[b], clip.has_value(), clip_value,
                      row_grad, stats + 2 * b);
      }
    });
  });
  return {row_stats, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("ppo_policy_loss", &ppo_policy_loss_cpu);
  m.impl("ppo_value_loss", &ppo_value_loss_cpu);
}

}  // namespace rlhf_kernels
