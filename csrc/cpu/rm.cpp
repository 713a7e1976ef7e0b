// CPU kernels of the reward-model losses: rlhf_kernels::bradley_terry_loss
// (elementwise -logsigmoid(chosen - rejected - margin) and its slope) and
// ranking_loss (per prompt, the mean of -logsigmoid(r_i - r_j) over the K^2 ordered
// pairs with rank_i < rank_j, and its gradient by each reward). The means across
// elements / prompts are taken by rlhf_kernels/ops/rm.py.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "threading.h"

namespace rlhf_kernels {
namespace {

// -logsigmoid(x) = log1p(exp(-|x|)) - min(x, 0), and its derivative -sigmoid(-x).
template <typename T>
T neg_log_sigmoid(T x, T& slope) {
  const T e = std::exp(-std::abs(x));
  slope = x >= 0 ? -e / (T(1) + e) : T(-1) / (T(1) + e);
  return std::log1p(e) - std::min(x, T(0));
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK((t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) && t.is_contiguous() &&
                  t.device().is_cpu(),
              op, ": ", name, " must be a contiguous float32/float64 CPU tensor");
}

// losses and grad (d loss / d chosen; empty unless need_grad) of chosen's shape.
std::tuple<at::Tensor, at::Tensor> bradley_terry_loss_cpu(
    const at::Tensor& chosen, const at::Tensor& rejected, const std::optional<at::Tensor>& margin, bool need_grad) {
  check_float("bradley_terry_loss", "chosen_rewards", chosen);
  check_float("bradley_terry_loss", "rejected_rewards", rejected);
  TORCH_CHECK(rejected.sizes() == chosen.sizes() && rejected.scalar_type() == chosen.scalar_type(),
              "bradley_terry_loss: rejected_rewards must match chosen_rewards");
  if (margin.has_value()) {
    check_float("bradley_terry_loss", "margin", *margin);
    TORCH_CHECK(margin->sizes() == chosen.sizes() && margin->scalar_type() == chosen.scalar_type(),
                "bradley_terry_loss: margin must match chosen_rewards");
  }
  at::Tensor losses = at::empty_like(chosen);
  at::Tensor grad = need_grad ? at::empty_like(chosen) : at::empty({0}, chosen.options());
  AT_DISPATCH_FLOATING_TYPES(chosen.scalar_type(), "rlhf_kernels::bradley_terry_loss (CPU)", [&] {
    const scalar_t* c = chosen.const_data_ptr<scalar_t>();
    const scalar_t* r = rejected.const_data_ptr<scalar_t>();
    const scalar_t* m = margin.has_value() ? margin->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = losses.mutable_data_ptr<scalar_t>();
    scalar_t* g = need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    // Per element: chosen, rejected (and margin) read; loss (and slope) written.
    const int64_t element_bytes = (3 + (m ? 1 : 0) + (g ? 1 : 0)) * int64_t(sizeof(scalar_t));
    const int64_t n = chosen.numel();
    const threading::Plan plan = threading::plan(n * element_bytes, threading::kBradleyTerry);
    threading::parallel_for_elements(plan, n, element_bytes, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t slope;
        out[i] = neg_log_sigmoid(c[i] - r[i] - (m == nullptr ? scalar_t(0) : m[i]), slope);
        if (g != nullptr) g[i] = slope;
      }
    });
  });
  return {losses, grad};
}

// rewards, ranks [B, K] of one float dtype. Returns row_loss [B] (0 for a prompt with
// no ranked pair), row_pairs [B] (its number of pairs) and grad [B, K] = d row_loss / d r.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ranking_loss_cpu(
    const at::Tensor& rewards, const at::Tensor& ranks, bool need_grad) {
  check_float("ranking_loss", "rewards", rewards);
  check_float("ranking_loss", "ranks", ranks);
  TORCH_CHECK(rewards.dim() == 2 && ranks.sizes() == rewards.sizes() && ranks.scalar_type() == rewards.scalar_type(),
              "ranking_loss: rewards and ranks must be [B, K] of one dtype");
  const int64_t B = rewards.size(0);
  const int64_t K = rewards.size(1);
  at::Tensor row_loss = at::empty({B}, rewards.options());
  at::Tensor row_pairs = at::empty({B}, rewards.options());
  at::Tensor grad = need_grad ? at::empty_like(rewards) : at::empty({0}, rewards.options());
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "rlhf_kernels::ranking_loss (CPU)", [&] {
    const scalar_t* r = rewards.const_data_ptr<scalar_t>();
    const scalar_t* rank = ranks.const_data_ptr<scalar_t>();
    scalar_t* loss = row_loss.mutable_data_ptr<scalar_t>();
    scalar_t* pairs = row_pairs.mutable_data_ptr<scalar_t>();
    scalar_t* g = need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    // Work per prompt: its K^2 ordered pairs, counted as one element each (the inputs
    // are only 2K + K elements; the pairs are the cost).
    const int64_t prompt_bytes = K * K * int64_t(sizeof(scalar_t));
    const threading::Plan plan = threading::plan(B * prompt_bytes, threading::kRanking);
    threading::parallel_for(plan, 0, B, prompt_bytes, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* rb = r + b * K;
        const scalar_t* kb = rank + b * K;
        scalar_t* gb = g == nullptr ? nullptr : g + b * K;
        if (gb != nullptr) std::fill(gb, gb + K, scalar_t(0));
        scalar_t total = 0, count = 0;
        for (int64_t i = 0; i < K; ++i) {
          for (int64_t j = 0; j < K; ++j) {
            if (!(kb[i] < kb[j])) continue;  // i must be ranked above j; ties are skipped
            scalar_t slope;
            total += neg_log_sigmoid(rb[i] - rb[j], slope);
            count += 1;
            if (gb != nullptr) {
              gb[i] += slope;
              gb[j] -= slope;
            }
          }
        }
        const scalar_t scale = count > 0 ? scalar_t(1) / count : scalar_t(0);
        loss[b] = total * scale;
        pairs[b] = count;
        if (gb != nullptr) {
          for (int64_t k = 0; k < K; ++k) gb[k] *= scale;
        }
      }
    });
  });
  return {row_loss, row_pairs, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("bradley_terry_loss", &bradley_terry_loss_cpu);
  m.impl("ranking_loss", &ranking_loss_cpu);
}

}  // namespace rlhf_kernels
