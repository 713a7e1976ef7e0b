// CPU kernel of rlhf_kernels::grpo_policy_loss: rows in parallel, one pass per row
// computing each token's loss (rlhf_kernels/reference/grpo.py), its gradient (stored,
// so the backward is a scale) and the row's sums. The loss type and the KL estimator are
// template parameters and every per-token step is a select, so each (loss, estimator)
// pair is a branch-free loop that GCC vectorises (fp32: vector_math's exp, 16 lane
// accumulators, AVX-512 / AVX2 clones; fp64: the same template with std::exp), as in
// ppo.cpp and kl.cpp. Ties of max/min split the gradient in half and clamps pass it on
// the closed interval, as in csrc/cpu/ppo.cpp, so the gradients equal autograd through
// the reference. An option that is off is +inf. Every clamp, max and min keeps NaN as
// torch's do, and masks are selects: NaN / inf at a mask-0 position never reaches the
// sums or the gradient (0 x inf would be NaN).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "threading.h"
#include "vector_math.h"

namespace rlhf_kernels {
namespace {

constexpr int kStats = 8;
constexpr int kLanes = vector_math::kLanes;
// Threading: csrc/cpu/threading.h's policy (serial below the size, 64 KiB tasks above,
// serial while the machine is busy) with ppo_policy_loss's thresholds: the same row
// loop shape (4-6 [B, T] streams and the gradient), not measured separately.
constexpr threading::Thresholds kGrpoPolicy = threading::kPpoPolicy;
enum LossCode : int64_t { kClip = 0, kCispo = 1, kSapo = 2, kPg = 3 };
// kl_code: estimator (1..5) + kStraightThrough (verl's "+": k2's gradient) + kCorrected
// (TRL's use_bias_correction_kl: the KL term times the ratio).
enum KlCode : int64_t { kNoKl = 0, kK1 = 1, kK2 = 2, kK3 = 3, kAbs = 4, kLowVar = 5, kStraightThrough = 8, kCorrected = 16 };

template <typename T>
struct Options {
  T low, high, dual_clip, delta, ratio_clamp, tau_pos, tau_neg, dro_beta, w_low, w_high, kl_coef;
  bool straight_through, corrected;
  T ratio_at_high, ratio_at_low;  // exp(+-ratio_clamp), by the kernel's own exp
};

RLHF_INLINE float exp_of(float x) { return vector_math::exp(x); }
RLHF_INLINE double exp_of(double x) { return std::exp(x); }
RLHF_INLINE float em1mx(float x) { return vector_math::exp_minus_one_minus_x(x); }
RLHF_INLINE double em1mx(double x) { return vector_math::exp_minus_one_minus_x(x); }
// em1mx(x) given e = exp_of(x), the same bits without a second exp (fp32:
// vector_math::exp_minus_one_minus_x's series below |x| = 0.5, e - 1 - x above).
RLHF_INLINE float em1mx_given(float x, float e) {
  float s = 1.0f / 3628800;
  s = s * x + 1.0f / 362880;
  s = s * x + 1.0f / 40320;
  s = s * x + 1.0f / 5040;
  s = s * x + 1.0f / 720;
  s = s * x + 1.0f / 120;
  s = s * x + 1.0f / 24;
  s = s * x + 1.0f / 6;
  s = s * x + 0.5f;
  const float series = s * x * x;
  const float direct = e - 1.0f - x;
  const float value = (x < 0.0f ? -x : x) < 0.5f ? series : direct;
  return x == std::numeric_limits<float>::infinity() ? x : value;
}
RLHF_INLINE double em1mx_given(double x, double) { return vector_math::exp_minus_one_minus_x(x); }
// Branch-free selects. `condition ? a : b` with an expensive a that only one side needs
// (a ratio read only by a masked sum) is turned into a branch by GCC's code sinking, and
// a branch stops the vectoriser ("control flow in loop"): these pick between two values
// already computed with bit masks, and the conditions combine with & and |, never the
// short-circuit && and ||.
template <typename T>
struct BitsOf;
template <>
struct BitsOf<float> { using type = uint32_t; };
template <>
struct BitsOf<double> { using type = uint64_t; };

template <typename T>
RLHF_INLINE T select(bool condition, T a, T b) {
  using U = typename BitsOf<T>::type;
  U x, y;
  std::memcpy(&x, &a, sizeof(T));
  std::memcpy(&y, &b, sizeof(T));
  const U keep = condition ? ~U(0) : U(0);
  const U z = (x & keep) | (y & ~keep);
  T out;
  std::memcpy(&out, &z, sizeof(T));
  return out;
}
// m * x where m != 0, else 0 (vector_math::masked, branch-free): NaN / inf at a mask-0
// position never contributes (0 * inf would be NaN).
template <typename T>
RLHF_INLINE T masked(T m, T x) { return select(m != T(0), m * x, T(0)); }
// max / min that propagate a NaN in a as torch.maximum / torch.minimum do; b is a bound
// (never NaN) or handled by the caller. Written !(a <= b): GCC does not if-convert the
// (a > b) | (a != a) of vector_math's.
template <typename T>
RLHF_INLINE T max_nan(T a, T b) { return select(!(a <= b), a, b); }
template <typename T>
RLHF_INLINE T min_nan(T a, T b) { return select(!(a >= b), a, b); }
// The same with a NaN in either argument kept.
template <typename T>
RLHF_INLINE T max_nan2(T a, T b) { return select(b != b, b, max_nan(a, b)); }
template <typename T>
RLHF_INLINE T min_nan2(T a, T b) { return select(b != b, b, min_nan(a, b)); }
// d max(a, b) / d a: 1, 0, or 1/2 on a tie (torch.maximum's convention).
template <typename T>
RLHF_INLINE T max_grad_first(T a, T b) { return select(a > b, T(1), select(a < b, T(0), T(0.5))); }
// torch.clamp: NaN stays NaN.
template <typename T>
RLHF_INLINE T clamp_value(T x, T low, T high) { return min_nan(max_nan(x, low), high); }
template <typename T>
RLHF_INLINE T inside(T x, T low, T high) { return select((x >= low) & (x <= high), T(1), T(0)); }

// kl(lp, ref) and d kl / d lp of reference.kl's estimators (k3 and low_var_kl without the
// cancellation of exp(x) - 1 - x near 0, as csrc/cpu/kl.cpp; low_var_kl clamps +-20
// inside, +-10 outside).
template <typename T, int64_t E>
RLHF_INLINE T kl_token(T lp, T ref, T& slope) {
  const T d = lp - ref;
  T value;
  if constexpr (E == kK1) {
    value = d;
    slope = 1;
  } else if constexpr (E == kK2) {
    value = T(0.5) * d * d;
    slope = d;
  } else if constexpr (E == kK3) {
    value = em1mx(-d);
    slope = select(d == std::numeric_limits<T>::infinity(), T(1), d - value);  // 1 - exp(-d)
  } else if constexpr (E == kAbs) {
    value = d < T(0) ? -d : d;
    slope = select(d > T(0), T(1), select(d < T(0), T(-1), T(0)));
  } else {  // low_var_kl
    const T c = clamp_value(-d, T(-20), T(20));
    const T raw = em1mx(c);  // exp(c) - c - 1
    value = clamp_value(raw, T(-10), T(10));
    slope = -(c + raw) * inside(-d, T(-20), T(20)) * inside(raw, T(-10), T(10));  // c + raw = exp(c) - 1
  }
  return value;
}

// The row sums, kLanes independent accumulators each (a single running sum would be a
// serial dependency chain the vectoriser may not reorder).
template <typename T>
struct Lanes {
  T loss[kLanes] = {}, low[kLanes] = {}, high[kLanes] = {}, dual[kLanes] = {}, k1[kLanes] = {}, k3[kLanes] = {},
    ratio[kLanes] = {}, ratio_max[kLanes] = {};
};

// One token into lane l: adds to the row sums, returns d(loss * mask) / d logprob before
// the row weight.
template <typename T, int64_t LOSS, int64_t KL>
RLHF_INLINE T policy_token(T lp, T old, T a, T m, T isw, T ref, const Options<T>& o, Lanes<T>& s, int l) {
  const T raw = lp - old;
  const T clamp_grad = inside(raw, -o.ratio_clamp, o.ratio_clamp);
  // exp(clamp(raw, +-c)) from the one exp of raw (also the approx_kl statistic's).
  const T e = exp_of(raw);
  const T ratio = select(raw > o.ratio_clamp, o.ratio_at_high, select(raw < -o.ratio_clamp, o.ratio_at_low, e));
  T loss, dloss;  // dloss: d loss / d lp
  if constexpr (LOSS == kClip) {
    const T first = min_nan(ratio, o.delta);
    const T unclipped = -a * first, clipped = -a * clamp_value(ratio, o.low, o.high);
    loss = max_nan2(unclipped, clipped);
    T dratio = -a * (max_grad_first(unclipped, clipped) * select(ratio <= o.delta, T(1), T(0)) +
                     max_grad_first(clipped, unclipped) * inside(ratio, o.low, o.high));
    // Dual clip, for negative advantages only: loss = min(loss, -a c).
    const T bound = select(a < T(0), -a * o.dual_clip, std::numeric_limits<T>::infinity());
    s.dual[l] += m * select(loss > bound, T(1), T(0));
    dratio *= max_grad_first(bound, loss);
    loss = min_nan2(loss, bound);
    dloss = dratio * ratio * clamp_grad;
  } else if constexpr (LOSS == kCispo) {
    const T w = clamp_value(ratio, o.w_low, o.w_high);  // a constant weight (detached)
    loss = -w * a * lp;
    dloss = -w * a;
  } else if constexpr (LOSS == kSapo) {
    const T tau = select(a > T(0), o.tau_pos, o.tau_neg);
    const T sig = T(1) / (T(1) + exp_of(-tau * (ratio - T(1))));
    loss = -a * sig * (T(4) / tau);
    dloss = -a * T(4) * sig * (T(1) - sig) * ratio * clamp_grad;
  } else {  // pg: -A lp + beta / 2 (lp - old)^2; beta 0 (gpg) never reads old (no 0 x inf)
    const bool dro = o.dro_beta != T(0);
    loss = -a * lp + select(dro, T(0.5) * o.dro_beta * raw * raw, T(0));
    dloss = -a + select(dro, o.dro_beta * raw, T(0));
  }
  loss *= isw;
  dloss *= isw;
  if constexpr (KL != kNoKl) {
    T slope;
    const T kl = kl_token<T, KL>(lp, ref, slope);
    slope = select(o.straight_through, lp - ref, slope);
    // kl_is_corrected: kl r, derivative kl' r + kl r' (r' = r where the log-ratio clamp passes)
    loss += o.kl_coef * select(o.corrected, kl * ratio, kl);
    dloss += o.kl_coef * select(o.corrected, (slope + kl * clamp_grad) * ratio, slope);
  }
  s.loss[l] += masked(m, loss);
  s.low[l] += m * select((ratio < o.low) & (a < T(0)), T(1), T(0));
  s.high[l] += m * select((ratio > o.high) & (a > T(0)), T(1), T(0));
  s.k1[l] += masked(m, -raw);
  s.k3[l] += masked(m, em1mx_given(raw, e));
  s.ratio[l] += masked(m, ratio);
  // A NaN ratio is the maximum, as torch's amax; a mask-0 position counts as 0 (ratios are
  // >= 0), never its ratio: the reference's amax of where(mask, ratio, 0).
  s.ratio_max[l] = max_nan2(select(m != T(0), ratio, T(0)), s.ratio_max[l]);
  return masked(m, dloss);
}

// One row of n tokens: the gradient (times the row weight) into grad, the row's 8 sums
// into stats. isw: the row's importance weights (a row of ones when absent).
template <typename T, int64_t LOSS, int64_t KL>
RLHF_INLINE void policy_row(const T* lp, const T* old, const T* adv, const T* m, const T* isw, const T* ref,
                            int64_t n, T row_weight, const Options<T>& o, T* grad, T* stats) {
  Lanes<T> s;
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T r = KL != kNoKl ? ref[t + l] : T(0);
      grad[t + l] = row_weight * policy_token<T, LOSS, KL>(lp[t + l], old[t + l], adv[t + l], m[t + l], isw[t + l],
                                                           r, o, s, l);
    }
  }
  for (; t < n; ++t) {
    const T r = KL != kNoKl ? ref[t] : T(0);
    grad[t] = row_weight * policy_token<T, LOSS, KL>(lp[t], old[t], adv[t], m[t], isw[t], r, o, s, 0);
  }
  T sums[kStats] = {};
  T top = 0;
  for (int l = 0; l < kLanes; ++l) {
    sums[0] += s.loss[l];
    sums[1] += s.low[l];
    sums[2] += s.high[l];
    sums[3] += s.dual[l];
    sums[4] += s.k1[l];
    sums[5] += s.k3[l];
    sums[6] += s.ratio[l];
    top = max_nan2(s.ratio_max[l], top);
  }
  stats[0] = row_weight * sums[0];
  std::copy(sums + 1, sums + 7, stats + 1);
  stats[7] = top;
}

