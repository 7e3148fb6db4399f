"""Checkers for the notebooks' exercises: each takes the learner's function and says what is wrong with it.

    check_ratio(ratio)                        # notebook 01
    check_clipped_loss(clipped_loss)          # notebook 02
    check_logprobs(token_logprobs)            # notebook 03
    check_shifted_logprobs(shifted_logprobs)  # notebook 03
    check_masked_mean(masked_mean)            # notebook 04
    check_policy_loss(policy_loss_forward)    # notebook 04
    check_kl(kl_k3, estimator="k3")           # notebook 05
    check_gae(gae)                            # notebook 05
    check_token_rewards(token_rewards)        # notebook 06

A checker runs the function on small cases of its own (hand-worked ones, then
seeded random ones, then edge cases) and compares with a reference first. Only
when an answer is wrong does it look for a known mistake: it computes what the
typical wrong implementations return on the same case and, if one matches,
names it in plain words with the numbers ("your ratio is inverted: got 0.5
where pi/pi_old = 2"). Otherwise it says what was expected and what came back.
A wrong answer raises ``AssertionError``; a right one prints one line
``✓ check_ratio: all 4 cases pass``. A ``NotImplementedError`` (an exercise
stub) propagates unchanged.

The references are ``utils.loss``, ``utils.logprobs`` and ``utils.masking``;
for the KL estimators, GAE and the per-token rewards, small loop
implementations live here so the checkers do not depend on the modules they
check. Exercise list: docs/exercises.md (the idea follows ARENA's
``tests.test_*`` checkers, which take the learner's function as an argument).
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from utils.logprobs import logprobs_from_logits
from utils.loss import clipped_surrogate
from utils.loss import policy_loss as _ref_policy_loss
from utils.masking import masked_mean as _ref_masked_mean

__all__ = [
    "check_ratio", "check_clipped_loss", "check_logprobs", "check_shifted_logprobs", "check_masked_mean",
    "check_policy_loss", "check_kl", "check_gae", "check_token_rewards",
]

ATOL, RTOL = 1e-5, 1e-4


# ----------------------------------------------------------------------------- machinery


@dataclass
class _Case:
    """One input to the learner's function: positional args in the exercise's order, plus keyword args."""

    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def fresh(self) -> tuple[tuple, dict]:
        """Clones of the inputs, so a function that writes into them cannot spoil the reference."""
        clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
        return tuple(clone(a) for a in self.args), {k: clone(v) for k, v in self.kwargs.items()}


@dataclass
class _Where:
    """The first entry where the learner's answer differs from the reference, for messages."""

    got: float
    exp: float
    idx: tuple
    case: _Case

    def at(self, t: torch.Tensor) -> float:
        """The value of an input tensor shaped like the output at the differing entry."""
        return float(t[self.idx])


Mistake = tuple[Callable[..., torch.Tensor], Callable[[_Where], str]]


def _f(x: float) -> str:
    """A number for a message: 4 significant digits."""
    return f"{x:.4g}"


def _short(t: torch.Tensor, n: int = 6) -> str:
    """A tensor for a message: its first ``n`` values, rounded."""
    flat = t.detach().double().reshape(-1)
    vals = ", ".join(_f(float(v)) for v in flat[:n])
    more = ", ..." if flat.numel() > n else ""
    return f"[{vals}{more}]" if t.dim() else _f(float(t))


def _call(checker: str, fn: Callable, case: _Case) -> Any:
    """Call the learner's function on a fresh copy of the case; wrap its errors (not the stub's) in a message."""
    args, kwargs = case.fresh()
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise  # an exercise stub: let the learner see its hint unchanged
    except Exception as err:
        shapes = ", ".join(
            f"{list(a.shape)} {str(a.dtype).replace('torch.', '')}" if isinstance(a, torch.Tensor) else repr(a)
            for a in list(args) + list(kwargs.values())
        )
        raise AssertionError(
            f"{checker} (case '{case.name}'): your function raised {type(err).__name__}: {err} "
            f"(inputs: {shapes})"
        ) from err


