// CPU kernels for the masked statistics of the gae family: rlhf_kernels::masked_sums
// (the reduction behind masked_mean), masked_whiten and its backward. Every sum
// accumulates in double whatever the input dtype, so a 2M-element fp32 whitening
// keeps its mean and variance to fp32 rounding; the passes read x and mask only,
// never a product temporary.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "threading.h"
#include "vector_math.h"

namespace rlhf_kernels {
namespace {

struct Sums {
  double first = 0.0;
  double second = 0.0;
};

// The reductions over x, mask w (and the gradient g), as (first, second):
//   kSums (w x, w); kCentered (w c^2, w c); kGrad (g', g' c); kGradAll (g, g c)
// with c = x - mean and g' = g where w != 0, else 0 (those outputs were filled with 0).
// Every term is a select on w != 0 (g != 0 for kGradAll's g c), not a product: NaN or
// inf at a mask-0 position never reaches the sums (0 * inf is NaN).
enum class Pass { kSums, kCentered, kGrad, kGradAll };

template <Pass P, typename T>
RLHF_INLINE Sums pass_sums(const T* x, const T* w, const T* g, int64_t n, double mean) {
  double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = 0; i < n; ++i) {
    const double wi = w[i], xi = x[i];
    if constexpr (P == Pass::kSums) {
      a += wi != 0.0 ? wi * xi : 0.0;
      b += wi;
    } else if constexpr (P == Pass::kCentered) {
      const double c = xi - mean;
      a += wi != 0.0 ? wi * c * c : 0.0;
      b += wi != 0.0 ? wi * c : 0.0;
    } else {
      const double live = (P == Pass::kGradAll || wi != 0.0) ? double(g[i]) : 0.0;
      a += live;
      b += live != 0.0 ? live * (xi - mean) : 0.0;
    }
  }
  return {a, b};
}

template <typename T>
RLHF_INLINE Sums pass_any(Pass p, const T* x, const T* w, const T* g, int64_t n, double mean) {
  switch (p) {
    case Pass::kSums: return pass_sums<Pass::kSums>(x, w, g, n, mean);
    case Pass::kCentered: return pass_sums<Pass::kCentered>(x, w, g, n, mean);
    case Pass::kGrad: return pass_sums<Pass::kGrad>(x, w, g, n, mean);
    default: return pass_sums<Pass::kGradAll>(x, w, g, n, mean);
  }
}

// Entry points per dtype, vectorised by target clones: the baseline build is SSE2, 2
// doubles a vector, where the AVX2 and AVX-512 clones take 4 and 8 (the sums are in
// double, so the width in doubles is what bounds these passes).
RLHF_VECTORIZED static Sums run_pass(Pass p, const float* x, const float* w, const float* g, int64_t n, double mean) {
  return pass_any(p, x, w, g, n, mean);
}
RLHF_VECTORIZED static Sums run_pass(Pass p, const double* x, const double* w, const double* g, int64_t n,
                                     double mean) {
  return pass_any(p, x, w, g, n, mean);
}

// y = (x - mean) rstd + shift, set to 0 where w == 0 when kFill, in T's precision.
template <bool kFill, typename T>
RLHF_INLINE void whiten_rows(const T* x, const T* w, T* y, int64_t n, T mean, T rstd, T shift) {
  for (int64_t i = 0; i < n; ++i) {
    const T value = (x[i] - mean) * rstd + shift;
    y[i] = (!kFill || w[i] != T(0)) ? value : T(0);
  }
}
template <typename T>
RLHF_INLINE void whiten_any(bool fill, const T* x, const T* w, T* y, int64_t n, T mean, T rstd, T shift) {
  fill ? whiten_rows<true>(x, w, y, n, mean, rstd, shift) : whiten_rows<false>(x, w, y, n, mean, rstd, shift);
}
RLHF_VECTORIZED static void write_whiten(bool fill, const float* x, const float* w, float* y, int64_t n, float mean,
                                         float rstd, float shift) {
  whiten_any(fill, x, w, y, n, mean, rstd, shift);
}
RLHF_VECTORIZED static void write_whiten(bool fill, const double* x, const double* w, double* y, int64_t n,
                                         double mean, double rstd, double shift) {
  whiten_any(fill, x, w, y, n, mean, rstd, shift);
}

// dx = r g' + w mean_coef - var_coef w (c - centered_mean) (see masked_whiten_backward_cpu).
template <bool kFill, typename T>
RLHF_INLINE void whiten_grad_rows(const T* g, const T* x, const T* w, T* dx, int64_t n, T mean, T rstd, T mean_coef,
                                  T var_coef, T centered_mean) {
  for (int64_t i = 0; i < n; ++i) {
    const T live = (!kFill || w[i] != T(0)) ? g[i] : T(0);
    // A mask-0 position takes no part in the statistics: no w * (x - mean) term (0 * inf).
    const T statistics = w[i] != T(0) ? w[i] * (mean_coef - var_coef * (x[i] - mean - centered_mean)) : T(0);
    dx[i] = rstd * live + statistics;
  }
}
template <typename T>
RLHF_INLINE void whiten_grad_any(bool fill, const T* g, const T* x, const T* w, T* dx, int64_t n, T mean, T rstd,
                                 T mean_coef, T var_coef, T centered_mean) {
  fill ? whiten_grad_rows<true>(g, x, w, dx, n, mean, rstd, mean_coef, var_coef, centered_mean)
       : whiten_grad_rows<false>(g, x, w, dx, n, mean, rstd, mean_coef, var_coef, centered_mean);
}
RLHF_VECTORIZED static void write_whiten_grad(bool fill, const float* g, const float* x, const float* w, float* dx,
                                              int64_t n, float mean, float rstd, float mean_coef, float var_coef,
                                              float centered_mean) {
  whiten_grad_any(fill, g, x, w, dx, n, mean, rstd, mean_coef, var_coef, centered_mean);
}
RLHF_VECTORIZED static void write_whiten_grad(bool fill, const double* g, const double* x, const double* w,
                                              double* dx, int64_t n, double mean, double rstd, double mean_coef,
                                              double var_coef, double centered_mean) {
  whiten_grad_any(fill, g, x, w, dx, n, mean, rstd, mean_coef, var_coef, centered_mean);
}

// Items per reduction block: partial sums of fixed blocks combined in order, so a
// result never depends on the thread count or on whether the call ran parallel
// (threading.h). 16384 fp32 elements of x and mask: 128 KiB, two policy tasks' worth.
constexpr int64_t kBlock = 16384;

// One pass over [0, n), in blocks, under `plan`.
template <typename T>
Sums sum_pass(const threading::Plan& plan, Pass p, const T* x, const T* w, const T* g, int64_t n, double mean) {
  const int64_t element_bytes = (g == nullptr ? 2 : 3) * int64_t(sizeof(T));
  return threading::ordered_reduce(
      plan, n, kBlock, element_bytes, Sums{},
      [&](int64_t begin, int64_t end) {
        return run_pass(p, x + begin, w + begin, g == nullptr ? g : g + begin, end - begin, mean);
      },
      [](Sums a, Sums b) { return Sums{a.first + b.first, a.second + b.second}; });
}

// Weighted moments about a mean: weight W = sum w, mean, m2 = sum w (x - mean)^2 and
// centered = sum w (x - mean) (0 up to rounding).
struct Moments {
  double weight = 0.0, mean = 0.0, m2 = 0.0, centered = 0.0;
};

// The moments of x under weights w in one read of memory: per block, the block's sums
// (sum w x, sum w) and then its moments about its own mean, a second pass over a block
// that is still in cache; then the blocks' moments moved to the global mean, in block
// order, with sum w (x - M)^2 = sum w (x - a)^2 + 2 (a - M) sum w (x - a) + W (a - M)^2
// (exact for any shift a; the block mean keeps it free of cancellation, as a second
// pass over all of x would, at half the memory traffic).
template <typename T>
Moments whole_moments(const threading::Plan& plan, const T* x, const T* w, int64_t n) {
  const T* none = nullptr;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<Moments> block(blocks);
  std::vector<double> weighted_sum(blocks);
  threading::parallel_for(plan, 0, blocks, kBlock * 2 * int64_t(sizeof(T)), [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t begin = i * kBlock, size = std::min(n, begin + kBlock) - begin;
      const Sums sums = run_pass(Pass::kSums, x + begin, w + begin, none, size, 0.0);
      Moments& b = block[i];
      b.weight = sums.second;
      b.mean = b.weight > 0 ? sums.first / b.weight : 0.0;
      const Sums centered = run_pass(Pass::kCentered, x + begin, w + begin, none, size, b.mean);
      b.m2 = centered.first;
      b.centered = centered.second;
      weighted_sum[i] = sums.first;
    }
  });
  Moments total;
  double total_sum = 0.0;
  for (int64_t i = 0; i < blocks; ++i) {
    total.weight += block[i].weight;
    total_sum += weighted_sum[i];
  }
  total.mean = total.weight > 0 ? total_sum / total.weight : 0.0;
  for (const Moments& b : block) {
    // A block without a nonzero weight adds nothing (not 0 * inf when the mean is inf).
    if (b.weight == 0.0 && b.m2 == 0.0 && b.centered == 0.0) continue;
    const double shift = b.mean - total.mean;
    total.m2 += b.m2 + 2.0 * shift * b.centered + b.weight * shift * shift;
    total.centered += b.centered + b.weight * shift;
  }
  return total;
}

