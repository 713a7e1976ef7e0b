"""TRL's own unit tests of the functions rlhf_kernels.integrations.trl.patch() replaces,
run through `trl.trainer.utils` with the drop-ins patched in (and unpatched, to show
that TRL passes them as stated here).

The tests restate, case for case and tolerance for tolerance, the classes of TRL's
tests/test_utils.py that cover the replaced functions: TestSelectiveLogSoftmax
(float16 / bfloat16: torch.equal to logits.log_softmax(-1) gathered; float32 /
float64: 1e-5), TestEntropyFromLogits (4 shapes x chunk sizes 1 and 16 x 4 dtypes,
1e-5 against the unchunked formula in the logits dtype) and TestChunkedLogProbFunction
(forward and backward against the full-logits formula, float32 1e-5, bfloat16
backward 1e-2), the last adapted to TRL 1.16's signature (bias, softcap, logit_scale
and outputs arguments; five outputs). They are written here, not copied: TRL's wheel
ships no tests, and this project commits no code taken from a fetched repository.
Each test calls the function as TRL's test does, by its name in trl.trainer.utils,
looked up at call time, so the patched run exercises the drop-ins.
"""

import pytest
import torch
import torch.nn.functional as F

from rlhf_kernels.integrations import trl as rk_trl
from trl_support import skip_module_unless_supported, trl_utils

skip_module_unless_supported()

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["trl", "patched"])
def utils(request):
    """trl.trainer.utils, unpatched or with rk_trl.patch() applied for the test."""
    if request.param == "trl":
        yield trl_utils
        return
    with rk_trl.patched() as count:
        assert count > 0
        assert trl_utils.selective_log_softmax is rk_trl.selective_log_softmax
        assert trl_utils.entropy_from_logits is rk_trl.entropy_from_logits
        assert trl_utils._ChunkedLogProbFunction is rk_trl.ChunkedLogProbFunction
        yield trl_utils
    assert trl_utils.selective_log_softmax is not rk_trl.selective_log_softmax


def _gathered_log_softmax(logits, index):
    return torch.gather(logits.log_softmax(-1), dim=-1, index=index)


# ---------------------------------------------------- TestSelectiveLogSoftmax --


@pytest.mark.parametrize("dtype", DTYPES)
def test_selective_log_softmax(utils, dtype):
    batch, seq, vocab = 4, 32, 1024
    input_ids = torch.randint(0, vocab, (batch, seq))
    logits = torch.randn(batch, seq, vocab, dtype=dtype)
    want = _gathered_log_softmax(logits, input_ids.unsqueeze(-1)).squeeze(-1)
    got = utils.selective_log_softmax(logits, input_ids)
    if dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(got, want)  # TRL: the 16-bit path is exact to log_softmax
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 8])
def test_selective_log_softmax_multi_index(utils, dtype, k):
    batch, seq, vocab = 4, 32, 1024
    index = torch.randint(0, vocab, (batch, seq, k))
    logits = torch.randn(batch, seq, vocab, dtype=dtype)
    want = _gathered_log_softmax(logits, index)
    got = utils.selective_log_softmax(logits, index)
    assert got.shape == (batch, seq, k)
    if dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------- TestEntropyFromLogits --


@pytest.mark.parametrize("shape", [(768,), (32, 768), (8, 16, 768), (2, 4, 8, 768)])
@pytest.mark.parametrize("chunk_size", [1, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_from_logits(utils, dtype, chunk_size, shape):
    logits = torch.randn(*shape, dtype=dtype)
    if dtype in (torch.float64, torch.float32):
        p = logits.softmax(-1)
        want = -torch.sum(p * p.log(), dim=-1)
    else:
        logps = logits.log_softmax(dim=-1)
        want = -(torch.exp(logps) * logps).sum(-1)
    got = utils.entropy_from_logits(logits, chunk_size=chunk_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------ TestChunkedLogProbFunction --
# TRL 1.16: apply(hidden, weight, bias, targets, temperature, chunk_size,
# final_logit_softcapping=None, logit_scale=1.0, outputs=...) -> 5 outputs.

N, H, V, CHUNK = 64, 32, 128, 32


def _full_logits_reference(hidden, weight, labels, temperature):
    logits = (hidden @ weight.t()).to(torch.float32) / temperature
    log_p = F.log_softmax(logits, dim=-1)
    return log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(torch.softmax(logits, dim=-1) * log_p).sum(-1)


def _chunked(utils, hidden, weight, labels, temperature):
    out = utils._ChunkedLogProbFunction.apply(
        hidden, weight, None, labels, temperature, CHUNK, None, 1.0, ("log_probs", "entropy")
    )
    assert len(out) == 5 and out[2] is None and out[3] is None and out[4] is None
    return out[0], out[1]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_log_prob_forward(utils, temperature):
    torch.manual_seed(42)
    hidden, weight = torch.randn(N, H), torch.randn(V, H)
    labels = torch.randint(0, V, (N,))
    logprobs, entropy = _chunked(utils, hidden, weight, labels, temperature)
    want_logprobs, want_entropy = _full_logits_reference(hidden, weight, labels, temperature)
    torch.testing.assert_close(logprobs, want_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_chunked_log_prob_backward(utils, temperature, dtype, tol):
    torch.manual_seed(42)
    hidden = torch.randn(N, H, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    _chunked(utils, hidden, weight, labels, temperature)[0].sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    _full_logits_reference(hidden, weight, labels, temperature)[0].sum().backward()
    torch.testing.assert_close(got[0], hidden.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(got[1], weight.grad, atol=tol, rtol=tol)
