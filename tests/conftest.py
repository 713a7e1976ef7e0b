import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracle.py

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. It is
# chosen when a kernel is decorated, so it must be set before rlhf_kernels.triton loads.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _fresh_seed(request, monkeypatch):
    """Fresh random inputs per test, reproducible from the test's id and independent of
    test order; no test sees another's backend setting."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    monkeypatch.delenv("RLHF_KERNELS_BACKEND", raising=False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def tolist(x: torch.Tensor):
    return x.detach().double().tolist()


def random_mask(B: int, T: int, *, holes: bool = True, all_masked_row: bool = True) -> torch.Tensor:
    """0/1 float mask: right padding of random length, interior holes (multi-turn
    observation tokens) and, optionally, row 0 all masked."""
    lengths = torch.randint(1, T + 1, (B,))
    mask = (torch.arange(T) < lengths[:, None]).float()
    if holes and T > 2:
        mask = mask * (torch.rand(B, T) > 0.2).float()
    if all_masked_row and B > 1:
        mask[0] = 0
    return mask


def backends_of(op: str, gpu: bool = False) -> list:
    """pytest params for a module's backend fixture: reference, and cpu and triton
    (in the interpreter, on CPU tensors) where `op` has them here.

    gpu=True (tests/test_hostile.py, which moves its tensors to the GPU for these): on a
    machine with CUDA, triton is the compiled one (the interpreter is off there) and
    cuda is offered too, where `op` has a CUDA kernel. Without CUDA the params are the
    same as gpu=False's."""
    from rlhf_kernels import backend

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    on_gpu = gpu and torch.cuda.is_available()
    params = [
        "reference",
        pytest.param("cpu", marks=pytest.mark.skipif(op not in backend.HAS_CPU, reason="rlhf_kernels._C not built")),
        pytest.param(
            "triton",
            marks=pytest.mark.skipif(
                op not in backend.HAS_TRITON or not (interpreted or on_gpu),
                reason="needs triton and TRITON_INTERPRET=1 (or a CUDA device, with gpu=True)",
            ),
        ),
    ]
    if on_gpu:
        params.append(
            pytest.param("cuda", marks=pytest.mark.skipif(op not in backend.HAS_CUDA, reason="no CUDA kernel built"))
        )
    return params


def use_backend(request, monkeypatch, family: str) -> str:
    """Routes every op of `family` to the fixture's backend for one test."""
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", f"{family}={request.param}")
    return request.param


def count_calls(monkeypatch, module, name: str) -> list:
    """A list that gets one entry per call of module.name (which still runs)."""
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls
