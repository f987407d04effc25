"""Selection groups for training the local selector: collection from a student and a teacher, and the collator.

A *selection group* is one uncertain decoding step of the student: the context (prompt + tokens generated so far), the
student's top-K candidate tokens, and the teacher's absolute probability of each candidate. [`collect_selection_data`]
gathers them into a `datasets.Dataset`; [`SelectionGroupCollator`] turns a list of groups into the tensors
[`S2TTrainer`] reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers.utils import logging

from .kv import output_rows, positions_from_attention_mask
from .prompts import is_token_id, left_pad, prompt_token_ids
from .selection import top_k_candidates
from .teachers import Teacher, as_teacher
from .triggers import entropy_signal, kl_signal
from .version import __version__


__all__ = [
    "COLLECTION_MODES",
    "SelectionGroupCollator",
    "collect_selection_data",
    "selection_features",
    "trajectory_features",
]

logger = logging.get_logger(__name__)

COLLECTION_MODES = ("teacher_forced", "on_policy")
COLLECTION_SIGNALS = ("kl", "entropy")
METADATA_NAME = "collection.json"
SHARDS_DIR = "shards"
TRAJECTORIES_DIR = "trajectories"
_FORMAT_VERSION = 1


def selection_features():
    """The `datasets.Features` of a selection-group dataset."""
    from datasets import Features, Sequence as Seq, Value

    return Features(
        {
            "context_ids": Seq(Value("int32")),
            "cand_ids": Seq(Value("int32")),
            "teacher_probs": Seq(Value("float32")),
            "student_probs": Seq(Value("float32")),
            "teacher_top1": Value("int32"),
            "prompt_index": Value("int32"),
            "step": Value("int32"),
            "signal": Value("float32"),
        }
    )


def trajectory_features():
    """
    The `datasets.Features` of a trajectory dataset (`collect_selection_data(..., return_trajectories=True)`): one row
    per student trajectory, with what a selection group holds at *every* eligible position, to label and fit the
    learned trigger ([`~s2t_hf.learned_trigger.fit_trigger_row`]).
    """
    from datasets import Features, Sequence as Seq, Value

    return Features(
        {
            "prompt_index": Value("int32"),
            "input_ids": Seq(Value("int32")),
            "prompt_length": Value("int32"),
            "steps": Seq(Value("int32")),
            "cand_ids": Seq(Seq(Value("int32"))),
            "teacher_probs": Seq(Seq(Value("float32"))),
            "teacher_top1": Seq(Value("int32")),
            "entropy": Seq(Value("float32")),
            "kl": Seq(Value("float32")),
        }
    )


@dataclass
class _Settings:
    """What determines the collected groups (hashed for resuming)."""

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


def collect_selection_data(
    student: torch.nn.Module,
    teacher: torch.nn.Module | Teacher,
    tokenizer: Any = None,
    prompts: Iterable[Any] = (),
    *,
    mode: str = "teacher_forced",
    top_k: int = 16,
    fraction: float = 0.1,
    signal: str = "kl",
    trigger_rate: float | None = None,
    trigger_threshold: float | None = None,
    calibration_prompts: Sequence[Any] | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    chat_template: bool | None = None,
    signal_top_k: int = 64,
    warmup_tokens: int = 3,
    suppress_token_ids: Sequence[int] | None = None,
    generation_kwargs: dict[str, Any] | None = None,
    save_to: str | os.PathLike | None = None,
    resume: bool = True,
    shard_size: int = 256,
    show_progress: bool = True,
    return_trajectories: bool = False,
):
    """
    Collects selection groups `{context_ids, cand_ids[K], teacher_probs[K], ...}` at the student's divergence points.

    Two modes:

    - `"teacher_forced"` (fast): the student generates greedy trajectories (batched, left padding); the student and the
      teacher then score each whole trajectory in one forward each. At every generated position a trigger signal is
      computed on the student's top-`signal_top_k` support: with `signal="kl"`, KL(student || teacher) (the `kl`
      trigger's [`~s2t_hf.triggers.kl_signal`]: where the teacher disagrees); with `signal="entropy"`, the student's
      entropy ([`~s2t_hf.triggers.entropy_signal`]: where the teacher-free `entropy` trigger of S2T-Local fires). The
      positions with the highest signal, a fraction `fraction` of all generated positions, become groups. The first
      `warmup_tokens` positions never do.
    - `"on_policy"`: the student decodes with collaborative S2T ([`S2TLogitsProcessor`] with `selection="teacher"`,
      `trigger="kl"`), calibrated so that the trigger fires on a fraction `trigger_rate` of the steps; every trigger is
      a group. The trajectories follow the teacher's choices, as S2T-Local decoding will.

    Each row holds `context_ids` (prompt + generated tokens before the step, no padding), `cand_ids` (the student's
    top-K, best first), `teacher_probs` (the teacher's *absolute* probabilities of the candidates), `student_probs`,
    `teacher_top1` (the teacher's argmax over the whole vocabulary, for hit@K statistics) and the provenance
    `prompt_index` (position in `prompts`), `step` (generated tokens before the decision) and `signal` (its value).

    With `return_trajectories=True` (teacher-forced mode) the same pass also returns the student's trajectories, one
    row per prompt (see [`trajectory_features`]): the token ids, and at every eligible position (`steps`: generated
    tokens before the decision) the student's top-K candidates, the teacher's probabilities of them, its top-1, the
    student's entropy and the KL (NaN for a remote teacher). They label and fit the learned trigger
    ([`~s2t_hf.learned_trigger.fit_trigger_row`]) at no extra teacher cost.

    Prompts are processed in shards of `shard_size`; with `save_to`, each finished shard is written to disk and a later
    call with the same arguments resumes after the last finished shard. In `"teacher_forced"` mode the top `fraction`
    is taken within each shard (a shard of a few hundred prompts makes this close to a global quantile).

    Args:
        student (`PreTrainedModel`):
            The student (the base model the selector will be trained on; collect before `S2TSelector.create`).
        teacher (`PreTrainedModel` or `Teacher`):
            The teacher, sharing the student's tokenizer. It may live on another device or dtype, or behind a server
            ([`~s2t_hf.teachers.RemoteTeacher`]: teacher-forced mode with `signal="entropy"` only, since the KL signal
            and the on-policy `kl` trigger need the teacher's whole distribution at every position).
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Needed for string prompts. Rows of the output layer at or above `len(tokenizer)` (padded vocabularies)
            are never generated nor offered as candidates.
        prompts (iterable of `str`, of chat messages or of token-id lists):
            Training prompts. A string is wrapped as one user message and, when the tokenizer has a chat template,
            formatted with `apply_chat_template(..., add_generation_prompt=True)`; a list of `{"role", "content"}`
            messages is formatted likewise; token-id lists are used as they are.
        mode (`str`, *optional*, defaults to `"teacher_forced"`):
            `"teacher_forced"` or `"on_policy"`.
        top_k (`int`, *optional*, defaults to 16):
            Candidates per group (the paper collects K = 16 and selects among K = 8 at inference).
        fraction (`float`, *optional*, defaults to 0.1):
            Teacher-forced mode: the fraction of generated positions that become groups (the top by `signal`).
        signal (`str`, *optional*, defaults to `"kl"`):
            Teacher-forced mode: how positions are ranked, `"kl"` or `"entropy"` (see above).
        trigger_rate (`float`, *optional*):
            On-policy mode: target trigger rate of the calibrated `kl` trigger. Defaults to `fraction`.
        trigger_threshold (`float`, *optional*):
            On-policy mode: use this KL threshold instead of calibrating one.
        calibration_prompts (sequence, *optional*):
            On-policy mode: prompts to calibrate the trigger on (same formats as `prompts`). Defaults to the first 32
            prompts.
        max_new_tokens (`int`, *optional*, defaults to 256):
            Longest generated continuation.
        batch_size (`int`, *optional*, defaults to 8):
            Prompts per `generate` call and per scoring forward (lower it if memory runs short).
        chat_template (`bool`, *optional*):
            Whether to format string prompts with the tokenizer's chat template. Defaults to `True` when the tokenizer
            has one.
        signal_top_k (`int`, *optional*, defaults to 64):
            Support of the KL signal.
        warmup_tokens (`int`, *optional*, defaults to 3):
            Generated tokens at the start of each trajectory that never become groups.
        suppress_token_ids (`list[int]`, *optional*):
            Rows never generated nor offered as candidates, and left out of the teacher's distribution. Defaults to
            the rows at or above `len(tokenizer)` when a tokenizer is given.
        generation_kwargs (`dict`, *optional*):
            Further arguments of `generate` (e.g. `do_sample=True, temperature=0.7`); greedy by default.
        save_to (`str` or `os.PathLike`, *optional*):
            Directory to write the dataset to (`datasets.load_from_disk(save_to)` reads it back); finished shards are
            kept under `save_to/shards` until the collection completes.
        resume (`bool`, *optional*, defaults to `True`):
            Pick up the shards (or the complete dataset) already in `save_to` if they were collected with the same
            settings, prompts and models. `False` starts over and overwrites them.
        shard_size (`int`, *optional*, defaults to 256):
            Prompts per shard (the unit of resuming).
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm progress bar over prompts (hidden when transformers' progress bars are disabled).
        return_trajectories (`bool`, *optional*, defaults to `False`):
            Also return the trajectory dataset (teacher-forced mode only); with `save_to` it is written to
            `save_to/trajectories`.

    Returns:
        `datasets.Dataset`: one row per selection group; with `return_trajectories=True`, the tuple
        `(groups, trajectories)`.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from s2t_hf import collect_selection_data
    >>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    >>> _ = torch.manual_seed(0)
    >>> student, teacher = AutoModelForCausalLM.from_config(config), AutoModelForCausalLM.from_config(config)
    >>> groups = collect_selection_data(student, teacher, prompts=[[2, 3, 4], [5, 6]], top_k=4, fraction=0.2,
    ...                                 max_new_tokens=10, show_progress=False)
    >>> len(groups), len(groups[0]["cand_ids"])
    (4, 4)

    ```
    """
    import datasets

    if mode not in COLLECTION_MODES:
        raise ValueError(f"`mode` must be one of {COLLECTION_MODES}, got {mode!r}.")
    if not isinstance(top_k, int) or top_k < 2:
        raise ValueError(f"`top_k` must be an integer >= 2 (a group needs a choice), got {top_k!r}.")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"`fraction` must lie in (0, 1], got {fraction}.")
    if signal not in COLLECTION_SIGNALS:
        raise ValueError(f"`signal` must be one of {COLLECTION_SIGNALS}, got {signal!r}.")
    if return_trajectories and mode != "teacher_forced":
        raise ValueError(
            "`return_trajectories=True` needs `mode='teacher_forced'`: on-policy trajectories follow the teacher's "
            "choices after each trigger, so they are not the student's own steps the learned trigger is fit on."
        )
    if signal != "kl" and mode != "teacher_forced":
        raise ValueError(
            f"`signal={signal!r}` applies to `mode='teacher_forced'`; on-policy groups come from KL triggers."
        )
    trigger_rate = fraction if trigger_rate is None else trigger_rate
    if mode == "on_policy" and not 0.0 < trigger_rate < 1.0:  # `fraction=1` is fine in teacher-forced mode
        raise ValueError(f"`trigger_rate` must lie in (0, 1), got {trigger_rate}.")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if student is None or teacher is None:
        raise ValueError("`student` and `teacher` are both required: groups compare the teacher with the student.")
    # --- remote teachers (s2t_hf.teachers): no whole-vocabulary distribution, so no KL signal
    if isinstance(teacher, Teacher) and not teacher.full_distribution and (mode != "teacher_forced" or signal == "kl"):
        raise ValueError(
            f"A `{type(teacher).__name__}` gives the teacher's probabilities of the candidates, not its whole "
            f"distribution, which `mode={mode!r}` with `signal={signal!r}` needs (the KL signal). Use "
            "`mode='teacher_forced', signal='entropy'`, or a local teacher model."
        )
    # ---
    generation_kwargs = dict(generation_kwargs or {})
    for key in ("max_new_tokens", "logits_processor", "input_ids", "attention_mask"):
        if key in generation_kwargs:
            raise ValueError(f"`generation_kwargs` must not set `{key}`; it is set by `collect_selection_data`.")

    vocab = output_rows(student)
    encoded = _check_prompt_vocab(prompt_token_ids(prompts, tokenizer, chat_template=chat_template, name="prompts"),
                                  vocab, "prompts")
    if suppress_token_ids is None:
        suppress_token_ids = list(range(len(tokenizer), vocab)) if tokenizer is not None else []
    suppress = sorted({int(i) for i in suppress_token_ids})
    if any(not 0 <= i < vocab for i in suppress):
        raise ValueError(f"`suppress_token_ids` must lie in [0, {vocab}) (the student's output rows), got {suppress}.")
    settings = _Settings(
        mode=mode,
        top_k=top_k,
        fraction=fraction,
        signal=signal,
        trigger_rate=trigger_rate,
        max_new_tokens=max_new_tokens,
        signal_top_k=signal_top_k,
        warmup_tokens=warmup_tokens,
        shard_size=shard_size,
        suppress_token_ids=suppress,
        generation_kwargs={k: repr(v) for k, v in sorted(generation_kwargs.items())},
        trajectories=bool(return_trajectories),
    )
    context = _Context(student, teacher, tokenizer, settings, generation_kwargs, batch_size)

    store = None
    if save_to is not None:
        store = _ShardStore(
            os.fspath(save_to), _fingerprint(settings, encoded, student, teacher), resume, return_trajectories
        )
        if store.complete:
            logger.info(f"Loading the complete selection dataset already collected in `{save_to}`.")
            groups = datasets.load_from_disk(os.fspath(save_to))
            if return_trajectories:
                return groups, datasets.load_from_disk(os.path.join(os.fspath(save_to), TRAJECTORIES_DIR))
            return groups

    processor = None
    try:
        if mode == "on_policy":
            threshold = trigger_threshold
            if threshold is None and store is not None:
                threshold = store.metadata.get("trigger_threshold")
            processor = context.make_processor(threshold)
            if threshold is None:
                calibration = (
                    _check_prompt_vocab(
                        prompt_token_ids(
                            calibration_prompts, tokenizer, chat_template=chat_template, name="calibration_prompts"
                        ),
                        vocab, "calibration_prompts",
                    )
                    if calibration_prompts is not None
                    else encoded[:32]
                )
                threshold = processor.calibrate(
                    calibration, trigger_rate, batch_size=batch_size, **context.generate_kwargs()
                )
            if store is not None:
                store.update(trigger_threshold=threshold)

        shards, trajectory_shards = [], []
        num_shards = math.ceil(len(encoded) / shard_size)
        done = sum(min(shard_size, len(encoded) - i * shard_size) for i in range(num_shards) if store and store.has(i))
        from transformers.utils.logging import tqdm

        with tqdm(
            total=len(encoded),
            initial=done,
            desc=f"Selection groups ({mode})",
            unit="prompt",
            disable=not show_progress,
        ) as bar:
            for shard_index in range(num_shards):
                start = shard_index * shard_size
                if store is not None and store.has(shard_index):
                    shards.append(store.load(shard_index))
                    if return_trajectories:
                        trajectory_shards.append(store.load(shard_index, TRAJECTORIES_DIR))
                    continue
                chunk = list(enumerate(encoded[start : start + shard_size], start=start))
                if mode == "teacher_forced":
                    rows, trajectory_rows = context.teacher_forced_shard(chunk, bar)
                else:
                    rows, trajectory_rows = context.on_policy_shard(processor, chunk, bar), []
                shard = datasets.Dataset.from_dict(_columns(rows), features=selection_features())
                if return_trajectories:
                    trajectories = datasets.Dataset.from_dict(
                        _columns(trajectory_rows, trajectory_features()), features=trajectory_features()
                    )
                    if store is not None:
                        trajectories = store.save(shard_index, trajectories, TRAJECTORIES_DIR)
                    trajectory_shards.append(trajectories)
                if store is not None:
                    shard = store.save(shard_index, shard)
                shards.append(shard)
                bar.set_postfix(groups=sum(len(s) for s in shards))
    finally:
        if processor is not None:
            processor.remove_hooks()

    dataset = datasets.concatenate_datasets(shards)
    if len(dataset) == 0:
        hint = (
            "raise `fraction`, raise `max_new_tokens`, or lower `warmup_tokens`"
            if mode == "teacher_forced"
            else "raise `trigger_rate` (or lower `trigger_threshold`), raise `max_new_tokens`, or lower "
            "`warmup_tokens`"
        )
        raise ValueError(
            f"No selection group was collected from {len(encoded)} prompts in `{mode}` mode: the student generated no "
            f"eligible step (generations shorter than `warmup_tokens`={warmup_tokens}, or no trigger). Give more or "
            f"longer prompts, {hint}."
        )
    logger.info(f"Collected {len(dataset)} selection groups from {len(encoded)} prompts ({mode}).")
    trajectories = datasets.concatenate_datasets(trajectory_shards) if return_trajectories else None
    if store is not None:
        dataset, trajectories = store.finish(dataset, trajectories)
    return (dataset, trajectories) if return_trajectories else dataset


# ---------------------------------------------------------------------------------------------------------------------
# Collection


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class _Context:
    """The models and settings of one collection run."""

    def __init__(self, student, teacher, tokenizer, settings: _Settings, generation_kwargs: dict, batch_size: int):
        self.student = student
        self.teacher = teacher
        # the teacher behind the `Teacher` interface (checks the vocabularies; suppressed rows left out)
        self.scorer = as_teacher(teacher, tokenizer)
        self.scorer.prepare(student, tokenizer, settings.suppress_token_ids)
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

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs = {"max_new_tokens": self.settings.max_new_tokens, "pad_token_id": self.pad_id, "do_sample": False}
        if self.eos_ids:
            kwargs["eos_token_id"] = self.eos_ids
        if self.settings.suppress_token_ids:
            kwargs["suppress_tokens"] = list(self.settings.suppress_token_ids)
        kwargs.update(self.extra_generation_kwargs)
        return kwargs

    def _batches(self, chunk: list[tuple[int, list[int]]]):
        for start in range(0, len(chunk), self.batch_size):
            batch = chunk[start : start + self.batch_size]
            indices = [i for i, _ in batch]
            prompts = [p for _, p in batch]
            padded = left_pad(prompts, self.pad_id, _device(self.student))
            yield indices, prompts, padded["input_ids"], padded["attention_mask"]

    @torch.no_grad()
    def teacher_forced_shard(
        self, chunk: list[tuple[int, list[int]]], bar
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The shard's selection groups, and its trajectories when the settings ask for them."""
        settings = self.settings
        positions_seen = 0
        found: list[tuple[float, int, int, list[int], dict[str, Any]]] = []
        trajectories: list[dict[str, Any]] = []
        for indices, prompts, input_ids, attention_mask in self._batches(chunk):
            output = self.student.generate(
                input_ids=input_ids, attention_mask=attention_mask, **self.generate_kwargs()
            )
            bar.update(len(indices))
            prompt_length = input_ids.shape[1]
            generated = output[:, prompt_length:]
            num_new = generated.shape[1]
            if num_new == 0:
                continue
            if self.eos_ids:
                is_eos = torch.isin(generated, torch.tensor(self.eos_ids, device=generated.device))
                after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
            else:
                after_eos = torch.zeros_like(generated, dtype=torch.bool)
            generated_mask = (~after_eos).long()
            lengths = generated_mask.sum(-1)
            positions_seen += int(lengths.sum())
            mask = torch.cat([attention_mask, generated_mask], dim=1)[:, :-1]
            sequence = output[:, :-1]
            positions = positions_from_attention_mask(mask)
            student_logits = self.student(
                input_ids=sequence, attention_mask=mask, position_ids=positions, use_cache=False,
                logits_to_keep=num_new,
            ).logits.float()
            if self.scorer.full_distribution:
                teacher_log_probs = self.scorer.trajectory_log_probs(sequence, mask, num_new)
            if self.suppress.numel():
                student_logits.index_fill_(-1, self.suppress.to(student_logits.device), float("-inf"))
            batch = len(indices)
            flat_student = student_logits.reshape(batch * num_new, -1)
            del student_logits
            flat_teacher = None
            if self.scorer.full_distribution:
                flat_teacher = teacher_log_probs.to(flat_student.device).reshape(batch * num_new, -1)
                del teacher_log_probs
            if settings.signal == "entropy":
                signal = entropy_signal(flat_student, settings.signal_top_k).view(batch, num_new)
            else:
                signal = kl_signal(flat_student, flat_teacher, settings.signal_top_k).view(batch, num_new)
            steps = torch.arange(num_new, device=signal.device)
            eligible = (steps[None] >= settings.warmup_tokens) & (steps[None] < lengths[:, None].to(signal.device))
            rows, cols = eligible.nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            flat_index = rows * num_new + cols
            cand_ids, cand_log_probs, _ = top_k_candidates(flat_student[flat_index], settings.top_k)
            signal_values = signal[rows, cols]
            generated_lists = generated.tolist()
            if flat_teacher is not None:
                teacher_selected = flat_teacher[flat_index]
                teacher_probs = teacher_selected.gather(-1, cand_ids).exp()
                teacher_top1 = teacher_selected.argmax(-1)
            else:
                # --- a teacher without the whole distribution (RemoteTeacher): score the candidates only; the
                # signal is the student's entropy (checked in `collect_selection_data`)
                trajectories = [prompts[b] + generated_lists[b][: int(lengths[b])] for b in range(batch)]
                prompt_lengths = torch.tensor([len(prompts[b]) for b in rows.tolist()])
                targets = torch.stack([rows.cpu(), cols.cpu() + prompt_lengths], 1)
                teacher_log_probs, teacher_top1 = self.scorer.score_trajectories(trajectories, targets, cand_ids)
                teacher_probs = teacher_log_probs.exp()
                # ---
            if settings.trajectories:
                trajectories += self._trajectory_rows(
                    indices, prompts, generated_lists, lengths.tolist(), rows, cols, cand_ids, teacher_probs,
                    teacher_top1, flat_student[flat_index], flat_teacher[flat_index] if flat_teacher is not None else None,
                )
            for n, (row, step) in enumerate(zip(rows.tolist(), cols.tolist())):
                record = {
                    "cand_ids": cand_ids[n].tolist(),
                    "teacher_probs": teacher_probs[n].tolist(),
                    "student_probs": cand_log_probs[n].exp().tolist(),
                    "teacher_top1": int(teacher_top1[n]),
                    "signal": float(signal_values[n]),
                }
                context = prompts[row] + generated_lists[row][:step]
                found.append((record["signal"], indices[row], step, context, record))
        if not found:
            return [], trajectories
        count = min(len(found), max(1, round(settings.fraction * positions_seen)))
        signals = torch.tensor([f[0] for f in found], dtype=torch.float64)
        chosen = sorted(signals.topk(count).indices.tolist(), key=lambda i: (found[i][1], found[i][2]))
        out = []
        for i in chosen:
            _, prompt_index, step, context, record = found[i]
            out.append({"context_ids": context, **record, "prompt_index": prompt_index, "step": step})
        return out, trajectories

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
        from .config import S2TConfig
        from .processor import S2TLogitsProcessor

        settings = self.settings
        reserved = {}
        if settings.suppress_token_ids:
            reserved = {"num_bins": len(settings.suppress_token_ids), "bin_token_ids": settings.suppress_token_ids}
        config = S2TConfig(
            trigger="kl",
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
    def on_policy_shard(self, processor, chunk: list[tuple[int, list[int]]], bar) -> list[dict[str, Any]]:
        out = []
        for indices, _, input_ids, attention_mask in self._batches(chunk):
            self.student.generate(
                input_ids=input_ids, attention_mask=attention_mask, logits_processor=[processor],
                **self.generate_kwargs(),
            )
            bar.update(len(indices))
            for record in processor.records:
                out.append(
                    {
                        "context_ids": record["context_ids"],
                        "cand_ids": record["cand_ids"],
                        "teacher_probs": record["teacher_probs"],
                        "student_probs": record["student_probs"],
                        "teacher_top1": record["teacher_top1"],
                        "prompt_index": indices[record["row"]],
                        "step": record["step"],
                        "signal": record["signal"],
                    }
                )
        return out


def _columns(rows: list[dict[str, Any]], features=None) -> dict[str, list]:
    return {name: [row[name] for row in rows] for name in (features or selection_features())}


def _check_prompt_vocab(encoded: list[list[int]], vocab: int, name: str) -> list[list[int]]:
    """`encoded` itself, once every token id is checked to lie in `[0, vocab)` (the student's output rows)."""
    for index, ids in enumerate(encoded):
        if not 0 <= min(ids) <= max(ids) < vocab:
            outside = sorted({int(t) for t in ids if not 0 <= t < vocab})
            raise ValueError(
                f"`{name}[{index}]` holds token ids {outside[:8]} outside the student's vocabulary of {vocab} rows; "
                "encode the prompts with the student's tokenizer."
            )
    return encoded


def _fingerprint(settings: _Settings, encoded: list[list[int]], student, teacher) -> str:
    from .selector import vocab_fingerprint

    digest = hashlib.sha256()
    values = asdict(settings)
    if not values["trajectories"]:
        del values["trajectories"]  # collections made before trajectories existed keep their fingerprint
    digest.update(json.dumps(values, sort_keys=True).encode())
    for role, model in (("student", student), ("teacher", teacher)):
        if isinstance(model, Teacher):  # a `Teacher`: its model, or the server and model name of a remote one
            model = getattr(model, "model", None)
        if not isinstance(model, torch.nn.Module):
            digest.update(f"{role}:{getattr(teacher, 'base_url', '')}:{model}".encode())
            continue
        digest.update(f"{role}:{vocab_fingerprint(model)}".encode())
    for ids in encoded:
        digest.update(json.dumps(ids).encode())
        digest.update(b";")
    return digest.hexdigest()[:32]


class _ShardStore:
    """Finished shards of a collection under `root/shards`, and the final dataset in `root`."""

    def __init__(self, root: str, fingerprint: str, resume: bool, trajectories: bool = False):
        self.root = root
        self.trajectories = trajectories
        self.fingerprint = fingerprint
        self.metadata_path = os.path.join(root, METADATA_NAME)
        metadata = None
        if os.path.isfile(self.metadata_path):
            with open(self.metadata_path, encoding="utf-8") as f:
                metadata = json.load(f)
        elif resume and os.path.isdir(root) and os.listdir(root):
            raise ValueError(
                f"`save_to` ({root}) is not empty and holds no `{METADATA_NAME}`: it was not written by "
                "`collect_selection_data`. Choose an empty or new directory."
            )
        if metadata is not None and not resume:
            self._clear()
            metadata = None
        if metadata is not None and metadata.get("fingerprint") != fingerprint:
            raise ValueError(
                f"`save_to` ({root}) holds a collection made with other settings, prompts or models (fingerprint "
                f"{metadata.get('fingerprint')} vs {fingerprint} now). Pass `resume=False` to overwrite it, or choose "
                "another `save_to`."
            )
        self.metadata = metadata or {
            "format": _FORMAT_VERSION,
            "s2t_hf_version": __version__,
            "fingerprint": fingerprint,
            "complete": False,
        }
        os.makedirs(os.path.join(root, SHARDS_DIR), exist_ok=True)
        self._write_metadata()
        if metadata is not None and not self.complete:
            logger.info(f"Resuming the collection in `{root}`.")

    @property
    def complete(self) -> bool:
        return bool(self.metadata.get("complete"))

    def _clear(self) -> None:
        shutil.rmtree(os.path.join(self.root, SHARDS_DIR), ignore_errors=True)
        shutil.rmtree(os.path.join(self.root, TRAJECTORIES_DIR), ignore_errors=True)
        for name in os.listdir(self.root):
            if name in (METADATA_NAME, "state.json", "dataset_info.json") or (
                name.startswith("data-") and name.endswith(".arrow")
            ):
                os.remove(os.path.join(self.root, name))

    def _write_metadata(self) -> None:
        temporary = self.metadata_path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(self.metadata, f, indent=2, sort_keys=True)
        os.replace(temporary, self.metadata_path)

    def update(self, **values: Any) -> None:
        self.metadata.update(values)
        self._write_metadata()

    def _shard_path(self, index: int, kind: str = "shard") -> str:
        return os.path.join(self.root, SHARDS_DIR, f"{kind}-{index:05d}")

    def has(self, index: int) -> bool:
        kinds = ("shard", TRAJECTORIES_DIR) if self.trajectories else ("shard",)
        return all(os.path.isfile(os.path.join(self._shard_path(index, kind), "state.json")) for kind in kinds)

    def load(self, index: int, kind: str = "shard"):
        import datasets

        return datasets.load_from_disk(self._shard_path(index, kind))

    def save(self, index: int, shard, kind: str = "shard"):
        path = self._shard_path(index, kind)
        temporary = path + ".tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        shard.save_to_disk(temporary)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(temporary, path)
        return self.load(index, kind)

    def finish(self, dataset, trajectories=None):
        import datasets

        dataset.save_to_disk(self.root)
        if trajectories is not None:
            trajectories.save_to_disk(os.path.join(self.root, TRAJECTORIES_DIR))
        self.update(complete=True, num_groups=len(dataset))
        dataset = datasets.load_from_disk(self.root)
        if trajectories is not None:
            trajectories = datasets.load_from_disk(os.path.join(self.root, TRAJECTORIES_DIR))
        shutil.rmtree(os.path.join(self.root, SHARDS_DIR), ignore_errors=True)
        return dataset, trajectories


# ---------------------------------------------------------------------------------------------------------------------
# Collator


@dataclass
class SelectionGroupCollator:
    """
    Collates selection groups into tensors for [`S2TTrainer`]: contexts padded on the **left** (so every context ends
    at the same column, where the packed candidates follow), candidates padded to the largest K of the batch.

    Args:
        pad_token_id (`int`, *optional*, defaults to 0):
            Id written into padding positions (they are masked, so any valid id works).
        max_context_length (`int`, *optional*):
            Keep only the last `max_context_length` tokens of each context (the paper truncates to 512).
        pad_to_multiple_of (`int`, *optional*):
            Pad the context length up to a multiple of this.

    Returns (from `__call__`) a dict of tensors:

    - `input_ids`, `attention_mask` (`(batch, length)`): the contexts, left padded;
    - `cand_ids`, `cand_mask` (`(batch, K)`): candidate ids and `True` for real candidates;
    - `teacher_probs`, and `student_probs` when every group has it (`(batch, K)`, float32, 0 for padding).

    Examples:

    ```python
    >>> from s2t_hf import SelectionGroupCollator
    >>> collator = SelectionGroupCollator(pad_token_id=0)
    >>> batch = collator([
    ...     {"context_ids": [5, 6, 7], "cand_ids": [1, 2], "teacher_probs": [0.1, 0.6]},
    ...     {"context_ids": [8], "cand_ids": [3, 4], "teacher_probs": [0.3, 0.2]},
    ... ])
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])

    ```
    """

    pad_token_id: int = 0
    max_context_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.max_context_length is not None and self.max_context_length < 1:
            raise ValueError(
                f"`max_context_length` must be a positive integer or None, got {self.max_context_length}."
            )
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(
                f"`pad_to_multiple_of` must be a positive integer or None, got {self.pad_to_multiple_of}."
            )

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("`features` is empty; a batch needs at least one selection group.")
        check_selection_columns(features[0])
        contexts = [_token_ids(f["context_ids"], "context_ids") for f in features]
        if self.max_context_length is not None:
            contexts = [c[-self.max_context_length :] for c in contexts]
        if any(len(c) == 0 for c in contexts):
            raise ValueError("A selection group has an empty `context_ids`; every context needs at least one token.")
        length = max(len(c) for c in contexts)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        candidates = [_token_ids(f["cand_ids"], "cand_ids") for f in features]
        if any(len(c) == 0 for c in candidates):
            raise ValueError("A selection group has no `cand_ids`; every group needs its candidates (K >= 2).")
        num_candidates = max(len(c) for c in candidates)
        batch = len(features)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        cand_ids = torch.full((batch, num_candidates), self.pad_token_id, dtype=torch.long)
        cand_mask = torch.zeros((batch, num_candidates), dtype=torch.bool)
        teacher_probs = torch.zeros((batch, num_candidates), dtype=torch.float32)
        with_student = all(f.get("student_probs") is not None for f in features)
        student_probs = torch.zeros((batch, num_candidates), dtype=torch.float32)
        for i, (feature, context, cands) in enumerate(zip(features, contexts, candidates)):
            input_ids[i, length - len(context) :] = torch.tensor(context, dtype=torch.long)
            attention_mask[i, length - len(context) :] = 1
            k = len(cands)
            cand_ids[i, :k] = torch.tensor(cands, dtype=torch.long)
            cand_mask[i, :k] = True
            teacher_probs[i, :k] = _probabilities(feature["teacher_probs"], "teacher_probs", k)
            if with_student:
                student_probs[i, :k] = _probabilities(feature["student_probs"], "student_probs", k)
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "cand_ids": cand_ids,
            "cand_mask": cand_mask,
            "teacher_probs": teacher_probs,
        }
        if with_student:
            out["student_probs"] = student_probs
        return out


def check_selection_columns(columns: Iterable[str]) -> None:
    """Raises a `KeyError` naming the selection-group columns missing from `columns` (a dataset's or a row's)."""
    columns = set(columns)
    missing = [k for k in ("context_ids", "cand_ids", "teacher_probs") if k not in columns]
    if missing:
        raise KeyError(
            f"Selection groups need `context_ids`, `cand_ids` and `teacher_probs`; missing {missing}. Build the "
            "dataset with `collect_selection_data`, and keep `remove_unused_columns=False` in the training "
            "arguments."
        )


def _as_list(values: Any) -> list:
    if isinstance(values, torch.Tensor):
        return values.tolist()
    return list(values)


def _token_ids(values: Any, name: str) -> list[int]:
    """A group's `context_ids` or `cand_ids`: a flat list of non-negative integers."""
    ids = _as_list(values)
    if not all(is_token_id(t) and t >= 0 for t in ids):
        raise ValueError(
            f"A selection group's `{name}` must be a flat list of token ids (integers >= 0), got {str(ids)[:120]}. "
            "Build the dataset with `collect_selection_data`."
        )
    return ids


def _probabilities(values: Any, name: str, num_candidates: int) -> torch.Tensor:
    """A group's `teacher_probs` or `student_probs`: one finite, non-negative number per candidate."""
    probs = _as_list(values)
    if len(probs) != num_candidates:
        raise ValueError(
            f"A selection group has {num_candidates} `cand_ids` but {len(probs)} `{name}`; they must match."
        )
    if not all(isinstance(p, numbers.Real) and math.isfinite(p) and p >= 0 for p in probs):
        raise ValueError(
            f"A selection group's `{name}` must hold one finite, non-negative probability per candidate, got "
            f"{str(probs)[:120]}."
        )
    return torch.tensor(probs, dtype=torch.float32)
