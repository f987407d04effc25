"""The learned trigger: one reserved output row whose logit says "a selection here changes the token for the better".

The row is a linear probe on the student's final hidden state (the input of its output head), so the processor reads it
from the scores `generate` computes anyway: no extra forward and no teacher at inference (`trigger="learned"`). By
default the probe also weighs the student's entropy (`config.trigger_entropy_weight`, computed from the same scores):
entropy is a non-linear function of the logits that no single row can express, and the row then learns what entropy
misses (where along a solution selection pays) instead of a rough copy of it.

It is fit as a cheap separate step after data collection, not as a loss term of [`S2TTrainer`]:

- the probe is a logistic regression on fixed features, a convex problem solved exactly in seconds (L-BFGS) on every
  labelled position, where a loss term would see only the few positions of each packed training group;
- with `adapter_mode="scoring"` (the student generates as the base model) its features are the base model's hidden
  states, which selector training never changes, so nothing is gained by fitting it jointly.

Labels come from the trajectories that [`collect_selection_data`] returns with `return_trajectories=True`: every
eligible position of the student's greedy trajectories, with the student's top-K and the teacher's view of them.

- `"fixable"` (default): the teacher's top-1 token is one of the student's top-K candidates but not the student's
  top-1. Selection among the top-K can then give the teacher's choice, and only then: the positions where S2T and
  S2T-Local gain accuracy.
- `"flip"`: the teacher's favourite among the top-K candidates differs from the student's top-1, i.e. collaborative
  S2T would change the token. A superset of `"fixable"` that also counts steps where the teacher's real choice lies
  outside the top-K (the change is then not evidence of a fix).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers.utils import logging

from .kv import positions_from_attention_mask
from .prompts import left_pad
from .triggers import threshold_for_rate


__all__ = ["TRIGGER_LABELS", "fit_trigger_row", "roc_auc", "trigger_labels", "trigger_signals"]

logger = logging.get_logger(__name__)

TRIGGER_LABELS = ("fixable", "flip")
_TRAJECTORY_COLUMNS = ("input_ids", "prompt_length", "steps", "cand_ids", "teacher_probs", "teacher_top1")


def roc_auc(scores: Sequence[float] | torch.Tensor, labels: Sequence[bool] | torch.Tensor) -> float:
    """
    Area under the ROC curve of `scores` for predicting `labels`: the probability that a random positive scores above a
    random negative (ties count one half). NaN scores are left out; NaN when one class is empty.

    Examples:

    ```python
    >>> from s2t_hf.learned_trigger import roc_auc
    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75

    ```
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    labels = torch.as_tensor(labels).flatten().bool()
    if scores.shape != labels.shape:
        raise ValueError(f"`scores` has {scores.numel()} values but `labels` has {labels.numel()}.")
    keep = ~scores.isnan()
    scores, labels = scores[keep], labels[keep]
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    # Mann-Whitney U with average ranks for ties
    order = scores.argsort()
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    unique, inverse, counts = torch.unique(sorted_scores, return_inverse=True, return_counts=True)
    if unique.numel() < scores.numel():
        ends = counts.cumsum(0).double()
        average = ends - (counts.double() - 1) / 2
        ranks[order] = average[inverse]
    u = ranks[labels].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def trigger_labels(trajectory: dict[str, Any], top_k: int, label: str = "fixable") -> torch.Tensor:
    """
    The label of each eligible position of one trajectory (a row of the trajectory dataset), shape `(positions,)`.

    Args:
        trajectory (`dict`): a row of `collect_selection_data(..., return_trajectories=True)`.
        top_k (`int`): the K of inference (at most the K the data was collected with).
        label (`str`, *optional*, defaults to `"fixable"`): one of `TRIGGER_LABELS` (see the module's docstring).
    """
    if label not in TRIGGER_LABELS:
        raise ValueError(f"`label` must be one of {TRIGGER_LABELS}, got {label!r}.")
    if not trajectory["steps"]:
        return torch.zeros(0, dtype=torch.bool)
    candidates = torch.tensor(trajectory["cand_ids"], dtype=torch.long)
    if top_k < 2 or top_k > candidates.shape[1]:
        raise ValueError(
            f"`top_k={top_k}` must lie in [2, {candidates.shape[1]}]: the trajectories hold the student's top-"
            f"{candidates.shape[1]} (collect with a larger `top_k` for a larger K)."
        )
    candidates = candidates[:, :top_k]
    if label == "fixable":
        top1 = torch.tensor(trajectory["teacher_top1"], dtype=torch.long)
        return (candidates[:, 1:] == top1[:, None]).any(-1)
    teacher = torch.tensor(trajectory["teacher_probs"], dtype=torch.float32)[:, :top_k]
    return teacher.argmax(-1) != 0


