"""Input checks that fail loudly, and ``cmp`` for the notebooks' self-checks.

Every public function in ``utils`` validates its tensors with these, so a shape
mismatch, an empty mask or a NaN is a ``ValueError`` naming the argument,
never a silent NaN further down.
"""

from __future__ import annotations

import torch


def check_same_shape(**tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless every non-None tensor has the same shape."""
    given = {k: v for k, v in tensors.items() if v is not None}
    shapes = {k: tuple(v.shape) for k, v in given.items()}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{k}{list(s)}" for k, s in shapes.items())
        raise ValueError(f"shape mismatch: {listing}; these must have the same shape")


def check_float(**tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the first tensor that is not floating point (integer or bool log-probs, say)."""
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}; "
                             "log-probs and advantages are real numbers (did you pass token ids or a mask?)")


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless every non-None tensor has the same dtype (a silent mix rounds one of them)."""
    given = {k: v.dtype for k, v in tensors.items() if v is not None}
    if len(set(given.values())) > 1:
        listing = ", ".join(f"{k} {str(d).replace('torch.', '')}" for k, d in given.items())
        raise ValueError(f"dtype mismatch: {listing}; compute them in one dtype (float32: logprobs_from_logits "
                         "returns float32 even for bf16 logits). A half-precision log-prob is rounded (float16 "
                         "steps by 0.004 near -5, bfloat16 by 0.03), so the ratio is not 1 where it should be")


def check_finite(**tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the first tensor that holds a NaN or an infinity."""
    for name, t in tensors.items():
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf); check what produced it")


def check_mask(mask: torch.Tensor, name: str = "action_mask") -> torch.Tensor:
    """Return ``mask`` as bool; raise if it holds values other than 0/1 or selects nothing."""
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must hold only 0/1 (or bool) values")
        mask = mask.bool()
    if not bool(mask.any()):
        raise ValueError(f"{name} is empty: it selects no token, so a mean over it is undefined")
    return mask


def check_clip_eps(value: float, name: str = "clip_eps") -> float:
    """Raise unless ``0 < value < 1`` (PPO's clipping range)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()  # a 0-d tensor is fine; judge its value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) < 1.0):
        raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
    return float(value)


def cmp(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-6) -> bool:
    """Print whether two tensors agree exactly, approximately (within ``atol``), or not.

    Returns True when they agree within ``atol``, so a notebook can ``assert cmp(...)``.
    Idea from Karpathy's makemore part 4 ``cmp`` helper.
    """
    ours, ref = torch.as_tensor(ours).detach().double(), torch.as_tensor(ref).detach().double()
    if ours.shape != ref.shape:
        print(f"{name:28s} | shapes differ: {list(ours.shape)} vs {list(ref.shape)}")
        return False
    exact = bool(torch.equal(ours, ref))
    maxdiff = float((ours - ref).abs().max()) if ours.numel() else 0.0
    approx = maxdiff <= atol
    print(f"{name:28s} | exact: {str(exact):5s} | approx: {str(approx):5s} | maxdiff: {maxdiff:.2e}")
    return approx
