"""verl 0.9.1's own advantage estimators and policy losses as parity oracles.

`core_algos` is verl/trainer/ppo/core_algos.py of the verl==0.9.1 wheel, loaded
from tests/vendored/verl_0_9_1 (byte for byte, with verl/utils/groupwise.py and
verl/utils/torch_functional.py, whose functions it calls). Its import-time
dependencies that are not math (omegaconf, tensordict, verl's config dataclasses,
device helpers, the `deprecated` decorator) are stubs; every formula run is
verl's file. `actor_config(...)` stands in for verl's ActorConfig (attribute and
.get() access, as core_algos uses it).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent / "vendored" / "verl_0_9_1"


class _Config(dict):
    """verl's configs are read both as attributes and with .get()."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error


class ActorConfig(_Config):
    pass


class AlgoConfig(_Config):
    pass


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    module.__path__ = []  # a package, so submodules can be registered under it
    return module


def _load_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _load() -> types.ModuleType:
    saved = {k: v for k, v in sys.modules.items() if k == "verl" or k.startswith("verl.")}
    stubs = {
        "omegaconf": _module("omegaconf", DictConfig=dict),
        "tensordict": _module("tensordict", TensorDict=dict),
        "verl": _module("verl"),
        "verl.trainer": _module("verl.trainer"),
        "verl.trainer.ppo": _module("verl.trainer.ppo"),
        "verl.trainer.config": _module("verl.trainer.config", AlgoConfig=AlgoConfig),
        "verl.workers": _module("verl.workers"),
        "verl.workers.config": _module("verl.workers.config", ActorConfig=ActorConfig),
        "verl.utils": _module("verl.utils"),
        "verl.utils.device": _module(
            "verl.utils.device", get_device_name=lambda: "cpu", get_torch_device=lambda: torch.cpu
        ),
        "verl.utils.import_utils": _module("verl.utils.import_utils", deprecated=lambda *a, **k: lambda f: f),
    }
    added = [name for name in stubs if name not in sys.modules]
    sys.modules.update({name: stubs[name] for name in added})
    try:
        groupwise = _load_file("verl.utils.groupwise", ROOT / "verl/utils/groupwise.py")
        stubs["verl.utils"].as_torch_index = groupwise.as_torch_index
        stubs["verl.utils"].group_mean_std = groupwise.group_mean_std
        _load_file("verl.utils.torch_functional", ROOT / "verl/utils/torch_functional.py")
        stubs["verl.utils"].torch_functional = sys.modules["verl.utils.torch_functional"]
        return _load_file("verl.trainer.ppo.core_algos", ROOT / "verl/trainer/ppo/core_algos.py")
    finally:
        # verl's modules and the stubs leave sys.modules; the loaded module keeps its globals.
        for name in [k for k in sys.modules if k == "verl" or k.startswith("verl.")] + added:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


core_algos = _load()


# verl 0.9.1's PolicyLossConfig defaults (verl/workers/config/actor.py); note ppo_kl_coef
# 0.1 here where core_algos falls back to 1.0 for None.
POLICY_LOSS_DEFAULTS = {
    "clip_cov_ratio": 0.0002, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0, "kl_cov_ratio": 0.0002, "ppo_kl_coef": 0.1,
    "dro_beta": None,
}  # fmt: skip


def actor_config(**options) -> ActorConfig:
    """An ActorConfig with verl 0.9.1's defaults (clip_ratio 0.2, clip_ratio_c 3.0, one rank)."""
    policy_loss = _Config({**POLICY_LOSS_DEFAULTS, **options.pop("policy_loss", {})})
    config = {
        "clip_ratio": 0.2,
        "clip_ratio_low": None,
        "clip_ratio_high": None,
        "clip_ratio_c": 3.0,
        "tau_pos": 1.0,
        "tau_neg": 1.05,
        "global_batch_info": {},
        "policy_loss": policy_loss,
    }
    config.update(options)
    return ActorConfig(config)
