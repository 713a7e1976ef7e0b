// CPU kernel for rlhf_kernels::dpo_loss: one pass over the B pairs computing one loss
// type's losses, the implicit rewards and, when autograd needs it, d loss / d policy
// log-prob of the chosen and the rejected response (the backward is a scale). The
// formulas are TRL 1.16's (rlhf_kernels/reference/dpo.py): LD-DPO tails, f-divergence
// scores, length normalisation and WPO weights are applied per pair here; the loss types
// that couple pairs (aot, aot_unpaired, sft) and the sum over several types are in
// rlhf_kernels/ops/dpo.py. Derivatives follow torch's conventions (relu'(0) = 0, a
// clamp passes the gradient on its closed interval). logsigmoid is
// min(x, 0) - log1p(exp(-|x|)): finite for any finite x.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string_view>

#include "threading.h"

namespace rlhf_kernels {
namespace {

// The order of rlhf_kernels.reference.dpo.PAIR_LOSS_TYPES.
enum class DpoLoss {
  kSigmoid, kRobust, kHinge, kIpo, kExoPair, kNcaPair, kSppoHard, kApoZero, kApoDown, kBcoPair, kDiscopop,
  kSigmoidNorm,
};
enum class FDivergence { kReverseKl, kForwardKl, kJs, kAlpha };

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
  if (s == "bco_pair") return DpoLoss::kBcoPair;
  if (s == "discopop") return DpoLoss::kDiscopop;
  if (s == "sigmoid_norm") return DpoLoss::kSigmoidNorm;
  TORCH_CHECK(false, "dpo_loss: '", s, "' is not a per-pair loss_type of the kernel");
}

FDivergence parse_f_divergence(c10::string_view name, double alpha) {
  const std::string_view s(name.data(), name.size());
  if (s == "reverse_kl") return FDivergence::kReverseKl;
  if (s == "forward_kl") return FDivergence::kForwardKl;
  if (s == "js_divergence") return FDivergence::kJs;
  // TRL's limit case: alpha -> 1 is reverse KL.
  if (s == "alpha_divergence") return std::abs(alpha - 1.0) < 1e-6 ? FDivergence::kReverseKl : FDivergence::kAlpha;
  TORCH_CHECK(false, "dpo_loss: unknown f_divergence_type '", s, "'");
}

template <typename T>
T log_sigmoid(T x) { return std::min(x, T(0)) - std::log1p(std::exp(-std::abs(x))); }
template <typename T>
T sigmoid(T x) { return x >= 0 ? T(1) / (T(1) + std::exp(-x)) : std::exp(x) / (T(1) + std::exp(x)); }
// d sigmoid / dx = sigmoid(x) sigmoid(-x).
template <typename T>
T sigmoid_slope(T x) { return sigmoid(x) * sigmoid(-x); }

struct Options {
  DpoLoss loss;
  FDivergence f;
  double beta, label_smoothing, sigmoid_smoothing, alpha, alpha_clamp, discopop_tau;
  bool reference_free;
};

// The f-divergence score f'(exp(x)) of a log-ratio x, and its derivative in `slope`.
template <typename T>
T score(T x, const Options& o, T& slope) {
  switch (o.f) {
    case FDivergence::kReverseKl:
      slope = 1;
      return x;
    case FDivergence::kForwardKl:
      slope = std::exp(-x);
      return 1 - slope;
    case FDivergence::kJs:
      slope = sigmoid(-x);
      return T(0.69314718055994530942) + log_sigmoid(x);  // log 2
    case FDivergence::kAlpha: {
      const T t = T(o.alpha - 1) * x;
      const T e = std::exp(std::min(t, T(o.alpha_clamp)));
      slope = t <= T(o.alpha_clamp) ? e : T(0);
      return (e - 1) * T(1 / (o.alpha - 1));
    }
  }
  return x;
}

// The loss of one pair and its derivatives by the chosen / rejected policy log-prob.
// rho = pi - ref; (a, b) = rho, or pi when reference_free; n_c, n_r: the lengths the
// scores of ipo / sigmoid_norm are divided by (1 when not given).
template <typename T>
T pair_loss(T pi_c, T pi_r, T ref_c, T ref_r, T n_c, T n_r, const Options& o, T& d_chosen, T& d_rejected) {
  const T beta = T(o.beta), ls = T(o.label_smoothing);
  const T rho_c = pi_c - ref_c, rho_r = pi_r - ref_r;
  const T a = o.reference_free ? pi_c : rho_c, b = o.reference_free ? pi_r : rho_r;
  switch (o.loss) {  // the losses of rho or a, b alone (no f-divergence, TRL rejects it for them)
    case DpoLoss::kNcaPair: {
      const T c = beta * rho_c, r = beta * rho_r;
      d_chosen = beta * (-sigmoid(-c) + T(0.5) * sigmoid(c));
      d_rejected = beta * T(0.5) * sigmoid(r);
      return -log_sigmoid(c) - T(0.5) * log_sigmoid(-c) - T(0.5) * log_sigmoid(-r);
    }
    case DpoLoss::kBcoPair: {
      const T c = beta * rho_c, r = beta * rho_r;
      d_chosen = -beta * sigmoid(-c);
      d_rejected = beta * sigmoid(r);
      return -log_sigmoid(c) - log_sigmoid(-r);
    }
    case DpoLoss::kSppoHard: {
      const T half = T(0.5) / beta;
      d_chosen = 2 * (rho_c - half);
      d_rejected = 2 * (rho_r + half);
      return (rho_c - half) * (rho_c - half) + (rho_r + half) * (rho_r + half);
    }
    case DpoLoss::kApoZero:
      d_chosen = -beta * sigmoid_slope(beta * a);
      d_rejected = beta * sigmoid_slope(beta * b);
      return 1 - sigmoid(beta * a) + sigmoid(beta * b);
    case DpoLoss::kApoDown:
      d_chosen = beta * (sigmoid_slope(beta * a) - sigmoid_slope(beta * (a - b)));
      d_rejected = beta * sigmoid_slope(beta * (a - b));
      return sigmoid(beta * a) + 1 - sigmoid(beta * (a - b));
    default:
      break;
  }
  // The losses of the scores: ds = d score / d log-ratio (over the length when normalised).
  T ds_c, ds_r;
  T s_c = score(a, o, ds_c), s_r = score(b, o, ds_r);
  s_c /= n_c, s_r /= n_r, ds_c /= n_c, ds_r /= n_r;
  const T z = beta * (s_c - s_r);
  T loss, dz;  // d loss / d z
  switch (o.loss) {
    case DpoLoss::kSigmoid:
    case DpoLoss::kSigmoidNorm: {  // sigmoid_smoothing: cDPO's, 0 unless asked (and for sigmoid_norm)
      const T sl = T(o.sigmoid_smoothing);
      loss = -log_sigmoid(z) * (1 - sl) - log_sigmoid(-z) * sl;
      dz = -(1 - sl) * sigmoid(-z) + sl * sigmoid(z);
      break;
    }
    case DpoLoss::kRobust:
      loss = (-log_sigmoid(z) * (1 - ls) + log_sigmoid(-z) * ls) / (1 - 2 * ls);
      dz = (-(1 - ls) * sigmoid(-z) - ls * sigmoid(z)) / (1 - 2 * ls);
      break;
    case DpoLoss::kHinge:
      loss = std::max(T(1) - z, T(0));
      dz = T(1) - z > 0 ? T(-1) : T(0);
      break;
    case DpoLoss::kIpo: {
      const T gap = (s_c - s_r) - T(1) / (2 * beta);
      loss = gap * gap;
      dz = 2 * gap / beta;
      break;
    }
    case DpoLoss::kExoPair: {
      const T c1 = std::log1p(-ls), c2 = std::log(ls);
      loss = sigmoid(z) * (log_sigmoid(z) - c1) + sigmoid(-z) * (log_sigmoid(-z) - c2);
      dz = sigmoid_slope(z) * (z - c1 + c2);  // logsigmoid(z) - logsigmoid(-z) = z
      break;
    }
    default: {  // discopop; exp(-z) m as exp(logsigmoid(z / tau) - z), finite where exp(-z) overflows
      const T tau = T(o.discopop_tau), u = z / tau;
      const T keep = sigmoid(-u), blend = std::exp(log_sigmoid(u) - z);  // 1 - m, exp(-z) m
      loss = -log_sigmoid(z) * keep + blend;
      dz = -sigmoid(-z) * keep + log_sigmoid(z) * sigmoid_slope(u) / tau + blend * (keep / tau - 1);
      break;
    }
  }
  d_chosen = beta * dz * ds_c;
  d_rejected = -beta * dz * ds_r;
  return loss;
}

void check_pairs(const at::Tensor& t, const at::Tensor& like, int64_t rows, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == like.size(0) && t.is_contiguous() &&
                  t.scalar_type() == like.scalar_type() && t.device().is_cpu(),
              "dpo_loss: ", name, " must be a contiguous [", rows, ", B] CPU tensor of the log-probs' dtype");
}

