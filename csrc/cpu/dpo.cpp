// CPU kernel for rlhf_kernels::dpo_loss: one pass over the B pairs computing each
// loss, the implicit rewards and, when autograd needs it, d loss / d policy log-prob
// of the chosen and the rejected response (the backward is a scale). The formulas
// are TRL's (rlhf_kernels/reference/dpo.py); derivatives follow torch's conventions
// (relu' (0) = 0). logsigmoid is min(x, 0) - log1p(exp(-|x|)): finite for any finite x.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string_view>

namespace rlhf_kernels {
namespace {

enum class DpoLoss { kSigmoid, kRobust, kHinge, kIpo, kExoPair, kNcaPair, kSppoHard, kApoZero, kApoDown };

DpoLoss parse_loss_type(c10::string_view name) {
  const std::string_view s(name.data(), name.size());
  if (s == "sigmoid") return DpoLoss::kSigmoid;
  if (s == "robust") return DpoLoss::kRobust;
  if (s == "hinge") return DpoLoss::kHinge;
  if (s == "ipo") return DpoLoss::kIpo;
  if (s == "exo_pair") return DpoLoss::kExoPair;
  if (s == "nca_pair") return DpoLoss::kNcaPair;
  if (s == "sppo_hard") return DpoLoss::kSppoHard;
  if (s == "apo_zero") return DpoLoss::kApoZero;
  if (s == "apo_down") return DpoLoss::kApoDown;
  TORCH_CHECK(false, "dpo_loss: unknown loss_type '", s, "'");
}

// TRL's exo_pair epsilon when label_smoothing is 0 (reference/dpo.py EXO_DEFAULT_EPSILON).
constexpr double kExoDefaultEpsilon = 1e-3;

template <typename T>
T log_sigmoid(T x) { return std::min(x, T(0)) - std::log1p(std::exp(-std::abs(x))); }
template <typename T>
T sigmoid(T x) { return x >= 0 ? T(1) / (T(1) + std::exp(-x)) : std::exp(x) / (T(1) + std::exp(x)); }
// d sigmoid / dx = sigmoid(x) sigmoid(-x).
template <typename T>
T sigmoid_slope(T x) { return sigmoid(x) * sigmoid(-x); }

struct Options {
  DpoLoss loss;
  double beta, label_smoothing;
  bool reference_free;
};

// The loss of one pair and its derivatives by the chosen / rejected policy log-prob.
// rho = pi - ref; the scored rho (a, b) drops ref when reference_free, while nca_pair
// and sppo_hard always use the true rho, as TRL does.
template <typename T>
T pair_loss(T pi_c, T pi_r, T ref_c, T ref_r, const Options& o, T& d_chosen, T& d_rejected) {
  const T beta = T(o.beta), ls = T(o.label_smoothing);
  const T true_c = pi_c - ref_c, true_r = pi_r - ref_r;
  const T a = o.reference_free ? pi_c : true_c, b = o.reference_free ? pi_r : true_r;
  const T z = beta * (a - b);
  T loss, dz = 0;  // dz: d loss / d z for the losses of z alone
  switch (o.loss) {
    case DpoLoss::kSigmoid:
      loss = -log_sigmoid(z) * (1 - ls) - log_sigmoid(-z) * ls;
      dz = -(1 - ls) * sigmoid(-z) + ls * sigmoid(z);
      break;
    case DpoLoss::kRobust:
      loss = (-log_sigmoid(z) * (1 - ls) + log_sigmoid(-z) * ls) / (1 - 2 * ls);
      dz = (-(1 - ls) * sigmoid(-z) - ls * sigmoid(z)) / (1 - 2 * ls);
      break;
    case DpoLoss::kHinge:
      loss = std::max(T(1) - z, T(0));
      dz = T(1) - z > 0 ? T(-1) : T(0);
      break;
    case DpoLoss::kIpo: {
      const T gap = (a - b) - T(1) / (2 * beta);
      loss = gap * gap;
      dz = 2 * gap / beta;
      break;
    }
    case DpoLoss::kExoPair: {
      const T eps = ls > 0 ? ls : T(kExoDefaultEpsilon);
      const T c1 = std::log1p(-eps), c2 = std::log(eps);
      loss = sigmoid(z) * (log_sigmoid(z) - c1) + sigmoid(-z) * (log_sigmoid(-z) - c2);
      dz = sigmoid_slope(z) * (z - c1 + c2);  // logsigmoid(z) - logsigmoid(-z) = z
      break;
    }
    case DpoLoss::kNcaPair: {
      const T c = beta * true_c, r = beta * true_r;
      loss = -log_sigmoid(c) - T(0.5) * log_sigmoid(-c) - T(0.5) * log_sigmoid(-r);
      d_chosen = beta * (-sigmoid(-c) + T(0.5) * sigmoid(c));
      d_rejected = beta * T(0.5) * sigmoid(r);
      return loss;
    }
    case DpoLoss::kSppoHard: {
      const T half = T(0.5) / beta;
      loss = (true_c - half) * (true_c - half) + (true_r + half) * (true_r + half);
      d_chosen = 2 * (true_c - half);
      d_rejected = 2 * (true_r + half);
      return loss;
    }
    case DpoLoss::kApoZero:
      loss = 1 - sigmoid(beta * a) + sigmoid(beta * b);
      d_chosen = -beta * sigmoid_slope(beta * a);
      d_rejected = beta * sigmoid_slope(beta * b);
      return loss;
    case DpoLoss::kApoDown:
      loss = sigmoid(beta * a) + 1 - sigmoid(z);
      d_chosen = beta * (sigmoid_slope(beta * a) - sigmoid_slope(z));
      d_rejected = beta * sigmoid_slope(z);
      return loss;
  }
  d_chosen = beta * dz;
  d_rejected = -beta * dz;
  return loss;
}

// Returns (losses [B], rewards [2, B] = beta (pi - ref) for chosen then rejected,
// grad [2, B] = d losses / d (policy chosen, policy rejected), empty unless need_grad).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dpo_loss_cpu(
    const at::Tensor& chosen, const at::Tensor& rejected, const at::Tensor& ref_chosen,
    const at::Tensor& ref_rejected, double beta, c10::string_view loss_type, double label_smoothing,
    bool reference_free, bool need_grad) {
  for (const at::Tensor* t : {&rejected, &ref_chosen, &ref_rejected}) {
    TORCH_CHECK(t->sizes() == chosen.sizes() && t->scalar_type() == chosen.scalar_type() && t->is_contiguous() &&
                    t->device().is_cpu(),
                "dpo_loss: the four log-prob tensors must be contiguous CPU [B] tensors of one dtype");
  }
  TORCH_CHECK(chosen.dim() == 1 && chosen.is_contiguous() &&
                  (chosen.scalar_type() == at::kFloat || chosen.scalar_type() == at::kDouble),
              "dpo_loss: log-probs must be contiguous float32/float64 [B]");
  const Options options{parse_loss_type(loss_type), beta, label_smoothing, reference_free};
  const int64_t B = chosen.size(0);
  at::Tensor losses = at::empty({B}, chosen.options());
  at::Tensor rewards = at::empty({2, B}, chosen.options());
  at::Tensor grad = at::empty({need_grad ? 2 : 0, B}, chosen.options());
  AT_DISPATCH_FLOATING_TYPES(chosen.scalar_type(), "rlhf_kernels::dpo_loss (CPU)", [&] {
    const scalar_t* pc = chosen.const_data_ptr<scalar_t>();
    const scalar_t* pr = rejected.const_data_ptr<scalar_t>();
    const scalar_t* rc = ref_chosen.const_data_ptr<scalar_t>();
    const scalar_t* rr = ref_rejected.const_data_ptr<scalar_t>();
    scalar_t* out = losses.mutable_data_ptr<scalar_t>();
    scalar_t* rew = rewards.mutable_data_ptr<scalar_t>();
    scalar_t* g = need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t d_chosen, d_rejected;
        out[i] = pair_loss<scalar_t>(pc[i], pr[i], rc[i], rr[i], options, d_chosen, d_rejected);
        rew[i] = scalar_t(beta) * (pc[i] - rc[i]);
        rew[B + i] = scalar_t(beta) * (pr[i] - rr[i]);
        if (g != nullptr) {
          g[i] = d_chosen;
          g[B + i] = d_rejected;
        }
      }
    });
  });
  return {losses, rewards, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("dpo_loss", &dpo_loss_cpu);
}

}  // namespace rlhf_kernels