// Where a count or a variance denominator is <= 0 the reference divides by 1
// (rlhf_kernels/reference/masked.py), so nothing becomes NaN.
double safe(double denominator) { return denominator > 0 ? denominator : 1.0; }

void check_pair(const char* op, const at::Tensor& x, const at::Tensor& mask) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(mask.sizes() == x.sizes() && mask.scalar_type() == x.scalar_type(), op,
              ": mask must have x's shape ", x.sizes(), " and dtype ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && mask.device().is_cpu() && x.is_contiguous() && mask.is_contiguous(), op,
              ": x and mask must be contiguous CPU tensors");
}

// Per row of [R, C]: (sum mask * x, sum mask) as float64 [R, 2].
at::Tensor masked_sums_cpu(const at::Tensor& x, const at::Tensor& mask) {
  check_pair("masked_sums", x, mask);
  TORCH_CHECK(x.dim() == 2, "masked_sums: x must be [R, C], got ", x.sizes());
  const int64_t R = x.size(0);
  const int64_t C = x.size(1);
  at::Tensor sums = at::empty({R, 2}, x.options().dtype(at::kDouble));
  double* out = sums.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rlhf_kernels::masked_sums (CPU)", [&] {
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const scalar_t* ws = mask.const_data_ptr<scalar_t>();
    const int64_t row_bytes = 2 * C * int64_t(sizeof(scalar_t));
    const threading::Plan plan = threading::plan(R * row_bytes, threading::kMasked);
    const scalar_t* none = nullptr;
    if (R == 1) {  // one long row: the reduction itself runs in parallel
      const Sums s = sum_pass(plan, Pass::kSums, xs, ws, none, C, 0.0);
      out[0] = s.first;
      out[1] = s.second;
    } else {
      threading::parallel_for(plan, 0, R, row_bytes, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {  // the same blocks as one long row: the same bits
          const Sums s = sum_pass(threading::Plan{}, Pass::kSums, xs + r * C, ws + r * C, none, C, 0.0);
          out[2 * r] = s.first;
          out[2 * r + 1] = s.second;
        }
      });
    }
  });
  return sums;
}

