"""Masks over response tokens and means under them.

Derived in notebooks/04_masked_token_loss.ipynb.
"""

from __future__ import annotations

import torch

from utils.checks import check_same_shape


def _as_bool(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """The mask as bool; a float mask must hold only 0 and 1 (0.5 is not "half kept").

    The one 0/1 rule for masks in this package's masking and advantage functions.
    """
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0/1 (or bool) values")
    return mask.bool()


def masked_sum(tensor: torch.Tensor, mask: torch.Tensor | None, dim: int | None = None) -> torch.Tensor:
    """Sum of ``tensor`` where ``mask`` is true, over ``dim`` (all dims if None).

    Uses ``where``, not ``tensor * mask``: a NaN or inf in a masked-out slot
    would survive multiplication by 0 (``inf * 0 = nan``).
    """
    if mask is None:
        return tensor.sum() if dim is None else tensor.sum(dim)
    check_same_shape(tensor=tensor, mask=mask)
    mask = _as_bool(mask)
    kept = torch.where(mask, tensor, 0)  # 0 in the tensor's own dtype
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor | None, dim: int | None = None) -> torch.Tensor:
    """Mean of ``tensor`` over the entries where ``mask`` is true.

    tensor, mask: same shape, e.g. [B, T]. dim=None: one mean over all kept
    entries (a scalar); dim=-1: one mean per row ([B]). Raises ``ValueError``
    when a reduced slice keeps no entry, where the seed note's version divides
    by zero and returns NaN.
    """
    if mask is None:
        return tensor.mean() if dim is None else tensor.mean(dim)
    check_same_shape(tensor=tensor, mask=mask)
    mask = _as_bool(mask)
    count = mask.sum() if dim is None else mask.sum(dim)
    if not bool(count.all()):  # some slice keeps no entry
        where = "the whole mask" if dim is None else f"{int((count == 0).sum())} slice(s) along dim={dim}"
        raise ValueError(f"masked_mean: empty mask ({where} keeps no entry); the mean is undefined")
    return masked_sum(tensor, mask, dim) / count.to(tensor.dtype)


def response_mask(
    input_ids: torch.Tensor, prompt_len: int, eos_token_id: int | None = None, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask over the response positions ``input_ids[:, prompt_len:]``.

    input_ids: [B, T] prompt (left-padded to ``prompt_len``) followed by the response.
    Returns [B, T - prompt_len]: true from the first response token up to and
    including the first EOS (the EOS is an action the policy took), false after it
    (generation pads there) and wherever ``attention_mask`` is 0.
    """
    if not 0 < prompt_len < input_ids.shape[-1]:
        raise ValueError(f"prompt_len={prompt_len} must lie in [1, {input_ids.shape[-1] - 1}] for input_ids of length {input_ids.shape[-1]}")
    resp = input_ids[:, prompt_len:]  # [B, R]
    mask = torch.ones_like(resp, dtype=torch.bool)
    if eos_token_id is not None:
        is_eos = (resp == eos_token_id).long()
        after_eos = (is_eos.cumsum(-1) - is_eos) > 0  # strictly after the first EOS
        mask &= ~after_eos
    if attention_mask is not None:
        mask &= attention_mask[:, prompt_len:].bool()
    return mask