// Every (loss, estimator) pair, picked per row; each case is one branch-free loop.
template <typename T>
RLHF_INLINE void policy_row_any(int64_t loss, int64_t kl, const T* lp, const T* old, const T* adv, const T* m,
                                const T* isw, const T* ref, int64_t n, T row_weight, const Options<T>& o, T* grad,
                                T* stats) {
#define RLHF_GRPO_ROW(L, K) return policy_row<T, L, K>(lp, old, adv, m, isw, ref, n, row_weight, o, grad, stats)
#define RLHF_GRPO_KL(L)                   \
  switch (kl) {                           \
    case kK1: RLHF_GRPO_ROW(L, kK1);      \
    case kK2: RLHF_GRPO_ROW(L, kK2);      \
    case kK3: RLHF_GRPO_ROW(L, kK3);      \
    case kAbs: RLHF_GRPO_ROW(L, kAbs);    \
    case kLowVar: RLHF_GRPO_ROW(L, kLowVar); \
    default: RLHF_GRPO_ROW(L, kNoKl);     \
  }
  switch (loss) {
    case kClip: RLHF_GRPO_KL(kClip);
    case kCispo: RLHF_GRPO_KL(kCispo);
    case kSapo: RLHF_GRPO_KL(kSapo);
    default: RLHF_GRPO_KL(kPg);
  }
#undef RLHF_GRPO_KL
#undef RLHF_GRPO_ROW
}

