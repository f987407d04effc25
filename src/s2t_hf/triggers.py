"""Trigger signals: how uncertain is the student at this step, and does it cross the threshold?

All signals are computed in float32 on the student's top-k support (k = `signal_top_k`), renormalised, as in the paper.
A row with a NaN or `+inf` logit, or without any finite one (for KL: or a teacher without a finite log-probability on
the support), has a NaN signal, which never crosses a threshold (such a row never triggers) and is left out of
calibration.
"""

from __future__ import annotations

import torch


def top_k_support(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The student's top-k token ids and their probabilities renormalised over the top-k.

    Args:
        scores (`torch.Tensor` of shape `(batch, vocab)`): logits (any float dtype).
        k (`int`): support size, clipped to the vocabulary size.

    Returns:
        `(ids, probs)`, both of shape `(batch, k)`; `probs` is float32 and sums to 1 over the last dimension.
    """
    k = min(k, scores.shape[-1])
    values, ids = scores.float().topk(k, dim=-1)
    return ids, torch.softmax(values, dim=-1)


def entropy_signal(scores: torch.Tensor, k: int = 64) -> torch.Tensor:
    """Entropy (nats) of the student's distribution restricted to its top-k support. Shape `(batch,)`."""
    _, probs = top_k_support(scores, k)
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def kl_signal(scores: torch.Tensor, teacher_logits: torch.Tensor, k: int = 64) -> torch.Tensor:
    """
    KL(student || teacher) on the student's top-k support, both distributions renormalised there. Shape `(batch,)`.

    `teacher_logits` must share the student's vocabulary indexing (same device; extra rows are ignored).
    """
    ids, student = top_k_support(scores, k)
    teacher = torch.softmax(teacher_logits.float().gather(-1, ids), dim=-1)
    return (student * (student.clamp_min(1e-30).log() - teacher.clamp_min(1e-30).log())).sum(-1)


def threshold_for_rate(signals: torch.Tensor, rate: float) -> float:
    """
    The threshold `t` such that a fraction `rate` of `signals` lies strictly above it (the `1 - rate` quantile).

    Args:
        signals (`torch.Tensor`): 1-D signal values collected on calibration prompts; NaN values (rows that can never
            trigger) are left out.
        rate (`float`): target trigger rate in (0, 1).
    """
    if signals.numel() == 0:
        raise ValueError(
            "No signal values were collected: the calibration generations had no eligible step (the first "
            "`warmup_tokens` generated tokens never count). Give more or longer prompts, raise `max_new_tokens`, "
            "or lower `warmup_tokens`."
        )
    if not 0.0 < rate < 1.0:
        raise ValueError(f"`target_rate` must lie in (0, 1), got {rate}.")
    values = signals.double().flatten()
    values = values[~values.isnan()]
    if values.numel() == 0:
        raise ValueError(
            f"All {signals.numel()} signal values are NaN: the model produced NaN or infinite logits at every "
            "calibration step (e.g. a float16 overflow); check its outputs."
        )
    return float(torch.quantile(values, 1.0 - rate))