// stats (float64 [5]), saved for the backward: count, mean, rstd = 1/sqrt(var + eps),
// the safe variance denominator, and sum mask * (x - mean) (0 up to rounding,
// kept so the backward is the exact derivative of what the forward computed).
enum Stat { kCount, kMean, kRstd, kDenominator, kCenteredSum, kNumStats };

std::tuple<at::Tensor, at::Tensor> masked_whiten_cpu(
    const at::Tensor& x, const at::Tensor& mask, bool shift_mean, bool unbiased, double eps, bool fill_masked) {
  check_pair("masked_whiten", x, mask);
  at::Tensor out = at::empty_like(x);
  at::Tensor stats = at::empty({kNumStats}, x.options().dtype(at::kDouble));
  double* st = stats.mutable_data_ptr<double>();
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rlhf_kernels::masked_whiten (CPU)", [&] {
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const scalar_t* ws = mask.const_data_ptr<scalar_t>();
    scalar_t* ys = out.mutable_data_ptr<scalar_t>();
    // One reading pass (x, mask) and one writing pass (x, mask read, y written).
    const threading::Plan plan = threading::plan(5 * n * int64_t(sizeof(scalar_t)), threading::kMasked);
    const Moments m = whole_moments(plan, xs, ws, n);
    const double count = m.weight;
    const double mean = m.mean;
    const double denominator = safe(unbiased ? count - 1 : count);
    const double rstd = 1.0 / std::sqrt(m.m2 / denominator + eps);
    const double shift = shift_mean ? 0.0 : mean;
    threading::parallel_for_elements(plan, n, 3 * int64_t(sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
      write_whiten(fill_masked, xs + begin, ws + begin, ys + begin, end - begin, scalar_t(mean), scalar_t(rstd),
                   scalar_t(shift));
    });
    st[kCount] = count;
    st[kMean] = mean;
    st[kRstd] = rstd;
    st[kDenominator] = denominator;
    st[kCenteredSum] = m.centered;
  });
  return {out, stats};
}

