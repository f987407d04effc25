"""One decoding step as the processor sees it ([`DecodingStep`]), and the guard that follows `generate` step by step
([`StepTracker`]).

`generate` hands a logits processor only `(input_ids, scores)`. The tracker reads the rest from the processor's
[`~s2t_hf.state_hook.GenerationStateHook`] (the attention mask, the cache, the learned trigger's row), checks that every call
follows exactly one new single-token forward of the model (greedy search or sampling), notices a new `generate` call,
and keeps the rows that have finished.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .state_hook import GenerationStateHook


INPUTS_EMBEDS_REFUSED = (
    "`generate` was given the prompt as `inputs_embeds`: S2T needs its token ids (the teacher reads them and "
    "candidates are scored after them). Pass `input_ids` (and `attention_mask`) instead."
)


@dataclasses.dataclass
class DecodingStep:
    """
    What the processor knows at one decoding step.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch, length)`): the sequences so far.
        scores (`torch.FloatTensor` of shape `(batch, vocab)`): the scores of the earlier logits processors, the
            reserved rows at `-inf`.
        index (`int`): generated tokens before this step.
        active (`torch.BoolTensor` of shape `(batch,)`): rows that have not finished.
        eligible (`torch.BoolTensor` of shape `(batch,)`): active rows past the warm-up: those that may trigger.
        attention_mask (`torch.LongTensor` of shape `(batch, length)`, *optional*): left padding included; read only
            when the step may trigger.
        trigger_logits (`torch.FloatTensor` of shape `(batch,)`, *optional*): the learned trigger row's logit, as the
            model returned it.
        teacher (`Teacher`, *optional*): asked by [`teacher_log_probs`].
        teacher_distribution (`torch.FloatTensor` of shape `(batch, vocab)`, *optional*): the teacher's next-token
            log-probabilities, once [`teacher_log_probs`] computed them.
    """

    input_ids: torch.Tensor
    scores: torch.Tensor
    index: int
    active: torch.Tensor
    eligible: torch.Tensor
    attention_mask: torch.Tensor | None = None
    trigger_logits: torch.Tensor | None = None
    teacher: Any = None
    teacher_distribution: torch.Tensor | None = None

    def teacher_log_probs(self) -> torch.Tensor:
        """The teacher's next-token log-probabilities at every row, computed once per step."""
        if self.teacher_distribution is None:
            self.teacher_distribution = self.teacher.next_log_probs(self.input_ids, self.attention_mask)
        return self.teacher_distribution


class StepTracker:
    """
    Follows the steps of `generate` calls through the processor's hook: the guards of each call, the prompt length,
    the finished rows, and the step's one host sync.

    Args:
        hook (`GenerationStateHook`): the processor's record of the model's forwards.
        eos_token_ids (`torch.LongTensor`): ids that finish a row.
        warmup_tokens (`int`): generated tokens at the start of each row that never trigger.
    """

    def __init__(self, hook: GenerationStateHook, eos_token_ids: torch.Tensor, warmup_tokens: int):
        self.hook = hook
        self.eos_token_ids = eos_token_ids
        self.warmup_tokens = warmup_tokens
        self._forwards_seen = -1
        self._generations_seen = hook.generations
        self.clear()

    def clear(self) -> None:
        """Forgets the current `generate` call."""
        self.prompt_length: int | None = None
        self.previous_ids: torch.Tensor | None = None
        self.finished: torch.Tensor | None = None
        self.reordered: torch.Tensor | None = None

    def starts_generation(self, input_ids: torch.Tensor) -> bool:
        """
        Checks that this call follows one new single-token forward of the model, and tells whether it is the first
        step of a new `generate` call (the processor then resets before [`begin`]).
        """
        record = self.hook.last
        if not self.hook.attached:
            raise ValueError(
                "S2TLogitsProcessor is closed (its `with` block ended or `remove_hooks()` was called): use it inside "
                "`with S2TLogitsProcessor(...) as s2t:`, or open it again with another `with` block."
            )
        if record is None or self.hook.forwards == self._forwards_seen:
            raise ValueError(
                "S2TLogitsProcessor was called without a new forward of its `model` since its last step. Either "
                "`generate` runs on another model than the processor's (build the processor with the model you call "
                "`generate` on), or this is assisted generation (`assistant_model=...`), where the assistant's own "
                "decoding calls the logits processors, or prompt-lookup generation (`prompt_lookup_num_tokens=...`), "
                "which verifies several tokens per forward. S2T supports greedy search and sampling only: remove "
                "`assistant_model` / `prompt_lookup_num_tokens`."
            )
        self._forwards_seen = self.hook.forwards
        if record.input_length > 1 and record.cache_length_before > 0:
            raise ValueError(
                "S2TLogitsProcessor supports greedy search and sampling only; this generate call verifies several "
                "tokens per forward (assisted or prompt-lookup decoding). Remove `assistant_model` / "
                "`prompt_lookup_num_tokens`."
            )
        new_generation = self.hook.generations != self._generations_seen
        self._generations_seen = self.hook.generations
        previous = self.previous_ids
        if previous is not None and (
            input_ids.shape[0] != previous.shape[0] or input_ids.shape[1] != previous.shape[1] + 1
        ):
            new_generation = True  # a new generate call without a cache
        return new_generation

    def begin(self, input_ids: torch.Tensor, scores: torch.Tensor, refuse_inputs_embeds: bool) -> tuple[int, torch.Tensor]:
        """
        Starts a step: the first step of a call checks the decoding method; every step updates the finished rows.

        Returns:
            `(index, active)`: generated tokens before this step and the rows that have not finished.
        """
        self.reordered = None
        previous = self.previous_ids
        if previous is not None and previous.shape[1] > 0:
            # O(batch) and no host sync here: checked at the step's one sync (`any_triggered`)
            self.reordered = (input_ids[:, -2] != previous[:, -1]).any()
        if self.prompt_length is None:
            if input_ids.shape[1] == 0 and refuse_inputs_embeds:
                raise ValueError(INPUTS_EMBEDS_REFUSED)
            if bool((torch.logsumexp(scores.float(), dim=-1).abs() < 1e-4).all()):
                raise ValueError(
                    "S2TLogitsProcessor supports greedy search and sampling only, but it received normalised "
                    "log-probabilities, as beam search passes them. Use `num_beams=1`."
                )
            self.prompt_length = input_ids.shape[1]
            self.finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        self.previous_ids = input_ids
        index = input_ids.shape[1] - self.prompt_length
        if index > 0 and self.eos_token_ids.numel():
            self.finished |= torch.isin(input_ids[:, -1], self.eos_token_ids.to(input_ids.device))
        return index, ~self.finished

    @property
    def first_step(self) -> bool:
        """Whether no step of the current `generate` call was taken yet."""
        return self.prompt_length is None

    def eligible(self, index: int, active: torch.Tensor) -> torch.Tensor:
        """The active rows past the warm-up."""
        return active & (index >= self.warmup_tokens)

    def attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The attention mask of the last forward (left padding included), or ones when none was passed."""
        record = self.hook.last
        mask = record.attention_mask if record is not None else None
        if mask is None and record is not None and not record.mask_readable and input_ids.shape[0] > 1:
            raise ValueError(
                "This `generate` call passes the model a prepared attention mask (one per kind of layer, with a static "
                "cache) from which the processor cannot read the batch's left padding. Use the default dynamic cache "
                "(remove `cache_implementation`) or generate one prompt at a time."
            )
        if mask is None or mask.shape != input_ids.shape:
            return torch.ones_like(input_ids)
        return mask.to(input_ids.device)

    def watched_logits(self, scores: torch.Tensor, model_name: str) -> torch.Tensor:
        """
        The watched row's logit at this step, as the model computed it: recorded by the hook from the model's output,
        so the logits processors before S2T (`suppress_tokens`, `prefix_allowed_tokens_fn`, a grammar) that rule the
        row out, as they rule out every token they do not allow, leave the signal as it was.
        """
        logits = self.hook.last.watched_logits
        if logits is None or logits.shape[0] != scores.shape[0]:
            raise ValueError(
                "The learned trigger could not read its row from the model's output: the forward of "
                f"{model_name} returned no `logits` of shape (batch, length, vocab). Use a "
                "transformers causal LM, or another trigger."
            )
        return logits.to(scores.device)

    def any_triggered(self, triggered: torch.Tensor, scores: torch.Tensor, active: torch.Tensor, index: int) -> bool:
        """
        The step's one host sync: whether any row triggered, checked together with whether rows were reordered since
        the last step and whether an active row's scores are broken (NaN or `+inf`, or no finite token left).
        """
        # one reduction: a row's max is NaN if it holds a NaN, +inf if it holds +inf, -inf if no token is finite
        broken = ~torch.isfinite(scores.amax(-1))
        checks = [triggered.any(), (broken & active).any()]
        if self.reordered is not None:
            checks.append(self.reordered)
        flags = torch.stack(checks).tolist()
        if flags[1]:
            rows = (broken & active).nonzero()[:, 0].tolist()
            raise ValueError(
                f"The scores of row(s) {rows} at generation step {index} hold NaN or +inf, or no "
                "finite token: the model's logits are broken (e.g. an overflow in float16; try bfloat16 or float32), "
                "or the logits processors before S2T ruled out every token."
            )
        if len(flags) > 2 and flags[2]:
            raise ValueError(
                "S2TLogitsProcessor supports greedy search and sampling only: rows were reordered between steps, as "
                "beam search does. Use `num_beams=1`."
            )
        return bool(flags[0])
