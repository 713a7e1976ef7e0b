// CPU kernels for rlhf_kernels::token_logprobs and its backward: rows in
// parallel; each row's transformed logits are staged once in a per-thread fp32
// buffer of V floats, so the max, the sum of exponentials and sum(p z) run as
// plain vectorisable loops over contiguous floats.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../logprobs_checks.h"
#include "../logprobs_transform.h"

namespace rlhf_kernels {
namespace {

// Rows per parallel task: a row is O(V) work, so a few rows amortise the task.
constexpr int64_t kRowGrain = 4;

template <typename acc_t>
LogitTransform<acc_t> make_transform(double temperature, std::optional<double> softcap, double logit_scale) {
  return {static_cast<acc_t>(logit_scale), static_cast<acc_t>(softcap.value_or(0.0)),
          static_cast<acc_t>(1.0 / temperature)};
}

// z[v] = transform(x[v]) into `z`; returns max_v z[v].
template <typename scalar_t, typename acc_t>
acc_t stage_row(const scalar_t* x, int64_t V, const LogitTransform<acc_t>& transform, acc_t* z) {
  acc_t top = -std::numeric_limits<acc_t>::infinity();
  for (int64_t v = 0; v < V; ++v) {
    z[v] = transform(static_cast<acc_t>(x[v]));
    top = std::max(top, z[v]);
  }
  return top;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(
    const at::Tensor& logits, const at::Tensor& labels, double temperature,
    std::optional<double> softcap, double logit_scale, int64_t ignore_index, bool return_entropy) {
  check_token_logprobs_inputs(logits, labels, at::kCPU);
  const int64_t N = logits.size(0);
  const int64_t V = logits.size(1);
  const auto out_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = logits.options().dtype(out_dtype);
  at::Tensor logprobs = at::empty({N}, options);
  at::Tensor entropy = at::empty({N}, options);
  at::Tensor lse = at::empty({N}, options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "rlhf_kernels::token_logprobs (CPU)", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto transform = make_transform<acc_t>(temperature, softcap, logit_scale);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    acc_t* lp_out = logprobs.mutable_data_ptr<acc_t>();
    acc_t* h_out = entropy.mutable_data_ptr<acc_t>();
    acc_t* lse_out = lse.mutable_data_ptr<acc_t>();
    AT_DISPATCH_INDEX_TYPES(labels.scalar_type(), "token_logprobs labels", [&] {
      const index_t* y = labels.const_data_ptr<index_t>();
      at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> z(V);
        for (int64_t n = begin; n < end; ++n) {
          const acc_t top = stage_row(x + n * V, V, transform, z.data());
          acc_t sum_exp = 0, sum_exp_z = 0;
          for (int64_t v = 0; v < V; ++v) {
            const acc_t e = std::exp(z[v] - top);
            sum_exp += e;
            sum_exp_z += e * z[v];
          }
          const acc_t log_normaliser = top + std::log(sum_exp);
          lse_out[n] = log_normaliser;
          const bool valid = static_cast<int64_t>(y[n]) != ignore_index;
          // The label logit is the staged value itself: read exactly, never re-derived.
          lp_out[n] = valid ? z[y[n]] - log_normaliser : acc_t(0);
          h_out[n] = valid && return_entropy ? log_normaliser - sum_exp_z / sum_exp : acc_t(0);
        }
      });
    });
  });
  return {logprobs, entropy, lse};
}

// d x = (g_lp (onehot - p) - g_H p (z - sum p z)) * dz/dx, with sum p z = lse - H.
at::Tensor token_logprobs_backward_cpu(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
    const at::Tensor& entropy, double temperature, std::optional<double> softcap,
    double logit_scale, int64_t ignore_index) {
  check_token_logprobs_inputs(logits, labels, at::kCPU);
  check_token_logprobs_row_stats(logits, {grad_logprobs, lse, entropy}, grad_entropy);
  const int64_t N = logits.size(0);
  const int64_t V = logits.size(1);
  at::Tensor grad_logits = at::empty_like(logits);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "rlhf_kernels::token_logprobs_backward (CPU)", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto transform = make_transform<acc_t>(temperature, softcap, logit_scale);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const acc_t* g_lp = grad_logprobs.const_data_ptr<acc_t>();
    const acc_t* g_h = grad_entropy.has_value() ? grad_entropy->const_data_ptr<acc_t>() : nullptr;
    const acc_t* row_lse = lse.const_data_ptr<acc_t>();
    const acc_t* row_h = entropy.const_data_ptr<acc_t>();
    scalar_t* dx = grad_logits.mutable_data_ptr<scalar_t>();
    AT_DISPATCH_INDEX_TYPES(labels.scalar_type(), "token_logprobs_backward labels", [&] {
      const index_t* y = labels.const_data_ptr<index_t>();
      at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const scalar_t* row = x + n * V;
          scalar_t* grad_row = dx + n * V;
          const bool valid = static_cast<int64_t>(y[n]) != ignore_index;
          if (!valid) {
            std::fill(grad_row, grad_row + V, scalar_t(0));
            continue;
          }
          const acc_t g = g_lp[n];
          const acc_t gh = g_h == nullptr ? acc_t(0) : g_h[n];
          const acc_t mean_z = row_lse[n] - row_h[n];
          for (int64_t v = 0; v < V; ++v) {
            const acc_t xv = static_cast<acc_t>(row[v]);
            const acc_t z = transform(xv);
            const acc_t p = std::exp(z - row_lse[n]);
            acc_t dz = -g * p - gh * p * (z - mean_z);
            if (v == static_cast<int64_t>(y[n])) dz += g;
            grad_row[v] = static_cast<scalar_t>(dz * transform.derivative(xv));
          }
        }
      });
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("token_logprobs", &token_logprobs_cpu);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cpu);
}

}  // namespace rlhf_kernels