def _as_tensor(checker: str, out: Any, shape: torch.Size, case: _Case, shape_hint: str = "") -> torch.Tensor:
    """Check the learner returned a tensor of the expected shape; return it detached, in float64."""
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        raise AssertionError(f"{checker} (case '{case.name}'): your function returned a tuple of {len(out)}; "
                             "return a single tensor")
    if not isinstance(out, torch.Tensor):
        raise AssertionError(f"{checker} (case '{case.name}'): your function returned {type(out).__name__}, "
                             f"expected a torch.Tensor of shape {list(shape)}")
    if out.shape != shape:
        raise AssertionError(f"{checker} (case '{case.name}'): your function returned shape {list(out.shape)}, "
                             f"expected {list(shape)}{shape_hint}")
    return out.detach().double()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within tolerance; NaNs and equal infinities count as equal (to recognise broken variants)."""
    a, b = a.double(), b.double()
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True))


def _first_diff(got: torch.Tensor, exp: torch.Tensor, case: _Case) -> _Where:
    """Locate the first entry (in row-major order) where ``got`` and ``exp`` differ."""
    bad = ~torch.isclose(got, exp.double(), rtol=RTOL, atol=ATOL, equal_nan=True)
    idx = tuple(int(i) for i in bad.nonzero()[0]) if bool(bad.any()) else tuple(0 for _ in got.shape)
    return _Where(float(got[idx]), float(exp.double()[idx]), idx, case)


def _generic(checker: str, case: _Case, got: torch.Tensor, exp: torch.Tensor) -> str:
    """The message when no known mistake matches: expected vs got, with the largest difference."""
    diff = (got - exp.double()).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    w = _first_diff(got, exp, case)
    where = f" (first at index {list(w.idx)}: expected {_f(w.exp)}, got {_f(w.got)})" if got.dim() else ""
    return (f"{checker} (case '{case.name}'): expected {_short(exp)}, got {_short(got)}; "
            f"max abs diff {_f(float(diff.max()))}{where}")


def _eval_mistake(wrong: Callable, case: _Case) -> torch.Tensor | None:
    """What a known wrong implementation returns on a case (None if it cannot run there)."""
    args, kwargs = case.fresh()
    try:
        with torch.no_grad():
            return wrong(*args, **kwargs)
    except Exception:  # a variant that cannot run on this case tells nothing about it
        return None


def _diagnose(checker: str, cases: list[_Case], gots: list[torch.Tensor], exps: list[torch.Tensor],
              mistakes: list[Mistake]) -> str:
    """Name the known mistake that reproduces the learner's answers, else say what was expected on the first wrong case.

    A mistake is named only if its outputs equal the learner's on every case evaluated (a single case can
    be degenerate: with gamma = lam = 1, or uniform logits, several mistakes coincide); the mistakes are tried
    in order, single mistakes before pairs. The example shown is the first case it gets wrong.
    """
    wrong_idx = [i for i, (g, e) in enumerate(zip(gots, exps)) if not _close(g, e)]
    outs = [[_eval_mistake(wrong, c) for c in cases[: len(gots)]] for wrong, _ in mistakes]

    def matches(k: int, i: int) -> bool:
        w = outs[k][i]
        return w is not None and w.shape == gots[i].shape and _close(gots[i], w)

    for k, (_, message) in enumerate(mistakes):
        if not all(matches(k, i) or outs[k][i] is None for i in range(len(gots))):
            continue
        shown = [i for i in wrong_idx if matches(k, i)]
        if not shown:
            continue
        i = shown[0]
        return f"{checker} (case '{cases[i].name}'): " + message(_first_diff(gots[i], exps[i], cases[i]))
    i = wrong_idx[0]
    return _generic(checker, cases[i], gots[i], exps[i])


def _run(checker: str, fn: Callable, cases: list[_Case], reference: Callable, mistakes: list[Mistake],
         shape_hint: str = "") -> None:
    """Compare ``fn`` with ``reference`` on every case; raise with a diagnosis if any is wrong.

    Cases run in order; an error or a wrong shape is reported on the case where it happens, unless an
    earlier case already gave a wrong answer (then the diagnosis uses the cases run so far).
    """
    if not callable(fn):
        raise AssertionError(f"{checker}: pass your function itself (e.g. {checker}(my_fn)), got {type(fn).__name__}")
    gots: list[torch.Tensor] = []
    exps: list[torch.Tensor] = []
    for case in cases:
        args, kwargs = case.fresh()
        with torch.no_grad():
            exp = reference(*args, **kwargs)
        try:
            got = _as_tensor(checker, _call(checker, fn, case), exp.shape, case, shape_hint)
        except AssertionError:
            if any(not _close(g, e) for g, e in zip(gots, exps)):
                break  # report the earlier wrong answer, the more basic problem
            raise
        gots.append(got)
        exps.append(exp)
    if any(not _close(g, e) for g, e in zip(gots, exps)):
        raise AssertionError(_diagnose(checker, cases, gots, exps, mistakes))


def _check_grad(checker: str, fn: Callable, case: _Case, grad_arg: int, reference: Callable, what: str) -> None:
    """The output must carry a gradient to input ``grad_arg``, equal to the reference's (through ``.sum()``)."""
    args, kwargs = case.fresh()
    ref_args, ref_kwargs = case.fresh()
    x = args[grad_arg].requires_grad_(True)
    xr = ref_args[grad_arg].requires_grad_(True)
    try:
        out = fn(*args, **kwargs)
    except NotImplementedError:
        raise
    except Exception as err:
        raise AssertionError(f"{checker} (case '{case.name}'): your function raised {type(err).__name__}: {err} "
                             f"when {what} requires grad") from err
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise AssertionError(f"{checker} (case '{case.name}'): your output carries no gradient to {what}; "
                             "did you call .detach(), .item(), .numpy() or use torch.no_grad()?")
    out.sum().backward()
    reference(*ref_args, **ref_kwargs).sum().backward()
    if x.grad is None or not _close(x.grad, xr.grad):
        got = torch.zeros_like(xr.grad) if x.grad is None else x.grad
        raise AssertionError(f"{checker} (case '{case.name}'): the values are right but the gradient w.r.t. {what} "
                             f"is not: expected {_short(xr.grad)}, got {_short(got)} (detached part of the graph?)")


def _accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes a parameter called ``name``."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _ok(checker: str, n: int) -> None:
    """The one line a passing checker prints."""
    print(f"\u2713 {checker}: all {n} cases pass")


def _gen(seed: int) -> torch.Generator:
    """A private seeded generator: the cases do not depend on (or disturb) the notebook's global seed."""
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- 01: the ratio


