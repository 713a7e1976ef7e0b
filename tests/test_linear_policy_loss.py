"""linear_policy_loss: the policy loss from hidden states x lm_head weight, against the
unfused computation (the [B, T, V] logits, log_softmax, gather, entropy, then the
reference policy_loss) on every backend, in fp32 and bf16, on odd shapes (T = 1, V not
a multiple of any block, H not a multiple of 128, an all-masked row), with float64
gradcheck, torch.compile and bad input.
"""

import pytest
import torch

import rlhf_kernels as rk
from conftest import backends_of, random_mask


@pytest.fixture(params=backends_of("linear_policy_loss"))
def backend_name(request):
    return request.param


def _inputs(B, T, H, V, dtype=torch.float32, *, ref=False, bias=False):
    hidden = torch.randn(B, T, H, dtype=dtype)
    weight = (torch.randn(V, H) / H**0.5).to(dtype)
    labels = torch.randint(0, V, (B, T))
    mask = random_mask(B, T)
    labels[mask == 0] = V + 5  # padding tokens out of the vocabulary are never read
    base = -3 * torch.rand(B, T)
    inputs = dict(
        hidden=hidden,
        weight=weight,
        labels=labels,
        mask=mask,
        old_logprobs=base + 0.3 * torch.randn(B, T),
        advantages=torch.randn(B),
        ref_logprobs=base + 0.2 * torch.randn(B, T) if ref else None,
        bias=(0.1 * torch.randn(V)).to(dtype) if bias else None,
    )
    return inputs


def _unfused(hidden, weight, labels, mask, *, bias=None, temperature=1.0, entropy_coef=0.0, **options):
    """What a trainer does without us: the whole [B, T, V] logits in fp32."""
    logits = (hidden @ weight.T + (0 if bias is None else bias)).float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    tokens = torch.where(mask != 0, labels, 0)
    logprobs = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return rk.policy_loss(
        logprobs,
        entropy=entropy if entropy_coef else entropy.detach(),
        entropy_coef=entropy_coef,
        mask=mask,
        backend="reference",
        **options,
    )


def _loss_and_grads(fn, inputs, differentiable, **options):
    inputs = {k: (v.detach().clone().requires_grad_(k in differentiable) if torch.is_tensor(v) else v)
              for k, v in inputs.items()}  # fmt: skip
    loss, stats = fn(**inputs, **options)
    loss.backward()
    return loss.detach(), stats, [inputs[k].grad for k in differentiable]


CASES = [
    dict(loss_type="grpo", clip_high=0.28),
    dict(loss_type="dapo", clip_high=0.28, kl_coef=0.04, kl_estimator="k3"),
    dict(loss_type="dr_grpo", entropy_coef=0.01),
    dict(loss_type="gspo", clip_low=3e-4, clip_high=4e-4),
    dict(loss_type="cispo", clip_high=5.0, cispo_clip="upper", temperature=0.7),
    dict(loss_type="vanilla", dual_clip=3.0, agg="token-mean", importance_sampling_level="sequence"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["loss_type"])
def test_matches_the_unfused_loss_and_gradients(backend_name, case):
    B, T, H, V = (3, 5, 24, 515) if backend_name == "triton" else (4, 9, 72, 1031)
    inputs = _inputs(B, T, H, V, ref="kl_coef" in case, bias=case["loss_type"] == "dr_grpo")
    differentiable = ("hidden", "weight") + (("bias",) if inputs["bias"] is not None else ())
    ours = _loss_and_grads(rk.linear_policy_loss, inputs, differentiable, backend=backend_name, **case)
    want = _loss_and_grads(_unfused, inputs, differentiable, **case)
    # fp32: both sides reduce V in fp32 in different orders; 2e-5 relative covers
    # H = 72 dot products and V = 1031 sums (observed <= 3e-6).
    torch.testing.assert_close(ours[0], want[0], atol=2e-6, rtol=2e-5)
    for name in want[1]:
        torch.testing.assert_close(ours[1][name], want[1][name], atol=2e-6, rtol=2e-5, msg=name)
    for got, expected in zip(ours[2], want[2]):
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-5)


