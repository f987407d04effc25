"""Calibration of a trigger's threshold to a target rate: generate without triggers, collect the signal, take its
quantile. [`S2TLogitsProcessor.calibrate`] calls [`calibrate_threshold`]."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from transformers.utils import logging

from .prompts import left_pad, prompt_token_ids
from .triggers import TriggerPolicy, threshold_for_rate


logger = logging.get_logger(__name__)


class SignalRecorder(TriggerPolicy):
    """A trigger that never fires but records the signal of `policy` at every eligible step (calibration)."""

    def __init__(self, policy: TriggerPolicy):
        super().__init__(policy.config)
        self.policy = policy
        self.watch_row = policy.watch_row
        self.needs_teacher_every_step = policy.needs_teacher_every_step
        self.signals: list[torch.Tensor] = []

    def signal(self, step) -> torch.Tensor | None:
        return self.policy.signal(step)

    def fire(self, signal: torch.Tensor | None, eligible: torch.Tensor) -> torch.Tensor:
        if signal is not None:
            self.signals.append(signal[eligible].detach().cpu())
        return torch.zeros_like(eligible)


def calibrate_threshold(
    processor: Any,
    prompts: Iterable[Any],
    target_rate: float | None = None,
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    chat_template: bool | None = None,
    **generate_kwargs: Any,
) -> float:
    """
    Sets `processor.config.trigger_threshold` so that its trigger fires on a fraction `target_rate` of eligible steps.
    See [`S2TLogitsProcessor.calibrate`] for the arguments.

    Returns:
        `float`: the threshold.
    """
    config = processor.config
    if not processor.trigger_policy.has_threshold:
        from .triggers import TRIGGERS

        kinds = [name for name, policy in TRIGGERS.items() if policy.has_threshold]
        raise ValueError(
            f"Only the {', '.join(f'`{t}`' for t in kinds)} triggers have a threshold; this processor "
            f"uses {config.trigger!r}."
        )
    target_rate = target_rate if target_rate is not None else config.trigger_rate
    if target_rate is None:
        raise ValueError("Give `target_rate`, the fraction of eligible steps that should trigger (e.g. 0.01).")
    if not 0.0 < target_rate < 1.0:
        raise ValueError(f"`target_rate` must lie in (0, 1), got {target_rate}.")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("`prompts` is empty; give at least one calibration prompt.")
    tokenizer = tokenizer or processor.tokenizer
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else processor.pad_token_id
    with recording_signals(processor) as recorder:
        for batch in _prompt_batches(prompts, tokenizer, batch_size, processor.student.device, pad, chat_template):
            processor.model.generate(**batch, **{**generate_kwargs, "do_sample": False}, logits_processor=[processor])
    threshold = threshold_for_rate(torch.cat(recorder.signals), target_rate)
    processor.config = dataclasses.replace(config, trigger_threshold=threshold, trigger_rate=target_rate)
    logger.info(f"Calibrated the {config.trigger} trigger to {threshold:.4f} for a {target_rate:.1%} rate.")
    processor.reset()
    processor.reset_total_stats()  # calibration decoded nothing to count
    return threshold


@contextlib.contextmanager
def recording_signals(processor: Any) -> Iterator[SignalRecorder]:
    """The processor's trigger replaced by a [`SignalRecorder`] of it while the block runs."""
    policy = processor.trigger_policy
    recorder = SignalRecorder(policy)
    processor.trigger_policy = recorder
    try:
        yield recorder
    finally:
        processor.trigger_policy = policy


def _prompt_batches(
    prompts: list[Any], tokenizer: Any, batch_size: int, device: torch.device, pad_token_id: int,
    chat_template: bool | None = None,
) -> Iterator[dict]:
    """Left-padded batches of `input_ids` + `attention_mask` from strings, chat messages (through the chat template
    unless `chat_template=False`, as [`prompt_token_ids`] formats them) or token-id lists."""
    rows = prompt_token_ids(prompts, tokenizer, chat_template=chat_template)
    for start in range(0, len(rows), batch_size):
        yield left_pad(rows[start : start + batch_size], pad_token_id, device)
