// CPU kernels for rlhf_kernels::token_logprobs and its backward: rows in
// parallel; each row is staged once as fp32 (fp64 for fp64 logits) and the
// transform, max, sum of exponentials and gradient run as vectorised row loops
// (vector_math.h). Extra memory: one row buffer per thread (none in a forward that reads
// its rows in place).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../logprobs_checks.h"
#include "threading.h"
#include "vector_math.h"

namespace rlhf_kernels {
namespace {

struct TransformOptions {
  double scale;
  double softcap;  // <= 0: no cap
  double inv_temperature;
};

// Row operations on a staged row: vectorised fp32 ones, and plain fp64 ones for
// fp64 logits (gradcheck), with the same formulas.
struct FloatRows {
  using acc_t = float;
  // Whether z = x (no softcap, scale / T = 1 in fp32, as transform_row computes it).
  static bool identity(const TransformOptions& o) {
    return o.softcap <= 0.0 && static_cast<float>(o.scale) * static_cast<float>(o.inv_temperature) == 1.0f;
  }
  static void transform(float* z, int64_t n, const TransformOptions& o) {
    vector_math::transform_row(z, n, o.scale, o.softcap, o.inv_temperature);
  }
  static float max(const float* z, int64_t n) { return vector_math::row_max(z, n); }
  static void sum_exp(const float* z, int64_t n, float top, float& sum_exp, float* sum_exp_dz,
                      const vector_math::NextRow& next) {
    vector_math::row_sum_exp(z, n, top, sum_exp, sum_exp_dz, next);
  }
  static float derivative(float z, const TransformOptions& o) {
    return vector_math::transform_derivative(z, o.scale, o.softcap, o.inv_temperature);
  }
  static void grad(float* z, int64_t n, float lse, float g, float g_h, float mean_z, const TransformOptions& o) {
    vector_math::row_grad(z, n, lse, g, g_h, mean_z, o.scale, o.softcap, o.inv_temperature);
  }
};

struct DoubleRows {
  using acc_t = double;
  static bool identity(const TransformOptions&) { return false; }  // fp64 (gradcheck): always staged
  static void transform(double* z, int64_t n, const TransformOptions& o) {
    for (int64_t v = 0; v < n; ++v) {
      const double scaled = o.scale * z[v];
      z[v] = (o.softcap > 0 ? o.softcap * std::tanh(scaled / o.softcap) : scaled) * o.inv_temperature;
    }
  }
  static double max(const double* z, int64_t n) {
    double top = -std::numeric_limits<double>::infinity();
    for (int64_t v = 0; v < n; ++v) top = std::max(top, z[v]);
    return top;
  }
  static void sum_exp(const double* z, int64_t n, double top, double& sum_exp, double* sum_exp_dz,
                      const vector_math::NextRow&) {
    double total_e = 0, total_ez = 0;
    for (int64_t v = 0; v < n; ++v) {
      const double dz = z[v] - top;
      const double e = std::exp(dz);
      total_e += e;
      total_ez += e > 0 ? e * dz : 0.0;  // a masked logit (p = 0) adds nothing, never 0 * -inf
    }
    sum_exp = total_e;
    if (sum_exp_dz != nullptr) *sum_exp_dz = total_ez;
  }
  static double derivative(double z, const TransformOptions& o) {
    if (o.softcap <= 0) return o.scale * o.inv_temperature;
    const double t = z / (o.softcap * o.inv_temperature);
    return o.scale * o.inv_temperature * (1 - t * t);
  }
  static void grad(double* z, int64_t n, double lse, double g, double g_h, double mean_z, const TransformOptions& o) {
    for (int64_t v = 0; v < n; ++v) {
      const double p = std::exp(z[v] - lse);
      z[v] = (p > 0 ? p * (-g - g_h * (z[v] - mean_z)) : 0.0) * derivative(z[v], o);
    }
  }
};

template <typename scalar_t>
using RowsFor = std::conditional_t<std::is_same_v<scalar_t, double>, DoubleRows, FloatRows>;

// z = transform(x) for one row of V, in the compute dtype.
template <typename Rows, typename scalar_t>
void stage_row(const scalar_t* x, int64_t V, const TransformOptions& o, typename Rows::acc_t* z) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    vector_math::bf16_to_float(reinterpret_cast<const uint16_t*>(x), V, z);
  } else {
    for (int64_t v = 0; v < V; ++v) z[v] = static_cast<typename Rows::acc_t>(x[v]);
  }
  Rows::transform(z, V, o);
}

// One row's forward statistics, relative to its max z: sum exp(z - top), sum exp(z -
// top) (z - top) (when asked) and z at the label.
template <typename acc_t>
struct RowSums {
  acc_t top, sum_exp, sum_exp_dz, label_z;
};

// Whether forward_row reads a row where it is: fp32 and bf16 logits that need no
// transform (bf16 widened in registers). Every other row is staged into a buffer of V.
template <typename Rows, typename scalar_t>
bool reads_in_place(const TransformOptions& o) {
  return (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) && Rows::identity(o);
}

