"""Per-token log-probabilities log pi(token | prefix) from a causal LM.

Derived in notebooks/03_token_logprobs.ipynb; notebook 08 measures its memory.
"""

from __future__ import annotations

import math

import torch

from utils.models import context_length

_ONE_CALL_ELEMENTS = 2**23  # up to 8M logits (32 MiB in fp32): one fused call over all rows
_CHUNK_ELEMENTS = 2**22  # above that, the forward reuses one workspace of at most 4M logits (16 MiB in fp32)
_TINY = 2.0**-100  # p[label] below this (log p < -69) is recomputed as a log-softmax: p could underflow
_GRAIN = 32_768  # torch's at::internal::GRAIN_SIZE: an elementwise op on at most this many elements runs on one thread


def _rows_per_chunk(n_rows: int, vocab: int) -> int:
    """All rows while they fit _ONE_CALL_ELEMENTS, else as many as fit _CHUNK_ELEMENTS (at least one)."""
    if n_rows * vocab <= _ONE_CALL_ELEMENTS:
        return max(1, n_rows)
    return max(1, _CHUNK_ELEMENTS // vocab)


def _check_temperature(temperature: float) -> float:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _scaled(rows: torch.Tensor, tau: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """The rows as fp32 ``rows / tau``: ``rows`` itself when nothing changes, else written into ``out`` (or new)."""
    if rows.dtype == torch.float32 and tau == 1.0:
        return rows
    if out is None:
        out = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    if rows.dtype == torch.float32:
        return torch.div(rows, tau, out=out)
    return out.copy_(rows).div_(tau)  # bf16/fp16: upcast first, so x / tau is not rounded to half precision


def _forward_chunks(flat: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """log softmax(flat / tau)[labels] for flat [N, V], labels [N] -> [N] fp32, with no [N, V] kept.

    One fused log_softmax per chunk of rows, written into one reused workspace (a fresh [N, V] output
    would cost its page faults), then a gather of the N values we need.
    """
    N, V = flat.shape
    step = _rows_per_chunk(N, V)
    work = torch.empty((min(step, N), V), dtype=torch.float32, device=flat.device)
    out = torch.empty(N, dtype=torch.float32, device=flat.device)
    for i in range(0, N, step):
        buf = work[: min(step, N - i)]
        torch.log_softmax(_scaled(flat[i : i + step], tau, buf), -1, out=buf)
        torch.gather(buf, -1, labels[i : i + step, None], out=out[i : i + step, None])
    return out


def _softmax_pick(flat: torch.Tensor, labels: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused softmax(flat / tau) -> (log p[labels] [N, 1] fp32, the softmax [N, V] fp32), with or without grad.

    log p is the log of the N picked probabilities; a p below _TINY (log p < -69, where p could have
    underflowed) and NaN rows get an exact log-softmax instead. The same code serves the no-grad forward and
    the autograd one, so old and new log-probs of the same fp32 model agree bit for bit (a ratio of exactly 1).
    """
    z = _scaled(flat, tau)
    probs = torch.softmax(z, -1) if z is flat else torch.softmax(z, -1, out=z)  # in place on a scaled copy
    p = probs.gather(-1, labels[:, None])  # [N, 1]
    logp = p.log()
    if not float(p.min()) >= _TINY:  # rare: an unlikely label, or NaN (a Python float compare: no tensor op)
        low = ~(p.view(-1) >= _TINY)
        logp.view(-1)[low] = _forward_chunks(flat[low], labels[low], tau)
        _check_finite(logp)
    return logp, probs


class _SelectedLogProbs(torch.autograd.Function):
    """log softmax(x / tau)[y] (tau: the temperature) with a hand-written backward.

    The gradient is ``g * (onehot(y) - softmax(x / tau)) / tau`` for an upstream gradient g: one [N, V]
    tensor, which any method must return. Its softmax comes one of two ways:

    * up to _ONE_CALL_ELEMENTS logits, the forward computes softmax(x / tau) itself (one fused kernel) and
      keeps it; log p[y] is the log of the N picked values. The backward scales that very buffer by -g and
      adds g at the labels, in place: one pass and no allocation, as the buffer is the gradient;
    * above it the forward keeps only logsumexp per row, and the backward recomputes
      exp(x / tau - lse) into a fresh [N, V] (fp32: three in-place passes over it, no temporaries;
      bf16/fp16: chunk by chunk, softmax in fp32, stored in the logits' dtype).

    Differentiable once: the first backward spends the kept buffer.
    """

    @staticmethod
    def forward(ctx, flat: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
        N, V = flat.shape
        ctx.tau, ctx.dtype, ctx.probs = tau, flat.dtype, None
        if N * V > _ONE_CALL_ELEMENTS:
            logp = _forward_chunks(flat, labels, tau)
            _check_finite(logp)
            lse = flat.gather(-1, labels[:, None]).squeeze(-1).float() / tau - logp  # logsumexp(x / tau) per row
            ctx.save_for_backward(labels, flat, lse)
            return logp
        logp, ctx.probs = _softmax_pick(flat, labels, tau)
        ctx.save_for_backward(labels)
        return logp

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        tau = ctx.tau
        g = grad_out.reshape(-1, 1).float()  # [N, 1]
        g = g if tau == 1.0 else g / tau  # d(x / tau)/dx brings a 1/tau
        if len(ctx.saved_tensors) == 3:  # large: recompute the softmax
            labels, flat, lse = ctx.saved_tensors
            grad = torch.empty_like(flat)  # [N, V]
            if flat.dtype == torch.float32:  # -g * exp(x / tau - lse), three passes in place
                if tau == 1.0:
                    torch.sub(flat, lse[:, None], out=grad)
                else:
                    torch.add(-lse[:, None], flat, alpha=1 / tau, out=grad)
                grad.exp_().mul_(-g)
            else:  # bf16/fp16: the softmax in fp32 a chunk at a time, stored in the logits' dtype
                step = _CHUNK_ELEMENTS // flat.shape[1] or 1
                for i in range(0, flat.shape[0], step):
                    s = slice(i, i + step)
                    grad[s] = (flat[s].float() / tau - lse[s, None]).exp_().mul_(-g[s])
            grad.scatter_add_(-1, labels[:, None], g.to(grad.dtype))  # + g at each label: the onehot term
            return grad, None, None
        (labels,) = ctx.saved_tensors
        grad, ctx.probs = ctx.probs, None
        if grad is None:
            raise RuntimeError("logprobs_from_logits: a second backward through one forward; the first turned its "
                               "softmax buffer into the gradient. Run the forward again instead of retain_graph=True")
        _scale_rows_(grad, -g)  # softmax -> -g * softmax, in place
        grad.scatter_add_(-1, labels[:, None], g)  # + g at each label: the onehot term
        return grad.to(ctx.dtype), None, None


def _scale_rows_(x: torch.Tensor, w: torch.Tensor) -> None:
    """x *= w in place, for x [N, V] and w [N, 1].

    Up to 4 * _GRAIN elements, in slices of at most _GRAIN elements: each slice runs on one thread, which is
    quicker there than waking a second one (notebook 08 times both at 24 x 4,096).
    """
    N, V = x.shape
    if V > _GRAIN or N * V > 4 * _GRAIN:
        x.mul_(w)
        return
    step = _GRAIN // V
    for i in range(0, N, step):
        x[i : i + step].mul_(w[i : i + step])


def _check_finite(logp: torch.Tensor) -> None:
    # finite logits give log p <= 0; min() propagates NaN and keeps -inf, so one reduction checks every value
    if logp.device.type == "cpu":
        if not math.isfinite(logp.detach().min()):
            raise ValueError("logits hold NaN or inf: the log-probabilities are not finite")
    else:  # on the device, without a host sync
        torch._assert_async(torch.isfinite(logp).all(), "logits hold NaN or inf: the log-probabilities are not finite")


def _check_labels(labels: torch.Tensor, V: int) -> None:
    lo, hi = (int(v) for v in torch.aminmax(labels))
    if lo < 0 or hi >= V:
        raise ValueError(f"labels must lie in [0, {V}) (the vocabulary), got range [{lo}, {hi}]")


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[label]: the log-probability of each label, exact and fast.

    logits: [..., V]; labels: [...] (same leading shape) -> [...] float32 (the maths runs in fp32 for bf16/fp16
    logits too: a bf16 log-softmax is off by ~0.04 nats, notebook 08).
    Up to 8M logits this is one fused kernel; above, one log-softmax per chunk of rows into a reused
    workspace, so no [N, V] copy is made (the idea of TRL's ``selective_log_softmax``). The backward is
    written by hand (``_SelectedLogProbs``). Differentiable once. Notebook 08 measures it against the
    trainers' versions.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"shape mismatch: logits{list(logits.shape)} needs labels{list(logits.shape[:-1])}, got labels{list(labels.shape)}")
    if labels.dtype not in (torch.long, torch.int, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be integer token ids, got dtype {labels.dtype}")
    tau = _check_temperature(temperature)
    V = logits.shape[-1]
    if labels.numel() == 0:
        return logits.new_zeros(labels.shape, dtype=torch.float32)
    flat, flat_labels = logits.reshape(-1, V), labels.reshape(-1).long()  # [N, V], [N]
    on_cpu = flat.device.type == "cpu"
    if not on_cpu:  # checked on the device, without a host sync
        torch._assert_async((flat_labels >= 0).all() & (flat_labels < V).all(), f"labels must lie in [0, {V})")
    try:
        if logits.requires_grad and torch.is_grad_enabled():
            result = _SelectedLogProbs.apply(flat, flat_labels, tau)  # checks its own output
        elif flat.numel() <= _ONE_CALL_ELEMENTS:
            result, _ = _softmax_pick(flat, flat_labels, tau)  # checks its own output
        else:
            result = _forward_chunks(flat, flat_labels, tau)
            _check_finite(result)
    except RuntimeError:  # on the CPU, gather refuses a label outside [0, V): say so in our words
        if on_cpu:
            _check_labels(flat_labels, V)
        raise
    return result.reshape(labels.shape)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of softmax(logits / temperature) at every position: [..., V] -> [...]."""
    tau = _check_temperature(temperature)
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    step = _rows_per_chunk(flat.shape[0], V)
    out = []
    for i in range(0, flat.shape[0], step):
        rows = flat[i : i + step] / tau
        logp = rows - torch.logsumexp(rows, -1, keepdim=True)
        out.append(-(logp.exp() * logp).sum(-1))  # H = -sum p log p
    result = torch.cat(out).reshape(logits.shape[:-1]) if out else flat.new_zeros(logits.shape[:-1])
    if not bool(torch.isfinite(result).all()):
        raise ValueError("logits hold NaN or inf: the entropy is not finite")
    return result


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, 2, ... counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logits(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prompt_len: int
) -> torch.Tensor:
    """Logits that predict the response tokens ``input_ids[:, prompt_len:]``.

    input_ids: [B, T] (prompts left-padded to ``prompt_len``). Returns [B, T - prompt_len, V], contiguous.
    The shift by one lives here: the logits at position t predict token t + 1,
    so the response's logits are those at positions ``prompt_len - 1 ... T - 2`` (``logits[:, P-1:-1]``).
    The LM head runs on those positions only (``logits_to_keep`` given as their indices), so no slice of
    the logits is taken afterwards: for B > 1 a slice ``[:, :-1]`` would make the flattening in
    ``logprobs_from_logits`` copy all [B, R, V] logits.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {list(input_ids.shape)}")
    B, T = input_ids.shape
    if not 0 < prompt_len < T:
        raise ValueError(f"prompt_len={prompt_len} must lie in [1, {T - 1}]: input_ids of length {T} need a prompt and a response")
    n_ctx = context_length(model)
    if T > n_ctx:
        raise ValueError(f"prompt + response is {T} tokens, longer than the model's context of {n_ctx}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"shape mismatch: attention_mask{list(attention_mask.shape)} vs input_ids{list(input_ids.shape)}")
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        # the R positions that score a response token; the LM head skips the rest
        logits_to_keep=torch.arange(prompt_len - 1, T - 1, device=input_ids.device),
        use_cache=False,
    )
    return out.logits  # [B, R, V]


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prompt_len: int,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """log pi(response token | everything before it), for each response position.

    input_ids: [B, T] = prompt (left-padded to ``prompt_len``) + response.
    Returns log_probs [B, T - prompt_len] (and the per-token entropy, same shape,
    if ``return_entropy``). ``temperature`` must be the one used for sampling.
    """
    logits = response_logits(model, input_ids, attention_mask, prompt_len)
    log_probs = logprobs_from_logits(logits, input_ids[:, prompt_len:], temperature)
    if not return_entropy:
        return log_probs
    with torch.no_grad():
        entropy = entropy_from_logits(logits, temperature)
    return log_probs, entropy