// The entry points per dtype: fp32 vectorised (target clones), fp64 plain.
RLHF_VECTORIZED static void run_policy_row(int64_t loss, int64_t kl, const float* lp, const float* old,
                                           const float* adv, const float* m, const float* isw, const float* ref,
                                           int64_t n, float row_weight, const Options<float>& o, float* grad,
                                           float* stats) {
  policy_row_any(loss, kl, lp, old, adv, m, isw, ref, n, row_weight, o, grad, stats);
}
static void run_policy_row(int64_t loss, int64_t kl, const double* lp, const double* old, const double* adv,
                           const double* m, const double* isw, const double* ref, int64_t n, double row_weight,
                           const Options<double>& o, double* grad, double* stats) {
  policy_row_any(loss, kl, lp, old, adv, m, isw, ref, n, row_weight, o, grad, stats);
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
  const int64_t estimator = kl_code & 7;
  TORCH_CHECK(kl_code == kNoKl || (kl_code >= 0 && kl_code < 32 && estimator >= kK1 && estimator <= kLowVar),
              "grpo_policy_loss: bad kl_code ", kl_code);
  // An absent tensor is empty; a present one at B = 0 is empty too, hence the shape.
  TORCH_CHECK(kl_code == kNoKl || ref_logprobs.sizes() == logprobs.sizes(),
              "grpo_policy_loss: a KL term needs ref_logprobs");
  const int64_t B = logprobs.size(0), T = logprobs.size(1);
  TORCH_CHECK(row_weight.dim() == 1 && row_weight.size(0) == B && row_weight.scalar_type() == logprobs.scalar_type() &&
                  row_weight.is_contiguous(),
              "grpo_policy_loss: row_weight must be a contiguous [B] tensor of the inputs' dtype");
  at::Tensor row_stats = at::empty({B, kStats}, logprobs.options());
  at::Tensor grad = need_grad ? at::empty_like(logprobs) : at::empty({0}, logprobs.options());
  // Without importance weights every row reads one shared row of ones (cache-resident).
  at::Tensor ones = is_weights.numel() ? is_weights : at::ones({T}, logprobs.options());
  const int64_t isw_stride = is_weights.numel() ? T : 0;
  // Bytes per row: 4 inputs, the gradient when asked, the weights and ref_logprobs when present.
  const int64_t streams = 4 + (need_grad ? 1 : 0) + (is_weights.numel() ? 1 : 0) + (kl_code != kNoKl ? 1 : 0);
  const int64_t row_bytes = T * streams * static_cast<int64_t>(logprobs.element_size());
  const threading::Plan plan = threading::plan(B * row_bytes, kGrpoPolicy);
  AT_DISPATCH_FLOATING_TYPES(logprobs.scalar_type(), "rlhf_kernels::grpo_policy_loss (CPU)", [&] {
    using S = scalar_t;
    const Options<S> o{S(params[0]), S(params[1]), S(params[2]), S(params[3]),  S(params[4]),
                       S(params[5]), S(params[6]), S(params[7]), S(params[8]), S(params[9]),
                       S(params[10]), (kl_code & kStraightThrough) != 0, (kl_code & kCorrected) != 0,
                       exp_of(S(params[4])),  exp_of(-S(params[4]))};
    const S* lp = logprobs.const_data_ptr<S>();
    const S* old = old_logprobs.const_data_ptr<S>();
    const S* adv = advantages.const_data_ptr<S>();
    const S* m = mask.const_data_ptr<S>();
    const S* isw = ones.const_data_ptr<S>();
    const S* ref = kl_code != kNoKl ? ref_logprobs.const_data_ptr<S>() : nullptr;
    const S* weight = row_weight.const_data_ptr<S>();
    S* stats = row_stats.mutable_data_ptr<S>();
    S* g = need_grad ? grad.mutable_data_ptr<S>() : nullptr;
    const auto rows = [&](int64_t begin, int64_t end) {
      // Forward only: the gradient goes to one scratch row per task, never per row.
      std::vector<S> scratch(g == nullptr ? T : 0);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t offset = b * T;
        run_policy_row(loss_code, estimator, lp + offset, old + offset, adv + offset, m + offset,
                       isw + b * isw_stride, ref == nullptr ? nullptr : ref + offset, T, weight[b], o,
                       g == nullptr ? scratch.data() : g + offset, stats + kStats * b);
      }
    };
    threading::parallel_for(plan, 0, B, row_bytes, rows);
  });
  return {row_stats, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("grpo_policy_loss", &grpo_policy_loss_cpu); }

}  // namespace rlhf_kernels
