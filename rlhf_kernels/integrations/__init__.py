"""Drop-ins with TRL's, OpenRLHF's and verl's exact signatures and semantics, each a
thin adapter over rlhf_kernels' public API (no second implementation of the math).

    from rlhf_kernels.integrations import trl, openrlhf, verl

Each module's docstring lists where it departs from its framework (never NaN from
finite input, clear errors for unsupported options).
"""
