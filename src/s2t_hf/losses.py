"""Losses and statistics of selection distillation, as pure functions on tensors (tested without a trainer).

A *selection group* is one decision point: a context, the student's K candidate tokens and the teacher's probability
of each. The local selector gives every candidate a logit `s` (see [`~s2t_hf.selection.local_candidate_logits`], the
exact function used at inference); the loss of a group, with `p_T` the teacher's probabilities renormalised over the
group and `c*` their argmax, is

    CE(softmax(s / T), c*) + hinge(m - (s[c*] - max_{c != c*} s[c])) + lambda * KL(p_T || softmax(s / T))

plus `beta * KL_LM`, the KL divergence KL(base || adapted) of the next-token distributions over the ordinary
vocabulary on the context positions ([`lm_kl_divergence`]), which keeps the student's own generation close to the base
model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


__all__ = [
    "SelectionLossOutput",
    "lm_kl_divergence",
    "lm_kl_per_position",
    "selection_loss",
    "selection_metrics",
    "spearman_correlation",
]


@dataclass
class SelectionLossOutput:
    """
    Per-group terms of the selection loss, each of shape `(batch,)`.

    Args:
        loss (`torch.Tensor`): `cross_entropy + hinge + teacher_kl_weight * teacher_kl`.
        cross_entropy (`torch.Tensor`): `-log softmax(s / T)[c*]`.
        hinge (`torch.Tensor`): `max(0, m - (s[c*] - max_{c != c*} s[c]))`.
        teacher_kl (`torch.Tensor`): `KL(p_T || softmax(s / T))`.
        teacher_choice (`torch.Tensor`): `c*`, the position (0..K-1) of the teacher's preferred candidate (long).
    """

    loss: torch.Tensor
    cross_entropy: torch.Tensor
    hinge: torch.Tensor
    teacher_kl: torch.Tensor
    teacher_choice: torch.Tensor


def _candidate_mask(candidate_logits: torch.Tensor, candidate_mask: torch.Tensor | None) -> torch.Tensor:
    if candidate_mask is None:
        return torch.ones_like(candidate_logits, dtype=torch.bool)
    if candidate_mask.shape != candidate_logits.shape:
        raise ValueError(
            f"`candidate_mask` must have the shape of the candidate logits {tuple(candidate_logits.shape)}, got "
            f"{tuple(candidate_mask.shape)}."
        )
    return candidate_mask.to(device=candidate_logits.device, dtype=torch.bool)


def teacher_choice(teacher_probs: torch.Tensor, candidate_mask: torch.Tensor | None = None) -> torch.Tensor:
    """
    `c*`: the position of the valid candidate the teacher finds most probable; ties go to the student's higher rank
    (the lower position), as in [`~s2t_hf.selection.teacher_selection`].

    Args:
        teacher_probs (`torch.Tensor` of shape `(batch, K)`): the teacher's probabilities of the candidates.
        candidate_mask (`torch.Tensor` of shape `(batch, K)`, *optional*): `False` for padding candidates.

    Returns:
        `torch.Tensor` of shape `(batch,)`, long.
    """
    mask = _candidate_mask(teacher_probs, candidate_mask)
    return teacher_probs.float().masked_fill(~mask, float("-inf")).argmax(-1)


def selection_loss(
    candidate_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    candidate_mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    margin: float = 1.0,
    teacher_kl_weight: float = 0.1,
) -> SelectionLossOutput:
    """
    The selection loss of each group: cross-entropy on the teacher's choice, a margin hinge and a KL term to the
    teacher's distribution over the group.

    Args:
        candidate_logits (`torch.Tensor` of shape `(batch, K)`):
            The selector's candidate logits `s` (from [`~s2t_hf.selection.local_candidate_logits`]).
        teacher_probs (`torch.Tensor` of shape `(batch, K)`):
            The teacher's probabilities of the candidates (absolute or already renormalised: they are renormalised over
            the valid candidates of each group).
        candidate_mask (`torch.Tensor` of shape `(batch, K)`, *optional*):
            `False` for padding candidates of groups with fewer than K candidates.
        temperature (`float`, *optional*, defaults to 1.0):
            `T` in `softmax(s / T)` (cross-entropy and KL terms). The hinge acts on `s` itself.
        margin (`float`, *optional*, defaults to 1.0):
            `m`: the hinge is zero once `s[c*]` beats every other candidate by `m`. `0` disables the term.
        teacher_kl_weight (`float`, *optional*, defaults to 0.1):
            `lambda`, the weight of `KL(p_T || softmax(s / T))`.

    Returns:
        [`SelectionLossOutput`]: per-group terms (shape `(batch,)`, float32), differentiable in `candidate_logits`.

    Examples:

    ```python
    >>> import torch
    >>> from s2t_hf.losses import selection_loss
    >>> logits = torch.tensor([[2.0, 0.0, 0.0]])
    >>> out = selection_loss(logits, torch.tensor([[0.5, 0.3, 0.2]]))
    >>> out.teacher_choice, out.hinge  # the teacher prefers candidate 0, which already wins by the margin
    (tensor([0]), tensor([0.]))
    >>> torch.allclose(out.cross_entropy, torch.nn.functional.cross_entropy(logits, torch.tensor([0])))
    True

    ```
    """
    if candidate_logits.dim() != 2 or teacher_probs.shape != candidate_logits.shape:
        raise ValueError(
            f"`candidate_logits` and `teacher_probs` must both have shape (batch, K); got "
            f"{tuple(candidate_logits.shape)} and {tuple(teacher_probs.shape)}."
        )
    if temperature <= 0:
        raise ValueError(f"`temperature` must be positive, got {temperature}.")
    if margin < 0:
        raise ValueError(f"`margin` must be non-negative, got {margin}.")
    mask = _candidate_mask(candidate_logits, candidate_mask)
    empty = (~mask.any(-1)).nonzero()[:, 0].tolist()
    if empty:
        raise ValueError(
            f"`candidate_mask` leaves groups {empty} without any candidate; every group needs at least one (drop "
            "empty groups before the loss)."
        )
    logits = candidate_logits.float()
    target = teacher_probs.to(device=logits.device, dtype=torch.float32).masked_fill(~mask, 0.0).clamp_min(0.0)
    # renormalised exactly, even when the group's mass is subnormal (a floor on the sum would leave it below one)
    total = target.sum(-1, keepdim=True)
    target = target / torch.where(total > 0, total, torch.ones_like(total))
    choice = teacher_choice(teacher_probs.to(logits.device), mask)

    log_q = torch.log_softmax((logits / temperature).masked_fill(~mask, float("-inf")), dim=-1)
    cross_entropy = -log_q.gather(-1, choice[:, None])[:, 0]
    # KL(p_T || q) with 0 log 0 = 0; padding candidates (q = 0) carry p_T = 0
    positive = target > 0
    terms = torch.where(positive, target * (target.clamp_min(1e-38).log() - log_q.masked_fill(~mask, 0.0)), 0.0)
    teacher_kl = terms.sum(-1)

    chosen = logits.gather(-1, choice[:, None])[:, 0]
    others = logits.masked_fill(~mask, float("-inf")).scatter(-1, choice[:, None], float("-inf"))
    runner_up = others.max(-1).values
    gap = chosen - runner_up
    hinge = torch.where(torch.isfinite(gap), torch.relu(margin - gap), torch.zeros_like(gap))
    loss = cross_entropy + hinge + teacher_kl_weight * teacher_kl
    return SelectionLossOutput(
        loss=loss, cross_entropy=cross_entropy, hinge=hinge, teacher_kl=teacher_kl, teacher_choice=choice
    )


class _LMKLDivergence(torch.autograd.Function):
    """
    KL(softmax(base) || softmax(adapted)) per position over the kept columns, memory-lean: computed in chunks, and the
    gradient direction `softmax(adapted) - softmax(base)` is formed in the forward and saved instead of both logits, so
    neither logits tensor has to outlive the forward.
    """

    @staticmethod
    def forward(ctx, adapted: torch.Tensor, base: torch.Tensor, keep: torch.Tensor | None, chunk: int):
        # adapted, base: (batch, length, vocab), possibly non-contiguous views; returns (batch, length) float32
        batch, length, _ = adapted.shape
        out = torch.empty(batch, length, dtype=torch.float32, device=adapted.device)
        needs_grad = ctx.needs_input_grad[0]
        direction = torch.empty(adapted.shape, dtype=adapted.dtype, device=adapted.device) if needs_grad else None
        for row, start in _chunks(batch, length, chunk):
            log_q = _masked_log_softmax(adapted[row, start : start + chunk], keep)
            log_p = _masked_log_softmax(base[row, start : start + chunk], keep)
            p = log_p.exp()
            terms = p * (log_p - log_q)
            if keep is not None:
                terms = terms.masked_fill(~keep, 0.0)
            out[row, start : start + chunk] = terms.sum(-1)
            if needs_grad:  # d KL(p || q) / d adapted = q - p on the kept columns (both are 0 on the others)
                direction[row, start : start + chunk] = log_q.exp_().sub_(p)
        if needs_grad:
            ctx.save_for_backward(direction)
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (direction,) = ctx.saved_tensors
        return direction * grad_output[..., None].to(direction.dtype), None, None, None


def _chunks(batch: int, length: int, chunk: int):
    for row in range(batch):
        for start in range(0, length, chunk):
            yield row, start


def _masked_log_softmax(logits: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float()
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def lm_kl_per_position(
    base_logits: torch.Tensor,
    adapted_logits: torch.Tensor,
    *,
    ignore_token_ids: Sequence[int] | torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """
    KL(base || adapted) of the next-token distributions at every position: [`lm_kl_divergence`] before its average
    over the context, for callers that average over their own spans (groups whose contexts share one row).

    Args:
        base_logits, adapted_logits, ignore_token_ids, chunk_size: as for [`lm_kl_divergence`].

    Returns:
        `torch.Tensor` of shape `(batch, length)`, float32.
    """
    if base_logits.shape != adapted_logits.shape or adapted_logits.dim() != 3:
        raise ValueError(
            f"`base_logits` and `adapted_logits` must both have shape (batch, length, vocab); got "
            f"{tuple(base_logits.shape)} and {tuple(adapted_logits.shape)}."
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer (positions processed at once), got {chunk_size!r}.")
    vocab = adapted_logits.shape[-1]
    keep = None
    if ignore_token_ids is not None and len(ignore_token_ids) > 0:
        ids = torch.as_tensor(ignore_token_ids, dtype=torch.long, device=adapted_logits.device)
        keep = torch.ones(vocab, dtype=torch.bool, device=adapted_logits.device)
        keep[ids] = False
    return _LMKLDivergence.apply(adapted_logits, base_logits.detach(), keep, chunk_size)


def lm_kl_divergence(
    base_logits: torch.Tensor,
    adapted_logits: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    ignore_token_ids: Sequence[int] | torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """
    KL(base || adapted) of the next-token distributions over the ordinary vocabulary, averaged over the real context
    positions of each sequence: the term that keeps a selector adapter from changing the student's own generation.

    Computed in float32 and in chunks of positions, with a fused backward (`softmax(adapted) - softmax(base)`), so the
    memory it adds is about one copy of the logits. No gradient flows into `base_logits`.

    Args:
        base_logits (`torch.Tensor` of shape `(batch, length, vocab)`):
            Logits of the base model (adapter disabled).
        adapted_logits (`torch.Tensor` of shape `(batch, length, vocab)`):
            Logits of the adapted model at the same positions.
        attention_mask (`torch.Tensor` of shape `(batch, length)`, *optional*):
            1 for real tokens, 0 for padding (padding positions do not count).
        ignore_token_ids (`list[int]` or `torch.Tensor`, *optional*):
            Vocabulary rows left out of both distributions, e.g. the selector's reserved bin rows.
        chunk_size (`int`, *optional*, defaults to 1024):
            Positions processed at once.

    Returns:
        `torch.Tensor` of shape `(batch,)`, float32, non-negative (up to rounding).

    Examples:

    ```python
    >>> import torch
    >>> from s2t_hf.losses import lm_kl_divergence
    >>> logits = torch.randn(2, 5, 11)
    >>> lm_kl_divergence(logits, logits.clone())
    tensor([0., 0.])

    ```
    """
    per_position = lm_kl_per_position(
        base_logits, adapted_logits, ignore_token_ids=ignore_token_ids, chunk_size=chunk_size
    )
    if attention_mask is None:
        return per_position.mean(-1)
    weights = attention_mask.to(device=per_position.device, dtype=torch.float32)
    return (per_position * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)


def _average_ranks(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Ranks (1-based, ties share their average rank) of the valid entries of each row; invalid entries get 0."""
    values = values.float()
    valid = mask[:, None, :] & mask[:, :, None]
    less = ((values[:, None, :] < values[:, :, None]) & valid).sum(-1).float()
    equal = ((values[:, None, :] == values[:, :, None]) & valid).sum(-1).float()
    return (less + (equal + 1.0) / 2.0) * mask


