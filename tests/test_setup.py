"""setup.py's choice of build: finding the CUDA toolkit behind nvcc (wrapper scripts,
symlinks, CUDA_HOME), torch's CUDA major against nvcc's, and the fallback decision,
on fake toolkits (no nvcc or GPU needed). The build itself, CUDA and the CPU
fallback, is checked by .ci/torch_versions.sh."""

import importlib.util
import os
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("rlhf_kernels_setup_py", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() runs only as __main__
    return module


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch, tmp_path, setup_py):
    for var in ("CUDA_HOME", "CUDA_PATH", "RLHF_KERNELS_CUDA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")  # restored after the test
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(setup_py, "DEFAULT_TOOLKITS", ((str(tmp_path / "nowhere"), "the default location"),))


def _script(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def _toolkit(root, release="13.0", says_top=True):
    """A fake toolkit whose nvcc answers --version and --dryrun as the real one does."""
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "lib64").mkdir()
    (root / "lib64" / "libcudart.so").write_text("")
    top = f'echo "#\\$ TOP={root}/bin/.." >&2' if says_top else ":"
    _script(
        root / "bin" / "nvcc",
        f'case "$*" in\n  *--version*) echo "Cuda compilation tools, release {release}, V{release}.88";;\n'
        f"  *--dryrun*) {top};;\nesac\n",
    )
    return root


def _on_path(monkeypatch, folder):
    monkeypatch.setenv("PATH", f"{folder}:/usr/bin:/bin")


def _torch(cuda="13.0"):
    return types.SimpleNamespace(
        __version__="2.14.1+cu130" if cuda else "2.13.0+cpu",
        version=types.SimpleNamespace(cuda=cuda),
        cuda=types.SimpleNamespace(is_available=lambda: False),
    )


def test_a_wrapper_script_on_path_leads_to_the_real_toolkit(setup_py, tmp_path, monkeypatch):
    # /usr/local/bin/nvcc = `exec /usr/local/cuda-13.0/bin/nvcc "$@"`: torch would guess /usr/local
    real = _toolkit(tmp_path / "cuda-13.0")
    _script(tmp_path / "local" / "bin" / "nvcc", f'exec {real}/bin/nvcc "$@"\n')
    _on_path(monkeypatch, tmp_path / "local" / "bin")
    home, how = setup_py.find_cuda_toolkit("13.0")
    assert home == os.path.realpath(real) and "runs nvcc from" in how


def test_a_symlink_on_path_is_resolved(setup_py, tmp_path, monkeypatch):
    real = _toolkit(tmp_path / "cuda-13.0", says_top=False)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "nvcc").symlink_to(real / "bin" / "nvcc")
    _on_path(monkeypatch, tmp_path / "links")
    home, how = setup_py.find_cuda_toolkit("13.0")
    assert home == os.path.realpath(real) and "symlinks" in how


def test_cuda_home_comes_first_and_must_be_a_toolkit(setup_py, tmp_path, monkeypatch):
    real = _toolkit(tmp_path / "cuda-13.0")
    monkeypatch.setenv("CUDA_HOME", str(real))
    assert setup_py.find_cuda_toolkit("13.0") == (str(real), "$CUDA_HOME")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # /usr/local: bin/nvcc maybe, no headers
    with pytest.raises(setup_py.CudaProblem, match="include/cuda_runtime.h") as problem:
        setup_py.find_cuda_toolkit("13.0")
    assert "CUDA_HOME" in problem.value.fix


def test_no_toolkit_anywhere(setup_py):
    with pytest.raises(setup_py.CudaProblem, match="no CUDA toolkit found") as problem:
        setup_py.find_cuda_toolkit("13.0")
    assert "CUDA 13.x" in problem.value.fix


def test_a_toolkit_found_plans_the_cuda_build_with_ptx(setup_py, tmp_path, monkeypatch):
    _on_path(monkeypatch, _toolkit(tmp_path / "cuda-13.0", release="13.2") / "bin")
    info = setup_py.plan_cuda(_torch("13.0"))  # minor versions may differ
    assert info["kernels"] == "cuda" and info["nvcc"] == "13.2"
    assert info["arch_list"] == os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"


def test_a_cuda_major_mismatch_falls_back_with_one_warning(setup_py, tmp_path, monkeypatch, capsys):
    _on_path(monkeypatch, _toolkit(tmp_path / "cuda-12.4", release="12.4") / "bin")
    info = setup_py.plan_cuda(_torch("13.0"))
    assert info["kernels"] == "cpu"
    assert "CUDA 12.4" in info["reason"] and "CUDA 13.0" in info["reason"]
    assert "CUDA_HOME" in info["fix"]
    err = capsys.readouterr().err
    assert err.count("WARNING rlhf-kernels") == 1 and "RLHF_KERNELS_CUDA=0" in err


def test_rlhf_kernels_cuda_1_makes_the_problem_an_error(setup_py, tmp_path, monkeypatch):
    _on_path(monkeypatch, _toolkit(tmp_path / "cuda-12.4", release="12.4") / "bin")
    monkeypatch.setenv("RLHF_KERNELS_CUDA", "1")
    with pytest.raises(SystemExit, match="major versions must match"):
        setup_py.plan_cuda(_torch("13.0"))
    with pytest.raises(SystemExit, match="CPU build"):
        setup_py.plan_cuda(_torch(None))


def test_a_cpu_torch_builds_the_cpu_kernels_without_a_warning(setup_py, capsys):
    info = setup_py.plan_cuda(_torch(None))
    assert info["kernels"] == "cpu" and "CPU build" in info["reason"] and info["fix"] == ""
    assert capsys.readouterr().err == ""


def test_rlhf_kernels_cuda_0(setup_py, tmp_path, monkeypatch, capsys):
    _on_path(monkeypatch, _toolkit(tmp_path / "cuda-13.0") / "bin")
    monkeypatch.setenv("RLHF_KERNELS_CUDA", "0")
    assert setup_py.plan_cuda(_torch("13.0"))["reason"] == "RLHF_KERNELS_CUDA=0"
    assert capsys.readouterr().err == ""


def test_info_says_which_build_and_why(monkeypatch):
    import torch

    from rlhf_kernels import _extension

    monkeypatch.setattr(
        _extension,
        "BUILD_INFO",
        {"kernels": "cuda", "nvcc": "13.0", "cuda_home": "/usr/local/cuda-13.0", "arch_list": "8.0;9.0+PTX",
         "torch": torch.__version__},
    )
    assert _extension.build_summary() == (
        "C++ CPU + CUDA kernels (nvcc 13.0 in /usr/local/cuda-13.0, archs 8.0;9.0+PTX)"
    )
    monkeypatch.setattr(
        _extension,
        "BUILD_INFO",
        {"kernels": "cpu", "reason": "no CUDA toolkit found", "fix": "set CUDA_HOME", "torch": "0.0"},
    )
    summary = _extension.build_summary()
    assert summary.startswith("C++ CPU kernels only, no CUDA kernels: no CUDA toolkit found. Fix: set CUDA_HOME")
    assert "Built against torch 0.0" in summary
