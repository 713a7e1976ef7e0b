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
  m.def(
      "gae(Tensor rewards, Tensor values, Tensor? mask, float gamma, float lam, str mask_mode)"
      " -> (Tensor advantages, Tensor returns)");
}
