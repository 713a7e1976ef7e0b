// The GAE reverse scan of one row, shared by the CPU kernel (one row per
// at::parallel_for item) and the CUDA kernel (one row per thread), so the two
// backends cannot drift apart. The recursion, for t = T-1 .. 0 (V_T = 0, A_T = 0):
//   multiply: r_t, V_t first multiplied by mask_t                  (OpenRLHF)
//   delta_t = r_t + gamma * V_{t+1} - V_t
//   A_t     = delta_t + gamma * lam * A_{t+1}
//   carry:   A_t and V_t blended with the carried values by mask_t, so a
//            mask-0 position passes the next value and advantage through   (verl)
//   returns_t = A_t + V_t
#pragma once
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <cstdint>
#include <string_view>

namespace rlhf_kernels {

enum class GaeMaskMode : int { kIgnore = 0, kMultiply = 1, kCarry = 2 };

inline GaeMaskMode parse_gae_mask_mode(std::string_view mode) {
  if (mode == "ignore") return GaeMaskMode::kIgnore;
  if (mode == "multiply") return GaeMaskMode::kMultiply;
  if (mode == "carry") return GaeMaskMode::kCarry;
  TORCH_CHECK(false, "gae: mask_mode must be one of 'ignore', 'multiply', 'carry', got '", mode, "'");
}

// One row of length T. `mask` may be null (all ones). acc_t is the type the
// recursion runs in: double on CPU, float on CUDA.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void gae_scan_row(
    const scalar_t* rewards, const scalar_t* values, const scalar_t* mask,
    scalar_t* advantages, scalar_t* returns, int64_t T,
    acc_t gamma, acc_t lam, GaeMaskMode mode) {
  acc_t next_value = 0;
  acc_t running_advantage = 0;
  for (int64_t t = T - 1; t >= 0; --t) {
    const acc_t m = mask == nullptr ? acc_t(1) : static_cast<acc_t>(mask[t]);
    acc_t r = static_cast<acc_t>(rewards[t]);
    acc_t v = static_cast<acc_t>(values[t]);
    if (mode == GaeMaskMode::kMultiply) {
      r *= m;
      v *= m;
    }
    const acc_t delta = r + gamma * next_value - v;
    const acc_t advantage = delta + gamma * lam * running_advantage;
    if (mode == GaeMaskMode::kCarry) {
      next_value = m * v + (acc_t(1) - m) * next_value;
      running_advantage = m * advantage + (acc_t(1) - m) * running_advantage;
    } else {
      next_value = v;
      running_advantage = advantage;
    }
    advantages[t] = static_cast<scalar_t>(running_advantage);
    returns[t] = static_cast<scalar_t>(running_advantage + v);
  }
}

}  // namespace rlhf_kernels
