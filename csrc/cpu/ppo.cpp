// CPU kernels for rlhf_kernels::ppo_policy_loss and ppo_value_loss: rows in
// parallel, one pass per row computing the per-token loss, its gradient (stored,
// so the backward is a scale) and the row's sums. Ties of max/min split the
// gradient in half, as torch.maximum / torch.minimum do, so the gradients equal
// autograd through the reference exactly.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>

namespace rlhf_kernels {
namespace {

constexpr int64_t kRowGrain = 16;

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

// d max(a, b) / d a: 1, 0, or 1/2 on a tie (torch.maximum's convention).
template <typename T>
inline T max_grad_first(T a, T b) {
  return a > b ? T(1) : (a < b ? T(0) : T(0.5));
}

std::tuple<at::Tensor, at::Tensor> ppo_policy_loss_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const at::Tensor& mask, const at::Tensor& row_weight, double clip_low, double clip_high,
    std::optional<double> dual_clip, std::optional<double> log_ratio_clamp, bool need_grad) {
  check_ppo_inputs("ppo_policy_loss", {logprobs, old_logprobs, advantages, mask}, row_weight);
  const int64_t B = logprobs.size(0);
  const int64_t T = logprobs.size(1);
  at::Tensor row_stats = at::zeros({B, 4}, logprobs.options());
  at::Tensor grad = need_grad ? at::empty_like(logprobs) : at::empty({0}, logprobs.options());

  AT_DISPATCH_FLOATING_TYPES(logprobs.scalar_type(), "rlhf_kernels::ppo_policy_loss (CPU)", [&] {
    using T_ = scalar_t;
    const T_* lp = logprobs.const_data_ptr<T_>();
    const T_* old = old_logprobs.const_data_ptr<T_>();
    const T_* adv = advantages.const_data_ptr<T_>();
    const T_* m = mask.const_data_ptr<T_>();
    const T_* weight = row_weight.const_data_ptr<T_>();
    T_* stats = row_stats.mutable_data_ptr<T_>();
    T_* g = need_grad ? grad.mutable_data_ptr<T_>() : nullptr;
    const T_ low = T_(1) - T_(clip_low), high = T_(1) + T_(clip_high);
    at::parallel_for(0, B, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        T_ loss_sum = 0, clipped = 0, dual = 0, k3 = 0;
        for (int64_t i = b * T; i < (b + 1) * T; ++i) {
          T_ log_ratio = lp[i] - old[i];
          T_ clamp_grad = 1;
          if (log_ratio_clamp.has_value()) {
            const T_ c = T_(*log_ratio_clamp);
            clamp_grad = std::abs(log_ratio) <= c ? T_(1) : T_(0);
            log_ratio = std::min(std::max(log_ratio, -c), c);
          }
          const T_ ratio = std::exp(log_ratio);
          const T_ a = adv[i];
          const T_ unclipped = -a * ratio;
          const T_ ratio_clipped = std::min(std::max(ratio, low), high);
          const T_ clipped_term = -a * ratio_clipped;
          T_ loss = std::max(unclipped, clipped_term);
          // d loss / d ratio through the max: the clipped term moves with the ratio only
          // inside [low, high] (clamp's gradient is 1 on the closed interval).
          const T_ in_range = ratio >= low && ratio <= high ? T_(1) : T_(0);
          T_ dloss = -a * (max_grad_first(unclipped, clipped_term) + max_grad_first(clipped_term, unclipped) * in_range);
          bool dual_active = false;
          if (dual_clip.has_value() && a < 0) {
            const T_ bound = -a * T_(*dual_clip);
            dual_active = loss > bound;
            dloss *= max_grad_first(bound, loss);  // d min(loss, bound) / d loss
            loss = std::min(loss, bound);
          }
          const T_ w = m[i];
          loss_sum += w * loss;
          clipped += w * (clipped_term > unclipped ? T_(1) : T_(0));
          dual += w * (dual_active ? T_(1) : T_(0));
          k3 += w * (std::expm1(log_ratio) - log_ratio);
          if (g != nullptr) g[i] = weight[b] * w * dloss * ratio * clamp_grad;
        }
        stats[4 * b + 0] = weight[b] * loss_sum;
        stats[4 * b + 1] = clipped;
        stats[4 * b + 2] = dual;
        stats[4 * b + 3] = k3;
      }
    });
  });
  return {row_stats, grad};
}

std::tuple<at::Tensor, at::Tensor> ppo_value_loss_cpu(
    const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns, const at::Tensor& mask,
    const at::Tensor& row_weight, std::optional<double> clip, bool need_grad) {
  check_ppo_inputs("ppo_value_loss", {values, old_values, returns, mask}, row_weight);
  const int64_t B = values.size(0);
  const int64_t T = values.size(1);
  at::Tensor row_stats = at::zeros({B, 2}, values.options());
  at::Tensor grad = need_grad ? at::empty_like(values) : at::empty({0}, values.options());

  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "rlhf_kernels::ppo_value_loss (CPU)", [&] {
    using T_ = scalar_t;
    const T_* v = values.const_data_ptr<T_>();
    const T_* old = old_values.const_data_ptr<T_>();
    const T_* ret = returns.const_data_ptr<T_>();
    const T_* m = mask.const_data_ptr<T_>();
    const T_* weight = row_weight.const_data_ptr<T_>();
    T_* stats = row_stats.mutable_data_ptr<T_>();
    T_* g = need_grad ? grad.mutable_data_ptr<T_>() : nullptr;
    at::parallel_for(0, B, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        T_ loss_sum = 0, clipped_count = 0;
        for (int64_t i = b * T; i < (b + 1) * T; ++i) {
          const T_ error = v[i] - ret[i];
          const T_ unclipped = error * error;
          T_ loss = T_(0.5) * unclipped;
          T_ dloss = error;  // d (0.5 e^2) / d v
          bool clipped_larger = false;
          if (clip.has_value()) {
            const T_ c = T_(*clip);
            const T_ delta = v[i] - old[i];
            const T_ clipped_error = old[i] + std::min(std::max(delta, -c), c) - ret[i];
            const T_ clipped = clipped_error * clipped_error;
            const T_ delta_grad = std::abs(delta) <= c ? T_(1) : T_(0);
            loss = T_(0.5) * std::max(unclipped, clipped);
            dloss = max_grad_first(unclipped, clipped) * error +
                    max_grad_first(clipped, unclipped) * clipped_error * delta_grad;
            clipped_larger = clipped > unclipped;
          }
          loss_sum += m[i] * loss;
          clipped_count += m[i] * (clipped_larger ? T_(1) : T_(0));
          if (g != nullptr) g[i] = weight[b] * m[i] * dloss;
        }
        stats[2 * b + 0] = weight[b] * loss_sum;
        stats[2 * b + 1] = clipped_count;
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
