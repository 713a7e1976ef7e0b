// Argument checks of the token_logprobs ops shared by every device's kernel; they
// guard direct torch.ops.rlhf_kernels calls (rlhf_kernels/_validation.py gives
// the friendlier errors first). Label ranges are checked by each kernel itself
// (csrc/cpu/logprobs.cpp: check_labels), so no mode that skips the Python checks
// (torch.compile, direct calls) reads or writes out of bounds.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <initializer_list>
#include <optional>

namespace rlhf_kernels {

inline void check_token_logprobs_inputs(const at::Tensor& logits, const at::Tensor& labels, c10::DeviceType device) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "token_logprobs: logits must be [N, V] with V >= 1, got ",
              logits.sizes());
  TORCH_CHECK(logits.is_floating_point(), "token_logprobs: logits must be floating point, got ", logits.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), "token_logprobs: labels must be [N] = [",
              logits.size(0), "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kInt || labels.scalar_type() == at::kLong,
              "token_logprobs: labels must be int32 or int64, got ", labels.scalar_type());
  TORCH_CHECK(logits.device().type() == device && labels.device() == logits.device(),
              "token_logprobs: logits and labels must be on one ", device, " device");
  TORCH_CHECK(logits.is_contiguous() && labels.is_contiguous(), "token_logprobs: logits and labels must be contiguous");
}

// Per-row float tensors (gradients and saved statistics) of the backward: [N],
// the compute dtype of logits (float64 for float64, else float32), contiguous.
inline void check_token_logprobs_row_stats(
    const at::Tensor& logits, std::initializer_list<at::Tensor> rows, const std::optional<at::Tensor>& optional_row) {
  const auto dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto check = [&](const at::Tensor& row) {
    TORCH_CHECK(row.dim() == 1 && row.size(0) == logits.size(0) && row.scalar_type() == dtype &&
                    row.device() == logits.device() && row.is_contiguous(),
                "token_logprobs_backward: per-row tensors must be contiguous [", logits.size(0), "] ", dtype,
                " on ", logits.device(), ", got ", row.sizes(), " ", row.scalar_type());
  };
  for (const auto& row : rows) check(row);
  if (optional_row.has_value()) check(*optional_row);
}

}  // namespace rlhf_kernels
