"""The work of one selection-group collection: [`SelectionCollector`] holds the student, the teacher and the
[`CollectionSettings`], and turns one shard of prompts into selection groups, teacher-forced or on-policy.

[`~s2t_hf.data.collect_selection_data`] drives it shard by shard (argument checks, calibration, saving and resuming
with [`~s2t_hf.shard_store.ShardStore`]).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .kv import model_device, output_rows, positions_from_attention_mask
from .prompts import left_pad
from .selection import top_k_candidates
from .teachers import Teacher, as_teacher
from .triggers import entropy_signal, kl_signal


__all__ = ["CollectionSettings", "SelectionCollector"]

#: One prompt of a shard: its index in `prompts` and its token ids.
IndexedPrompt = tuple[int, list[int]]
#: A candidate group before the top-fraction choice: `(signal, prompt_index, step, context_ids, record)`.
_Candidate = tuple[float, int, int, list[int], dict[str, Any]]


@dataclass
class CollectionSettings:
    """What determines the collected groups: the arguments of [`~s2t_hf.data.collect_selection_data`] of the same
    names, hashed for resuming ([`~s2t_hf.shard_store.collection_fingerprint`])."""

    mode: str
    top_k: int
    fraction: float
    signal: str
    trigger_rate: float
    max_new_tokens: int
    signal_top_k: int
    warmup_tokens: int
    shard_size: int
    suppress_token_ids: list[int]
    generation_kwargs: dict[str, Any] = field(default_factory=dict)
    trajectories: bool = False
    # a digest of the teacher prompts, when the teacher reads prompts of its own ("" otherwise)
    teacher_prompts: str = ""
    # a digest of the given responses, when the student's replies are given rather than generated ("" otherwise)
    responses: str = ""



@dataclass
class _ScoredBatch:
    """One batch of the student's trajectories, scored in one forward of the student (and one of the teacher, when it
    gives its whole distribution)."""

    generated: torch.Tensor  # (batch, num_new): the generated tokens
    lengths: torch.Tensor  # (batch,): generated tokens up to the first end of sequence, included
    student_logits: torch.Tensor  # (batch * num_new, vocab), float32, suppressed rows at -inf
    teacher_log_probs: torch.Tensor | None  # (batch * num_new, vocab), or None for a teacher without it
    signal: torch.Tensor  # (batch, num_new): the trigger signal of `settings.signal`


class SelectionCollector:
    """
    The models and settings of one collection run, and the work on one shard of prompts: teacher-forced
    ([`~SelectionCollector.teacher_forced_shard`]) or on-policy ([`~SelectionCollector.on_policy_shard`], decoding
    with the processor of [`~SelectionCollector.make_processor`]).

    Args:
        student (`PreTrainedModel`):
            The student.
        teacher (`PreTrainedModel` or `Teacher`):
            The teacher; checked against the student's vocabulary here (`Teacher.prepare`).
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The shared tokenizer (its end-of-sequence and padding ids are used when the student's generation config
            has none).
        settings (`CollectionSettings`):
            What to collect.
        generation_kwargs (`dict`):
            Further arguments of `generate`.
        batch_size (`int`):
            Prompts per `generate` call and per scoring forward.
        teacher_prompts (`list`, *optional*):
            One teacher prompt per prompt (a string or chat messages), read by the teacher instead of the student's
            prompt ([`~s2t_hf.teachers.Teacher.begin`]).
        responses (`list[list[int]]`, *optional*):
            One response per prompt (token ids), scored teacher-forced instead of a generated reply.
    """

    def __init__(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module | Teacher,
        tokenizer: Any,
        settings: CollectionSettings,
        generation_kwargs: dict[str, Any],
        batch_size: int,
        teacher_prompts: list | None = None,
        responses: list[list[int]] | None = None,
    ):
        self.student = student
        self.teacher = teacher
        # the teacher behind the `Teacher` interface (checks the vocabularies; suppressed rows left out)
        self.teacher_interface = as_teacher(teacher, tokenizer)
        self.teacher_interface.prepare(student, tokenizer, settings.suppress_token_ids)
        if settings.signal == "kl" and not self.teacher_interface.full_distribution:
            raise ValueError(
                f"`signal='kl'` needs the teacher's whole distribution over the student's vocabulary, which a "
                f"`{type(self.teacher_interface).__name__}` of this kind cannot give (a served teacher, or one with "
                "another tokenizer). Use `signal='entropy'`."
            )
        self.teacher_prompts = teacher_prompts
        self.tokenizer = tokenizer
        self.settings = settings
        self.extra_generation_kwargs = generation_kwargs
        self.batch_size = batch_size
        self.vocab = output_rows(student)
        generation_config = getattr(student, "generation_config", None)
        eos = getattr(generation_config, "eos_token_id", None)
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        if pad is None:
            pad = getattr(generation_config, "pad_token_id", None)
        if pad is None:
            pad = self.eos_ids[0] if self.eos_ids else 0
        self.pad_id = int(pad)
        self.suppress = torch.tensor(settings.suppress_token_ids, dtype=torch.long)
        if responses is not None and not self.eos_ids:
            raise ValueError(
                "`responses` end with an end-of-sequence token, and neither the student's generation config nor the "
                "tokenizer names one: set `student.generation_config.eos_token_id`."
            )
        self.responses = responses

    def generate_kwargs(self) -> dict[str, Any]:
        """The arguments of the student's `generate` calls: greedy unless `generation_kwargs` says otherwise."""
        kwargs = {"max_new_tokens": self.settings.max_new_tokens, "pad_token_id": self.pad_id, "do_sample": False}
        if self.eos_ids:
            kwargs["eos_token_id"] = self.eos_ids
        if self.settings.suppress_token_ids:
            kwargs["suppress_tokens"] = list(self.settings.suppress_token_ids)
        kwargs.update(self.extra_generation_kwargs)
        return kwargs

    def _batches(
        self, chunk: list[IndexedPrompt], by_length: bool = False
    ) -> Iterator[tuple[list[int], list[list[int]], torch.Tensor, torch.Tensor]]:
        """The chunk in batches of `batch_size`: indices, prompts, left-padded `input_ids` and `attention_mask`; with
        `by_length`, in order of length (prompt and given response), so that a batch pads little."""
        if by_length:
            chunk = sorted(chunk, key=self._length)
        for start in range(0, len(chunk), self.batch_size):
            batch = chunk[start : start + self.batch_size]
            indices = [i for i, _ in batch]
            prompts = [p for _, p in batch]
            padded = left_pad(prompts, self.pad_id, model_device(self.student))
            yield indices, prompts, padded["input_ids"], padded["attention_mask"]

    def _length(self, item: IndexedPrompt) -> int:
        index, prompt = item
        return len(prompt) + (len(self.responses[index]) if self.responses is not None else 0)

    @torch.no_grad()
    def teacher_forced_shard(
        self, chunk: list[IndexedPrompt], bar: Any
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """
        The shard's selection groups, and its trajectories when the settings ask for them: the student generates, the
        student and the teacher score the trajectories, and the positions with the highest signal (a fraction
        `settings.fraction` of the generated positions) become groups.

        Args:
            chunk (`list[tuple[int, list[int]]]`):
                The shard's prompts with their indices in `prompts`.
            bar (`tqdm`):
                Advanced by the number of prompts generated.

        Returns:
            `(groups, trajectories)`: rows of [`~s2t_hf.data.selection_features`] and of
            [`~s2t_hf.data.trajectory_features`] (empty unless `settings.trajectories`).
        """
        positions_seen = 0
        found: list[_Candidate] = []
        trajectories: list[dict[str, Any]] = []
        # by length: the groups do not depend on the order (a shard's are chosen, then sorted by prompt and step)
        for indices, prompts, input_ids, attention_mask in self._batches(chunk, by_length=True):
            if self.responses is None:
                output = self.student.generate(
                    input_ids=input_ids, attention_mask=attention_mask, **self.generate_kwargs()
                )
            else:
                output = torch.cat([input_ids, self.response_block(indices, input_ids.device)], dim=1)
            bar.update(len(indices))
            if output.shape[1] == input_ids.shape[1]:
                continue  # nothing generated
            scored = self._score_batch(attention_mask, output, input_ids.shape[1], self.prompts_of(indices))
            positions_seen += int(scored.lengths.sum())
            groups, rows = self._batch_groups(indices, prompts, scored)
            found += groups
            trajectories += rows
        trajectories.sort(key=lambda row: row["prompt_index"])
        return self._top_fraction(found, positions_seen), trajectories

    def response_block(self, indices: list[int], device: torch.device) -> torch.Tensor:
        """The given responses of the prompts at `indices`, each cut to `max_new_tokens - 1` tokens and ended with the
        first end-of-sequence id, right-padded with it (scoring stops after the first one)."""
        eos = self.eos_ids[0]
        rows = [self.responses[i][: self.settings.max_new_tokens - 1] + [eos] for i in indices]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [eos] * (width - len(r)) for r in rows], dtype=torch.long, device=device)

    def prompts_of(self, indices: list[int]) -> list | None:
        """The teacher prompts of the prompts at `indices`, or `None` when the teacher reads the student's."""
        return None if self.teacher_prompts is None else [self.teacher_prompts[i] for i in indices]

    def _score_batch(
        self, attention_mask: torch.Tensor, output: torch.Tensor, prompt_length: int, teacher_prompts: list | None
    ) -> _ScoredBatch:
        """Teacher-forced scores of the generated positions of `output` (prompts left padded to `prompt_length`)."""
        settings = self.settings
        generated = output[:, prompt_length:]
        batch, num_new = generated.shape
        if self.eos_ids:
            is_eos = torch.isin(generated, torch.tensor(self.eos_ids, device=generated.device))
            after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        else:
            after_eos = torch.zeros_like(generated, dtype=torch.bool)
        generated_mask = (~after_eos).long()
        mask = torch.cat([attention_mask, generated_mask], dim=1)[:, :-1]
        sequence = output[:, :-1]
        positions = positions_from_attention_mask(mask)
        student_logits = self.student(
            input_ids=sequence, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=num_new,
        ).logits.float()
        if self.teacher_interface.full_distribution:
            self.teacher_interface.begin([prompt_length] * batch, teacher_prompts)
            teacher_log_probs = self.teacher_interface.trajectory_log_probs(sequence, mask, num_new)
        if self.suppress.numel():
            student_logits.index_fill_(-1, self.suppress.to(student_logits.device), float("-inf"))
        flat_student = student_logits.reshape(batch * num_new, -1)
        del student_logits
        flat_teacher = None
        if self.teacher_interface.full_distribution:
            flat_teacher = teacher_log_probs.to(flat_student.device).reshape(batch * num_new, -1)
            del teacher_log_probs
        if settings.signal == "entropy":
            signal = entropy_signal(flat_student, settings.signal_top_k).view(batch, num_new)
        else:
            signal = kl_signal(flat_student, flat_teacher, settings.signal_top_k).view(batch, num_new)
        return _ScoredBatch(generated, generated_mask.sum(-1), flat_student, flat_teacher, signal)

    def _batch_groups(
        self, indices: list[int], prompts: list[list[int]], scored: _ScoredBatch
    ) -> tuple[list[_Candidate], list[dict[str, Any]]]:
        """The batch's candidate groups at every eligible position, and its trajectory rows when the settings ask for
        them."""
        settings = self.settings
        signal = scored.signal
        num_new = signal.shape[1]
        steps = torch.arange(num_new, device=signal.device)
        eligible = (steps[None] >= settings.warmup_tokens) & (steps[None] < scored.lengths[:, None].to(signal.device))
        rows, cols = eligible.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return [], []
        flat_index = rows * num_new + cols
        student_logits = scored.student_logits[flat_index]
        cand_ids, cand_log_probs, _ = top_k_candidates(student_logits, settings.top_k)
        signal_values = signal[rows, cols]
        generated_lists = scored.generated.tolist()
        teacher_log_probs = scored.teacher_log_probs[flat_index] if scored.teacher_log_probs is not None else None
        teacher_probs, teacher_top1 = self._teacher_values(
            prompts, generated_lists, scored.lengths, rows, cols, cand_ids, teacher_log_probs, self.prompts_of(indices)
        )
        trajectories = []
        if settings.trajectories:
            trajectories = self._trajectory_rows(
                indices, prompts, generated_lists, scored.lengths.tolist(), rows, cols, cand_ids, teacher_probs,
                teacher_top1, student_logits, teacher_log_probs,
            )
        found = []
        unscored = teacher_probs.isnan().any(-1).tolist()
        for n, (row, step) in enumerate(zip(rows.tolist(), cols.tolist())):
            if unscored[n]:
                continue  # a position the teacher (another tokenizer) could not score: no group
            record = {
                "cand_ids": cand_ids[n].tolist(),
                "teacher_probs": teacher_probs[n].tolist(),
                "student_probs": cand_log_probs[n].exp().tolist(),
                "teacher_top1": int(teacher_top1[n]),
                "signal": float(signal_values[n]),
            }
            context = prompts[row] + generated_lists[row][:step]
            found.append((record["signal"], indices[row], step, context, record))
        return found, trajectories

    def _teacher_values(
        self,
        prompts: list[list[int]],
        generated_lists: list[list[int]],
        lengths: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        cand_ids: torch.Tensor,
        teacher_log_probs: torch.Tensor | None,
        teacher_prompts: list | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's probabilities of the candidates at the positions `(rows, cols)`, and its top-1 there (NaN
        probabilities where a teacher with another tokenizer could not score them; -1 where its top-1 is unknown)."""
        if teacher_log_probs is not None:
            return teacher_log_probs.gather(-1, cand_ids).exp(), teacher_log_probs.argmax(-1)
        # a teacher without the whole distribution (served, or with another tokenizer): score the candidates only;
        # the signal is the student's entropy (checked at construction)
        trajectories = [prompts[b] + generated_lists[b][: int(lengths[b])] for b in range(len(prompts))]
        self.teacher_interface.begin([len(p) for p in prompts], teacher_prompts)
        prompt_lengths = torch.tensor([len(prompts[b]) for b in rows.tolist()])
        targets = torch.stack([rows.cpu(), cols.cpu() + prompt_lengths], 1)
        log_probs, top1 = self.teacher_interface.score_trajectories(trajectories, targets, cand_ids)
        return log_probs.exp(), top1

    def _top_fraction(self, found: list[_Candidate], positions_seen: int) -> list[dict[str, Any]]:
        """The groups of the highest signal, a fraction `settings.fraction` of the positions seen, in prompt order."""
        if not found:
            return []
        count = min(len(found), max(1, round(self.settings.fraction * positions_seen)))
        signals = torch.tensor([f[0] for f in found], dtype=torch.float64)
        chosen = sorted(signals.topk(count).indices.tolist(), key=lambda i: (found[i][1], found[i][2]))
        out = []
        for i in chosen:
            _, prompt_index, step, context, record = found[i]
            out.append({"context_ids": context, **record, "prompt_index": prompt_index, "step": step})
        return out

    def _trajectory_rows(
        self, indices, prompts, generated_lists, lengths, rows, cols, cand_ids, teacher_probs, teacher_top1,
        student_logits, teacher_log_probs,
    ) -> list[dict[str, Any]]:
        """One row per trajectory of a batch: its eligible positions with candidates, teacher values and signals."""
        settings = self.settings
        entropy = entropy_signal(student_logits, settings.signal_top_k).tolist()
        if teacher_log_probs is not None:
            kl = kl_signal(student_logits, teacher_log_probs, settings.signal_top_k).tolist()
        else:
            kl = [float("nan")] * len(entropy)
        per_row: dict[int, list[int]] = {}
        for n, row in enumerate(rows.tolist()):
            per_row.setdefault(row, []).append(n)
        cand_lists, prob_lists, top1_list = cand_ids.tolist(), teacher_probs.tolist(), teacher_top1.tolist()
        step_list = cols.tolist()
        out = []
        for row in range(len(indices)):
            found = per_row.get(row, [])
            out.append(
                {
                    "prompt_index": indices[row],
                    "input_ids": prompts[row] + generated_lists[row][: lengths[row]],
                    "prompt_length": len(prompts[row]),
                    "steps": [step_list[n] for n in found],
                    "cand_ids": [cand_lists[n] for n in found],
                    "teacher_probs": [prob_lists[n] for n in found],
                    "teacher_top1": [int(top1_list[n]) for n in found],
                    "entropy": [entropy[n] for n in found],
                    "kl": [kl[n] for n in found],
                }
            )
        return out

    def make_processor(self, threshold: float | None):
        """The on-policy decoder: collaborative S2T (the `kl` or `entropy` trigger of `settings.signal`,
        `selection="teacher"`) recording its triggers, with `threshold` (`None`: to be calibrated)."""
        from .config import S2TConfig
        from .processor import S2TLogitsProcessor

        settings = self.settings
        reserved = {}
        if settings.suppress_token_ids:
            reserved = {"num_bins": len(settings.suppress_token_ids), "bin_token_ids": settings.suppress_token_ids}
        config = S2TConfig(
            trigger=settings.signal,
            selection="teacher",
            top_k=settings.top_k,
            signal_top_k=settings.signal_top_k,
            warmup_tokens=settings.warmup_tokens,
            trigger_threshold=threshold,
            trigger_rate=settings.trigger_rate,
            **reserved,
        )
        return S2TLogitsProcessor(
            self.student,
            config,
            teacher=self.teacher,
            tokenizer=self.tokenizer,
            eos_token_id=self.eos_ids or None,
            record_triggers=True,
        )

    @torch.no_grad()
    def on_policy_shard(self, processor, chunk: list[IndexedPrompt], bar: Any) -> list[dict[str, Any]]:
        """The shard's selection groups: the triggers `processor` records while the student decodes with it."""
        out = []
        for indices, _, input_ids, attention_mask in self._batches(chunk):
            processor.teacher_prompts = self.prompts_of(indices)
            self.student.generate(
                input_ids=input_ids, attention_mask=attention_mask, logits_processor=[processor],
                **self.generate_kwargs(),
            )
            bar.update(len(indices))
            for record in processor.records:
                if any(math.isnan(p) for p in record["teacher_probs"]):
                    continue  # a step the teacher (another tokenizer) could not score: no group
                out.append(
                    {
                        "context_ids": record["context_ids"],
                        "cand_ids": record["cand_ids"],
                        "teacher_probs": record["teacher_probs"],
                        "student_probs": record["student_probs"],
                        "teacher_top1": record.get("teacher_top1", -1),
                        "prompt_index": indices[record["row"]],
                        "step": record["step"],
                        "signal": record["signal"],
                    }
                )
        return out