// The forward of one row: read in place (reads_in_place), or staged into z. `next` is the
// row after this one (vector_math::NextRow). fp32 N = 4096, V = 32000, 2 threads: the
// forward was 1.32x torch.compile's staged, 1.43x read in place, 2.02x with the next
// row fetched (bench/results/logprobs-cpu-float32-token_logprobs_N_4096.md).
template <typename Rows, typename scalar_t>
RowSums<typename Rows::acc_t> forward_row(const scalar_t* x, int64_t V, const TransformOptions& o,
                                          typename Rows::acc_t* z, int64_t label, bool entropy,
                                          const vector_math::NextRow& next) {
  using acc_t = typename Rows::acc_t;
  RowSums<acc_t> row{};
  acc_t* sum_exp_dz = entropy ? &row.sum_exp_dz : nullptr;
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (reads_in_place<Rows, scalar_t>(o)) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        row.top = vector_math::row_max(x, V);
        vector_math::row_sum_exp(x, V, row.top, row.sum_exp, sum_exp_dz, next);
        row.label_z = x[label];
      } else {
        const uint16_t* bits = reinterpret_cast<const uint16_t*>(x);
        row.top = vector_math::bf16_row_max(bits, V);
        vector_math::bf16_row_sum_exp(bits, V, row.top, row.sum_exp, sum_exp_dz, next);
        row.label_z = vector_math::bf16_value(bits[label]);
      }
      return row;
    }
  }
  stage_row<Rows>(x, V, o, z);
  row.top = Rows::max(z, V);
  Rows::sum_exp(z, V, row.top, row.sum_exp, sum_exp_dz, next);
  row.label_z = z[label];
  return row;
}

// grad_row = z rounded to the logits' dtype (a no-op cast when they are the same).
template <typename acc_t, typename scalar_t>
void store_row(const acc_t* z, int64_t V, scalar_t* grad_row) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    vector_math::float_to_bf16(z, V, reinterpret_cast<uint16_t*>(grad_row));
  } else {
    for (int64_t v = 0; v < V; ++v) grad_row[v] = static_cast<scalar_t>(z[v]);
  }
}

// Labels are checked here, before any row is read or written: a label outside [0, V)
// that is not ignore_index raises (a linear pass over N labels, cheap next to the rows).
// The Python checks usually raise first, but they are skipped under torch.compile and on
// direct torch.ops calls; without this the row loops would read z[label] and the
// backward write at z[label] out of bounds.
template <typename index_t>
void check_labels(const index_t* y, int64_t N, int64_t V, int64_t ignore_index, const char* op) {
  for (int64_t n = 0; n < N; ++n) {
    const int64_t label = static_cast<int64_t>(y[n]);
    TORCH_CHECK_VALUE(label == ignore_index || (label >= 0 && label < V), op, ": labels must be in [0, ", V,
                      ") or equal ignore_index=", ignore_index, "; got ", label, " at row ", n);
  }
}

TransformOptions make_options(double temperature, std::optional<double> softcap, double logit_scale) {
  return {logit_scale, softcap.value_or(0.0), 1.0 / temperature};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(
    const at::Tensor& logits, const at::Tensor& labels, double temperature,
    std::optional<double> softcap, double logit_scale, int64_t ignore_index, bool return_entropy,
    bool /*inplace_backward: read by the autograd formula only*/) {
  check_token_logprobs_inputs(logits, labels, at::kCPU);
  const int64_t N = logits.size(0);
  const int64_t V = logits.size(1);
  const auto options = logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor logprobs = at::empty({N}, options);
  at::Tensor entropy = at::empty({N}, options);
  at::Tensor lse = at::empty({N}, options);
  const TransformOptions transform = make_options(temperature, softcap, logit_scale);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "rlhf_kernels::token_logprobs (CPU)", [&] {
    using Rows = RowsFor<scalar_t>;
    using acc_t = typename Rows::acc_t;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    acc_t* lp_out = logprobs.mutable_data_ptr<acc_t>();
    acc_t* h_out = entropy.mutable_data_ptr<acc_t>();
    acc_t* lse_out = lse.mutable_data_ptr<acc_t>();
    AT_DISPATCH_INDEX_TYPES(labels.scalar_type(), "token_logprobs labels", [&] {
      const index_t* y = labels.const_data_ptr<index_t>();
      check_labels(y, N, V, ignore_index, "token_logprobs");
      const int64_t row_bytes = V * int64_t(sizeof(scalar_t));  // the row read once
      const threading::Plan plan = threading::plan(N * row_bytes, threading::kLogprobs);
      threading::parallel_for(plan, 0, N, row_bytes, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> buffer(reads_in_place<Rows, scalar_t>(transform) ? 0 : V);
        for (int64_t n = begin; n < end; ++n) {
          const bool valid = static_cast<int64_t>(y[n]) != ignore_index;
          const vector_math::NextRow next{reinterpret_cast<const char*>(x + (n + 1) * V),
                                          n + 1 < end ? row_bytes : 0};
          // An ignored row reads its logit 0 (V >= 1): its result is 0 whatever it is.
          const RowSums<acc_t> row = forward_row<Rows>(x + n * V, V, transform, buffer.data(),
                                                       valid ? static_cast<int64_t>(y[n]) : 0, return_entropy, next);
          const acc_t log_sum = std::log(row.sum_exp);
          const acc_t log_normaliser = row.top + log_sum;
          lse_out[n] = log_normaliser;
          // The label logit is the (transformed) element itself: read exactly, never re-derived.
          lp_out[n] = valid ? row.label_z - log_normaliser : acc_t(0);
          // Relative to the max: exact for masked vocabularies (-inf / finfo.min logits).
          h_out[n] = valid && return_entropy ? log_sum - row.sum_exp_dz / row.sum_exp : acc_t(0);
        }
      });
    });
  });
  return {logprobs, entropy, lse};
}

