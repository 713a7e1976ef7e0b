// Argument checks of rlhf_kernels::gae shared by every device's kernel. The
// Python layer (rlhf_kernels/_validation.py) gives friendlier errors first;
// these guard direct torch.ops.rlhf_kernels.gae calls from reading out of bounds.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>

namespace rlhf_kernels {

inline void check_gae_inputs(
    const at::Tensor& rewards, const at::Tensor& values, const std::optional<at::Tensor>& mask,
    c10::DeviceType device) {
  TORCH_CHECK(rewards.dim() == 2, "gae: rewards must be [B, T], got ", rewards.sizes());
  TORCH_CHECK(values.sizes() == rewards.sizes(), "gae: values must have the shape of rewards ",
              rewards.sizes(), ", got ", values.sizes());
  TORCH_CHECK(rewards.scalar_type() == at::kFloat || rewards.scalar_type() == at::kDouble,
              "gae: rewards must be float32 or float64, got ", rewards.scalar_type());
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "gae: values must have dtype ",
              rewards.scalar_type(), ", got ", values.scalar_type());
  TORCH_CHECK(rewards.device().type() == device && values.device() == rewards.device(),
              "gae: rewards and values must be on one ", device, " device");
  TORCH_CHECK(rewards.is_contiguous() && values.is_contiguous(),
              "gae: rewards and values must be contiguous");
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == rewards.sizes(), "gae: mask must have the shape of rewards ",
                rewards.sizes(), ", got ", mask->sizes());
    TORCH_CHECK(mask->scalar_type() == rewards.scalar_type(), "gae: mask must have dtype ",
                rewards.scalar_type(), ", got ", mask->scalar_type());
    TORCH_CHECK(mask->device() == rewards.device(), "gae: mask must be on ", rewards.device());
    TORCH_CHECK(mask->is_contiguous(), "gae: mask must be contiguous");
  }
}

}  // namespace rlhf_kernels
