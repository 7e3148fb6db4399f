"""Per-token log-probabilities log pi(token | prefix) from a causal LM.

Derived in notebooks/03_token_logprobs.ipynb; notebook 08 measures its memory.
"""

from __future__ import annotations

import math

import torch

from utils.models import context_length

_CHUNK_ELEMENTS = 2**22  # at most 4M logits (16 MiB in fp32) of temporaries at a time


_MIN_CHUNK_ELEMENTS = 2**18  # below 1 MiB a chunk saves nothing worth its fixed per-call cost


def _row_chunks(n_rows: int, vocab: int) -> int:
    """Rows per chunk: at most 1/8 of all rows and at most _CHUNK_ELEMENTS logits, but never under
    _MIN_CHUNK_ELEMENTS logits (a 24-token response over 4,096 tokens is one chunk, not eight)."""
    rows = min(math.ceil(n_rows / 8), _CHUNK_ELEMENTS // vocab)
    return max(1, rows, math.ceil(_MIN_CHUNK_ELEMENTS / vocab))


def _check_temperature(temperature: float) -> float:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


class _SelectedLogProbs(torch.autograd.Function):
    """log softmax(x / tau)[y] by chunks of rows (tau: the temperature), with a hand-written backward.

    Letting autograd differentiate a loop over ``flat[i:i+k]`` slices would give one
    backward node per chunk, each allocating a zero-filled [N, V] gradient
    (notebook 08 measures it). Here backward writes ``grad_out * (onehot - softmax) / tau`` into the
    single [N, V] gradient buffer that any method must return: for fp32 logits in one in-place
    pass over that buffer (no temporaries), for bf16/fp16 logits chunk by chunk (softmax in fp32,
    stored in the logits' dtype).
    """

    @staticmethod
    def forward(ctx, flat: torch.Tensor, labels: torch.Tensor, tau: float, step: int) -> torch.Tensor:
        # flat: [N, V] logits, labels: [N]. One fused log_softmax per chunk (faster than logsumexp on CPU);
        # the maths runs in fp32 even for bf16 logits (a bf16 log-softmax is off by ~0.04 nats, notebook 08).
        out = []
        for rows, y in zip(flat.split(step), labels.split(step)):
            rows = rows.float() if tau == 1.0 else rows.float() / tau
            out.append(torch.log_softmax(rows, dim=-1).gather(-1, y[:, None]).squeeze(-1))
        logp = torch.cat(out)  # [N]
        lse = flat.gather(-1, labels[:, None]).squeeze(-1).float() / tau - logp  # logsumexp(x/tau), per row
        ctx.save_for_backward(flat, labels, lse)
        ctx.tau, ctx.step = tau, step
        return logp

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        flat, labels, lse = ctx.saved_tensors
        tau = ctx.tau
        g = grad_out.float() / tau  # [N]: d/dx of x/tau brings a 1/tau, so g already holds it
        grad = torch.empty_like(flat)  # [N, V]: the one full-size tensor any method must return
        if flat.dtype == torch.float32:  # -g * softmax(x/tau), written in place: no temporaries, no chunks needed
            torch.div(flat, tau, out=grad).sub_(lse[:, None]).exp_().mul_(-g[:, None])
        else:  # bf16/fp16: softmax in fp32 one chunk at a time, stored in the logits' dtype
            for i in range(0, flat.shape[0], ctx.step):
                s = slice(i, i + ctx.step)
                grad[s] = (flat[s].float() / tau - lse[s, None]).exp_().mul_(-g[s, None])
        grad.scatter_add_(-1, labels[:, None], g[:, None].to(grad.dtype))  # + g at each label (the onehot term)
        return grad, None, None, None


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[label], without a full log-softmax copy.

    logits: [..., V]; labels: [...] (same leading shape) -> [...] float32.
    Computes ``logit[label]/tau - logsumexp(logits/tau)`` (tau = ``temperature``) over chunks of
    rows, so the forward's only [rows, V] temporaries are one chunk's (the idea of TRL's
    ``selective_log_softmax``); the backward writes the [N, V] gradient in place (fp32) or by
    chunks (bf16/fp16). Exact, differentiable (once).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"shape mismatch: logits{list(logits.shape)} needs labels{list(logits.shape[:-1])}, got labels{list(labels.shape)}")
    if labels.dtype not in (torch.long, torch.int, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be integer token ids, got dtype {labels.dtype}")
    V = logits.shape[-1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= V):
        raise ValueError(f"labels must lie in [0, {V}) (the vocabulary), got range [{int(labels.min())}, {int(labels.max())}]")
    tau = _check_temperature(temperature)
    if labels.numel() == 0:
        return logits.new_zeros(labels.shape, dtype=torch.float32)
    flat, flat_labels = logits.reshape(-1, V), labels.reshape(-1).long()  # [N, V], [N]
    result = _SelectedLogProbs.apply(flat, flat_labels, tau, _row_chunks(flat.shape[0], V)).reshape(labels.shape)
    if not bool(torch.isfinite(result).all()):
        raise ValueError("logits hold NaN or inf: the log-probabilities are not finite")
    return result


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of softmax(logits / temperature) at every position: [..., V] -> [...]."""
    tau = _check_temperature(temperature)
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    step = _row_chunks(flat.shape[0], V)
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

    input_ids: [B, T] (prompts left-padded to ``prompt_len``). Returns [B, T - prompt_len, V].
    The shift by one lives here: the logits at position t predict token t + 1,
    so the response's logits start at ``prompt_len - 1`` and the last position's are dropped.
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
        logits_to_keep=T - prompt_len + 1,  # skip the LM head on prompt positions we never score
        use_cache=False,
    )
    return out.logits[:, :-1]  # [B, R, V]: drop the prediction after the last token


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
