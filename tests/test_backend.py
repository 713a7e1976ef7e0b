import subprocess
import sys
import textwrap

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _extension, backend, cli

CPU_GAE = "cpu" if "gae" in backend.HAS_CPU else "reference"


def test_auto_on_cpu_tensors():
    assert backend.resolve("gae", "cpu") == CPU_GAE
    for op in backend.OP_FAMILY:  # every op has a C++ CPU kernel
        assert backend.resolve(op, "cpu") == CPU_GAE
    if "dpo_loss" in backend.HAS_TRITON:  # the interpreter: offered after reference, explicit choice only
        assert backend.available("dpo_loss", "cpu")[-2:] == ("reference", "triton")


def test_explicit_beats_env_beats_auto(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    assert backend.resolve("gae", "cpu") == "reference"
    assert backend.resolve("gae", "cpu", backend=CPU_GAE) == CPU_GAE


def test_env_per_family_and_per_op(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, f"reference, gae={CPU_GAE}, discounted_returns=reference")
    assert backend.env_choice("gae") == CPU_GAE  # the family's entry
    assert backend.env_choice("masked_whiten") == CPU_GAE  # same family
    assert backend.env_choice("discounted_returns") == "reference"  # the op's own entry wins
    assert backend.env_choice("kl_penalty") == "reference"  # the default


@pytest.mark.parametrize(
    "setting,words",
    [
        ("fast", "RLHF_KERNELS_BACKEND must be one of ('triton', 'cuda', 'cpu', 'reference')"),
        ("gae=fast", "entry 'gae=fast' must be one of"),
        ("policy=cpu", "key must be an op family"),
    ],
)
def test_bad_env_setting_is_a_clear_error(monkeypatch, setting, words):
    monkeypatch.setenv(backend.ENV_VAR, setting)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        rk.gae(torch.randn(1, 2), torch.randn(1, 2))


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"backend must be one of \('triton', 'cuda', 'cpu', 'reference'\)"):
        rk.kl_penalty(torch.randn(3), torch.randn(3), backend="numpy")


def test_unavailable_backend_names_what_is_available(monkeypatch):
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run gae on cpu tensors.*available: \("):
        rk.gae(torch.randn(1, 2), torch.randn(1, 2), backend="cuda")
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    monkeypatch.delenv("TRITON_INTERPRET")  # no interpreter: no triton on CPU tensors
    with pytest.raises(ValueError, match="RLHF_KERNELS_BACKEND='triton' cannot run bradley_terry_loss"):
        rk.bradley_terry_loss(torch.randn(3), torch.randn(3))


def test_info_lists_every_op(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    assert ("rlhf_kernels._C: loaded" if _extension.LOADED else "NOT loaded") in out
    for op in backend.OP_FAMILY:
        assert op in out
    gae_line = next(line for line in out.splitlines() if line.startswith("gae "))
    assert gae_line.split()[2].rstrip(",") == CPU_GAE


def test_demo_runs(capsys):
    assert cli.main(["step", "--seed", "3"]) == 0
    assert "policy loss" in capsys.readouterr().out


def test_import_without_compiled_extension_falls_back_with_one_warning():
    script = textwrap.dedent("""
        import sys, warnings
        class BlockC:
            def find_spec(self, name, path=None, target=None):
                if name == "rlhf_kernels._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, BlockC())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, rlhf_kernels as rk
            from rlhf_kernels import backend
            adv, _ = rk.gae(torch.ones(1, 3), torch.zeros(1, 3), gamma=1.0, lam=1.0)
        messages = [str(w.message) for w in caught if "rlhf_kernels._C" in str(w.message)]
        assert len(messages) == 1, messages
        assert adv.tolist() == [[3.0, 2.0, 1.0]], adv
        assert backend.resolve("gae", "cpu") == "reference"
        try:
            rk.gae(torch.ones(1, 3), torch.zeros(1, 3), backend="cpu")
        except ValueError as error:
            assert "did not load" in str(error), error
        else:
            raise AssertionError("backend='cpu' without _C must fail")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
