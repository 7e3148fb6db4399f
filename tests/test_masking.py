"""Tests for utils/masking.py: masked sums and means against Python loops, and response_mask by hand."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from utils.masking import masked_mean, masked_sum, response_mask

# ----------------------------------------------------------------------------- naive references


def loop_masked(x: torch.Tensor, m: torch.Tensor, dim: int | None, mean: bool):
    """Masked sum/mean of a 2-D tensor with plain Python loops over the entries (float64)."""
    rows, cols = x.shape
    kept = lambda i, j: bool(m[i, j])  # noqa: E731
    if dim is None:
        vals = [float(x[i, j]) for i in range(rows) for j in range(cols) if kept(i, j)]
        return (sum(vals) / len(vals)) if mean else sum(vals)
    out = []
    if dim in (-1, 1):
        for i in range(rows):
            vals = [float(x[i, j]) for j in range(cols) if kept(i, j)]
            out.append(sum(vals) / len(vals) if mean else sum(vals))
    else:
        for j in range(cols):
            vals = [float(x[i, j]) for i in range(rows) if kept(i, j)]
            out.append(sum(vals) / len(vals) if mean else sum(vals))
    return out


def random_case(seed: int, rows: int = 5, cols: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    m = torch.rand(rows, cols, generator=g) > 0.5
    m[:, 0] = True  # every row keeps something
    m[0, :] = True  # every column keeps something
    return x, m


# ----------------------------------------------------------------------------- masked_sum / masked_mean


@pytest.mark.parametrize("dim", [None, -1, 1, 0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_mean_and_sum_match_loops(dim, seed):
    x, m = random_case(seed)
    for fn, mean in ((masked_mean, True), (masked_sum, False)):
        got = fn(x, m, dim)
        want = torch.tensor(loop_masked(x, m, dim, mean), dtype=torch.float64)
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)


def test_masked_mean_hand_worked():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, m).item() == pytest.approx((1 + 2 + 4) / 3)  # one mean over all kept entries
    assert masked_mean(x, m, -1).tolist() == [1.5, 4.0]  # one mean per row
    assert masked_mean(x[:, :2], m[:, :2], 0).tolist() == [2.5, 2.0]  # one mean per column (column 2 keeps none)
    assert masked_sum(x, m).item() == 7.0 and masked_sum(x, m, -1).tolist() == [3.0, 4.0]


def test_masked_mean_3d_last_dim():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, generator=g)
    m = torch.ones(2, 3, 5, dtype=torch.bool).tril()  # row k keeps k + 1 entries
    got = masked_mean(x, m, -1)
    for a in range(2):
        for b in range(3):
            assert got[a, b].item() == pytest.approx(x[a, b, : b + 1].mean().item(), abs=1e-6)


def test_no_mask_is_a_plain_mean_and_sum():
    x = torch.randn(3, 4)
    torch.testing.assert_close(masked_mean(x, None), x.mean())
    torch.testing.assert_close(masked_mean(x, None, -1), x.mean(-1))
    torch.testing.assert_close(masked_sum(x, None, 0), x.sum(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.long, torch.int32, torch.uint8])
def test_mask_dtypes_agree_with_bool(dtype):
    x, m = random_case(4)
    for dim in (None, -1, 0):
        assert torch.equal(masked_mean(x, m.to(dtype), dim), masked_mean(x, m, dim))
        assert torch.equal(masked_sum(x, m.to(dtype), dim), masked_sum(x, m, dim))


def test_empty_mask_raises():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="empty mask"):
        masked_mean(x, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty mask"):
        masked_mean(x, torch.zeros(2, 4))  # float zeros too


def test_empty_row_or_column_raises():
    # values in [1, 2): the mean is >= 1, so a relative tolerance means something for every draw (a mean of
    # randn values can land near 0, where two fp32 summation orders differ by more than 1e-6 of it)
    x = 1 + torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    m = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="dim=-1"):
        masked_mean(x, m, -1)
    assert masked_mean(x, m).item() == pytest.approx(float(x.double()[m.bool()].mean()))  # the whole mask is not empty
    with pytest.raises(ValueError, match="dim=0"):
        masked_mean(x, torch.tensor([[1, 1, 0, 1]] * 3), 0)  # column 2 empty


def test_masked_sum_of_empty_mask_is_zero():
    # a sum over nothing is 0 (well defined), unlike a mean
    assert masked_sum(torch.randn(2, 3), torch.zeros(2, 3)).item() == 0.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape mismatch"):
        masked_mean(torch.randn(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="shape mismatch"):  # checked before counting along dim (not an IndexError)
        masked_mean(torch.randn(2, 4), torch.ones(4), dim=1)
    with pytest.raises(ValueError, match="shape mismatch"):
        masked_sum(torch.randn(2, 4), torch.ones(4, 2))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_in_masked_slot_is_ignored(bad):
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    x[0, 2], x[1, 1] = bad, bad
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, m, -1).tolist() == [1.5, 3.0]
    assert masked_mean(x, m).item() == 2.0
    assert masked_sum(x, m).item() == 6.0
    # the naive x * m would not have ignored it: inf * 0 and nan * 0 are nan
    assert torch.isnan((x * m).sum())


def test_gradient_flows_only_to_kept_entries():
    x = torch.randn(2, 3, requires_grad=True)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    masked_mean(x, m, -1).sum().backward()
    assert x.grad.tolist() == [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]


# ----------------------------------------------------------------------------- property tests

shapes = st.tuples(st.integers(1, 6), st.integers(1, 9))


@st.composite
def tensor_and_mask(draw, nonempty_rows: bool):
    rows, cols = draw(shapes)
    vals = draw(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=rows * cols, max_size=rows * cols))
    bits = draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
    x = torch.tensor(vals, dtype=torch.float64).reshape(rows, cols)
    m = torch.tensor(bits).reshape(rows, cols)
    if nonempty_rows:
        m[:, draw(st.integers(0, cols - 1))] = True
    else:
        m[draw(st.integers(0, rows - 1)), draw(st.integers(0, cols - 1))] = True
    return x, m


@settings(max_examples=60, deadline=None)
@given(tensor_and_mask(nonempty_rows=False))
def test_property_scalar_mean_matches_loop_and_ignores_masked_values(case):
    x, m = case
    want = loop_masked(x, m, None, mean=True)
    assert masked_mean(x, m).item() == pytest.approx(want, rel=1e-9, abs=1e-9)
    # whatever sits in the masked slots, even inf/nan, does not change the result
    poisoned = torch.where(m, x, torch.full_like(x, float("nan")))
    assert masked_mean(poisoned, m).item() == pytest.approx(want, rel=1e-9, abs=1e-9)
    # the mean lies between the smallest and largest kept value
    kept = x[m]
    assert float(kept.min()) - 1e-9 <= masked_mean(x, m).item() <= float(kept.max()) + 1e-9


@settings(max_examples=60, deadline=None)
@given(tensor_and_mask(nonempty_rows=True), st.floats(-100, 100, allow_nan=False))
def test_property_row_means_shift_and_constants(case, c):
    x, m = case
    got = masked_mean(x, m, -1)
    assert got.tolist() == pytest.approx(loop_masked(x, m, -1, mean=True), rel=1e-9, abs=1e-9)
    torch.testing.assert_close(masked_mean(x + c, m, -1), got + c, atol=1e-9, rtol=1e-9)  # shift-equivariant
    assert masked_mean(torch.full_like(x, c), m, -1).tolist() == pytest.approx([c] * x.shape[0])
    # row means weighted by kept counts give the scalar mean
    counts = m.sum(-1).double()
    assert float((got * counts).sum() / counts.sum()) == pytest.approx(masked_mean(x, m).item(), rel=1e-9, abs=1e-9)


# ----------------------------------------------------------------------------- response_mask

EOS = 0


def test_response_mask_eos_in_the_middle():
    ids = torch.tensor([[5, 6, 7, 8, EOS, EOS, EOS]])  # prompt [5, 6], response [7, 8, EOS, pad, pad]
    assert response_mask(ids, 2, EOS).tolist() == [[True, True, True, False, False]]


def test_response_mask_eos_as_last_token_and_no_eos():
    ids = torch.tensor([[5, 6, 7, 8, EOS], [5, 6, 7, 8, 9]])
    assert response_mask(ids, 2, EOS).tolist() == [[True, True, True], [True, True, True]]


def test_response_mask_eos_first_and_repeated():
    ids = torch.tensor([[5, EOS, 7, EOS, 9], [5, 7, EOS, 3, EOS]])
    # only the first EOS counts: row 0 stops at once (one action), row 1 after 2 tokens
    assert response_mask(ids, 1, EOS).tolist() == [[True, False, False, False], [True, True, False, False]]


def test_response_mask_ignores_eos_in_the_left_padded_prompt():
    # GPT-2 pads with eos: the prompt's pads must not end the response
    ids = torch.tensor([[EOS, EOS, 5, 6, 7, 8], [1, 2, 3, 4, 7, EOS]])
    assert response_mask(ids, 4, EOS).tolist() == [[True, True], [True, True]]


def test_response_mask_without_eos_id_keeps_everything():
    ids = torch.tensor([[5, 6, EOS, EOS]])
    assert response_mask(ids, 1, None).tolist() == [[True, True, True]]


def test_response_mask_with_attention_mask_zeros():
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9]])
    am = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 0, 0]])  # response columns 2..4
    assert response_mask(ids, 2, EOS, am).tolist() == [[True, True, False], [True, False, False]]
    ids[0, 2] = EOS  # EOS and attention mask combine: ones until the first EOS, and where attention is 1
    assert response_mask(ids, 2, EOS, am).tolist() == [[True, False, False], [True, False, False]]


def test_response_mask_shape_and_dtype():
    out = response_mask(torch.randint(1, 9, (3, 10)), 4, EOS)
    assert out.shape == (3, 6) and out.dtype == torch.bool


@pytest.mark.parametrize("prompt_len", [0, -1, 5, 6])
def test_response_mask_bad_prompt_len_raises(prompt_len):
    with pytest.raises(ValueError, match="prompt_len"):
        response_mask(torch.ones(2, 5, dtype=torch.long), prompt_len, EOS)


def test_response_mask_agrees_with_a_loop():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 4, (50, 12), generator=g)  # EOS (0) is common
    P = 3
    got = response_mask(ids, P, EOS)
    for b in range(ids.shape[0]):
        seen_eos = False
        for j, tok in enumerate(ids[b, P:].tolist()):
            assert bool(got[b, j]) == (not seen_eos)
            seen_eos = seen_eos or tok == EOS
    assert 0 < got.float().mean() < 1  # the case holds a real mix of kept and dropped tokens


@pytest.mark.parametrize("fn", [masked_mean, masked_sum])
def test_a_mask_with_a_value_other_than_0_or_1_raises(fn):
    # 0.5 is not "half kept"; one such entry among 0s and 1s is enough to refuse the mask
    with pytest.raises(ValueError, match="0/1"):
        fn(torch.randn(2, 3), torch.tensor([[1.0, 0.0, 0.5], [1.0, 1.0, 0.0]]))
