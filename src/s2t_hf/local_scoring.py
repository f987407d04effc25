"""`LocalScorer`: the extra student forward of S2T-Local, which reads the selector's bins after each candidate.

The scorer owns the choice of *path* for that forward and the reason for it:

- `cache`: the triggered rows' K candidates in one forward on the live KV cache (a 4-D mask; sliding windows too);
- `fused`: the candidates ride in the next decoding forward of the fused loop (`s2t_hf.generate`); the loop runs that
  forward, the scorer only records that it happened;
- `recompute`: every prefix encoded again with its candidates, the last resort (caches that cannot be scored on).

The path is decided once per `generate` call, from the model, the cache and the adapter.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers.utils import logging

from .kv import (
    architecture_scoring_support,
    cache_scoring_support,
    can_drop_last,
    positions_from_attention_mask,
    score_candidates_by_recompute,
    score_candidates_on_cache,
)
from .state_hook import GenerationStateHook


logger = logging.get_logger(__name__)

# why S2T-Local cannot score on the live cache when the adapter is off while generating and changes keys and values
ADAPTER_CHANGES_CACHE = (
    "the cache was built without the adapter (`adapter_mode='scoring'`) and the adapter changes keys and values "
    "(create the selector with `preserve_cache=True` to score on the cache)"
)


def encodes_last_token(config: Any) -> bool:
    """
    Whether scoring encodes the step's last token again: the residual form reads the selector's own log-probabilities
    of the candidates, which with the adapter off while generating (`adapter_mode="scoring"`) the scores do not hold
    (with `residual_log_probs="student"` it reads the scores' own).
    """
    return (
        config.scoring == "residual" and config.adapter_mode == "scoring" and config.residual_log_probs == "selector"
    )


def check_cache_path(student: torch.nn.Module, config: Any, preserves_cache: bool) -> None:
    """
    Refuses `local_path="cache"` where the model or the adapter rules the cache path out: said at construction, not
    at the first trigger.
    """
    if config.local_path != "cache":
        return
    if config.adapter_mode == "scoring" and not preserves_cache:
        ok, reason = False, ADAPTER_CHANGES_CACHE
    else:
        ok, reason = architecture_scoring_support(student)
    if not ok:
        raise ValueError(
            f"`local_path='cache'` cannot serve this {type(student).__name__}: {reason}. Use "
            "`local_path='auto'` (scores on the cache where it can, else recomputes the prefixes) or "
            "`local_path='recompute'`."
        )


class LocalScorer:
    """
    Runs the forward that scores S2T-Local's candidates, on the path the model, the cache and the adapter allow.

    Args:
        student (`PreTrainedModel`): the student (unwrapped from PEFT).
        hook (`GenerationStateHook`): the processor's record of `generate`'s forwards (cache, mask, positions).
        config (`S2TConfig`): `local_path`, `adapter_mode`, `scoring`... of the processor.
        adapter_state (`AdapterState`, *optional*): switches the selector's LoRA on while scoring when it is off
            while generating (`adapter_mode="scoring"`).
        preserves_cache (`bool`): whether the selector's adapter leaves the keys and values as the base model's.
        pad_token_id (`int`): padding of the recomputed prefixes.
    """

    def __init__(
        self,
        student: torch.nn.Module,
        hook: GenerationStateHook,
        config: Any,
        adapter_state: Any,
        preserves_cache: bool,
        pad_token_id: int,
    ):
        self.student = student
        self.hook = hook
        self.config = config
        self.adapter_state = adapter_state
        self.preserves_cache = preserves_cache
        self.pad_token_id = pad_token_id
        self.adapter_only_while_scoring = config.adapter_mode == "scoring"
        self.encodes_last_token = encodes_last_token(config)
        self.reset()

    def reset(self) -> None:
        """Forgets the path of the last `generate` call and its counters."""
        self.calls = 0
        self.last_path: str | None = None
        self._decided: tuple[str, str] | None = None

    def path(self) -> tuple[str, str]:
        """
        The path of the current `generate` call and why: `("cache", reason)` or `("recompute", reason)`. Decided once
        per call, at its first trigger.
        """
        if self._decided is None:
            self._decided = self._decide()
        return self._decided

    def _decide(self) -> tuple[str, str]:
        wanted = self.config.local_path
        if wanted == "recompute":
            return "recompute", "requested"
        if self.adapter_only_while_scoring and not self.preserves_cache:
            reason = ADAPTER_CHANGES_CACHE
        else:
            ok, reason = cache_scoring_support(self.hook.cache, self.student)
            if ok:
                return "cache", "the live cache can be scored on"
        if wanted == "cache":
            raise ValueError(f"`local_path='cache'` was requested but {reason}. Use `local_path='auto'` or 'recompute'.")
        logger.info(f"S2T-Local scores candidates by recomputing their prefixes: {reason}.")
        return "recompute", reason

    def note_fused(self) -> None:
        """Records that the fused loop scored this step's candidates in its decoding forward."""
        self.last_path = "fused"

    @contextlib.contextmanager
    def adapter_on(self):
        """The selector's LoRA on, if it is off while generating (`adapter_mode="scoring"`)."""
        if not self.adapter_only_while_scoring or self.adapter_state is None:
            yield
            return
        with self.adapter_state.lora(True):
            yield

    def score(
        self, input_ids: torch.Tensor, mask: torch.Tensor, candidate_ids: torch.Tensor, triggered: torch.Tensor
    ) -> torch.Tensor:
        """
        The selector's logits after each candidate of the triggered rows: one extra forward of those rows only.

        Args:
            input_ids (`torch.Tensor` of shape `(batch, length)`): the sequences so far.
            mask (`torch.Tensor` of shape `(batch, length)`): their attention mask (left padding included).
            candidate_ids (`torch.Tensor` of shape `(n, K)`): the candidates of the `n` triggered rows.
            triggered (`torch.BoolTensor` of shape `(batch,)`): the triggered rows.

        Returns:
            `torch.Tensor` of shape `(n, K, vocab)`, or `(n, 1 + K, vocab)` when the last token is encoded again (its
            logits first).
        """
        path, _ = self.path()
        if path == "cache" and self.encodes_last_token and not can_drop_last(self.hook.cache, self.hook.previous_sliding):
            # right after the prefill of a prompt longer than a sliding window, the window has already dropped tokens
            # the prompt's last token attends to: this one step re-encodes its prefixes
            path = "recompute"
        self.calls += 1
        self.last_path = path
        rows = triggered.nonzero()[:, 0]
        with self.hook.pause(), self.adapter_on():
            if path == "cache":
                record = self.hook.last
                if record.position_ids is not None and record.position_ids.shape[-1] >= 1:
                    next_positions = record.position_ids.reshape(input_ids.shape[0], -1)[:, -1].to(input_ids.device) + 1
                else:
                    next_positions = positions_from_attention_mask(mask)[:, -1] + 1
                return score_candidates_on_cache(
                    self.student, self.hook.cache, mask, next_positions, candidate_ids,
                    last_token_ids=input_ids[:, -1] if self.encodes_last_token else None,
                    rows=rows if rows.numel() < input_ids.shape[0] else None,
                    previous=self.hook.previous_sliding,
                )
            return score_candidates_by_recompute(
                self.student,
                input_ids[rows],
                mask[rows],
                candidate_ids,
                max_context=self.config.max_context,
                pad_token_id=self.pad_token_id,
                with_last_token=self.encodes_last_token,
            )
