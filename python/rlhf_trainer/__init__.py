"""rlhf_trainer: the thin trainer bundled with rlhf-kernels (SFT, reward model, PPO, DPO).

It drives Hugging Face causal LMs through rlhf_kernels' public API only. The
stages land with the trainer issue; this package is installed alongside
rlhf_kernels so that `import rlhf_trainer` already resolves.
"""
