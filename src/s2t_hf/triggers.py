"""Triggers: how uncertain is the student at this step, and does it cross the threshold?

The signals are pure functions on tensors; the trigger *policies* ([`TriggerPolicy`], registered in [`TRIGGERS`]) turn
a decoding step into the rows that trigger.

All signals are computed in float32 on the student's top-k support (k = `signal_top_k`), renormalised, as in the paper.
A row with a NaN or `+inf` logit, or without any finite one (for KL: or a teacher without a finite log-probability on
the support), has a NaN signal, which never crosses a threshold (such a row never triggers) and is left out of
calibration.
"""

from __future__ import annotations

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)


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


# ---------------------------------------------------------------------------------------------------------------------
# Trigger policies: which rows trigger at a step. The processor builds one from `config.trigger` through `TRIGGERS`.


class TriggerPolicy:
    """
    Decides which rows of a decoding step trigger. Built once by the processor from its config.

    A policy computes a per-row `signal` from the step (or none) and turns it into the triggered rows with `fire`.
    To add a trigger kind, subclass this (or [`ThresholdTrigger`] for a signal compared to a calibrated threshold) and
    register it: `TRIGGERS["name"] = MyTrigger`; `S2TConfig(trigger="name")` then selects it.

    Class attributes:
        can_fire (`bool`): `False` for a policy that never triggers (the processor then skips the step's work).
        has_threshold (`bool`): whether the signal is compared to `config.trigger_threshold` (and can be calibrated).
        needs_teacher_every_step (`bool`): whether the signal reads the teacher's full distribution at every step.
        watch_row (`int` or `None`): an output row whose logit the processor must read from the model's own output
            (`step.trigger_logits`), before any logits processor can change it.

    Args:
        config (`S2TConfig`): the processor's settings.
        selector (`S2TSelector`, *optional*): the local selector, for policies that read its rows.
    """

    can_fire = True
    has_threshold = False
    needs_teacher_every_step = False

    def __init__(self, config, selector=None):
        self.config = config
        self.watch_row: int | None = None

    def reset(self) -> None:
        """Called when a new `generate` call starts."""

    def signal(self, step) -> torch.Tensor | None:
        """The per-row signal of the step (`(batch,)`, float32), or `None` for a signal-free trigger."""
        return None

    def fire(self, signal: torch.Tensor | None, eligible: torch.Tensor) -> torch.Tensor:
        """The rows that trigger, among the `eligible` ones (a boolean `(batch,)`)."""
        raise NotImplementedError


class ThresholdTrigger(TriggerPolicy):
    """A signal that triggers where it exceeds `config.trigger_threshold` (set directly or by calibration)."""

    has_threshold = True

    def fire(self, signal: torch.Tensor | None, eligible: torch.Tensor) -> torch.Tensor:
        if self.config.trigger_threshold is None:
            raise ValueError(
                f"The `{self.config.trigger}` trigger needs a threshold: set `trigger_threshold=...` or call "
                "`processor.calibrate(prompts, target_rate=...)` first."
            )
        return eligible & (signal > self.config.trigger_threshold)


class EntropyTrigger(ThresholdTrigger):
    """The student's entropy on its top-`signal_top_k` support (no teacher)."""

    def signal(self, step) -> torch.Tensor:
        return entropy_signal(step.scores, self.config.signal_top_k)


class KLTrigger(ThresholdTrigger):
    """KL(student || teacher) on the student's top-`signal_top_k` support: the teacher runs at every step."""

    needs_teacher_every_step = True

    def signal(self, step) -> torch.Tensor:
        return kl_signal(step.scores, step.teacher_log_probs(), self.config.signal_top_k)


class LearnedTrigger(ThresholdTrigger):
    """
    The logit of the selector's learned trigger row (a linear probe on the student's final hidden state), plus
    `trigger_entropy_weight` times the entropy signal.
    """

    def __init__(self, config, selector=None):
        super().__init__(config, selector)
        if selector is None:
            raise ValueError(
                "`trigger='learned'` reads the learned trigger row of a selector: pass `selector=...` (an "
                "`S2TSelector` created with `learned_trigger=True` and fit with "
                "`s2t_hf.learned_trigger.fit_trigger_row`), or load one with "
                "`S2TLogitsProcessor.from_pretrained(path_or_repo_id, model=model)` (add "
                "`selection='teacher', teacher=...` for collaborative S2T)."
            )
        self.watch_row = learned_trigger_row(selector, config)

    def signal(self, step) -> torch.Tensor:
        if step.trigger_logits is None:
            raise ValueError("The learned trigger's row logit was not read from the model's output at this step.")
        if self.config.trigger_entropy_weight:
            return step.trigger_logits + self.config.trigger_entropy_weight * entropy_signal(
                step.scores, self.config.signal_top_k
            )
        return step.trigger_logits


def learned_trigger_row(selector, config) -> int:
    """The selector's trigger row, once it is checked to be fit for the hidden states `config` decodes with."""
    row = selector.trigger_token_id
    if row is None:
        raise ValueError(
            "`trigger='learned'` needs a selector with a trigger row: this one was created without one. Create it "
            "with `S2TSelector.create(..., learned_trigger=True)` and fit the row with "
            "`s2t_hf.learned_trigger.fit_trigger_row(selector, trajectories)`."
        )
    fit_on = selector.config.trigger_adapter_mode
    if fit_on is None:
        raise ValueError(
            "The selector's trigger row was never fit (it is still zero: a constant logit that cannot rank steps). "
            "Fit it with `s2t_hf.learned_trigger.fit_trigger_row(selector, trajectories)` first."
        )
    if fit_on != config.adapter_mode:
        what = {"scoring": "the base model's (LoRA off)", "generate": "the adapted model's (LoRA on)"}
        logger.warning(
            f"The learned trigger row was fit on {what[fit_on]} hidden states, but this processor generates with "
            f"`adapter_mode={config.adapter_mode!r}`, i.e. {what[config.adapter_mode]}: its logit is read off "
            f"other hidden states than it was fit on. Pass `adapter_mode={fit_on!r}`, or fit the row again with "
            f"`fit_trigger_row(..., adapter_mode={config.adapter_mode!r})`."
        )
    return int(row)


class RandomTrigger(TriggerPolicy):
    """Each eligible row triggers with probability `trigger_rate` (seeded by `config.seed` at every `generate`)."""

    def __init__(self, config, selector=None):
        super().__init__(config, selector)
        self.generator: torch.Generator | None = None

    def reset(self) -> None:
        if self.config.seed is not None:
            self.generator = torch.Generator().manual_seed(self.config.seed)

    def fire(self, signal: torch.Tensor | None, eligible: torch.Tensor) -> torch.Tensor:
        draws = torch.rand(eligible.shape[0], generator=self.generator).to(eligible.device)
        return eligible & (draws < self.config.trigger_rate)


class AlwaysTrigger(TriggerPolicy):
    """Every eligible row triggers."""

    def fire(self, signal: torch.Tensor | None, eligible: torch.Tensor) -> torch.Tensor:
        return eligible.clone()


class NeverTrigger(TriggerPolicy):
    """No row triggers: the processor only masks the reserved rows and counts the steps."""

    can_fire = False

    def fire(self, signal: torch.Tensor | None, eligible: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(eligible)


#: The trigger kinds `S2TConfig.trigger` accepts, by name.
TRIGGERS: dict[str, type[TriggerPolicy]] = {
    "entropy": EntropyTrigger,
    "kl": KLTrigger,
    "learned": LearnedTrigger,
    "random": RandomTrigger,
    "always": AlwaysTrigger,
    "never": NeverTrigger,
}
