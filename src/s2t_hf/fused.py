"""`FusedSession`: the protocol between an [`S2TLogitsProcessor`] and the fused decoding loop (`s2t_hf.generate`).

The loop owns the session for one `generate` call (`with processor.fused_session(model, cache) as session:`). Through
it, and through nothing else, the loop:

- learns whether the candidates of S2T-Local can ride in its decoding forward (`session.fused`, decided once);
- takes the selection the processor left pending at a trigger step (`session.take_pending()`);
- runs the forward that scores the candidates inside `session.scoring_forward()`, where the processor's hook does not
  count it, and hands the logits back (`session.complete(pending, logits)`), which selects and accounts the step;
- tells the processor about that forward, which it ran in place of an ordinary one (`session.note_forward(...)`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers.utils import logging

from .kv import cache_scoring_support
from .state_hook import GenerationStateHook
from .selection import PendingSelection


logger = logging.get_logger(__name__)


class FusedSession:
    """
    One `generate` call of the fused loop, seen from the processor. Create it with
    [`S2TLogitsProcessor.fused_session`]; it is open while the processor holds it.

    Args:
        processor (`S2TLogitsProcessor`): the processor.
        hook (`GenerationStateHook`): the processor's record of the model's forwards.
        fused (`bool`): whether candidates ride in the decoding forward (else the processor scores them itself).
    """

    def __init__(self, processor: Any, hook: GenerationStateHook, fused: bool):
        self.processor = processor
        self.hook = hook
        self.fused = fused
        self.pending: PendingSelection | None = None

    @classmethod
    def decide(cls, processor: Any, hook: GenerationStateHook, model: torch.nn.Module, cache: Any) -> FusedSession:
        """
        The session of a `generate` call on `cache`: fused where the selection scores candidates with the adapter on
        while generating (`adapter_mode="generate"`), and the cache can hold K query slots.
        """
        config = processor.config
        fused = processor.selection_policy.scores_candidates and config.adapter_mode == "generate"
        if fused:
            ok, reason = cache_scoring_support(cache, model, num_slots=config.top_k)
            if not ok:
                fused = False
                logger.info(f"The fused S2T loop scores candidates in a forward of their own: {reason}.")
        return cls(processor, hook, fused)

    def hand_over(self, pending: PendingSelection) -> None:
        """Called by the processor: the step's selection waits for the loop's decoding forward."""
        self.pending = pending

    def take_pending(self) -> PendingSelection | None:
        """The selection the processor left pending at the last step, if any (taken once)."""
        pending, self.pending = self.pending, None
        return pending

    @contextlib.contextmanager
    def scoring_forward(self) -> Iterator[None]:
        """A forward run inside this block is not counted as one of `generate`'s (note it with [`note_forward`])."""
        with self.hook.pause():
            yield

    def complete(self, pending: PendingSelection, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Selects the tokens of a pending step from the decoding forward's logits at the candidates of its triggered
        rows, shape `(triggered, K, vocab)`, and accounts the step.

        Returns:
            `(chosen, positions)`: every row's chosen token (-1 where not triggered) and the chosen candidate's position
            (0..K-1) in each triggered row.
        """
        selection = self.processor.complete_selection(pending, logits, path="fused")
        return selection.chosen, selection.positions

    def note_forward(
        self, cache: Any, attention_mask: torch.Tensor, position_ids: torch.Tensor, next_logits: torch.Tensor
    ) -> None:
        """Records the fused forward as the step's forward: one token per row, the logits `(batch, vocab)` it yields."""
        self.hook.note(
            input_length=1, cache=cache, attention_mask=attention_mask, position_ids=position_ids,
            next_logits=next_logits,
        )