// tails [4, B]: LD-DPO's sums past the shared length (policy chosen, rejected, ref chosen,
// rejected); lengths [2, B] (chosen, rejected; ipo and sigmoid_norm divide by them, min 1);
// weights [B]: WPO's, multiply loss and gradient. Returns (losses [B], rewards [2, B] =
// beta rho for chosen then rejected, grad [2, B] = d losses / d (policy chosen, policy
// rejected), empty unless need_grad).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dpo_loss_cpu(
    const at::Tensor& chosen, const at::Tensor& rejected, const at::Tensor& ref_chosen,
    const at::Tensor& ref_rejected, const std::optional<at::Tensor>& tails, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& weights, double beta, c10::string_view loss_type, double label_smoothing,
    bool reference_free, bool cdpo, c10::string_view f_divergence_type, double f_alpha, double f_alpha_clamp,
    double ld_alpha, double discopop_tau, bool need_grad) {
  TORCH_CHECK(chosen.dim() == 1 && chosen.is_contiguous() &&
                  (chosen.scalar_type() == at::kFloat || chosen.scalar_type() == at::kDouble),
              "dpo_loss: log-probs must be contiguous float32/float64 [B]");
  for (const at::Tensor* t : {&rejected, &ref_chosen, &ref_rejected}) {
    TORCH_CHECK(t->sizes() == chosen.sizes() && t->scalar_type() == chosen.scalar_type() && t->is_contiguous() &&
                    t->device().is_cpu(),
                "dpo_loss: the four log-prob tensors must be contiguous CPU [B] tensors of one dtype");
  }
  if (tails) check_pairs(*tails, chosen, 4, "tails");
  if (lengths) check_pairs(*lengths, chosen, 2, "lengths");
  if (weights) check_pairs(weights->view({1, -1}), chosen, 1, "weights");
  const DpoLoss loss = parse_loss_type(loss_type);
  TORCH_CHECK(loss != DpoLoss::kSigmoidNorm || lengths, "dpo_loss: sigmoid_norm needs the lengths");
  const bool normalise = lengths && (loss == DpoLoss::kIpo || loss == DpoLoss::kSigmoidNorm);
  const Options options{loss, parse_f_divergence(f_divergence_type, f_alpha), beta, label_smoothing,
                        cdpo ? label_smoothing : 0.0, f_alpha, f_alpha_clamp, discopop_tau, reference_free};
  const int64_t B = chosen.size(0);
  at::Tensor losses = at::empty({B}, chosen.options());
  at::Tensor rewards = at::empty({2, B}, chosen.options());
  at::Tensor grad = at::empty({need_grad ? 2 : 0, B}, chosen.options());
  AT_DISPATCH_FLOATING_TYPES(chosen.scalar_type(), "rlhf_kernels::dpo_loss (CPU)", [&] {
    const scalar_t* pc = chosen.const_data_ptr<scalar_t>();
    const scalar_t* pr = rejected.const_data_ptr<scalar_t>();
    const scalar_t* rc = ref_chosen.const_data_ptr<scalar_t>();
    const scalar_t* rr = ref_rejected.const_data_ptr<scalar_t>();
    const scalar_t* tail = tails ? tails->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* len = normalise ? lengths->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* w = weights ? weights->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = losses.mutable_data_ptr<scalar_t>();
    scalar_t* rew = rewards.mutable_data_ptr<scalar_t>();
    scalar_t* g = need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    const scalar_t drop = scalar_t(1 - ld_alpha);  // LD-DPO: shared + alpha tail = full - (1 - alpha) tail
    // Per pair: four log-probs (and tails, lengths, weight) read; loss, two rewards (and
    // two gradients) written.
    const int64_t pair_bytes = (7 + (tail ? 4 : 0) + (len ? 2 : 0) + (w ? 1 : 0) + (g ? 2 : 0)) * int64_t(sizeof(scalar_t));
    const threading::Plan plan = threading::plan(B * pair_bytes, threading::kDpo);
    threading::parallel_for_elements(plan, B, pair_bytes, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t c = pc[i], r = pr[i], ref_c = rc[i], ref_r = rr[i];
        if (tail != nullptr) {
          c -= drop * tail[i], r -= drop * tail[B + i];
          ref_c -= drop * tail[2 * B + i], ref_r -= drop * tail[3 * B + i];
        }
        const scalar_t n_c = len ? std::max(len[i], scalar_t(1)) : scalar_t(1);
        const scalar_t n_r = len ? std::max(len[B + i], scalar_t(1)) : scalar_t(1);
        scalar_t d_chosen, d_rejected;
        const scalar_t value = pair_loss<scalar_t>(c, r, ref_c, ref_r, n_c, n_r, options, d_chosen, d_rejected);
        const scalar_t scale = w ? w[i] : scalar_t(1);
        out[i] = value * scale;
        rew[i] = scalar_t(beta) * (c - ref_c);
        rew[B + i] = scalar_t(beta) * (r - ref_r);
        if (g != nullptr) {
          g[i] = d_chosen * scale;
          g[B + i] = d_rejected * scale;
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