@dataclasses.dataclass
class _Positions:
    """The eligible positions of a list of trajectories, flattened."""

    trajectory: torch.Tensor  # index of the trajectory of each position
    labels: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor


def _positions(trajectories: list[dict[str, Any]], top_k: int, label: str, warmup_tokens: int) -> _Positions:
    index, labels, entropy, kl = [], [], [], []
    for n, trajectory in enumerate(trajectories):
        keep = torch.tensor(trajectory["steps"], dtype=torch.long) >= warmup_tokens
        labels.append(trigger_labels(trajectory, top_k, label)[keep])
        entropy.append(torch.tensor(trajectory["entropy"], dtype=torch.float64)[keep])
        kl.append(torch.tensor(trajectory["kl"], dtype=torch.float64)[keep])
        index.append(torch.full((int(keep.sum()),), n, dtype=torch.long))
    return _Positions(torch.cat(index), torch.cat(labels), torch.cat(entropy), torch.cat(kl))


@contextlib.contextmanager
def _generating_as(selector, adapter_mode: str) -> Iterator[None]:
    """The selector's model as the processor generates with it under `adapter_mode`, in eval mode, without grads."""
    was_training = selector.model.training
    selector.model.eval()
    mode = selector.lora_disabled() if adapter_mode == "scoring" else contextlib.nullcontext()
    try:
        with mode, torch.no_grad():
            yield
    finally:
        selector.model.train(was_training)


def _forward_positions(
    selector, trajectories: list[dict[str, Any]], warmup_tokens: int, adapter_mode: str, batch_size: int, row: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    The head's input (the final hidden state, float32) at every eligible position, and the logit of `row` there (what
    the processor reads), in trajectory order.
    """
    base = selector.base_model
    head = selector.output_head
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    device = next(base.parameters()).device
    features, logits = [], []
    try:
        with _generating_as(selector, adapter_mode):
            for start in range(0, len(trajectories), batch_size):
                batch = trajectories[start : start + batch_size]
                batch_steps = [
                    [s for s in t["steps"] if s >= warmup_tokens] for t in batch
                ]
                if not any(batch_steps):
                    continue
                rows = [list(t["input_ids"]) for t in batch]
                padded = left_pad(rows, 0, device)
                width = padded["input_ids"].shape[1]
                # column of the position that predicts generated token `s` of trajectory `b` (left padding)
                columns = [
                    [width - len(rows[b]) + int(batch[b]["prompt_length"]) + s - 1 for s in steps]
                    for b, steps in enumerate(batch_steps)
                ]
                first = min(c[0] for c in columns if c)
                keep = width - first
                captured.clear()
                output = base(
                    input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                    position_ids=positions_from_attention_mask(padded["attention_mask"]), use_cache=False,
                    logits_to_keep=keep,
                )
                hidden = captured[-1]
                for b, cols in enumerate(columns):
                    if not cols:
                        continue
                    at = torch.tensor(cols, device=device) - first
                    features.append(hidden[b, at].float().cpu())
                    if row is not None:
                        logits.append(output.logits[b, at, row].float().cpu())
    finally:
        handle.remove()
    hidden_size = int(head.weight.shape[1])
    stacked = torch.cat(features) if features else torch.zeros(0, hidden_size)
    return stacked, (torch.cat(logits) if row is not None and logits else None)


def _logistic_regression(features: torch.Tensor, labels: torch.Tensor, l2: float, max_iter: int) -> torch.Tensor:
    """Weights `(features,)` of an L2-regularised logistic regression (with intercept) on standardised features, mapped
    back to the raw features; the intercept is dropped (the calibrated threshold absorbs it)."""
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y = labels.double()
    weights = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        z = x @ weights[:-1] + weights[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y) + 0.5 * l2 * weights[:-1].square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return (weights[:-1].detach() / std).float()


def _split(trajectories: list[dict[str, Any]], validation_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Trajectory indices of the fit and validation sides, split by prompt (a prompt never lands on both)."""
    prompts = sorted({int(t.get("prompt_index", n)) for n, t in enumerate(trajectories)})
    generator = torch.Generator().manual_seed(seed)
    order = [prompts[i] for i in torch.randperm(len(prompts), generator=generator).tolist()]
    held_out = set(order[: int(round(validation_fraction * len(prompts)))])
    fit, validation = [], []
    for n, t in enumerate(trajectories):
        (validation if int(t.get("prompt_index", n)) in held_out else fit).append(n)
    return fit, validation