// d x = (g_lp (onehot - p) - g_H p (z - sum p z)) dz/dx, with sum p z = lse - H,
// written into grad_logits, which may be logits itself: each row is read whole
// (staged) before any of it is written.
void token_logprobs_backward_into(
    at::Tensor& grad_logits, const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
    double temperature, std::optional<double> softcap, double logit_scale, int64_t ignore_index) {
  check_token_logprobs_inputs(logits, labels, at::kCPU);
  check_token_logprobs_row_stats(logits, {grad_logprobs, lse, entropy}, grad_entropy);
  const int64_t N = logits.size(0);
  const int64_t V = logits.size(1);
  const TransformOptions transform = make_options(temperature, softcap, logit_scale);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "rlhf_kernels::token_logprobs_backward (CPU)", [&] {
    using Rows = RowsFor<scalar_t>;
    using acc_t = typename Rows::acc_t;
    constexpr bool stage_in_output = std::is_same_v<scalar_t, acc_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const acc_t* g_lp = grad_logprobs.const_data_ptr<acc_t>();
    const acc_t* g_h = grad_entropy.has_value() ? grad_entropy->const_data_ptr<acc_t>() : nullptr;
    const acc_t* row_lse = lse.const_data_ptr<acc_t>();
    const acc_t* row_h = entropy.const_data_ptr<acc_t>();
    scalar_t* dx = grad_logits.mutable_data_ptr<scalar_t>();
    AT_DISPATCH_INDEX_TYPES(labels.scalar_type(), "token_logprobs_backward labels", [&] {
      const index_t* y = labels.const_data_ptr<index_t>();
      check_labels(y, N, V, ignore_index, "token_logprobs_backward");
      const int64_t row_bytes = 2 * V * int64_t(sizeof(scalar_t));  // the row read, its gradient written
      const threading::Plan plan = threading::plan(N * row_bytes, threading::kLogprobs);
      threading::parallel_for(plan, 0, N, row_bytes, [&](int64_t begin, int64_t end) {
        // fp32/fp64 logits are staged in their own gradient row: no extra buffer.
        std::vector<acc_t> buffer(stage_in_output ? 0 : V);
        for (int64_t n = begin; n < end; ++n) {
          scalar_t* grad_row = dx + n * V;
          if (static_cast<int64_t>(y[n]) == ignore_index) {
            std::fill(grad_row, grad_row + V, scalar_t(0));
            continue;
          }
          acc_t* z = stage_in_output ? reinterpret_cast<acc_t*>(grad_row) : buffer.data();
          stage_row<Rows>(x + n * V, V, transform, z);
          const acc_t label_term = g_lp[n] * Rows::derivative(z[y[n]], transform);
          Rows::grad(z, V, row_lse[n], g_lp[n], g_h == nullptr ? acc_t(0) : g_h[n], row_lse[n] - row_h[n], transform);
          z[y[n]] += label_term;
          if constexpr (!stage_in_output) store_row(z, V, grad_row);
        }
      });
    });
  });
}

at::Tensor token_logprobs_backward_cpu(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
    const at::Tensor& entropy, double temperature, std::optional<double> softcap,
    double logit_scale, int64_t ignore_index) {
  at::Tensor grad_logits = at::empty_like(logits);
  token_logprobs_backward_into(grad_logits, grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature,
                               softcap, logit_scale, ignore_index);
  return grad_logits;
}

void token_logprobs_backward_inplace_cpu(
    at::Tensor& logits, const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy, double temperature,
    std::optional<double> softcap, double logit_scale, int64_t ignore_index) {
  token_logprobs_backward_into(logits, grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature,
                               softcap, logit_scale, ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("token_logprobs", &token_logprobs_cpu);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cpu);
  m.impl("token_logprobs_backward_", &token_logprobs_backward_inplace_cpu);
}

}  // namespace rlhf_kernels