// d x_j = r g_j + (w_j / C) G (shift - r) - (r^3 / D) S w_j (c_j - Swc / C), with g
// zeroed where mask is 0 when fill_masked (those outputs are constants), G = sum g, S = sum g c,
// c = x - mean, r = rstd, D the variance denominator, shift = 0 or 1 (shift_mean off).
at::Tensor masked_whiten_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask, const at::Tensor& stats, bool shift_mean,
    bool fill_masked) {
  check_pair("masked_whiten_backward", x, mask);
  check_pair("masked_whiten_backward", grad, mask);
  TORCH_CHECK(stats.scalar_type() == at::kDouble && stats.numel() == kNumStats && stats.is_contiguous(),
              "masked_whiten_backward: stats must be the forward's float64 [", int(kNumStats), "]");
  const double* st = stats.const_data_ptr<double>();
  const double count = safe(st[kCount]), mean = st[kMean], rstd = st[kRstd];
  const double denominator = st[kDenominator], centered_mean = st[kCenteredSum] / count;
  at::Tensor grad_x = at::empty_like(x);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rlhf_kernels::masked_whiten_backward (CPU)", [&] {
    const scalar_t* gs = grad.const_data_ptr<scalar_t>();
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const scalar_t* ws = mask.const_data_ptr<scalar_t>();
    scalar_t* dx = grad_x.mutable_data_ptr<scalar_t>();
    // One reading pass (g, x, mask) and one writing pass (g, x, mask read, dx written).
    const threading::Plan plan = threading::plan(7 * n * int64_t(sizeof(scalar_t)), threading::kMasked);
    const Sums sums = sum_pass(plan, fill_masked ? Pass::kGrad : Pass::kGradAll, xs, ws, gs, n, mean);
    const double mean_coef = sums.first / count * ((shift_mean ? 0.0 : 1.0) - rstd);
    const double var_coef = rstd * rstd * rstd / denominator * sums.second;
    threading::parallel_for_elements(plan, n, 4 * int64_t(sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
      write_whiten_grad(fill_masked, gs + begin, xs + begin, ws + begin, dx + begin, end - begin, scalar_t(mean),
                        scalar_t(rstd), scalar_t(mean_coef), scalar_t(var_coef), scalar_t(centered_mean));
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("masked_sums", &masked_sums_cpu);
  m.impl("masked_whiten", &masked_whiten_cpu);
  m.impl("masked_whiten_backward", &masked_whiten_backward_cpu);
}

}  // namespace rlhf_kernels
