// Every rlhf_kernels C++ op schema, in one place. Kernels attach to these per
// device with TORCH_LIBRARY_IMPL in csrc/cpu/<family>.cpp and csrc/cuda/<family>.cu;
// fake (meta) kernels and autograd live in rlhf_kernels/ops/<family>.py.
#include <Python.h>
#include <torch/library.h>

// `import rlhf_kernels._C` only has to run the static registrations below, so
// the module itself is empty (the extension-cpp pattern: no pybind11 functions).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(rlhf_kernels, m) {
  // gae: advantages and returns of one reverse scan per row; rewards/values [B, T]
  // float32 or float64, mask [B, T] of the same dtype or None; mask_mode is
  // "ignore" | "multiply" | "carry" (see rlhf_kernels/reference/gae.py).
  // token_logprobs: per-row log p(label), entropy and logsumexp of the
  // transformed logits; logits [N, V] any float dtype, labels [N] int32/int64;
  // outputs [N] float32 (float64 for float64 logits). softcap None = no cap.
  // inplace_backward only tells the autograd formula (rlhf_kernels/ops/logprobs.py)
  // which backward to run.
  m.def(
      "token_logprobs(Tensor logits, Tensor labels, float temperature, float? softcap, float logit_scale,"
      " int ignore_index, bool return_entropy, bool inplace_backward) -> (Tensor logprobs, Tensor entropy,"
      " Tensor lse)");
  // Its backward: d logits in the logits dtype, from the saved lse and entropy...
  m.def(
      "token_logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor labels,"
      " Tensor lse, Tensor entropy, float temperature, float? softcap, float logit_scale, int ignore_index)"
      " -> Tensor grad_logits");
  // ...or written over the logits themselves (no second [N, V] buffer).
  m.def(
      "token_logprobs_backward_(Tensor(a!) logits, Tensor grad_logprobs, Tensor? grad_entropy, Tensor labels,"
      " Tensor lse, Tensor entropy, float temperature, float? softcap, float logit_scale, int ignore_index)"
      " -> ()");
  // kl_penalty: the estimator ("k1" | "k2" | "k3" | "abs" | "low_var_kl") of
  // d = logprobs - ref_logprobs, elementwise over contiguous float32/float64 of one
  // shape, clamped to [-clamp, clamp] when set; grad = d kl / d d (empty unless
  // need_grad), so d/d logprobs = g * grad and d/d ref_logprobs = -g * grad.
  m.def(
      "kl_penalty(Tensor logprobs, Tensor ref_logprobs, str estimator, float? clamp, bool need_grad)"
      " -> (Tensor kl, Tensor grad)");
  // kl_shaped_rewards: [B, T] inputs, mask as weights of that dtype, scores [B];
  // score_index [B] int64, or None for the last position with mask != 0 (a row
  // with none gets no score). Returns (rewards, kl * mask).
  m.def(
      "kl_shaped_rewards(Tensor scores, Tensor logprobs, Tensor ref_logprobs, Tensor mask, float kl_coef,"
      " str estimator, float? clamp, Tensor? score_index) -> (Tensor rewards, Tensor kl)");
  // ppo_policy_loss / ppo_value_loss: one pass over [B, T] float32/float64 inputs of
  // one dtype (mask as weights in that dtype); row_weight [B] is the aggregation's
  // per-row scale (rlhf_kernels/ops/ppo.py), so the loss is sum(row_stats[:, 0]).
  // row_stats [B, 4]: weighted loss sum, then masked sums of the clipped indicator,
  // the dual-clip indicator and (ratio - 1 - log ratio) [value loss: B x 2, loss and
  // clipped]. grad [B, T] = d(row_stats[b, 0]) / d input (empty unless need_grad):
  // the backward is a scale. A None clip option is off.
  m.def(
      "ppo_policy_loss(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, Tensor row_weight,"
      " float clip_low, float clip_high, float? dual_clip, float? log_ratio_clamp, bool need_grad)"
      " -> (Tensor row_stats, Tensor grad)");
  // grpo_policy_loss: the per-token critic-free losses (rlhf_kernels/reference/grpo.py)
  // in one pass over [B, T] float32/float64 inputs of one dtype (mask as weights;
  // is_weights / ref_logprobs empty when unused). loss_code: 0 clip, 1 cispo, 2 sapo,
  // 3 pg (gpg, dro); kl_code: 0 none, 1 k1, 2 k2, 3 k3, 4 abs, 5 low_var_kl, +8 the
  // straight-through "+" (value of the estimator, gradient of k2), +16 kl_is_corrected
  // (the KL term times the ratio). params (12):
  // 1 - clip_low, 1 + clip_high, dual_clip, delta, log_ratio_clamp (+inf: off),
  // tau_pos, tau_neg, dro_beta, cispo weight low, high, kl_coef, 0. row_stats [B, 8]:
  // weighted loss sum, masked sums of low-clip, high-clip, dual-clip, -log ratio,
  // ratio - 1 - log ratio, ratio, and the row's max ratio. grad = d row_stats[:, 0].
  m.def(
      "grpo_policy_loss(Tensor logprobs, Tensor old_logprobs, Tensor advantages, Tensor mask, Tensor is_weights,"
      " Tensor ref_logprobs, Tensor row_weight, int loss_code, int kl_code, float[] params, bool need_grad)"
      " -> (Tensor row_stats, Tensor grad)");
  m.def(
      "ppo_value_loss(Tensor values, Tensor old_values, Tensor returns, Tensor mask, Tensor row_weight,"
      " float? clip, bool need_grad) -> (Tensor row_stats, Tensor grad)");
  // masked_sums: per row of [R, C] (sum mask * x, sum mask) as float64 [R, 2]
  // (masked_mean divides in Python). masked_whiten: one mean and variance over all
  // of x (mask as weights of x's dtype, float32/float64); stats float64 [5] is
  // (count, mean, rstd, variance denominator, sum mask (x - mean)) for the backward.
  m.def("masked_sums(Tensor x, Tensor mask) -> Tensor sums");
  // fill_masked: outputs where mask == 0 are 0 (else whitened like the rest).
  m.def(
      "masked_whiten(Tensor x, Tensor mask, bool shift_mean, bool unbiased, float eps, bool fill_masked)"
      " -> (Tensor out, Tensor stats)");
  m.def(
      "masked_whiten_backward(Tensor grad, Tensor x, Tensor mask, Tensor stats, bool shift_mean, bool fill_masked)"
      " -> Tensor grad_x");
  // dpo_loss: one per-pair loss type on the four [B] sequence log-probs (contiguous, one
  // float dtype), with optional LD-DPO tails [4, B] (policy chosen, rejected, ref chosen,
  // rejected), completion lengths [2, B] (ipo, sigmoid_norm) and WPO weights [B] of that
  // dtype; returns losses [B], rewards [2, B] (beta (pi - ref), chosen then rejected) and
  // grad [2, B] = d losses / d (policy chosen, policy rejected) (empty unless need_grad).
  m.def(
      "dpo_loss(Tensor policy_chosen, Tensor policy_rejected, Tensor ref_chosen, Tensor ref_rejected, Tensor? tails,"
      " Tensor? lengths, Tensor? weights, float beta, str loss_type, float label_smoothing, bool reference_free,"
      " bool cdpo, str f_divergence_type, float f_alpha, float f_alpha_clamp, float ld_alpha, float discopop_tau,"
      " bool need_grad) -> (Tensor losses, Tensor rewards, Tensor grad)");
  // bradley_terry_loss: elementwise -logsigmoid(chosen - rejected - margin) and its
  // derivative by chosen. ranking_loss: rewards, ranks [B, K] of one float dtype;
  // per prompt the mean over pairs with rank_i < rank_j, the pair count, and
  // d row_loss / d rewards [B, K].
  m.def(
      "bradley_terry_loss(Tensor chosen_rewards, Tensor rejected_rewards, Tensor? margin, bool need_grad)"
      " -> (Tensor losses, Tensor grad)");
  m.def(
      "ranking_loss(Tensor rewards, Tensor ranks, bool need_grad) -> (Tensor row_loss, Tensor row_pairs, Tensor grad)");
  m.def(
      "gae(Tensor rewards, Tensor values, Tensor? mask, float gamma, float lam, str mask_mode)"
      " -> (Tensor advantages, Tensor returns)");
}
