// The GAE reverse scan as affine maps, shared by the CPU kernel (sequential per row
// or per row chunk) and the CUDA kernel (per thread segment, then warp-shuffle and
// block scans of the maps), so the backends cannot drift apart. The recursion, for
// t = T-1 .. 0 (V_T = 0, A_T = 0):
//   multiply: r_t, V_t first multiplied by mask_t                  (OpenRLHF)
//   delta_t = r_t + gamma * NV_{t+1} - V_t
//   A_t     = delta_t + gamma * lam * A_{t+1}
//   carry:   NV_t and A_t blended with the carried values by mask_t, so a
//            mask-0 position passes the next value and advantage through   (verl)
//            (otherwise NV_t = V_t)
//   returns_t = A_t + V_t
// In the state s_t = (NV_t, A_t) each step is an affine map s_t = f_t(s_{t+1}) with
// a lower-triangular matrix, so any run of steps composes into one map of the same
// form (5 numbers): chunks of a row can be reduced independently and chained.
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

template <typename acc_t>
struct GaeState {
  acc_t next_value;  // NV: the value the step before sees as V_{t+1}
  acc_t advantage;   // A
};

// s -> (p NV + x, q NV + u A + y).
template <typename acc_t>
struct GaeMap {
  acc_t p, q, u, x, y;
};

template <typename acc_t>
C10_HOST_DEVICE inline GaeMap<acc_t> gae_identity() {
  return {acc_t(1), acc_t(0), acc_t(1), acc_t(0), acc_t(0)};
}

// earlier o later: the map of a run of steps followed (in t) by another run.
template <typename acc_t>
C10_HOST_DEVICE inline GaeMap<acc_t> gae_compose(const GaeMap<acc_t>& earlier, const GaeMap<acc_t>& later) {
  return {earlier.p * later.p, earlier.q * later.p + earlier.u * later.q, earlier.u * later.u,
          earlier.p * later.x + earlier.x, earlier.q * later.x + earlier.u * later.y + earlier.y};
}

template <typename acc_t>
C10_HOST_DEVICE inline GaeState<acc_t> gae_apply(const GaeMap<acc_t>& f, const GaeState<acc_t>& s) {
  // u A + (q NV + y): the advantage's dependency chain is one multiply and one add.
  return {f.p * s.next_value + f.x, f.u * s.advantage + (f.q * s.next_value + f.y)};
}

// One position's inputs as the recursion sees them (mask folded in per mode). The mask
// is folded in by selects, not products: a mask-0 position's reward and value never
// enter the scan ("carry" leaves them unread, "multiply" makes them 0), so NaN / inf
// there cannot reach a valid position (0 * inf is NaN).
template <typename acc_t>
struct GaeInput {
  acc_t reward, value, weight;  // weight: mask_t in carry mode, else 1
  acc_t return_value;           // what returns_t adds to A_t (the reference's V_t)
};

template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline GaeInput<acc_t> gae_input(
    const scalar_t* rewards, const scalar_t* values, const scalar_t* mask, int64_t t, GaeMaskMode mode) {
  const acc_t m = mask == nullptr ? acc_t(1) : static_cast<acc_t>(mask[t]);
  const acc_t r = static_cast<acc_t>(rewards[t]);
  const acc_t v = static_cast<acc_t>(values[t]);
  const bool live = m != acc_t(0);
  if (mode == GaeMaskMode::kMultiply) {
    const acc_t mv = live ? v * m : acc_t(0);
    return {live ? r * m : acc_t(0), mv, acc_t(1), mv};
  }
  if (mode == GaeMaskMode::kCarry) return {live ? r : acc_t(0), live ? v : acc_t(0), m, v};
  return {r, v, acc_t(1), v};
}

// f_t: NV_t = (1 - m) NV + m V_t; A_t = m gamma NV + (m gamma lam + 1 - m) A + m (r_t - V_t).
template <typename acc_t>
C10_HOST_DEVICE inline GaeMap<acc_t> gae_step(const GaeInput<acc_t>& in, acc_t gamma, acc_t lam) {
  const acc_t m = in.weight;
  return {acc_t(1) - m, m * gamma, m * gamma * lam + (acc_t(1) - m), m * in.value, m * (in.reward - in.value)};
}

// The composed map of positions [begin, end) (identity when empty).
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline GaeMap<acc_t> gae_segment_map(
    const scalar_t* rewards, const scalar_t* values, const scalar_t* mask, int64_t begin, int64_t end,
    acc_t gamma, acc_t lam, GaeMaskMode mode) {
  GaeMap<acc_t> f = gae_identity<acc_t>();
  for (int64_t t = end - 1; t >= begin; --t) {
    f = gae_compose(gae_step(gae_input<scalar_t, acc_t>(rewards, values, mask, t, mode), gamma, lam), f);
  }
  return f;
}

// Scans positions [begin, end) from the state after `end`, writing advantages and
// returns; returns the state at `begin` (the carry into the positions before it).
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline GaeState<acc_t> gae_scan_segment(
    const scalar_t* rewards, const scalar_t* values, const scalar_t* mask, scalar_t* advantages,
    scalar_t* returns, int64_t begin, int64_t end, GaeState<acc_t> state, acc_t gamma, acc_t lam,
    GaeMaskMode mode) {
  for (int64_t t = end - 1; t >= begin; --t) {
    const GaeInput<acc_t> in = gae_input<scalar_t, acc_t>(rewards, values, mask, t, mode);
    state = gae_apply(gae_step(in, gamma, lam), state);
    advantages[t] = static_cast<scalar_t>(state.advantage);
    returns[t] = static_cast<scalar_t>(state.advantage + in.return_value);
  }
  return state;
}

}  // namespace rlhf_kernels
