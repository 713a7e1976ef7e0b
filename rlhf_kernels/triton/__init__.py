"""Triton kernels and their launchers, one module per op family.

Imported only when triton is installed (rlhf_kernels.backend checks); the kernels
run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (the tests).
"""
