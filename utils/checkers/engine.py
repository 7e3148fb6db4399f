"""The engine every checker runs on: call the learner's function on each case, compare, name the mistake.

A checker is a list of ``Case``s (inputs, with the hand-worked answer where there is one), a
reference function, and a list of ``Mistake``s written out by hand: what a typical wrong
implementation returns, and what to tell the learner who made it. ``run`` compares the learner's
answers with the reference on every case; when one is wrong it looks for the mistake that
reproduces the learner's answers on all the cases and raises ``AssertionError`` with its message,
else with "expected ..., got ...". Derived for notebooks 01-06 (exercise list: docs/exercises.md).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

ATOL, RTOL = 1e-5, 1e-4


@dataclass
class Case:
    """One input to the learner's function: positional args in the exercise's order, keyword args, and
    ``expected``, the answer worked out by hand (the engine checks the reference against it)."""

    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    expected: torch.Tensor | None = None

    def fresh(self) -> tuple[tuple, dict]:
        """Clones of the inputs, so a function that writes into them cannot spoil the next call."""
        args = tuple(_clone(a) for a in self.args)
        return args, {k: _clone(v) for k, v in self.kwargs.items()}


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


@dataclass
class Diff:
    """Where the learner's answer first differs from the reference on one case, for a message."""

    case: Case
    got: float
    expected: float
    index: tuple

    def at(self, arg: int) -> float:
        """Input number ``arg`` of the case at the differing entry (for inputs shaped like the output)."""
        return float(self.case.args[arg][self.index])


@dataclass
class Mistake:
    """A known wrong answer: ``wrong`` computes it, ``says`` is the message, a ``str.format`` template.

    The template may use {got}, {expected}, {index} and any field the checker's ``fields`` function adds.
    """

    says: str
    wrong: Callable[..., torch.Tensor]


def fmt(x: float) -> str:
    """A number for a message: 4 significant digits."""
    return f"{x:.4g}"


def short(t: torch.Tensor, n: int = 6) -> str:
    """A tensor for a message: its first ``n`` values, rounded."""
    flat = t.detach().double().reshape(-1)
    if t.dim() == 0:
        return fmt(float(flat[0]))
    more = ", ..." if flat.numel() > n else ""
    return "[" + ", ".join(fmt(float(v)) for v in flat[:n]) + more + "]"


def gen(seed: int) -> torch.Generator:
    """A private seeded generator: the cases neither depend on nor disturb the notebook's global seed."""
    return torch.Generator().manual_seed(seed)


def accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes a parameter called ``name``."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within tolerance; NaNs and equal infinities count as equal (so broken mistakes are recognised)."""
    a, b = a.double(), b.double()
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True))


def _inputs(args: tuple, kwargs: dict) -> str:
    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"{list(v.shape)} {str(v.dtype).replace('torch.', '')}"
        return repr(v)
    return ", ".join(one(v) for v in list(args) + list(kwargs.values()))


def call(checker: str, fn: Callable, case: Case) -> Any:
    """The learner's answer on a fresh copy of the case; its errors (not a stub's) become a message."""
    args, kwargs = case.fresh()
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise  # an exercise stub: the learner sees its hint unchanged
    except Exception as err:
        raise AssertionError(f"{checker} (case '{case.name}'): your function raised {type(err).__name__}: {err} "
                             f"(inputs: {_inputs(args, kwargs)})") from err


def as_tensor(checker: str, out: Any, shape: torch.Size, case: Case, shape_hint: str) -> torch.Tensor:
    """The learner's answer as a float64 tensor, after checking it is one tensor of the expected shape."""
    where = f"{checker} (case '{case.name}'): your function returned"
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        raise AssertionError(f"{where} a tuple of {len(out)}; return a single tensor")
    if not isinstance(out, torch.Tensor):
        raise AssertionError(f"{where} {type(out).__name__}, expected a torch.Tensor of shape {list(shape)}")
    if out.shape != shape:
        raise AssertionError(f"{where} shape {list(out.shape)}, expected {list(shape)}{shape_hint}")
    return out.detach().double()


def first_diff(case: Case, got: torch.Tensor, exp: torch.Tensor) -> Diff:
    """The first entry (row-major) where ``got`` and ``exp`` differ."""
    bad = ~torch.isclose(got, exp.double(), rtol=RTOL, atol=ATOL, equal_nan=True)
    index = tuple(int(i) for i in bad.nonzero()[0]) if bool(bad.any()) else (0,) * got.dim()
    return Diff(case, float(got[index]), float(exp.double()[index]), index)


