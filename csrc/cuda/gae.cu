// CUDA kernel for rlhf_kernels::gae: one thread per row running the shared
// sequential scan (csrc/gae_scan.h) in float32 (float64 for float64 inputs).
// Exact to the CPU kernel by construction; its reads are strided by T across a
// warp, so it is bandwidth-poor for long rows: the chunked warp-shuffle scan of
// the RL-math kernels issue is meant to replace this launch, not the scan's math.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../gae_scan.h"
#include "../gae_checks.h"

namespace rlhf_kernels {
namespace {

constexpr int kThreadsPerBlock = 128;

template <typename scalar_t>
__global__ void gae_rows_kernel(
    const scalar_t* __restrict__ rewards, const scalar_t* __restrict__ values,
    const scalar_t* __restrict__ mask, scalar_t* __restrict__ advantages,
    scalar_t* __restrict__ returns, int64_t B, int64_t T, double gamma, double lam,
    GaeMaskMode mode) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= B) return;
  const int64_t offset = row * T;
  gae_scan_row<scalar_t, acc_t>(
      rewards + offset, values + offset, mask == nullptr ? nullptr : mask + offset,
      advantages + offset, returns + offset, T, static_cast<acc_t>(gamma),
      static_cast<acc_t>(lam), mode);
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(
    const at::Tensor& rewards, const at::Tensor& values, const std::optional<at::Tensor>& mask,
    double gamma, double lam, c10::string_view mask_mode) {
  check_gae_inputs(rewards, values, mask, at::kCUDA);
  const GaeMaskMode mode = parse_gae_mask_mode(std::string_view(mask_mode.data(), mask_mode.size()));
  const c10::cuda::CUDAGuard device_guard(rewards.device());
  const int64_t B = rewards.size(0);
  const int64_t T = rewards.size(1);
  at::Tensor advantages = at::empty_like(rewards);
  at::Tensor returns = at::empty_like(rewards);
  if (rewards.numel() == 0) return {advantages, returns};

  const unsigned blocks = static_cast<unsigned>((B + kThreadsPerBlock - 1) / kThreadsPerBlock);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "rlhf_kernels::gae (CUDA)", [&] {
    gae_rows_kernel<scalar_t><<<blocks, kThreadsPerBlock, 0, stream>>>(
        rewards.const_data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(),
        mask.has_value() ? mask->const_data_ptr<scalar_t>() : nullptr,
        advantages.mutable_data_ptr<scalar_t>(), returns.mutable_data_ptr<scalar_t>(), B, T,
        gamma, lam, mode);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {advantages, returns};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("gae", &gae_cuda);
}

}  // namespace rlhf_kernels
