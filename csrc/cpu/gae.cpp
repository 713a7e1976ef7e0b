// CPU kernel for rlhf_kernels::gae: rows in parallel, each row one sequential
// reverse scan in double (float64 accumulation keeps T = 32k rows within fp32
// rounding of the exact recursion).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../gae_scan.h"
#include "../gae_checks.h"

namespace rlhf_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor> gae_cpu(
    const at::Tensor& rewards, const at::Tensor& values, const std::optional<at::Tensor>& mask,
    double gamma, double lam, c10::string_view mask_mode) {
  check_gae_inputs(rewards, values, mask, at::kCPU);
  const GaeMaskMode mode = parse_gae_mask_mode(std::string_view(mask_mode.data(), mask_mode.size()));
  const int64_t B = rewards.size(0);
  const int64_t T = rewards.size(1);
  at::Tensor advantages = at::empty_like(rewards);
  at::Tensor returns = at::empty_like(rewards);
  if (rewards.numel() == 0) return {advantages, returns};

  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "rlhf_kernels::gae (CPU)", [&] {
    const scalar_t* r = rewards.const_data_ptr<scalar_t>();
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const scalar_t* m = mask.has_value() ? mask->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* adv = advantages.mutable_data_ptr<scalar_t>();
    scalar_t* ret = returns.mutable_data_ptr<scalar_t>();
    // A row is O(T) sequential work; one row per task is already coarse
    // enough, so the grain only bounds the task count for tiny T.
    const int64_t grain = std::max<int64_t>(1, 4096 / T);
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t offset = b * T;
        gae_scan_row<scalar_t, double>(
            r + offset, v + offset, m == nullptr ? nullptr : m + offset, adv + offset,
            ret + offset, T, gamma, lam, mode);
      }
    });
  });
  return {advantages, returns};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("gae", &gae_cpu);
}

}  // namespace rlhf_kernels