def test_bfloat16_matches_the_unfused_model_in_bfloat16(backend_name):
    B, T, H, V = (2, 3, 24, 515) if backend_name == "triton" else (3, 7, 72, 1031)
    inputs = _inputs(B, T, H, V, torch.bfloat16)
    ours = _loss_and_grads(rk.linear_policy_loss, inputs, ("hidden", "weight"), backend=backend_name)
    want = _loss_and_grads(_unfused, inputs, ("hidden", "weight"))
    # Both round the logits to bf16 (8 mantissa bits) before the fp32 softmax, but in
    # different dot-product orders: a logit differs by up to 1 bf16 ulp (2^-8 relative),
    # the loss by about that much; gradients come back as bf16 (again 2^-8).
    torch.testing.assert_close(ours[0], want[0], atol=1e-2, rtol=1e-2)
    assert ours[0].dtype == torch.float32
    for got, expected in zip(ours[2], want[2]):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_one_position_and_all_masked_rows(backend_name):
    inputs = _inputs(3, 1, 40, 259)
    inputs["mask"] = torch.tensor([[0.0], [1.0], [0.0]])
    ours = _loss_and_grads(rk.linear_policy_loss, inputs, ("hidden", "weight"), backend=backend_name)
    want = _loss_and_grads(_unfused, inputs, ("hidden", "weight"))
    torch.testing.assert_close(ours[0], want[0], atol=2e-6, rtol=2e-5)
    assert torch.equal(ours[2][0][0], torch.zeros(1, 40))  # a masked row gets no gradient
    inputs["mask"] = torch.zeros(3, 1)
    loss, _ = rk.linear_policy_loss(**inputs, backend=backend_name)
    assert loss.item() == 0.0


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_float64_gradcheck(backend_name):
    if backend_name not in rk.backend.available("linear_policy_loss", "cpu"):
        pytest.skip(f"{backend_name} not built")
    inputs = _inputs(2, 3, 5, 11, torch.float64, ref=True, bias=True)
    inputs["old_logprobs"] = inputs["old_logprobs"].double()
    inputs["ref_logprobs"] = inputs["ref_logprobs"].double()
    hidden, weight, bias = (inputs.pop(k).requires_grad_() for k in ("hidden", "weight", "bias"))

    def loss(h, w, b):
        return rk.linear_policy_loss(
            h, w, bias=b, **inputs, kl_coef=0.1, entropy_coef=0.01, clip_low=0.5, backend=backend_name
        )[0]

    assert torch.autograd.gradcheck(loss, (hidden, weight, bias))


def test_fullgraph_compile_matches_eager():
    name = "cpu" if "cpu" in rk.backend.available("linear_policy_loss", "cpu") else "reference"
    inputs = _inputs(2, 6, 32, 301)

    def step(**kwargs):
        return rk.linear_policy_loss(**kwargs, loss_type="dapo", backend=name)[0]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(**inputs), step(**inputs))


def test_bad_input_names_the_argument():
    inputs = _inputs(2, 3, 8, 17)
    with pytest.raises(ValueError, match="labels"):
        bad = dict(inputs, labels=inputs["labels"].clone())
        bad["labels"][1, 0], bad["mask"] = 17, torch.ones(2, 3)
        rk.linear_policy_loss(**bad)
    with pytest.raises(ValueError, match="old_logprobs"):
        rk.linear_policy_loss(**dict(inputs, old_logprobs=torch.zeros(2, 4)))
    with pytest.raises(ValueError, match="advantages"):
        rk.linear_policy_loss(**dict(inputs, advantages=torch.zeros(3)))
    with pytest.raises(TypeError, match="weight"):
        rk.linear_policy_loss(**dict(inputs, weight=inputs["weight"].double()))
    with pytest.raises(ValueError, match="hidden"):
        rk.linear_policy_loss(**dict(inputs, hidden=inputs["hidden"][0]))
    with pytest.raises(TypeError, match="computes logprobs and entropy itself"):
        rk.linear_policy_loss(**inputs, entropy=torch.zeros(2, 3))


# Liger's LigerFusedLinearGRPOLoss (chunked torch, TRL's loss types), the fused anchor of
# bench/grpo.py: the same loss and gradients, with TRL's normalisers (num_sequences = B,
# horizon = T as Liger's max_completion_length).
LIGER_CASES = [
    ("grpo", dict(num_sequences=True)),
    ("bnpo", dict()),
    ("dapo", dict()),
    ("dr_grpo", dict(num_sequences=True, horizon=True)),
]


@pytest.mark.parametrize("loss_type,normalisers", LIGER_CASES, ids=[c[0] for c in LIGER_CASES])
def test_matches_liger_fused_linear_grpo_loss(loss_type, normalisers):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception as error:  # noqa: BLE001  (not installed, or not importable on this torch)
        pytest.skip(f"liger_kernel not importable: {error!r}")
    B, T, H, V = 4, 7, 40, 301
    inputs = _inputs(B, T, H, V, ref=True)
    inputs["labels"] = inputs["labels"].clamp(max=V - 1)  # Liger gathers every position
    liger = LigerFusedLinearGRPOLoss(
        beta=0.04, compiled=False, use_ref_model=True, epsilon_low=0.2, epsilon_high=0.28,
        loss_type=loss_type, max_completion_length=T, temperature=0.8,
    )  # fmt: skip

    def theirs(hidden, weight, labels, mask, old_logprobs, advantages, ref_logprobs, bias):
        return liger(hidden, weight, labels, mask, advantages, ref_per_token_logps=ref_logprobs,
                     old_per_token_logps=old_logprobs)  # fmt: skip

    def ours(**kwargs):
        return rk.linear_policy_loss(
            **kwargs, loss_type=loss_type, clip_high=0.28, kl_coef=0.04, kl_estimator="k3", temperature=0.8,
            num_sequences=B if normalisers.get("num_sequences") else None,
            horizon=T if normalisers.get("horizon") else None,
        )  # fmt: skip

    got = _loss_and_grads(ours, inputs, ("hidden", "weight"))
    want = _loss_and_grads(theirs, inputs, ("hidden", "weight"))
    torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=2e-5)
    for mine, liger_grad in zip(got[2], want[2]):
        torch.testing.assert_close(mine, liger_grad, atol=2e-6, rtol=2e-5)