def check_ratio(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Check ``fn(log_probs, old_log_probs) -> pi_theta / pi_old`` elementwise (notebook 01)."""
    name = "check_ratio"
    g = _gen(1)
    old_a = -5 * torch.rand(4, 6, generator=g)
    old_b = -5 * torch.rand(2, 3, 5, generator=g)
    cases = [
        _Case("hand-worked: pi/pi_old = 2, 0.5, 1",
              (torch.tensor([0.5, 0.2, 0.9]).log(), torch.tensor([0.25, 0.4, 0.9]).log())),
        _Case("random [4, 6]", (old_a + 0.3 * torch.randn(4, 6, generator=g), old_a)),
        _Case("random [2, 3, 5]", (old_b + 0.5 * torch.randn(2, 3, 5, generator=g), old_b)),
        _Case("rare tokens: log-probs near -150", (torch.tensor([-149.0, -151.5, -160.0]),
                                                   torch.tensor([-150.0, -151.0, -160.0]))),
    ]
    lp0 = lambda w: w.at(w.case.args[0])  # noqa: E731
    mistakes: list[Mistake] = [
        (lambda lp, old: (old - lp).exp(),
         lambda w: f"your ratio is inverted: got {_f(w.got)} where pi/pi_old = {_f(w.exp)}; "
                   "the ratio is pi_theta/pi_old = exp(log_probs - old_log_probs)"),
        (lambda lp, old: lp - old,
         lambda w: f"you returned the log-ratio log_probs - old_log_probs ({_f(w.got)}); the ratio is its exp, "
                   f"{_f(w.exp)}"),
        (lambda lp, old: lp / old,
         lambda w: f"you divided the log-probs ({_f(w.got)}); probabilities divide, so log-probs subtract: "
                   f"exp(log_probs - old_log_probs) = {_f(w.exp)}"),
        (lambda lp, old: lp.exp() - old.exp(),
         lambda w: f"you subtracted the probabilities ({_f(w.got)}); the ratio divides them: {_f(w.exp)}"),
        (lambda lp, old: lp.exp() / old.exp(),
         lambda w: f"you computed exp(log_probs) / exp(old_log_probs): at log-prob {_f(lp0(w))} both exps "
                   f"underflow to 0 in float32 and give {_f(w.got)}; compute exp(log_probs - old_log_probs) "
                   f"= {_f(w.exp)} instead"),
        (lambda lp, old: old.exp() / lp.exp(),
         lambda w: f"your ratio is inverted and computed as exp(old)/exp(new), which underflows: got "
                   f"{_f(w.got)} where pi/pi_old = {_f(w.exp)}"),
    ]
    ref = lambda lp, old: (lp - old).exp()  # noqa: E731
    _run(name, fn, cases, ref, mistakes, shape_hint=" (the ratio is elementwise: one per token)")
    _check_grad(name, fn, cases[1], 0, ref, "log_probs")
    _ok(name, len(cases))


# ----------------------------------------------------------------------------- 02: the clipped loss


def _clip_side(r: float, a: float, eps: float) -> str:
    """Where a (ratio, advantage) pair sits in the case table, in words."""
    if a == 0:
        return "A = 0"
    band = "r < 1-eps" if r < 1 - eps else "r > 1+eps" if r > 1 + eps else "r inside [1-eps, 1+eps]"
    return f"A {'>' if a > 0 else '<'} 0 and {band}"


def check_clipped_loss(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> None:
    """Check ``fn(ratio, advantages, clip_eps) -> -min(r A, clip(r, 1-eps, 1+eps) A)`` elementwise (notebook 02)."""
    name = "check_clipped_loss"
    g = _gen(2)
    r_tab = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5] * 2)
    a_tab = torch.tensor([1.0] * 5 + [-1.0] * 5)
    cases = [
        _Case("hand-worked table, eps=0.2: r in {0.5, 0.9, 1, 1.1, 1.5}, A = +1 then -1", (r_tab, a_tab, 0.2)),
        _Case("eps=0.1: r in {0.85, 0.95, 1.05, 1.15}, A = +2 then -2",
              (torch.tensor([0.85, 0.95, 1.05, 1.15] * 2), torch.tensor([2.0] * 4 + [-2.0] * 4), 0.1)),
        _Case("random [3, 7], eps=0.2", ((0.4 * torch.randn(3, 7, generator=g)).exp(),
                                         torch.randn(3, 7, generator=g), 0.2)),
        _Case("random [2, 3, 4], eps=0.3, some A = 0",
              ((0.5 * torch.randn(2, 3, 4, generator=g)).exp(),
               torch.randn(2, 3, 4, generator=g) * (torch.rand(2, 3, 4, generator=g) > 0.2), 0.3)),
    ]

    def ra(w: _Where) -> str:
        r, a, eps = w.at(w.case.args[0]), w.at(w.case.args[1]), w.case.args[2]
        return f"at r={_f(r)}, A={_f(a)}, eps={eps} ({_clip_side(r, a, eps)})"

    clip = lambda r, eps: r.clamp(1 - eps, 1 + eps)  # noqa: E731
    mistakes: list[Mistake] = [
        (lambda r, a, eps: -torch.max(r * a, clip(r, eps) * a),
         lambda w: f"you used max instead of min: {ra(w)} the loss is -min(r*A, clip(r)*A) = {_f(w.exp)}, "
                   f"you got {_f(w.got)}; PPO takes the pessimistic (smaller) objective"),
        (lambda r, a, eps: torch.min(r * a, clip(r, eps) * a),
         lambda w: f"you returned the objective min(r*A, clip(r)*A), not the loss: the sign is flipped "
                   f"({ra(w)} expected {_f(w.exp)}, got {_f(w.got)}); the loss to minimise is -min(...)"),
        (lambda r, a, eps: -clip(r, eps) * a,
         lambda w: f"you clipped without the min: {ra(w)} the min keeps the unclipped r*A, so the loss is "
                   f"{_f(w.exp)}; you got {_f(w.got)}"),
        (lambda r, a, eps: -r * a,
         lambda w: f"you never clipped: your loss is -r*A everywhere; {ra(w)} expected {_f(w.exp)}, got {_f(w.got)}"),
        (lambda r, a, eps: -torch.min(r * a, clip(r, 0.2) * a),
         lambda w: f"you ignored clip_eps: your loss matches clip_eps=0.2, but this case passes "
                   f"clip_eps={w.case.args[2]} ({ra(w)} expected {_f(w.exp)}, got {_f(w.got)})"),
        (lambda r, a, eps: -torch.min(r * a, (r * a).clamp(1 - eps, 1 + eps)),
         lambda w: f"you clipped r*A instead of r: clip the ratio, then multiply by A ({ra(w)} expected "
                   f"{_f(w.exp)}, got {_f(w.got)})"),
        (lambda r, a, eps: torch.max(r * a, clip(r, eps) * a),
         lambda w: f"you returned max(r*A, clip(r)*A): the sign is flipped and max should be min "
                   f"({ra(w)} expected {_f(w.exp)}, got {_f(w.got)})"),
    ]
    _run(name, fn, cases, lambda r, a, eps: clipped_surrogate(r, a, eps), mistakes,
         shape_hint=" (the loss is per token, elementwise: do not average here)")
    _ok(name, len(cases))


# ----------------------------------------------------------------------------- 03: log-probs


def _logprob_mistakes(T_of: Callable[[_Where], float]) -> list[tuple[Callable, Callable[[_Where], str]]]:
    """Known wrong ways to compute log pi(label) from logits [.., V]: (wrong(logits, labels, T), message)."""
    pick = lambda x, y: x.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    return [
        (lambda x, y, T: pick((x / T).softmax(-1), y),
         lambda w: f"you returned probabilities (softmax), not log-probabilities: got {_f(w.got)} where "
                   f"log pi = {_f(w.exp)} (= log {_f(math.exp(w.exp))})"),
        (lambda x, y, T: pick(x / T, y),
         lambda w: f"you gathered the raw logits ({_f(w.got)}) without normalising; subtract logsumexp over the "
                   f"vocabulary (log_softmax): expected {_f(w.exp)}"),
        (lambda x, y, T: -pick((x / T).log_softmax(-1), y),
         lambda w: f"you returned the negative log-likelihood -log pi ({_f(w.got)}); return log pi = {_f(w.exp)}"),
        (lambda x, y, T: pick((x / T).softmax(-1).log(), y),
         lambda w: f"you computed log(softmax(...)): a probability that small underflows to 0 in float32 and "
                   f"log(0) = {_f(w.got)}; use log_softmax (or logits - logsumexp), which gives {_f(w.exp)}"),
        (lambda x, y, T: pick(x.log_softmax(-1), y),
         lambda w: f"you forgot the temperature: divide the logits by temperature={T_of(w)} before the "
                   f"log-softmax (expected {_f(w.exp)}, got {_f(w.got)})"),
        (lambda x, y, T: pick((x * T).log_softmax(-1), y),
         lambda w: f"you multiplied the logits by the temperature; divide them by temperature={T_of(w)} "
                   f"(expected {_f(w.exp)}, got {_f(w.got)})"),
        (lambda x, y, T: pick(x.log_softmax(-1), y) / T,
         lambda w: f"you divided the log-probs by the temperature; the logits are divided before the "
                   f"log-softmax (expected {_f(w.exp)}, got {_f(w.got)})"),
        (lambda x, y, T: pick((x / T).log_softmax(0), y),
         lambda w: f"you normalised over dim=0; the vocabulary is the last dim: log_softmax(dim=-1) "
                   f"(expected {_f(w.exp)}, got {_f(w.got)})"),
        (lambda x, y, T: pick((x / T).log_softmax(-2), y),
         lambda w: f"you normalised over dim=-2 (positions); the vocabulary is the last dim: log_softmax(dim=-1) "
                   f"(expected {_f(w.exp)}, got {_f(w.got)})"),
    ]


def _with_temperature(cases: list[_Case], fn: Callable, seed: int, make: Callable[[torch.Generator], _Case]) -> list[_Case]:
    """Append temperature cases when the learner's function takes a ``temperature`` argument."""
    if not _accepts(fn, "temperature"):
        return cases
    g = _gen(seed)
    extra = []
    for T in (0.7, 1.5):
        c = make(g)
        extra.append(_Case(f"{c.name}, temperature={T}", c.args, {"temperature": T}))
    return cases + extra


def check_logprobs(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(logits [..., V], labels [...]) -> log softmax(logits)[label]`` [...] (notebook 03).

    If ``fn`` takes a ``temperature`` keyword, it is also checked at temperatures 0.7 and 1.5
    (log softmax(logits / temperature)).
    """
    name = "check_logprobs"
    g = _gen(3)
    cases = [
        _Case("hand-worked: uniform logits over V=4, so log pi = -log 4",
              (torch.zeros(1, 4), torch.tensor([2]))),
        _Case("hand-worked: logits [2, 1, 0], label 0", (torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0]))),
        _Case("random [5, V=11]", (3 * torch.randn(5, 11, generator=g), torch.randint(0, 11, (5,), generator=g))),
        _Case("random [2, 3, V=7]", (2 * torch.randn(2, 3, 7, generator=g),
                                     torch.randint(0, 7, (2, 3), generator=g))),
        _Case("a rare token: logits [0, 200, -200]", (torch.tensor([[0.0, 200.0, -200.0]] * 2),
                                                      torch.tensor([2, 0]))),
    ]
    cases = _with_temperature(cases, fn, 30, lambda g: _Case(
        "random [4, V=9]", (2 * torch.randn(4, 9, generator=g), torch.randint(0, 9, (4,), generator=g))))
    T_of = lambda w: w.case.kwargs.get("temperature", 1.0)  # noqa: E731
    mistakes: list[Mistake] = [
        ((lambda wr: lambda x, y, temperature=1.0: wr(x, y, temperature))(wr), msg)
        for wr, msg in _logprob_mistakes(T_of)
    ]
    ref = lambda x, y, temperature=1.0: logprobs_from_logits(x, y, temperature)  # noqa: E731
    _run(name, fn, cases, ref, mistakes,
         shape_hint=" (one log-prob per label: gather the label's entry, do not return all V of them)")
    _check_grad(name, fn, cases[2], 0, ref, "logits")
    _ok(name, len(cases))


def check_shifted_logprobs(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(logits [B, T, V], input_ids [B, T]) -> [B, T-1]``: log pi(token t+1) from the logits at t.

    Notebook 03. If ``fn`` takes a ``temperature`` keyword it is also checked at temperatures 0.7 and 1.5.
    """
    name = "check_shifted_logprobs"
    g = _gen(4)
    # hand-worked: V=3, the logits at t put 4 on token (t+1) % 3 and 0 elsewhere; ids 0, 1, 2 follow that rule
    hand_logits = torch.zeros(1, 3, 3)
    for t in range(3):
        hand_logits[0, t, (t + 1) % 3] = 4.0
    cases = [
        _Case("hand-worked: the logits at t favour token t+1, ids [0, 1, 2]",
              (hand_logits, torch.tensor([[0, 1, 2]]))),
        _Case("random B=2, T=5, V=11", (2 * torch.randn(2, 5, 11, generator=g),
                                        torch.randint(0, 11, (2, 5), generator=g))),
        _Case("random B=3, T=4, V=7", (3 * torch.randn(3, 4, 7, generator=g),
                                       torch.randint(0, 7, (3, 4), generator=g))),
        _Case("T=2: a single scored token", (torch.randn(2, 2, 5, generator=g),
                                             torch.randint(0, 5, (2, 2), generator=g))),
    ]
    cases = _with_temperature(cases, fn, 40, lambda g: _Case(
        "random B=2, T=4, V=9", (2 * torch.randn(2, 4, 9, generator=g), torch.randint(0, 9, (2, 4), generator=g))))
    T_of = lambda w: w.case.kwargs.get("temperature", 1.0)  # noqa: E731
    lp = lambda x, y, T: logprobs_from_logits(x, y, T)  # noqa: E731

    def shifted(variant: Callable) -> Callable:
        return lambda x, ids, temperature=1.0: variant(x[:, :-1], ids[:, 1:], temperature)

    mistakes: list[Mistake] = [
        (lambda x, ids, temperature=1.0: lp(x[:, :-1], ids[:, :-1], temperature),
         lambda w: "off by one: you scored token t with the logits at t; the logits at position t predict token "
                   f"t+1, so pair logits[:, :-1] with input_ids[:, 1:] (expected {_f(w.exp)}, got {_f(w.got)})"),
        (lambda x, ids, temperature=1.0: lp(x[:, 1:], ids[:, 1:], temperature),
         lambda w: "off by one: you scored token t with the logits at t (you shifted both); the logits at t "
                   f"predict token t+1: pair logits[:, :-1] with input_ids[:, 1:] (expected {_f(w.exp)}, "
                   f"got {_f(w.got)})"),
        (lambda x, ids, temperature=1.0: lp(x[:, 1:], ids[:, :-1], temperature),
         lambda w: "you shifted the wrong way: you scored token t with the logits at t+1; pair logits[:, :-1] "
                   f"with input_ids[:, 1:] (expected {_f(w.exp)}, got {_f(w.got)})"),
    ] + [(shifted(wr), msg) for wr, msg in _logprob_mistakes(T_of)]
    ref = lambda x, ids, temperature=1.0: lp(x[:, :-1], ids[:, 1:], temperature)  # noqa: E731
    _run(name, fn, cases, ref, mistakes,
         shape_hint=" = [B, T-1]: the last position's logits predict a token past the end, and no logits "
                    "predict the first token")
    _check_grad(name, fn, cases[1], 0, ref, "logits")
    _ok(name, len(cases))


# ----------------------------------------------------------------------------- 04: masked mean and the loss


def check_masked_mean(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(tensor, mask, dim=None)``: mean over kept entries; ``ValueError`` on an empty mask (notebook 04).

    dim=None gives one mean over all kept entries (a scalar); dim=-1 one mean per row. With dim=-1 a row
    that keeps nothing is an empty mask too (its mean is 0/0) and must raise ``ValueError``.
    """
    name = "check_masked_mean"
    g = _gen(5)
    x_hand = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m_hand = torch.tensor([[1, 1, 0], [1, 0, 0]])
    lengths = torch.tensor([9, 4, 1, 6])
    m_rows = torch.arange(9)[None, :] < lengths[:, None]  # [4, 9] right-padded rows of different lengths
    cases = [
        _Case("hand-worked, dim left out: (1+2+4)/3", (x_hand, m_hand)),
        _Case("hand-worked, dim=-1: [(1+2)/2, 4/1]", (x_hand, m_hand, -1)),
        _Case("random [4, 9], bool mask, dim=None", (torch.randn(4, 9, generator=g),
                                                     torch.rand(4, 9, generator=g) > 0.4, None)),
        _Case("random [4, 9], rows keep 9, 4, 1, 6 tokens, float mask, dim=-1",
              (torch.randn(4, 9, generator=g), m_rows.float(), -1)),
        _Case("random [2, 3, 5], dim=-1", (torch.randn(2, 3, 5, generator=g),
                                           torch.ones(2, 3, 5, dtype=torch.bool).tril(), -1)),
        _Case("random [4, 9], rows keep 9, 4, 1, 6 tokens, dim=0", (torch.randn(4, 9, generator=g), m_rows, 0)),
    ]

    def counts(w: _Where) -> tuple[int, int]:
        x, m = w.case.args[0], w.case.args[1].bool()
        dim = w.case.args[2] if len(w.case.args) > 2 else None
        if dim is None:
            return m.numel(), int(m.sum())
        return x.shape[dim], int(m.sum(dim)[w.idx])

    mm = lambda x, m, dim=None: _ref_masked_mean(x, m, dim)  # noqa: E731
    msum = lambda x, m, dim=None: (x * m).sum() if dim is None else (x * m).sum(dim)  # noqa: E731
    mistakes: list[Mistake] = [
        (lambda x, m, dim=None: msum(x, m, dim) / (m.numel() if dim is None else x.shape[dim]),
         lambda w: f"you divided by the number of all tokens ({counts(w)[0]}), not the kept ones "
                   f"({counts(w)[1]}): expected {_f(w.exp)}, got {_f(w.got)}"),
        (lambda x, m, dim=None: x.mean() if dim is None else x.mean(dim),
         lambda w: f"you ignored the mask: that is the mean over all entries; expected {_f(w.exp)}, got {_f(w.got)}"),
        (lambda x, m, dim=None: msum(x, m, dim),
         lambda w: f"you returned the masked sum, not the mean: divide by the number of kept entries "
                   f"({counts(w)[1]}); expected {_f(w.exp)}, got {_f(w.got)}"),
        (lambda x, m, dim=None: mm(x, m, -1).mean() if dim is None else mm(x, m, dim),
         lambda w: f"with dim=None you averaged the per-row means ({_f(w.got)}); dim=None is one mean over all "
                   f"kept entries ({_f(w.exp)}), which weighs long rows more"),
        (lambda x, m, dim=None: msum(x, m, dim) / m.sum(),
         lambda w: f"with dim={w.case.args[2]} you divided each slice's sum by the kept count of the whole mask "
                   f"({int(w.case.args[1].bool().sum())}); divide by each slice's own count ({counts(w)[1]})"),
    ]
    _run(name, fn, cases, mm, mistakes,
         shape_hint=" (dim=None reduces everything to a scalar; dim=d removes dimension d only)")

    # edge cases: an empty mask (and, with dim=-1, an empty row) must raise ValueError
    empty_cases = [
        _Case("empty mask, dim=None", (torch.randn(2, 4, generator=g), torch.zeros(2, 4, dtype=torch.bool))),
        _Case("row 1 of the mask is empty, dim=-1", (torch.randn(3, 4, generator=g),
                                                     torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]), -1)),
    ]
    for case in empty_cases:
        args, kwargs = case.fresh()
        try:
            out = fn(*args, **kwargs)
        except ValueError:
            continue
        except NotImplementedError:
            raise
        except Exception as err:
            raise AssertionError(f"{name} (case '{case.name}'): your masked_mean raised {type(err).__name__} "
                                 f"({err}); raise ValueError on an empty mask, naming the problem") from err
        where = "on an empty mask" if len(case.args) == 2 else "when a row keeps no entry (dim=-1)"
        if isinstance(out, torch.Tensor) and out.is_floating_point() and bool(torch.isnan(out).any()):
            what = f"returns nan {where}"
        elif isinstance(out, torch.Tensor):
            what = f"returns {_short(out)} {where} (a clamp or +eps on the count hides it: the loss silently becomes 0)"
        else:
            what = f"returns {out!r} {where}"
        raise AssertionError(f"{name} (case '{case.name}'): your masked_mean {what} instead of raising ValueError; "
                             "check the kept count (mask.sum(dim) == 0) and raise ValueError")
    _ok(name, len(cases) + len(empty_cases))


def _per_token_variants() -> list[tuple[Callable, str | None]]:
    """Per-token PPO losses from (log_probs, old_log_probs, advantages, clip_eps): the right one, then mistakes."""
    def loss(lp, old, a, eps, *, invert=False, op=torch.min, sign=-1.0, clip=True, use_min=True, fixed_eps=None):
        r = (old - lp).exp() if invert else (lp - old).exp()
        e = eps if fixed_eps is None else fixed_eps
        c = r.clamp(1 - e, 1 + e) if clip else r
        return sign * (op(r * a, c * a) if use_min else c * a)

    return [
        (lambda *a: loss(*a), None),
        (lambda *a: loss(*a, invert=True), "your ratio is inverted: use exp(log_probs - old_log_probs), "
                                           "pi_theta/pi_old, not pi_old/pi_theta"),
        (lambda *a: loss(*a, op=torch.max), "you used max instead of min in -min(r*A, clip(r)*A)"),
        (lambda *a: loss(*a, sign=1.0), "the sign is flipped: the loss is -min(r*A, clip(r)*A), not +min(...)"),
        (lambda *a: loss(*a, clip=False), "you never clipped the ratio"),
        (lambda *a: loss(*a, use_min=False), "you clipped without the min: -clip(r)*A alone is wrong where the "
                                             "unclipped r*A is smaller"),
        (lambda *a: loss(*a, fixed_eps=0.2), "you ignored clip_eps (your loss matches clip_eps=0.2)"),
    ]


def _agg_variants() -> list[tuple[Callable, str | None]]:
    """Reductions of a per-token loss [B, T] under a mask: the right one (seq-mean-token-mean), then mistakes."""
    m_ = lambda m: m.to(torch.float64)  # noqa: E731
    return [
        (lambda l, m: ((l * m_(m)).sum(-1) / m_(m).sum(-1)).mean(), None),
        (lambda l, m: (l * m_(m)).sum() / m_(m).sum(),
         "you averaged over all kept tokens of the batch at once (token-mean); this exercise asks for the mean "
         "over each sequence's kept tokens, then over sequences (rows of different lengths weigh differently)"),
        (lambda l, m: ((l * m_(m)).sum(-1) / m.shape[-1]).mean(),
         "you divided by the number of all tokens (T per row), not the kept ones"),
        (lambda l, m: l.mean(), "you ignored action_mask: padding and prompt tokens entered the mean"),
        (lambda l, m: ((l * m_(m)).sum(-1) / m_(m).sum(-1)).sum(),
         "you summed the per-sequence means instead of averaging them over sequences"),
        (lambda l, m: (l * m_(m)).sum(-1).mean(), "you summed over each sequence's tokens instead of averaging them"),
    ]


def check_policy_loss(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(log_probs, old_log_probs, advantages, action_mask, clip_eps=0.2) -> scalar`` (notebook 04).

    The loss is -min(r A, clip(r) A) per token, averaged over each sequence's kept tokens, then over
    sequences; its gradient w.r.t. log_probs must match too.
    """
    name = "check_policy_loss"
    g = _gen(6)
    # hand-worked: row 0 keeps 3 tokens (r = 1, 1.5, 0.5 with A = 1, -1, 1), row 1 keeps 1 (r = 1.2, A = 2);
    # masked-out slots hold a large ratio and advantage, so a missing mask shows.
    old_h = torch.full((2, 4), -2.0)
    lp_h = old_h + torch.tensor([[1.0, 1.5, 0.5, 7.4], [1.2, 7.4, 7.4, 7.4]]).log()
    adv_h = torch.tensor([[1.0, -1.0, 1.0, 5.0], [2.0, 5.0, 5.0, 5.0]])
    mask_h = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)

    def rand_case(label: str, B: int, T: int, lengths: list[int], spread: float, eps: float | None,
                  mask_dtype=torch.bool) -> _Case:
        old = -4 * torch.rand(B, T, generator=g)
        lp = old + spread * torch.randn(B, T, generator=g)
        adv = torch.randn(B, T, generator=g)
        mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(mask_dtype)
        args = (lp, old, adv, mask) if eps is None else (lp, old, adv, mask, eps)
        return _Case(label, args)

    cases = [
        _Case("hand-worked: row means 0 and -1.2, eps=0.2", (lp_h, old_h, adv_h, mask_h, 0.2)),
        rand_case("random B=3, T=6, rows keep 6, 3, 1 tokens, clip_eps left at its default", 3, 6, [6, 3, 1],
                  0.3, None),
        rand_case("random B=4, T=5, rows keep 2, 5, 4, 1 tokens, eps=0.1, float mask", 4, 5, [2, 5, 4, 1], 0.3,
                  0.1, torch.float32),
        rand_case("random B=2, T=7, rows keep 7, 4 tokens, eps=0.3, ratios far outside the band", 2, 7, [7, 4],
                  0.8, 0.3),
    ]

    def ref(lp, old, adv, mask, eps=0.2):
        return _ref_policy_loss(lp, old, adv, mask, clip_eps=eps)[0]

    mistakes: list[Mistake] = []
    per_token, aggs = _per_token_variants(), _agg_variants()
    combos = sorted(itertools.product(per_token, aggs), key=lambda pa: (pa[0][1] is not None) + (pa[1][1] is not None))
    for (tok, tok_msg), (agg, agg_msg) in combos:
        msgs = [m for m in (tok_msg, agg_msg) if m is not None]
        if not msgs:
            continue

        def wrong(lp, old, adv, mask, eps=0.2, tok=tok, agg=agg):
            return agg(tok(lp.double(), old.double(), adv.double(), eps), mask)

        text = "; and ".join(msgs)
        mistakes.append((wrong, lambda w, text=text: f"{text} (expected {_f(w.exp)}, got {_f(w.got)})"))
    _run(name, fn, cases, ref, mistakes,
         shape_hint=" = a scalar (0-dim tensor): reduce over tokens and sequences")
    _check_grad(name, fn, cases[1], 0, ref, "log_probs")
    _ok(name, len(cases))


# ----------------------------------------------------------------------------- 05: KL estimators and GAE

_KL_FORMULAS = {
    "k1": "log_probs - ref_log_probs",
    "k2": "0.5 * (log_probs - ref_log_probs)**2",
    "k3": "exp(ref_log_probs - log_probs) - 1 - (ref_log_probs - log_probs)",
}


def _kl_loop(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Reference per-token estimates of KL(pi || pi_ref), one entry at a time (Schulman, "Approximating KL")."""
    out = torch.empty(log_probs.shape, dtype=torch.float64)
    flat_lp, flat_ref, flat_out = log_probs.reshape(-1), ref_log_probs.reshape(-1), out.view(-1)
    for i in range(flat_lp.numel()):
        log_r = float(flat_ref[i]) - float(flat_lp[i])  # log(pi_ref / pi) for a token sampled from pi
        flat_out[i] = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": math.expm1(log_r) - log_r}[estimator]
    return out


def check_kl(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], estimator: str = "k3") -> None:
    """Check ``fn(log_probs, ref_log_probs)`` -> a per-token estimate of KL(pi || pi_ref) (notebook 05).

    estimator: "k1" = log_probs - ref_log_probs; "k2" = 0.5 (log_probs - ref_log_probs)^2;
    "k3" = exp(ref_log_probs - log_probs) - 1 - (ref_log_probs - log_probs), never negative.
    """
    if estimator not in _KL_FORMULAS:
        raise ValueError(f"estimator must be one of {sorted(_KL_FORMULAS)}, got {estimator!r}")
    name = "check_kl"
    g = _gen(7)
    ref_a = -5 * torch.rand(3, 8, generator=g)
    ref_b = -5 * torch.rand(2, 2, 5, generator=g)
    same = -3 * torch.rand(2, 4, generator=g)
    cases = [
        _Case("hand-worked: pi = [0.5, 0.25], pi_ref = [0.25, 0.5]",
              (torch.tensor([0.5, 0.25]).log(), torch.tensor([0.25, 0.5]).log())),
        _Case("pi = pi_ref: every estimate is 0", (same, same.clone())),
        _Case("random [3, 8]", (ref_a + 0.5 * torch.randn(3, 8, generator=g), ref_a)),
        _Case("random [2, 2, 5], large differences", (ref_b + 2 * torch.randn(2, 2, 5, generator=g), ref_b)),
    ]
    forms = {
        "k1": lambda lp, rf: lp - rf,
        "k2": lambda lp, rf: 0.5 * (lp - rf) ** 2,
        "k3": lambda lp, rf: (rf - lp).exp() - 1 - (rf - lp),
    }
    mistakes: list[Mistake] = []
    for other, f in forms.items():
        if other != estimator:
            mistakes.append((f, lambda w, other=other: f"{other} instead of {estimator}: you computed "
                                                       f"{_KL_FORMULAS[other]} = {_f(w.got)}; {estimator} = "
                                                       f"{_KL_FORMULAS[estimator]} = {_f(w.exp)}"))
    mistakes += [
        (lambda lp, rf, f=forms[estimator]: f(rf, lp),
         lambda w: f"you swapped log_probs and ref_log_probs (got {_f(w.got)}, expected {_f(w.exp)}); "
                   f"{estimator} = {_KL_FORMULAS[estimator]}, with the samples drawn from pi"),
        (lambda lp, rf: (rf - lp).exp() - (rf - lp),
         lambda w: f"you dropped the -1 in k3 = r - 1 - log r (got {_f(w.got)}, expected {_f(w.exp)}); "
                   "without it the estimate is 1 where pi = pi_ref"),
        (lambda lp, rf: (lp - rf) ** 2,
         lambda w: f"you dropped the 1/2 in k2 = 0.5 * (log r)^2 (got {_f(w.got)}, expected {_f(w.exp)})"),
        (lambda lp, rf: (lp - rf).exp() - 1,
         lambda w: f"you computed exp(log_probs - ref_log_probs) - 1 (got {_f(w.got)}); {estimator} = "
                   f"{_KL_FORMULAS[estimator]} = {_f(w.exp)}"),
    ]
    _run(name, fn, cases, lambda lp, rf: _kl_loop(lp, rf, estimator), mistakes,
         shape_hint=" (the estimate is per token: do not average here)")
    _ok(f"{name}[{estimator}]", len(cases))


def _gae_loop(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float, *, acc: str = "gamma*lam",
              next_last: str = "zero", reset: bool = False, forward: bool = False, gamma_in_delta: bool = True,
              add_values: bool = False) -> torch.Tensor:
    """GAE by explicit loops; the keyword switches produce the known wrong versions (defaults: the right one)."""
    B, T = rewards.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    k = {"gamma*lam": gamma * lam, "gamma": gamma, "lam": lam}[acc]
    g_delta = gamma if gamma_in_delta else 1.0
    for b in range(B):
        running = 0.0
        order = range(T) if forward else reversed(range(T))
        for t in order:
            if t + 1 < T:
                v_next = float(values[b, t + 1])
            else:  # after the last token: 0 (the episode ends) unless a mistake says otherwise
                v_next = {"zero": 0.0, "wrap": float(values[b, 0]), "repeat": float(values[b, T - 1])}[next_last]
            delta = float(rewards[b, t]) + g_delta * v_next - float(values[b, t])
            running = delta if reset else delta + k * running
            out[b, t] = running + (float(values[b, t]) if add_values else 0.0)
    return out


def check_gae(fn: Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]) -> None:
    """Check ``fn(rewards [B, T], values [B, T], gamma, lam) -> advantages [B, T]`` (notebook 05).

    delta_t = r_t + gamma V_{t+1} - V_t with V_T = 0 after the last token; A_t = delta_t + gamma lam A_{t+1}.
    """
    name = "check_gae"
    g = _gen(8)
    cases = [
        _Case("hand-worked: rewards [0, 0, 1], values 0.5, gamma=lam=1 -> A = 0.5 each",
              (torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5), 1.0, 1.0)),
        _Case("hand-worked: rewards [1, 0, 2], values 0, gamma=0.5, lam=0.8 -> A = [1.32, 0.8, 2]",
              (torch.tensor([[1.0, 0.0, 2.0]]), torch.zeros(1, 3), 0.5, 0.8)),
        _Case("random B=3, T=6, gamma=0.9, lam=0.8", (torch.randn(3, 6, generator=g),
                                                      torch.randn(3, 6, generator=g), 0.9, 0.8)),
        _Case("random B=2, T=5, gamma=1, lam=0.95 (the usual RLHF setting)",
              (torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g), 1.0, 0.95)),
        _Case("T=1: A = r - V", (torch.randn(2, 1, generator=g), torch.randn(2, 1, generator=g), 0.9, 0.8)),
    ]
    gl = lambda w: f"gamma={w.case.args[2]}, lam={w.case.args[3]}"  # noqa: E731
    ge = lambda w: f"(expected {_f(w.exp)}, got {_f(w.got)} at index {list(w.idx)})"  # noqa: E731
    mistakes: list[Mistake] = [
        (lambda r, v, gm, lm: _gae_loop(r, v, gm, lm, reset=True),
         lambda w: "you reset the GAE accumulator: your advantages equal the one-step TD errors "
                   f"delta_t = r_t + gamma V_(t+1) - V_t; A_t = delta_t + gamma*lam*A_(t+1) {ge(w)}"),
        (lambda r, v, gm, lm: _gae_loop(r, v, gm, lm, acc="gamma"),
         lambda w: f"you used gamma instead of gamma*lam to accumulate A_(t+1) ({gl(w)}); with gamma alone it is "
                   f"the Monte-Carlo return minus V {ge(w)}"),
        (lambda r, v, gm, lm: _gae_loop(r, v, gm, lm, acc="lam"),
         lambda w: f"you used lam instead of gamma*lam to accumulate A_(t+1) ({gl(w)}) {ge(w)}"),
        (lambda r, v, gm, lm: _gae_loop(r, v, gm, lm, forward=True),
         lambda w: f"you ran the recursion forward in time; GAE accumulates from the last token backwards {ge(w)}"),
        (lambda r, v, gm, lm: _gae_loop(r, v, gm, lm, add_values=True),
         lambda w: f"you returned the returns A + V, not the advantages A {ge(w)}"),
        (lambda r, v, gm, lm: _gae_loop(r, v, gm, lm, next_last="wrap"),
         lambda w: "at the last token the value after it must be 0; you used values[:, 0] (torch.roll wraps "
                   f"around) {ge(w)}"),
        (lambda r, v, gm, lm: _gae_loop(r, v, gm, lm, next_last="repeat"),
         lambda w: f"at the last token the value after it must be 0; you bootstrapped with V_(T-1) {ge(w)}"),
        (lambda r, v, gm, lm: _gae_loop(r, v, gm, lm, gamma_in_delta=False),
         lambda w: f"you forgot gamma on V_(t+1) in the TD error delta_t = r_t + gamma V_(t+1) - V_t {ge(w)}"),
        (lambda r, v, gm, lm: _gae_loop(r, v, lm, gm),
         lambda w: f"you swapped gamma and lam ({gl(w)}) {ge(w)}"),
    ]
    _run(name, fn, cases, _gae_loop, mistakes, shape_hint=" = [B, T]: one advantage per token")
    _ok(name, len(cases))


# ----------------------------------------------------------------------------- 06: per-token rewards


def _token_rewards_loop(score: torch.Tensor, kl: torch.Tensor, action_mask: torch.Tensor, kl_coef: float, *,
                        kl_part: str = "masked", place: str = "last_kept", overwrite: bool = False) -> torch.Tensor:
    """Per-token rewards by loops; the keyword switches produce the known wrong versions (defaults: the right one)."""
    B, T = kl.shape
    mask = action_mask.bool()
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        kept = [t for t in range(T) if mask[b, t]]
        for t in range(T):
            pen = {"masked": -kl_coef * float(kl[b, t]) if mask[b, t] else 0.0,
                   "unmasked": -kl_coef * float(kl[b, t]),
                   "plus": kl_coef * float(kl[b, t]) if mask[b, t] else 0.0,
                   "no_coef": -float(kl[b, t]) if mask[b, t] else 0.0,
                   "none": 0.0}[kl_part]
            out[b, t] = pen
        if place == "all_kept":
            for t in kept:
                out[b, t] += float(score[b])
            continue
        t_score = {"last_kept": kept[-1] if kept else None, "last": T - 1, "first_kept": kept[0] if kept else None,
                   "one_past": len(kept) if len(kept) < T else None}[place]
        if t_score is None:
            raise ValueError("variant not defined here")
        out[b, t_score] = float(score[b]) if overwrite else out[b, t_score] + float(score[b])
    return out


def check_token_rewards(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]) -> None:
    """Check ``fn(score [B], kl [B, T], action_mask [B, T], kl_coef) -> rewards [B, T]`` (notebook 06).

    rewards = -kl_coef * kl on kept tokens, 0 elsewhere, plus each row's score on its last kept token.
    """
    name = "check_token_rewards"
    g = _gen(9)

    def right_padded(lengths: list[int], T: int, dtype=torch.bool) -> torch.Tensor:
        return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(dtype)

    cases = [
        _Case("hand-worked: score [1, -0.5], rows keep 3 and 2 of 4 tokens, kl_coef=0.1",
              (torch.tensor([1.0, -0.5]), torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]),
               right_padded([3, 2], 4), 0.1)),
        _Case("random B=3, T=6, rows keep 6, 2, 4 tokens, kl_coef=0.05",
              (torch.randn(3, generator=g), torch.rand(3, 6, generator=g), right_padded([6, 2, 4], 6), 0.05)),
        _Case("random B=2, T=5, rows keep 1, 3 tokens, kl_coef=0.2, float mask",
              (torch.randn(2, generator=g), torch.randn(2, 5, generator=g).abs(),
               right_padded([1, 3], 5, torch.float32), 0.2)),
        _Case("random B=3, T=4, rows keep 3, 2, 1 tokens, kl_coef=0.5, negative kl estimates (k1)",
              (torch.randn(3, generator=g), torch.randn(3, 4, generator=g), right_padded([3, 2, 1], 4), 0.5)),
    ]
    kl_msgs = {
        "masked": None,
        "unmasked": "you did not zero the KL penalty on masked-out tokens (they are padding, not actions)",
        "plus": "the KL penalty is added; it must be subtracted: -kl_coef * kl",
        "no_coef": "you forgot kl_coef: the penalty is -kl_coef * kl",
        "none": "the KL penalty is missing: kept tokens get -kl_coef * kl",
    }
    place_msgs = {
        "last_kept": None,
        "last": "score placed at the last position instead of the last kept token",
        "first_kept": "score placed at the first token instead of the last kept token",
        "one_past": "off by one: you placed the score at index mask.sum() (one past the last kept token); the last "
                    "kept token is at mask.sum() - 1",
        "all_kept": "you added the score to every kept token; it goes on the last kept token only",
        "overwrite": "you overwrote the last kept token's KL penalty with the score; add the score to it",
    }
    combos = sorted(itertools.product(kl_msgs.items(), place_msgs.items()),
                    key=lambda kp: (kp[0][1] is not None) + (kp[1][1] is not None))
    mistakes: list[Mistake] = []
    for (kl_part, kl_msg), (place, place_msg) in combos:
        msgs = [m for m in (kl_msg, place_msg) if m is not None]
        if not msgs:
            continue
        p, ow = ("last_kept", True) if place == "overwrite" else (place, False)

        def wrong(s, k, m, c, kl_part=kl_part, p=p, ow=ow):
            return _token_rewards_loop(s, k, m, c, kl_part=kl_part, place=p, overwrite=ow)

        text = "; and ".join(msgs)

        def message(w: _Where, text: str = text) -> str:
            b, T = w.idx[0], w.case.args[1].shape[1]
            last = int(w.case.args[2][b].bool().sum()) - 1
            return (f"{text} (expected {_f(w.exp)}, got {_f(w.got)} at index {list(w.idx)}; row {b} keeps "
                    f"tokens 0..{last} of T = {T})")

        mistakes.append((wrong, message))
    _run(name, fn, cases, _token_rewards_loop, mistakes, shape_hint=" = [B, T]: one reward per token")
    _ok(name, len(cases))