def _quietly(wrong: Callable, case: Case) -> torch.Tensor | None:
    """What a known mistake returns on a case; None if it cannot run there (it then tells nothing)."""
    args, kwargs = case.fresh()
    try:
        with torch.no_grad():
            return wrong(*args, **kwargs)
    except Exception:
        return None


def diagnose(checker: str, cases: list[Case], gots: list[torch.Tensor], exps: list[torch.Tensor],
             mistakes: list[Mistake], fields: Callable[[Diff], dict] | None = None) -> str:
    """The message for a wrong answer: the first mistake that reproduces every answer, else expected vs got.

    One case alone can be degenerate (with gamma = lam = 1 several GAE mistakes agree), so a mistake is
    named only when it matches the learner on every case it can run on.
    """
    wrong_at = [i for i, (g, e) in enumerate(zip(gots, exps)) if not close(g, e)]
    for mistake in mistakes:
        outs = [_quietly(mistake.wrong, c) for c in cases[: len(gots)]]
        if any(o is not None and not close(g, o) for g, o in zip(gots, outs)):
            continue
        shown = [i for i in wrong_at if outs[i] is not None]
        if shown:
            i = shown[0]
            d = first_diff(cases[i], gots[i], exps[i])
            values = {"got": fmt(d.got), "expected": fmt(d.expected), "index": list(d.index)}
            values.update(fields(d) if fields is not None else {})
            return f"{checker} (case '{cases[i].name}'): " + mistake.says.format(**values)
    i = wrong_at[0]
    got, exp = gots[i], exps[i].double()
    diff = (got - exp).abs().nan_to_num(nan=math.inf)
    d = first_diff(cases[i], got, exp)
    where = f" (first at index {list(d.index)}: expected {fmt(d.expected)}, got {fmt(d.got)})" if got.dim() else ""
    return (f"{checker} (case '{cases[i].name}'): expected {short(exp)}, got {short(got)}; "
            f"max abs diff {fmt(float(diff.max()))}{where}")


def run(checker: str, fn: Callable, cases: list[Case], reference: Callable, mistakes: list[Mistake], *,
        fields: Callable[[Diff], dict] | None = None, shape_hint: str = "") -> None:
    """Compare ``fn`` with ``reference`` on every case; raise ``AssertionError`` naming the mistake if any is wrong.

    Cases run in order. An error or a wrong shape is reported on the case where it happens, unless an
    earlier case already gave a wrong answer (that is the more basic problem, and it is reported instead).
    """
    if not callable(fn):
        raise AssertionError(f"{checker}: pass your function itself (e.g. {checker}(my_fn)), got {type(fn).__name__}")
    gots: list[torch.Tensor] = []
    exps: list[torch.Tensor] = []
    for case in cases:
        args, kwargs = case.fresh()
        with torch.no_grad():
            exp = reference(*args, **kwargs)
        if case.expected is not None and not close(exp, case.expected):
            raise RuntimeError(f"{checker} itself is broken: its reference gives {short(exp)} on the hand-worked "
                               f"case '{case.name}', worked out as {short(case.expected)}")
        try:
            got = as_tensor(checker, call(checker, fn, case), exp.shape, case, shape_hint)
        except AssertionError:
            if any(not close(g, e) for g, e in zip(gots, exps)):
                break
            raise
        gots.append(got)
        exps.append(exp)
    if any(not close(g, e) for g, e in zip(gots, exps)):
        raise AssertionError(diagnose(checker, cases, gots, exps, mistakes, fields))


def check_grad(checker: str, fn: Callable, case: Case, arg: int, reference: Callable, what: str) -> None:
    """The answer must carry a gradient to input ``arg``, equal to the reference's (through ``.sum()``)."""
    args, kwargs = case.fresh()
    ref_args, ref_kwargs = case.fresh()
    x, x_ref = args[arg].requires_grad_(True), ref_args[arg].requires_grad_(True)
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
    if x.grad is None or not close(x.grad, x_ref.grad):
        got = torch.zeros_like(x_ref.grad) if x.grad is None else x.grad
        raise AssertionError(f"{checker} (case '{case.name}'): the values are right but the gradient w.r.t. {what} "
                             f"is not: expected {short(x_ref.grad)}, got {short(got)} (detached part of the graph?)")


def passed(checker: str, n: int) -> None:
    """The one line a passing checker prints."""
    print(f"\u2713 {checker}: all {n} cases pass")
