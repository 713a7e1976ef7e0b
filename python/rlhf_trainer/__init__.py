"""rlhf_trainer: the thin trainer bundled with rlhf-kernels (SFT, reward model, PPO, DPO, GRPO).

It drives Hugging Face causal LMs through rlhf_kernels' public API only (log-probs
from hidden states by linear_logprobs, never full logits). Modules, one job each:

  task        the built-in synthetic task and its hidden gold reward
  tokenizer   the built-in task's tokenizer (tokenizers, built in code)
  data        JSONL readers (sft, preferences, rankings, prompts) and batching
  models      tiny built-in model / local HF model, value model, reward model
  sampling    response sampling for rollouts and evaluation
  sft, rm, ppo, dpo, grpo   the stages, each a function and a `rlhf-kernels train` command
  evaluate    gold reward, RM reward, KL to the reference, win rate
  demo, report        `rlhf-kernels demo` and its report / curves
  common      devices, seeds, checkpoints, metrics log, progress bars
  cli         `rlhf-kernels train sft|rm|ppo|dpo|grpo`
"""
