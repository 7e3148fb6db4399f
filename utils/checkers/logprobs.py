"""Checkers for notebook 03's exercises: log pi(label) from logits, and the shift by one for a causal LM."""

from __future__ import annotations

import math
from typing import Callable

import torch

from utils.checkers.engine import Case, Diff, Mistake, accepts, check_grad, fmt, gen, passed, run
from utils.logprobs import logprobs_from_logits


def pick(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """x[..., label] at every position."""
    return x.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def reference(logits, labels, temperature=1.0):
    return logprobs_from_logits(logits, labels, temperature)


def probabilities(logits, labels, temperature=1.0):
    return pick((logits / temperature).softmax(-1), labels)


def raw_logits(logits, labels, temperature=1.0):
    return pick(logits / temperature, labels)


def negative_log_likelihood(logits, labels, temperature=1.0):
    return -pick((logits / temperature).log_softmax(-1), labels)


def log_of_softmax(logits, labels, temperature=1.0):
    return pick((logits / temperature).softmax(-1).log(), labels)


def wrong_dim(logits, labels, temperature=1.0):
    return pick((logits / temperature).log_softmax(0), labels)


def forgot_temperature(logits, labels, temperature=1.0):
    return pick(logits.log_softmax(-1), labels)


def multiplied_temperature(logits, labels, temperature=1.0):
    return pick((logits * temperature).log_softmax(-1), labels)


def divided_log_probs(logits, labels, temperature=1.0):
    return pick(logits.log_softmax(-1), labels) / temperature


LOGPROB_MISTAKES = [
    Mistake("you returned probabilities (softmax), not log-probabilities: got {got} where log pi = {expected} "
            "(= log {prob})", probabilities),
    Mistake("you gathered the raw logits ({got}) without normalising; subtract logsumexp over the vocabulary "
            "(log_softmax): expected {expected}", raw_logits),
    Mistake("you returned the negative log-likelihood -log pi ({got}); return log pi = {expected}",
            negative_log_likelihood),
    Mistake("you computed log(softmax(...)): a probability that small underflows to 0 in float32 and log(0) = {got}; "
            "use log_softmax (or logits - logsumexp), which gives {expected}", log_of_softmax),
    Mistake("you normalised over dim=0; the vocabulary is the last dim: log_softmax(dim=-1) (expected {expected}, "
            "got {got})", wrong_dim),
    Mistake("you forgot the temperature: divide the logits by temperature={temperature} before the log-softmax "
            "(expected {expected}, got {got})", forgot_temperature),
    Mistake("you multiplied the logits by the temperature; divide them by temperature={temperature} "
            "(expected {expected}, got {got})", multiplied_temperature),
    Mistake("you divided the log-probs by the temperature; the logits are divided before the log-softmax "
            "(expected {expected}, got {got})", divided_log_probs),
]


def fields(d: Diff) -> dict:
    return {"prob": fmt(math.exp(d.expected)), "temperature": d.case.kwargs.get("temperature", 1.0)}


def with_temperatures(cases: list[Case], fn: Callable, extra: Callable[[torch.Generator], Case], seed: int) -> list[Case]:
    """Add cases at temperatures 0.7 and 1.5 when the learner's function takes a ``temperature`` argument."""
    if not accepts(fn, "temperature"):
        return cases
    g = gen(seed)
    for temperature in (0.7, 1.5):
        c = extra(g)
        cases = cases + [Case(f"{c.name}, temperature={temperature}", c.args, {"temperature": temperature})]
    return cases


def _random_4x9(g: torch.Generator) -> Case:
    return Case("random [4, V=9]", (2 * torch.randn(4, 9, generator=g), torch.randint(0, 9, (4,), generator=g)))


def check_logprobs(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(logits [..., V], labels [...]) -> log softmax(logits)[label]`` [...] (notebook 03).

    If ``fn`` takes a ``temperature`` keyword, it is also checked at temperatures 0.7 and 1.5
    (log softmax(logits / temperature)).
    """
    g = gen(3)
    cases = [
        Case("hand-worked: uniform logits over V=4, so log pi = -log 4", (torch.zeros(1, 4), torch.tensor([2])),
             expected=torch.tensor([-math.log(4)])),
        Case("hand-worked: logits [2, 1, 0], label 0", (torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0])),
             expected=torch.tensor([2 - math.log(math.e ** 2 + math.e + 1)])),
        Case("random [5, V=11]", (3 * torch.randn(5, 11, generator=g), torch.randint(0, 11, (5,), generator=g))),
        Case("random [2, 3, V=7]", (2 * torch.randn(2, 3, 7, generator=g), torch.randint(0, 7, (2, 3), generator=g))),
        Case("a rare token: logits [0, 200, -200]", (torch.tensor([[0.0, 200.0, -200.0]] * 2), torch.tensor([2, 0])),
             expected=torch.tensor([-400.0, -200.0])),
    ]
    cases = with_temperatures(cases, fn, _random_4x9, 30)
    run("check_logprobs", fn, cases, reference, LOGPROB_MISTAKES, fields=fields,
        shape_hint=" (one log-prob per label: gather the label's entry, do not return all V of them)")
    check_grad("check_logprobs", fn, cases[2], 0, reference, "logits")
    passed("check_logprobs", len(cases))


def shifted_reference(logits, input_ids, temperature=1.0):
    return logprobs_from_logits(logits[:, :-1], input_ids[:, 1:], temperature)


def same_position(logits, input_ids, temperature=1.0):
    return logprobs_from_logits(logits[:, :-1], input_ids[:, :-1], temperature)


def shifted_both(logits, input_ids, temperature=1.0):
    return logprobs_from_logits(logits[:, 1:], input_ids[:, 1:], temperature)


def shifted_backwards(logits, input_ids, temperature=1.0):
    return logprobs_from_logits(logits[:, 1:], input_ids[:, :-1], temperature)


def shifted_probabilities(logits, input_ids, temperature=1.0):
    return probabilities(logits[:, :-1], input_ids[:, 1:], temperature)


def shifted_raw_logits(logits, input_ids, temperature=1.0):
    return raw_logits(logits[:, :-1], input_ids[:, 1:], temperature)


def shifted_forgot_temperature(logits, input_ids, temperature=1.0):
    return forgot_temperature(logits[:, :-1], input_ids[:, 1:])


PAIR = "pair logits[:, :-1] with input_ids[:, 1:] (expected {expected}, got {got})"
SHIFT_MISTAKES = [
    Mistake("off by one: you scored token t with the logits at t; the logits at position t predict token t+1, so "
            + PAIR, same_position),
    Mistake("off by one: you scored token t with the logits at t (you shifted both); the logits at t predict token "
            "t+1: " + PAIR, shifted_both),
    Mistake("you shifted the wrong way: you scored token t with the logits at t+1; " + PAIR, shifted_backwards),
    Mistake(LOGPROB_MISTAKES[0].says, shifted_probabilities),
    Mistake(LOGPROB_MISTAKES[1].says, shifted_raw_logits),
    Mistake(LOGPROB_MISTAKES[5].says, shifted_forgot_temperature),
]


def _random_2x4x9(g: torch.Generator) -> Case:
    return Case("random B=2, T=4, V=9", (2 * torch.randn(2, 4, 9, generator=g),
                                         torch.randint(0, 9, (2, 4), generator=g)))


def check_shifted_logprobs(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(logits [B, T, V], input_ids [B, T]) -> [B, T-1]``: log pi(token t+1) from the logits at t.

    Notebook 03. If ``fn`` takes a ``temperature`` keyword it is also checked at temperatures 0.7 and 1.5.
    """
    g = gen(4)
    # hand-worked: V=3, the logits at t put 4 on token (t+1) % 3 and 0 elsewhere; ids 0, 1, 2 follow that rule
    hand = torch.zeros(1, 3, 3)
    for t in range(3):
        hand[0, t, (t + 1) % 3] = 4.0
    cases = [
        Case("hand-worked: the logits at t favour token t+1, ids [0, 1, 2]", (hand, torch.tensor([[0, 1, 2]])),
             expected=torch.full((1, 2), 4 - math.log(math.exp(4) + 2))),
        Case("random B=2, T=5, V=11", (2 * torch.randn(2, 5, 11, generator=g),
                                       torch.randint(0, 11, (2, 5), generator=g))),
        Case("random B=3, T=4, V=7", (3 * torch.randn(3, 4, 7, generator=g),
                                      torch.randint(0, 7, (3, 4), generator=g))),
        Case("T=2: a single scored token", (torch.randn(2, 2, 5, generator=g),
                                            torch.randint(0, 5, (2, 2), generator=g))),
    ]
    cases = with_temperatures(cases, fn, _random_2x4x9, 40)
    run("check_shifted_logprobs", fn, cases, shifted_reference, SHIFT_MISTAKES, fields=fields,
        shape_hint=" = [B, T-1]: the last position's logits predict a token past the end, and no logits "
                   "predict the first token")
    check_grad("check_shifted_logprobs", fn, cases[1], 0, shifted_reference, "logits")
    passed("check_shifted_logprobs", len(cases))