def _as_rows(trajectories) -> list[dict[str, Any]]:
    if hasattr(trajectories, "column_names"):  # a `datasets.Dataset`
        missing = [c for c in _TRAJECTORY_COLUMNS if c not in trajectories.column_names]
        if missing:
            raise ValueError(
                f"`trajectories` lacks the columns {missing}: pass the second dataset of "
                "`collect_selection_data(..., return_trajectories=True)`, not the selection groups."
            )
        return [dict(row) for row in trajectories]
    rows = list(trajectories)
    for row in rows[:1]:
        missing = [c for c in _TRAJECTORY_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"`trajectories` rows lack the keys {missing} (see `s2t_hf.data.trajectory_features`).")
    return rows


def trigger_signals(
    selector, trajectories, *, label: str = "fixable", top_k: int | None = None, warmup_tokens: int | None = None,
    adapter_mode: str | None = None, batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """
    The three trigger signals and the label at every eligible position of `trajectories`: `learned` (the trigger row's
    logit, as the processor reads it), `entropy`, `kl` (NaN for a remote teacher) and `labels`. Feed them to
    [`roc_auc`] to compare how well each predicts the label on held-out trajectories.

    Args:
        selector (`S2TSelector`): a selector with a fit trigger row.
        trajectories (`datasets.Dataset` or list of `dict`): rows of the trajectory dataset.
        label, top_k, warmup_tokens, adapter_mode, batch_size: as in [`fit_trigger_row`]; defaults from the
            selector's config.
    """
    config = selector.config
    if selector.trigger_token_id is None:
        raise ValueError("The selector has no trigger row; create it with `S2TSelector.create(..., learned_trigger=True)`.")
    rows = _as_rows(trajectories)
    top_k = top_k if top_k is not None else config.top_k
    warmup_tokens = warmup_tokens if warmup_tokens is not None else config.warmup_tokens
    adapter_mode = adapter_mode or config.trigger_adapter_mode or config.adapter_mode
    positions = _positions(rows, top_k, label, warmup_tokens)
    _, row_logits = _forward_positions(
        selector, rows, warmup_tokens, adapter_mode, batch_size, selector.trigger_token_id
    )
    learned = _learned_signal(row_logits, positions, config.trigger_entropy_weight)
    return {"learned": learned, "entropy": positions.entropy, "kl": positions.kl, "labels": positions.labels}


def _learned_signal(row_logits: torch.Tensor | None, positions: _Positions, entropy_weight: float) -> torch.Tensor:
    """The learned trigger's signal as the processor computes it: the row's logit plus the weighted entropy."""
    if row_logits is None:
        return torch.zeros(0, dtype=torch.float64)
    return row_logits.double() + entropy_weight * positions.entropy


def _check_fit_labels(fit: _Positions, label: str) -> int:
    """The number of positive fit positions; an error when there is nothing to learn."""
    if fit.labels.numel() == 0:
        raise ValueError(
            "The trajectories hold no eligible position to fit on (all shorter than `warmup_tokens`); give longer "
            "trajectories or lower `warmup_tokens`."
        )
    positives = int(fit.labels.sum())
    if positives == 0 or positives == fit.labels.numel():
        raise ValueError(
            f"Every one of the {fit.labels.numel()} fit positions has the same `{label}` label ({bool(fit.labels[0])}): "
            "nothing to learn. Collect more trajectories, or use another `label` or `top_k`."
        )
    return positives


def _fit_row_weights(
    features: torch.Tensor, fit: _Positions, with_entropy: bool, l2: float, max_iter: int
) -> tuple[torch.Tensor, float]:
    """`(row weights, entropy weight)` of the logistic regression on the hidden states (and the entropy)."""
    if with_entropy:
        features = torch.cat([features, fit.entropy.float()[:, None]], dim=1)
    weights = _logistic_regression(features, fit.labels, l2, max_iter)
    entropy_weight = float(weights[-1]) if with_entropy else 0.0
    weights = weights[:-1] if with_entropy else weights
    if not bool(torch.isfinite(weights).all()):
        raise ValueError(
            "Fitting the trigger row gave non-finite weights (the hidden states hold NaN or inf values?); check the "
            "student's outputs, or raise `l2`."
        )
    return weights, entropy_weight


def _validation_auroc(
    selector, validation_rows: list[dict[str, Any]], top_k: int, label: str, warmup_tokens: int, adapter_mode: str,
    batch_size: int, entropy_weight: float,
) -> tuple[dict[str, float], int]:
    """`(AUROC of each signal, number of positions)` on the held-out trajectories (NaN where there are none)."""
    auroc = {"learned": float("nan"), "entropy": float("nan"), "kl": float("nan")}
    if not validation_rows:
        return auroc, 0
    validation = _positions(validation_rows, top_k, label, warmup_tokens)
    validation_positions = int(validation.labels.numel())
    if validation_positions:
        row = selector.trigger_token_id
        _, row_logits = _forward_positions(selector, validation_rows, warmup_tokens, adapter_mode, batch_size, row)
        auroc = {
            "learned": roc_auc(_learned_signal(row_logits, validation, entropy_weight), validation.labels),
            "entropy": roc_auc(validation.entropy, validation.labels),
            "kl": roc_auc(validation.kl, validation.labels),
        }
    return auroc, validation_positions


def fit_trigger_row(
    selector,
    trajectories,
    *,
    label: str = "fixable",
    top_k: int | None = None,
    warmup_tokens: int | None = None,
    adapter_mode: str | None = None,
    target_rate: float | None = None,
    with_entropy: bool = True,
    validation_fraction: float = 0.2,
    l2: float = 1e-3,
    max_iter: int = 200,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """
    Fits the selector's trigger row: a logistic regression of `label` on the student's final hidden state (and, with
    `with_entropy`, its entropy) at every eligible position of `trajectories`; the hidden-state weights go into the
    row, the entropy's into `config.trigger_entropy_weight`, the intercept is left to the threshold.

    The features are the hidden states the processor will read the row off: the base model's for
    `adapter_mode="scoring"` (LoRA off while generating), the adapted model's for `"generate"`. The mode is recorded
    in `selector.config.trigger_adapter_mode`; with `target_rate`, `selector.config` also gets `trigger="learned"`
    and the threshold at which the row fires on that fraction of the trajectories' positions (recalibrate on your own
    prompts with [`S2TLogitsProcessor.calibrate`]).

    Args:
        selector (`S2TSelector`):
            Created with `learned_trigger=True`; not inside an open processor.
        trajectories (`datasets.Dataset` or list of `dict`):
            The trajectories of `collect_selection_data(..., return_trajectories=True)`, collected from the same
            student.
        label (`str`, *optional*, defaults to `"fixable"`):
            What the row predicts, one of `TRIGGER_LABELS` (see the module's docstring).
        top_k (`int`, *optional*):
            The K of the label; defaults to `selector.config.top_k`.
        warmup_tokens (`int`, *optional*):
            Positions before this many generated tokens are left out; defaults to `selector.config.warmup_tokens`.
        adapter_mode (`str`, *optional*):
            `"scoring"` or `"generate"`; defaults to `selector.config.adapter_mode`.
        target_rate (`float`, *optional*):
            Also set the threshold for this trigger rate (see above).
        with_entropy (`bool`, *optional*, defaults to `True`):
            Fit the entropy's weight with the row (`config.trigger_entropy_weight`); `False`: the row alone.
        validation_fraction (`float`, *optional*, defaults to 0.2):
            Prompts held out (the row is fit on the others) to report the AUROC of each signal.
        l2 (`float`, *optional*, defaults to 1e-3), max_iter (`int`, *optional*, defaults to 200):
            Regularisation (on standardised features) and L-BFGS iterations.
        batch_size (`int`, *optional*, defaults to 32):
            Trajectories per forward.
        seed (`int`, *optional*, defaults to 0):
            Seed of the split.

    Returns:
        `dict`: `positions` (fit / validation), `positive_rate`, `auroc` (validation AUROC of the `learned`,
        `entropy` and `kl` signals; NaN where a class or the signal is missing) and `threshold` (or `None`).

    Examples:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from s2t_hf import S2TSelector, collect_selection_data
    >>> from s2t_hf.learned_trigger import fit_trigger_row
    >>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    >>> _ = torch.manual_seed(0)
    >>> student, teacher = AutoModelForCausalLM.from_config(config), AutoModelForCausalLM.from_config(config)
    >>> prompts = [[2 + i % 50, 3 + i % 7] for i in range(40)]
    >>> groups, trajectories = collect_selection_data(student, teacher, prompts=prompts, top_k=4, max_new_tokens=12,
    ...                                               show_progress=False, return_trajectories=True)
    >>> selector = S2TSelector.create(student, num_bins=4, lora_r=2, learned_trigger=True)
    >>> report = fit_trigger_row(selector, trajectories, label="flip", top_k=4, adapter_mode="scoring", target_rate=0.1)
    >>> selector.config.trigger, selector.config.trigger_adapter_mode
    ('learned', 'scoring')

    ```
    """
    from .config import ADAPTER_MODES

    config = selector.config
    row = selector.trigger_token_id
    if row is None:
        raise ValueError(
            "The selector has no trigger row: create it with `S2TSelector.create(..., learned_trigger=True)`."
        )
    adapter_mode = adapter_mode or config.adapter_mode
    if adapter_mode not in ADAPTER_MODES:
        raise ValueError(f"`adapter_mode` must be one of {ADAPTER_MODES}, got {adapter_mode!r}.")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"`validation_fraction` must lie in [0, 1), got {validation_fraction}.")
    if target_rate is not None and not 0.0 < target_rate < 1.0:
        raise ValueError(f"`target_rate` must lie in (0, 1), got {target_rate}.")
    top_k = top_k if top_k is not None else config.top_k
    warmup_tokens = warmup_tokens if warmup_tokens is not None else config.warmup_tokens
    rows = _as_rows(trajectories)
    if not rows:
        raise ValueError("`trajectories` is empty; collect with `return_trajectories=True` on some prompts.")
    fit_index, validation_index = _split(rows, validation_fraction, seed)
    fit_rows = [rows[i] for i in fit_index]
    validation_rows = [rows[i] for i in validation_index]
    fit = _positions(fit_rows, top_k, label, warmup_tokens)
    positives = _check_fit_labels(fit, label)
    features, _ = _forward_positions(selector, fit_rows, warmup_tokens, adapter_mode, batch_size, None)
    weights, entropy_weight = _fit_row_weights(features, fit, with_entropy, l2, max_iter)
    selector.write_reserved_row(row, weights)
    logger.info(
        f"Fit the learned trigger row {row} on {fit.labels.numel()} positions ({positives / fit.labels.numel():.1%} "
        f"`{label}`), {adapter_mode} hidden states."
    )

    auroc, validation_positions = _validation_auroc(
        selector, validation_rows, top_k, label, warmup_tokens, adapter_mode, batch_size, entropy_weight
    )
    threshold = None
    updates: dict[str, Any] = {"trigger_adapter_mode": adapter_mode, "trigger_entropy_weight": entropy_weight}
    if target_rate is not None:
        _, row_logits = _forward_positions(selector, fit_rows, warmup_tokens, adapter_mode, batch_size, row)
        threshold = threshold_for_rate(_learned_signal(row_logits, fit, entropy_weight), target_rate)
        updates.update(trigger="learned", trigger_threshold=threshold, trigger_rate=target_rate)
    selector.config = dataclasses.replace(config, **updates)
    return {
        "label": label,
        "top_k": top_k,
        "adapter_mode": adapter_mode,
        "positions": {"fit": int(fit.labels.numel()), "validation": validation_positions},
        "positive_rate": positives / fit.labels.numel(),
        "entropy_weight": entropy_weight,
        "auroc": auroc,
        "threshold": threshold,
    }
