// CPU kernel of rlhf_kernels::grpo_policy_loss: rows in parallel, one pass per row
// computing each token's loss (rlhf_kernels/reference/grpo.py), its gradient (stored,
// so the backward is a scale) and the row's sums. Ties of max/min split the gradient
// in half and clamps pass it on the closed interval, as in csrc/cpu/ppo.cpp, so the
// gradients equal autograd through the reference. An option that is off is +inf.
// Every clamp, max and min keeps NaN as torch's do, and masks are selects: NaN / inf at a
// mask-0 position never reaches the sums or the gradient (0 x inf would be NaN).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "vector_math.h"

namespace rlhf_kernels {
namespace {

constexpr int64_t kRowGrain = 16;
constexpr int kStats = 8;
enum LossCode : int64_t { kClip = 0, kCispo = 1, kSapo = 2, kPg = 3 };
enum KlCode : int64_t { kNoKl = 0, kK1 = 1, kK2 = 2, kK3 = 3, kAbs = 4, kLowVar = 5, kStraightThrough = 8 };

template <typename T>
struct Options {
  T low, high, dual_clip, delta, ratio_clamp, tau_pos, tau_neg, dro_beta, w_low, w_high, kl_coef;
  int64_t loss, kl;
};

// d max(a, b) / d a: 1, 0, or 1/2 on a tie (torch.maximum's convention).
template <typename T>
inline T max_grad_first(T a, T b) { return a > b ? T(1) : (a < b ? T(0) : T(0.5)); }

using vector_math::masked;
using vector_math::max_nan;
using vector_math::min_nan;

// torch.clamp: NaN stays NaN.
template <typename T>
inline T clamp_value(T x, T low, T high) { return min_nan(max_nan(x, low), high); }

template <typename T>
inline T inside(T x, T low, T high) { return (x >= low && x <= high) ? T(1) : T(0); }

// kl(lp, ref) and d kl / d lp (reference.kl's estimators; low_var_kl clamps +-20 inside, +-10 outside).
template <typename T>
inline T kl_token(int64_t code, T lp, T ref, T& slope) {
  const T d = lp - ref;
  T value = 0;
  switch (code & 7) {
    case kK1: value = d; slope = 1; break;
    case kK2: value = T(0.5) * d * d; slope = d; break;
    case kK3: value = std::exp(-d) + d - 1; slope = 1 - std::exp(-d); break;
    case kAbs: value = std::abs(d); slope = d > 0 ? T(1) : (d < 0 ? T(-1) : T(0)); break;
    case kLowVar: {
      const T c = clamp_value(-d, T(-20), T(20));
      const T raw = std::exp(c) - c - 1;
      value = clamp_value(raw, T(-10), T(10));
      slope = -(std::exp(c) - 1) * inside(-d, T(-20), T(20)) * inside(raw, T(-10), T(10));
      break;
    }
    default: slope = 0;
  }
  if (code & kStraightThrough) slope = d;
  return value;
}

// One token: adds to the row sums, returns d(loss * mask) / d logprob before the row weight.
template <typename T>
inline T policy_token(T lp, T old, T a, T m, T isw, T ref, const Options<T>& o, T* sums, T& ratio_max) {
  const T raw = lp - old;
  const T clamp_grad = inside(raw, -o.ratio_clamp, o.ratio_clamp);
  const T log_ratio = clamp_value(raw, -o.ratio_clamp, o.ratio_clamp);
  const T ratio = std::exp(log_ratio);
  T loss = 0, dloss = 0;  // dloss: d loss / d lp
  if (o.loss == kClip) {
    const T first = min_nan(ratio, o.delta);
    const T unclipped = -a * first, clipped = -a * clamp_value(ratio, o.low, o.high);
    loss = max_nan(unclipped, clipped);
    T dratio = -a * (max_grad_first(unclipped, clipped) * (ratio <= o.delta ? T(1) : T(0)) +
                     max_grad_first(clipped, unclipped) * inside(ratio, o.low, o.high));
    if (a < 0) {
      const T bound = -a * o.dual_clip;
      sums[3] += m * (loss > bound ? T(1) : T(0));
      dratio *= max_grad_first(bound, loss);
      loss = min_nan(loss, bound);
    }
    dloss = dratio * ratio * clamp_grad;
  } else if (o.loss == kCispo) {
    const T w = clamp_value(ratio, o.w_low, o.w_high);  // a constant weight (detached)
    loss = -w * a * lp;
    dloss = -w * a;
  } else if (o.loss == kSapo) {
    const T tau = a > 0 ? o.tau_pos : o.tau_neg;
    const T s = T(1) / (T(1) + std::exp(-tau * (ratio - 1)));
    loss = -a * s * (T(4) / tau);
    dloss = -a * T(4) * s * (1 - s) * ratio * clamp_grad;
  } else {  // pg: -A lp + beta / 2 (lp - old)^2; beta 0 (gpg) never reads old (no 0 x inf)
    loss = -a * lp;
    dloss = -a;
    if (o.dro_beta != 0) {
      loss += T(0.5) * o.dro_beta * raw * raw;
      dloss += o.dro_beta * raw;
    }
  }
  loss *= isw;
  dloss *= isw;
  if (o.kl != kNoKl) {
    T slope = 0;
    loss += o.kl_coef * kl_token(o.kl, lp, ref, slope);
    dloss += o.kl_coef * slope;
  }
  sums[0] += masked(m, loss);
  sums[1] += m * ((ratio < o.low && a < 0) ? T(1) : T(0));
  sums[2] += m * ((ratio > o.high && a > 0) ? T(1) : T(0));
  sums[4] += masked(m, -raw);
  sums[5] += masked(m, std::expm1(raw) - raw);
  sums[6] += masked(m, ratio);
  if (m != 0) ratio_max = max_nan(ratio, ratio_max);  // a NaN ratio is the maximum, as torch's amax
  return masked(m, dloss);
}

std::tuple<at::Tensor, at::Tensor> grpo_policy_loss_cpu(
    const at::Tensor& logprobs, const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& mask,
    const at::Tensor& is_weights, const at::Tensor& ref_logprobs, const at::Tensor& row_weight, int64_t loss_code,
    int64_t kl_code, at::ArrayRef<double> params, bool need_grad) {
  TORCH_CHECK(logprobs.dim() == 2, "grpo_policy_loss: inputs must be [B, T], got ", logprobs.sizes());
  TORCH_CHECK(logprobs.scalar_type() == at::kFloat || logprobs.scalar_type() == at::kDouble,
              "grpo_policy_loss: inputs must be float32 or float64, got ", logprobs.scalar_type());
  for (const auto& x : {old_logprobs, advantages, mask}) {
    TORCH_CHECK(x.sizes() == logprobs.sizes() && x.scalar_type() == logprobs.scalar_type() && x.is_contiguous() &&
                    logprobs.is_contiguous() && x.device().is_cpu(),
                "grpo_policy_loss: every input must be a contiguous CPU ", logprobs.scalar_type(), " tensor of shape ",
                logprobs.sizes());
  }
  for (const auto& x : {is_weights, ref_logprobs}) {
    TORCH_CHECK(x.numel() == 0 || (x.sizes() == logprobs.sizes() && x.scalar_type() == logprobs.scalar_type() &&
                                   x.is_contiguous()),
                "grpo_policy_loss: is_weights / ref_logprobs must be empty or like logprobs");
  }
  TORCH_CHECK(params.size() == 12, "grpo_policy_loss: params must hold 12 numbers, got ", params.size());
  TORCH_CHECK(loss_code >= kClip && loss_code <= kPg, "grpo_policy_loss: bad loss_code ", loss_code);
  TORCH_CHECK(kl_code == kNoKl || ((kl_code & 7) >= kK1 && (kl_code & 7) <= kLowVar),
              "grpo_policy_loss: bad kl_code ", kl_code);
  // An absent tensor is empty; a present one at B = 0 is empty too, hence the shape.
  TORCH_CHECK(kl_code == kNoKl || ref_logprobs.sizes() == logprobs.sizes(),
              "grpo_policy_loss: a KL term needs ref_logprobs");
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  TORCH_CHECK(row_weight.dim() == 1 && row_weight.size(0) == B && row_weight.scalar_type() == logprobs.scalar_type(),
              "grpo_policy_loss: row_weight must be [B] of the inputs' dtype");
  at::Tensor row_stats = at::zeros({B, kStats}, logprobs.options());
  at::Tensor grad = need_grad ? at::empty_like(logprobs) : at::empty({0}, logprobs.options());
  AT_DISPATCH_FLOATING_TYPES(logprobs.scalar_type(), "rlhf_kernels::grpo_policy_loss (CPU)", [&] {
    using S = scalar_t;
    const Options<S> o{S(params[0]), S(params[1]), S(params[2]), S(params[3]), S(params[4]),  S(params[5]),
                       S(params[6]), S(params[7]), S(params[8]), S(params[9]), S(params[10]), loss_code, kl_code};
    const S* lp = logprobs.const_data_ptr<S>();
    const S* old = old_logprobs.const_data_ptr<S>();
    const S* adv = advantages.contiguous().const_data_ptr<S>();
    const S* m = mask.const_data_ptr<S>();
    const S* isw = is_weights.numel() ? is_weights.const_data_ptr<S>() : nullptr;
    const S* ref = ref_logprobs.numel() ? ref_logprobs.const_data_ptr<S>() : nullptr;
    const S* weight = row_weight.const_data_ptr<S>();
    S* stats = row_stats.mutable_data_ptr<S>();
    S* g = need_grad ? grad.mutable_data_ptr<S>() : nullptr;
    at::parallel_for(0, B, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        S sums[kStats] = {};
        S ratio_max = 0;
        for (int64_t t = b * T; t < (b + 1) * T; ++t) {
          const S d = policy_token(lp[t], old[t], adv[t], m[t], isw ? isw[t] : S(1), ref ? ref[t] : S(0), o, sums,
                                   ratio_max);
          if (g != nullptr) g[t] = weight[b] * d;
        }
        sums[0] *= weight[b];
        sums[7] = ratio_max;
        std::copy(sums, sums + kStats, stats + kStats * b);
      }
    });
  });
  return {row_stats, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("grpo_policy_loss", &grpo_policy_loss_cpu); }

}  // namespace rlhf_kernels