def spearman_correlation(
    x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """
    Spearman rank correlation of `x` and `y` along the last dimension, per row (ties get average ranks).

    Rows with fewer than two valid entries, or where either side is constant, give 0.

    Args:
        x, y (`torch.Tensor` of shape `(batch, K)`): the two rankings' scores.
        mask (`torch.Tensor` of shape `(batch, K)`, *optional*): `False` for entries to leave out.

    Returns:
        `torch.Tensor` of shape `(batch,)`, float32, in [-1, 1].

    Examples:

    ```python
    >>> import torch
    >>> from s2t_hf.losses import spearman_correlation
    >>> spearman_correlation(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[10.0, 30.0, 20.0]]))
    tensor([0.5000])

    ```
    """
    mask = _candidate_mask(x, mask)
    count = mask.sum(-1).float()
    rank_x, rank_y = _average_ranks(x, mask), _average_ranks(y.to(x.device), mask)
    mean_x = rank_x.sum(-1, keepdim=True) / count.clamp_min(1)[:, None]
    mean_y = rank_y.sum(-1, keepdim=True) / count.clamp_min(1)[:, None]
    dx, dy = (rank_x - mean_x) * mask, (rank_y - mean_y) * mask
    denominator = (dx.square().sum(-1) * dy.square().sum(-1)).sqrt()
    correlation = (dx * dy).sum(-1) / denominator.clamp_min(1e-12)
    return torch.where(denominator > 1e-12, correlation, torch.zeros_like(correlation))


def selection_metrics(
    candidate_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    student_probs: torch.Tensor | None = None,
    candidate_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """
    Per-group statistics of a selector against the teacher, each of shape `(batch,)` (float32, average them).

    - `agreement`: 1 where the selector's choice (argmax of `candidate_logits`) is the teacher's choice `c*`;
    - `student_agreement`: 1 where the student's own top-1 (argmax of `student_probs`) is `c*` (the baseline);
    - `spearman`: rank correlation of the candidate logits with the teacher's probabilities.

    Args:
        candidate_logits (`torch.Tensor` of shape `(batch, K)`): the selector's candidate logits.
        teacher_probs (`torch.Tensor` of shape `(batch, K)`): the teacher's probabilities of the candidates.
        student_probs (`torch.Tensor` of shape `(batch, K)`, *optional*): the student's probabilities.
        candidate_mask (`torch.Tensor` of shape `(batch, K)`, *optional*): `False` for padding candidates.

    Returns:
        `dict[str, torch.Tensor]`
    """
    mask = _candidate_mask(candidate_logits, candidate_mask)
    logits = candidate_logits.detach().float()
    teacher = teacher_probs.detach().to(logits.device).float()
    target = teacher_choice(teacher, mask)
    chosen = logits.masked_fill(~mask, float("-inf")).argmax(-1)
    metrics = {
        "agreement": (chosen == target).float(),
        "spearman": spearman_correlation(logits, teacher, mask),
    }
    if student_probs is not None:
        student = student_probs.detach().to(logits.device).float().masked_fill(~mask, float("-inf"))
        metrics["student_agreement"] = (student.argmax(-1) == target).float()
    return metrics
