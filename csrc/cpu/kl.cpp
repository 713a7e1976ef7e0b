// CPU kernels for rlhf_kernels::kl_penalty and kl_shaped_rewards. One estimator
// function (value and derivative) serves both; clamps pass the gradient on their
// closed interval and |d| has derivative sign(d), as torch's clamp and abs do.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <string_view>

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

template <typename T>
inline T clamp_to(T x, T bound) { return std::min(std::max(x, -bound), bound); }
template <typename T>
inline T passes(T x, T bound) { return std::abs(x) <= bound ? T(1) : T(0); }

// The estimate at d = lp - ref, and d estimate / d d into *derivative (when not null).
template <typename T>
inline T estimate(T d, Estimator estimator, bool has_clamp, T clamp, T* derivative) {
  T value, slope;
  switch (estimator) {
    case Estimator::kK1: value = d; slope = 1; break;
    case Estimator::kK2: value = T(0.5) * d * d; slope = d; break;
    case Estimator::kK3: {
      const T e = std::exp(-d);
      value = e + d - 1;
      slope = 1 - e;
      break;
    }
    case Estimator::kAbs: value = std::abs(d); slope = d > 0 ? T(1) : (d < 0 ? T(-1) : T(0)); break;
    default: {  // low_var_kl: c = clamp(-d, +-20), clamp(exp(c) - c - 1, +-10)
      const T c = clamp_to(-d, T(kLowVarInnerClamp));
      const T raw = std::exp(c) - c - 1;
      value = clamp_to(raw, T(kLowVarOuterClamp));
      slope = -passes(-d, T(kLowVarInnerClamp)) * (std::exp(c) - 1) * passes(raw, T(kLowVarOuterClamp));
    }
  }
  if (has_clamp) {
    slope *= passes(value, clamp);
    value = clamp_to(value, clamp);
  }
  if (derivative != nullptr) *derivative = slope;
  return value;
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
    const scalar_t bound = scalar_t(clamp.value_or(0));
    at::parallel_for(0, logprobs.numel(), 2048, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        out[i] = estimate(lp[i] - ref[i], estimator, clamp.has_value(), bound, g == nullptr ? nullptr : g + i);
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
    const scalar_t bound = scalar_t(clamp.value_or(0));
    const scalar_t coef = scalar_t(kl_coef);
    at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        int64_t last_valid = -1;
        for (int64_t i = b * T; i < (b + 1) * T; ++i) {
          k[i] = estimate(lp[i] - ref[i], estimator, clamp.has_value(), bound, static_cast<scalar_t*>(nullptr)) * m[i];
          r[i] = -coef * k[i];
          if (m[i] != 0) last_valid = i - b * T;
        }
        const int64_t where = index != nullptr ? index[b] : last_valid;
        TORCH_CHECK(index == nullptr || (where >= 0 && where < T), "kl_shaped_rewards: score_index must be in [0, ",
                    T, "), got ", where);
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
