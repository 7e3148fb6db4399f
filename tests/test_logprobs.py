"""Tests for utils/logprobs.py against naive log_softmax + gather and a token-by-token loop over the model."""

from __future__ import annotations

import math


import pytest
import torch
import torch.nn.functional as F

from utils import logprobs as lp_mod
from utils.logprobs import (
    entropy_from_logits,
    logprobs_from_logits,
    position_ids_from_mask,
    response_logits,
    sequence_logprobs,
)
from utils.models import load_policy


def naive_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The textbook version: a full log-softmax, then gather."""
    return F.log_softmax(logits / temperature, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def naive_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """-sum p log p with p = softmax(logits / T), computed in float64."""
    logp = F.log_softmax(logits.double() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------- logprobs_from_logits

SHAPES = [(7, 13), (3, 5, 11), (2, 3, 4, 9), (1, 2), (37, 3, 997)]


@pytest.fixture(params=["one_call", "chunked"])
def path(request, monkeypatch):
    """Run a test on both code paths: one fused call (the default below 8M logits) and the chunked path
    (forward chunk by chunk into a workspace, backward recomputing the softmax), forced at small sizes by
    shrinking the thresholds so that every test input is several chunks with a ragged last one."""
    if request.param == "chunked":
        monkeypatch.setattr(lp_mod, "_ONE_CALL_ELEMENTS", 40)
        monkeypatch.setattr(lp_mod, "_CHUNK_ELEMENTS", 30)
    return request.param


@pytest.mark.parametrize("shape,temperature", [(s, t) for s in SHAPES for t in (1.0, 0.7, 2.5)] + [((1001, 5000), 0.7), ((3, 999, 997), 1.3)])
def test_logprobs_match_naive(shape, temperature, path):
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(*shape, generator=g)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    for grad in (False, True):  # under no_grad, and through the autograd Function
        got = logprobs_from_logits(logits.clone().requires_grad_(grad), labels, temperature)
        assert got.shape == labels.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.detach(), naive_logprobs(logits, labels, temperature), atol=1e-5, rtol=1e-5)


def test_chunk_rule():
    # up to 8M logits one call covers every row; above, chunks of at most 4M logits, the last one ragged
    assert lp_mod._rows_per_chunk(24, 4096) == 24
    assert lp_mod._rows_per_chunk(128, 50257) == 128  # 6.4M logits: one call
    assert lp_mod._rows_per_chunk(2048, 50257) == 83  # 2**22 // 50257
    assert lp_mod._rows_per_chunk(1, 10**8) == 1  # a single row larger than a chunk is still one row


def test_chunked_path_is_forced_by_the_fixture(monkeypatch):
    monkeypatch.setattr(lp_mod, "_ONE_CALL_ELEMENTS", 40)
    monkeypatch.setattr(lp_mod, "_CHUNK_ELEMENTS", 30)
    step = lp_mod._rows_per_chunk(7, 13)
    assert 1 < step < 7 and 7 % step != 0


def test_tiny_label_probability_falls_back_to_log_softmax(path):
    # p[label] = e^-200 underflows in fp32; the one-call path takes log p from a log-softmax for that row
    logits = torch.tensor([[0.0, 200.0, -5.0], [1.0, 2.0, 3.0]], requires_grad=True)
    labels = torch.tensor([0, 2])
    got = logprobs_from_logits(logits, labels)
    torch.testing.assert_close(got.detach(), naive_logprobs(logits.detach(), labels), atol=1e-5, rtol=1e-6)
    assert got[0].item() == pytest.approx(-200.0)
    got.sum().backward()
    ref = logits.detach().clone().requires_grad_(True)
    naive_logprobs(ref, labels).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad, atol=1e-6, rtol=1e-5)


def test_second_backward_is_refused():
    # the one-call path turns its softmax buffer into the gradient: a second backward would be wrong, so it raises
    logits = torch.randn(3, 5, requires_grad=True)
    out = logprobs_from_logits(logits, torch.tensor([0, 1, 2])).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        out.backward()


def test_logprobs_hand_worked():
    # uniform logits over V=4: log 1/4; logits [2, 1, 0] at label 0: 2 - log(e^2 + e + 1)
    assert logprobs_from_logits(torch.zeros(1, 4), torch.tensor([2])).item() == pytest.approx(-math.log(4))
    expected = 2 - math.log(math.exp(2) + math.exp(1) + 1)
    assert logprobs_from_logits(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0])).item() == pytest.approx(expected)
    # temperature 2 halves the logits: [1, 0.5, 0]
    expected_t = 1 - math.log(math.exp(1) + math.exp(0.5) + 1)
    got_t = logprobs_from_logits(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0]), temperature=2.0).item()
    assert got_t == pytest.approx(expected_t)


def test_logprobs_stable_for_huge_logits():
    logits = torch.tensor([[0.0, 200.0, -200.0], [1e4, 0.0, -1e4]])
    got = logprobs_from_logits(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0]), atol=1e-6, rtol=0)
    assert logprobs_from_logits(logits, torch.tensor([0, 1]))[0].item() == pytest.approx(-200.0)


@pytest.mark.parametrize("shape,temperature", [((4, 6, 17), 1.0), ((300, 50), 0.7), ((1000, 5000), 1.3), ((70, 1000), 1.0)])
def test_logprobs_gradient_matches_naive(shape, temperature, path):
    # (70, 1000): small enough for the backward to scale the softmax in slices of 32 rows, with a ragged last one
    g = torch.Generator().manual_seed(1)
    base = 3 * torch.randn(*shape, generator=g)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    upstream = torch.randn(shape[:-1], generator=g)  # a random linear functional of the output
    grads = []
    for fn in (logprobs_from_logits, naive_logprobs):
        logits = base.clone().requires_grad_(True)
        (fn(logits, labels, temperature) * upstream).sum().backward()
        grads.append(logits.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,temperature", [((5, 9, 33), 1.0), ((1001, 5000), 0.7)])
def test_half_precision_gradient_matches_float32_autograd(dtype, shape, temperature, path):
    # the bf16/fp16 branch of the hand-written backward (softmax in fp32 chunk by chunk, stored in the logits'
    # dtype) against autograd through log_softmax of the same logits upcast to float32; (1001, 5000) is several
    # chunks with a ragged last one. The tolerance is the half-precision rounding of the stored gradient.
    g = torch.Generator().manual_seed(3)
    base = (3 * torch.randn(*shape, generator=g)).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    upstream = torch.randn(shape[:-1], generator=g)
    logits = base.clone().requires_grad_(True)
    out = logprobs_from_logits(logits, labels, temperature)
    assert out.dtype == torch.float32
    (out * upstream).sum().backward()
    ref = base.float().requires_grad_(True)
    (naive_logprobs(ref, labels, temperature) * upstream).sum().backward()
    assert logits.grad.dtype == dtype
    step = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # relative rounding of one stored value
    scale = float(ref.grad.abs().max())
    torch.testing.assert_close(logits.grad.float(), ref.grad, atol=4 * step * scale, rtol=4 * step)
    assert float((logits.grad.float() - ref.grad).abs().max()) > 0  # it really ran in half precision


def test_logprobs_does_not_modify_logits(path):
    logits = torch.randn(5, 7)
    before = logits.clone()
    logprobs_from_logits(logits, torch.zeros(5, dtype=torch.long), temperature=0.5)
    assert torch.equal(logits, before)


def test_logprobs_empty_batch():
    out = logprobs_from_logits(torch.randn(0, 7), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)


@pytest.mark.parametrize("labels,match", [
    (torch.zeros(3, dtype=torch.long), "shape mismatch"),  # wrong leading shape
    (torch.zeros(2, 3, 1, dtype=torch.long), "shape mismatch"),
    (torch.tensor([[0, 1, 7], [0, 0, 0]]), r"\[0, 7\)"),  # label == V
    (torch.tensor([[0, -1, 2], [0, 0, 0]]), r"\[0, 7\)"),  # negative label
    (torch.zeros(2, 3), "integer"),  # float labels
])
def test_logprobs_bad_labels_raise(labels, match, path):
    for grad in (False, True):  # the no-grad forward and the autograd Function
        with pytest.raises(ValueError, match=match):
            logprobs_from_logits(torch.randn(2, 3, 7, requires_grad=grad), labels)


@pytest.mark.parametrize("temperature", [0, 0.0, -1.0, float("inf"), float("nan"), "1.0", None])
def test_logprobs_bad_temperature_raises(temperature):
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(torch.randn(2, 5), torch.tensor([0, 1]), temperature)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_logprobs_non_finite_logits_raise(bad, path):
    logits = torch.randn(3, 6)
    logits[1, 4] = bad  # not the label's own slot: it still poisons the row's logsumexp
    for grad in (False, True):
        with pytest.raises(ValueError, match="NaN or inf"):
            logprobs_from_logits(logits.clone().requires_grad_(grad), torch.tensor([0, 1, 2]))


def test_logprobs_minus_inf_at_the_label_raises(path):
    logits = torch.randn(2, 6)
    logits[0, 3] = float("-inf")  # a token the sampler could never have chosen
    for grad in (False, True):
        with pytest.raises(ValueError, match="NaN or inf"):
            logprobs_from_logits(logits.clone().requires_grad_(grad), torch.tensor([3, 1]))


# ----------------------------------------------------------------------------- entropy_from_logits


@pytest.mark.parametrize("shape,temperature", [((7, 13), 1.0), ((2, 3, 11), 0.7), ((1000, 5000), 1.0)])
def test_entropy_matches_naive(shape, temperature):
    logits = 3 * torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    got = entropy_from_logits(logits, temperature)
    assert got.shape == shape[:-1]
    torch.testing.assert_close(got.double(), naive_entropy(logits, temperature), atol=1e-4, rtol=1e-5)


def test_entropy_hand_worked():
    # uniform over V: log V; one-hot-like (huge gap): ~0
    assert entropy_from_logits(torch.zeros(2, 8)).tolist() == pytest.approx([math.log(8)] * 2)
    assert entropy_from_logits(torch.tensor([[100.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_bad_temperature_raises():
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits(torch.randn(2, 5), 0.0)


# ----------------------------------------------------------------------------- position ids


def test_position_ids_from_mask_hand_worked():
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert position_ids_from_mask(am).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]


# ----------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def policy():
    model, tok = load_policy()
    return model, tok


def loop_logprobs(model, ids: torch.Tensor, prompt_len: int, temperature: float = 1.0) -> torch.Tensor:
    """One forward pass per response token, on the unpadded prefix alone. ids: [T] -> [T - prompt_len]."""
    out = []
    with torch.no_grad():
        for t in range(prompt_len, ids.shape[0]):
            logits = model(ids[None, :t]).logits[0, -1].double() / temperature  # predicts token t
            out.append(F.log_softmax(logits, -1)[ids[t]])
    return torch.stack(out).float()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_match_token_by_token_loop_left_padded(policy, temperature):
    model, tok = policy
    prompts = ["ROMEO.\nBut soft, what light", "KING.\nHow now"]
    batch = tok(prompts, return_tensors="pt", padding=True)  # left padding, pad = eos
    assert (batch.attention_mask[1] == 0).any(), "the test needs a padded row"
    P = batch.input_ids.shape[1]
    responses = torch.tensor([tok.encode(" through yonder window"), tok.encode(" my good lord, I")])[:, :4]
    ids = torch.cat([batch.input_ids, responses], 1)
    am = torch.cat([batch.attention_mask, torch.ones_like(responses)], 1)
    with torch.no_grad():
        got = sequence_logprobs(model, ids, am, P, temperature=temperature)
    assert got.shape == (2, 4)
    for i, p in enumerate(prompts):
        real = torch.cat([tok(p, return_tensors="pt").input_ids[0], responses[i]])  # no padding at all
        want = loop_logprobs(model, real, len(real) - 4, temperature)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_sequence_logprobs_entropy_and_gradient(policy):
    model, tok = policy
    ids = tok("First Citizen.\nBefore we proceed any further", return_tensors="pt").input_ids
    P = 5
    log_probs, ent = sequence_logprobs(model, ids, None, P, temperature=0.8, return_entropy=True)
    with torch.no_grad():
        logits = model(ids).logits[:, P - 1 : -1]
    torch.testing.assert_close(ent.double(), naive_entropy(logits, 0.8), atol=1e-4, rtol=1e-5)
    assert not ent.requires_grad and log_probs.requires_grad
    log_probs.sum().backward()
    assert model.transformer.wte.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_response_logits_shape_and_errors(policy):
    model, _ = policy
    ids = torch.randint(1, 100, (2, 10))
    got = response_logits(model, ids, None, 3)
    assert got.shape == (2, 7, model.config.vocab_size)
    assert got.is_contiguous()  # B > 1: flattening it for the log-probs must not copy the logits
    with torch.no_grad():
        torch.testing.assert_close(got, model(ids).logits[:, 2:-1], atol=1e-5, rtol=1e-5)  # positions P-1 ... T-2
    for bad in (0, 10, 11, -1):
        with pytest.raises(ValueError, match="prompt_len"):
            response_logits(model, ids, None, bad)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        response_logits(model, ids[0], None, 3)
    with pytest.raises(ValueError, match="shape mismatch"):
        response_logits(model, ids, torch.ones(2, 9, dtype=torch.long), 3)
    n_ctx = model.config.n_positions  # 256
    too_long = torch.randint(1, 100, (1, n_ctx + 1))
    with pytest.raises(ValueError, match=f"context of {n_ctx}"):
        sequence_logprobs(model, too_long, None, 10)
    assert response_logits(model, too_long[:, :n_ctx], None, n_ctx - 2).shape[1] == 2  # exactly the context is fine
