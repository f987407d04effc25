"""Selection groups for training the local selector: their collection from a student and a teacher.

A *selection group* is one uncertain decoding step of the student: the context (prompt + tokens generated so far), the
student's top-K candidate tokens, and the teacher's absolute probability of each candidate. [`collect_selection_data`]
gathers them into a `datasets.Dataset`, stage by stage: the arguments are checked, the prompts encoded, the on-policy
trigger calibrated, the shards collected by a [`~s2t_hf.collection.SelectionCollector`] (and saved and resumed by a
[`~s2t_hf.shard_store.ShardStore`]), and the dataset finished. The collator that turns groups into the trainer's
tensors is [`~s2t_hf.collator.SelectionGroupCollator`].
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers.utils import logging

from .collection import CollectionSettings, IndexedPrompt, SelectionCollector
from .kv import output_rows
from .prompts import prompt_token_ids
# `METADATA_NAME` is re-exported: the CLI reads the names of the files of `save_to` from this module
from .shard_store import (  # noqa: F401
    METADATA_NAME,
    TRAJECTORIES_DIR,
    ShardStore,
    collection_fingerprint,
    collection_fingerprint_of,
    collection_identity,
    legacy_fingerprint,
    stable_repr,
)
from .teachers import Teacher
from .teachers.teacher_prompts import check_teacher_prompts


__all__ = [
    "COLLECTION_MODES",
    "collect_selection_data",
    "selection_features",
    "trajectory_features",
]

logger = logging.get_logger(__name__)

COLLECTION_MODES = ("teacher_forced", "on_policy")
COLLECTION_SIGNALS = ("kl", "entropy")

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
    resume: bool | str = True,
    shard_size: int = 256,
    show_progress: bool = True,
    return_trajectories: bool = False,
    teacher_prompts: Sequence[Any] | None = None,
    collection_id: str | None = None,
    responses: Sequence[Any] | None = None,
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
    - `"on_policy"`: the student decodes with collaborative S2T ([`S2TLogitsProcessor`] with `selection="teacher"`
      and `trigger=signal`, `kl` or `entropy`), calibrated so that the trigger fires on a fraction `trigger_rate` of
      the steps; every trigger is a group. The trajectories follow the teacher's choices, as S2T-Local decoding will.

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
            The teacher: a model of the student's tokenizer, or a [`~s2t_hf.teachers.Teacher`] — one of another model
            family as `LocalTeacher(model, tokenizer=teacher_tokenizer)` (it scores the candidates as text), or one
            behind a server ([`~s2t_hf.teachers.RemoteTeacher`]). It may live on another device or dtype. A teacher
            of another tokenizer or behind a server gives no distribution over the student's vocabulary: use
            `signal="entropy"` with it, in either mode.
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
            How positions are chosen, `"kl"` or `"entropy"` (see above): in teacher-forced mode the ranking, in
            on-policy mode the trigger (`kl` or `entropy`). A served teacher, or one with another tokenizer than the
            student, has no distribution over the student's vocabulary: use `"entropy"` with it.
        trigger_rate (`float`, *optional*):
            On-policy mode: target trigger rate of the calibrated trigger. Defaults to `fraction`.
        trigger_threshold (`float`, *optional*):
            On-policy mode: use this threshold (KL or entropy, after `signal`) instead of calibrating one.
        collection_id (`str`, *optional*):
            A name for this collection, part of its identity: what the models cannot tell apart (e.g. a served
            teacher whose weights changed under the same path; give each run its own id).
        teacher_prompts (sequence, *optional*):
            One prompt per prompt that the teacher reads instead of the student's, followed by the student's
            continuation: a string, or chat messages rendered with the teacher's chat template. Privileged
            information here makes a *hinted* teacher (e.g. the reference solution: a copy of the student's model,
            `LocalTeacher(copy.deepcopy(student), tokenizer=tokenizer)`, then serves as a teacher).
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
        resume (`bool` or `"upgrade"`, *optional*, defaults to `True`):
            Pick up the shards (or the complete dataset) already in `save_to` if they were collected with the same
            settings, prompts and models ([`~s2t_hf.shard_store.collection_identity`]: for a local model its
            `name_or_path`, configuration and every parameter tensor; for a served teacher the served model's name,
            root and maximum length). `False` starts over and overwrites them. `"upgrade"` also resumes a collection
            written by an older s2t_hf under an older identity version when it matches under that version (the error
            such a collection raises says so).
        shard_size (`int`, *optional*, defaults to 256):
            Prompts per shard (the unit of resuming).
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a tqdm progress bar over prompts (hidden when transformers' progress bars are disabled).
        responses (sequence, *optional*):
            Teacher-forced mode: one response per prompt that the student and the teacher score instead of the
            student's own greedy reply, e.g. the dataset's reference solutions (the paper's cheap alternative to
            on-policy rollouts: no generation at all). A string is tokenized without special tokens; a token-id list
            is used as it is. The first end-of-sequence id is appended, and a response longer than `max_new_tokens`
            is cut there.
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
    if resume not in (True, False, "upgrade"):
        raise ValueError(f"`resume` must be `True`, `False` or `'upgrade'`, got {resume!r}.")
    if collection_id is not None and not isinstance(collection_id, str):
        raise ValueError(f"`collection_id` must be a string, got {type(collection_id).__name__}.")
    trigger_rate = _check_arguments(
        student, teacher, mode=mode, top_k=top_k, fraction=fraction, signal=signal, trigger_rate=trigger_rate,
        max_new_tokens=max_new_tokens, batch_size=batch_size, shard_size=shard_size,
        return_trajectories=return_trajectories,
    )
    generation_kwargs = _check_generation_kwargs(generation_kwargs)
    vocab = output_rows(student)
    encoded = _encode(prompts, tokenizer, chat_template, vocab, "prompts")
    teacher_prompts = check_teacher_prompts(teacher_prompts)
    if teacher_prompts is not None and len(teacher_prompts) != len(encoded):
        raise ValueError(
            f"`teacher_prompts` has {len(teacher_prompts)} prompts for {len(encoded)} `prompts`: give one teacher "
            "prompt per prompt, in the same order."
        )
    encoded_responses = _encode_responses(responses, tokenizer, mode, vocab, len(encoded))
    settings = CollectionSettings(
        mode=mode,
        top_k=top_k,
        fraction=fraction,
        signal=signal,
        trigger_rate=trigger_rate,
        max_new_tokens=max_new_tokens,
        signal_top_k=signal_top_k,
        warmup_tokens=warmup_tokens,
        shard_size=shard_size,
        suppress_token_ids=_suppressed_rows(suppress_token_ids, tokenizer, vocab),
        generation_kwargs=stable_repr(generation_kwargs),
        trajectories=bool(return_trajectories),
        teacher_prompts=_digest(teacher_prompts),
        responses=_digest(encoded_responses),
    )
    collector = SelectionCollector(
        student, teacher, tokenizer, settings, generation_kwargs, batch_size, teacher_prompts=teacher_prompts,
        responses=encoded_responses,
    )

    store = None
    if save_to is not None:
        identity = collection_identity(settings, encoded, student, teacher, collection_id)
        store = ShardStore(
            os.fspath(save_to), collection_fingerprint_of(identity), resume, return_trajectories, identity=identity,
            legacy_fingerprint=legacy_fingerprint(settings, encoded, student, teacher, generation_kwargs),
        )
        if store.complete:
            return _load_complete(os.fspath(save_to), return_trajectories)

    processor = None
    try:
        if mode == "on_policy":
            threshold = trigger_threshold
            if threshold is None and store is not None:
                threshold = store.metadata.get("trigger_threshold")
            processor = collector.make_processor(threshold)
            calibration = encoded[:32]
            if threshold is None and calibration_prompts is not None:
                calibration = _encode(calibration_prompts, tokenizer, chat_template, vocab, "calibration_prompts")
            _calibrate(collector, processor, store, threshold, calibration)
        shards, trajectory_shards = _collect_shards(collector, processor, store, encoded, show_progress)
    finally:
        if processor is not None:
            processor.remove_hooks()
    return _finish(shards, trajectory_shards, store, settings, num_prompts=len(encoded))


# ---------------------------------------------------------------------------------------------------------------------
# The stages of `collect_selection_data`


def _check_arguments(
    student: Any,
    teacher: Any,
    *,
    mode: str,
    top_k: int,
    fraction: float,
    signal: str,
    trigger_rate: float | None,
    max_new_tokens: int,
    batch_size: int,
    shard_size: int,
    return_trajectories: bool,
) -> float:
    """Checks the arguments of [`collect_selection_data`]; returns the trigger rate (`fraction` by default)."""
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
    trigger_rate = fraction if trigger_rate is None else trigger_rate
    if mode == "on_policy" and not 0.0 < trigger_rate < 1.0:  # `fraction=1` is fine in teacher-forced mode
        raise ValueError(f"`trigger_rate` must lie in (0, 1), got {trigger_rate}.")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if student is None or teacher is None:
        raise ValueError("`student` and `teacher` are both required: groups compare the teacher with the student.")
    # --- remote teachers (s2t_hf.teachers): no whole-vocabulary distribution, so no KL signal
    if isinstance(teacher, Teacher) and not teacher.full_distribution and signal == "kl":
        raise ValueError(
            f"A `{type(teacher).__name__}` gives the teacher's probabilities of the candidates, not its whole "
            f"distribution, which `signal='kl'` needs. Use `signal='entropy'`, or a local teacher model."
        )
    return trigger_rate


def _digest(items: list | None) -> str:
    """A digest of the teacher prompts (or the responses) for the collection's fingerprint ("" without them)."""
    if items is None:
        return ""
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:32]


def _encode_responses(
    responses: Sequence[Any] | None, tokenizer: Any, mode: str, vocab: int, num_prompts: int
) -> list[list[int]] | None:
    """The responses' token ids (strings tokenized without special tokens), checked against the prompts and the
    student's vocabulary; `None` without responses."""
    if responses is None:
        return None
    if mode != "teacher_forced":
        raise ValueError(
            "`responses` are scored teacher-forced: use `mode='teacher_forced'` (on-policy collection decodes the "
            "student's own replies)."
        )
    if isinstance(responses, (str, bytes)):
        raise TypeError("`responses` must be a sequence with one response per prompt, not a single string.")
    responses = list(responses)
    if len(responses) != num_prompts:
        raise ValueError(
            f"`responses` has {len(responses)} responses for {num_prompts} `prompts`: give one per prompt, in order."
        )
    encoded = []
    for index, response in enumerate(responses):
        if isinstance(response, str):
            if tokenizer is None:
                raise ValueError("String `responses` need `tokenizer`; or pass token-id lists.")
            ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        elif isinstance(response, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in response):
            ids = list(response)
        else:
            raise TypeError(f"`responses[{index}]` must be a string or a list of token ids, got {type(response)}.")
        if not ids:
            raise ValueError(f"`responses[{index}]` is empty; every response needs at least one token.")
        if not 0 <= min(ids) <= max(ids) < vocab:
            raise ValueError(
                f"`responses[{index}]` holds token ids outside the student's vocabulary of {vocab} rows; encode the "
                "responses with the student's tokenizer."
            )
        encoded.append([int(t) for t in ids])
    return encoded


def _check_generation_kwargs(generation_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of `generation_kwargs`, checked not to set what the collection sets."""
    generation_kwargs = dict(generation_kwargs or {})
    for key in ("max_new_tokens", "logits_processor", "input_ids", "attention_mask"):
        if key in generation_kwargs:
            raise ValueError(f"`generation_kwargs` must not set `{key}`; it is set by `collect_selection_data`.")
    return generation_kwargs


def _encode(prompts: Any, tokenizer: Any, chat_template: bool | None, vocab: int, name: str) -> list[list[int]]:
    """The prompts' token ids (no padding), each checked to lie in the student's `vocab` output rows."""
    encoded = prompt_token_ids(prompts, tokenizer, chat_template=chat_template, name=name)
    for index, ids in enumerate(encoded):
        if not 0 <= min(ids) <= max(ids) < vocab:
            outside = sorted({int(t) for t in ids if not 0 <= t < vocab})
            raise ValueError(
                f"`{name}[{index}]` holds token ids {outside[:8]} outside the student's vocabulary of {vocab} rows; "
                "encode the prompts with the student's tokenizer."
            )
    return encoded


def _suppressed_rows(suppress_token_ids: Sequence[int] | None, tokenizer: Any, vocab: int) -> list[int]:
    """The rows never generated nor offered: `suppress_token_ids`, by default the rows above the tokenizer."""
    if suppress_token_ids is None:
        suppress_token_ids = list(range(len(tokenizer), vocab)) if tokenizer is not None else []
    suppress = sorted({int(i) for i in suppress_token_ids})
    if any(not 0 <= i < vocab for i in suppress):
        raise ValueError(f"`suppress_token_ids` must lie in [0, {vocab}) (the student's output rows), got {suppress}.")
    return suppress


def _load_complete(root: str, return_trajectories: bool):
    """The dataset (and trajectories) of a collection already complete in `root`."""
    import datasets

    logger.info(f"Loading the complete selection dataset already collected in `{root}`.")
    groups = datasets.load_from_disk(root)
    if return_trajectories:
        return groups, datasets.load_from_disk(os.path.join(root, TRAJECTORIES_DIR))
    return groups


def _calibrate(
    collector: SelectionCollector,
    processor: Any,
    store: ShardStore | None,
    threshold: float | None,
    calibration: list[list[int]],
) -> None:
    """On-policy mode: calibrates `processor`'s trigger on `calibration` unless `threshold` is known, and records the
    threshold in `store` (a resumed collection reuses it)."""
    if threshold is None:
        threshold = processor.calibrate(
            calibration, collector.settings.trigger_rate, batch_size=collector.batch_size,
            **collector.generate_kwargs(),
        )
    if store is not None:
        store.update(trigger_threshold=threshold)


def _collect_shards(
    collector: SelectionCollector,
    processor: Any,
    store: ShardStore | None,
    encoded: list[list[int]],
    show_progress: bool,
) -> tuple[list, list]:
    """Every shard's groups (and trajectories), loaded from `store` where finished, collected otherwise."""
    from transformers.utils.logging import tqdm

    settings = collector.settings
    shard_size = settings.shard_size
    shards, trajectory_shards = [], []
    num_shards = math.ceil(len(encoded) / shard_size)
    done = sum(min(shard_size, len(encoded) - i * shard_size) for i in range(num_shards) if store and store.has(i))
    with tqdm(
        total=len(encoded),
        initial=done,
        desc=f"Selection groups ({settings.mode})",
        unit="prompt",
        disable=not show_progress,
    ) as bar:
        for shard_index in range(num_shards):
            if store is not None and store.has(shard_index):
                shards.append(store.load(shard_index))
                if settings.trajectories:
                    trajectory_shards.append(store.load(shard_index, TRAJECTORIES_DIR))
                continue
            start = shard_index * shard_size
            chunk = list(enumerate(encoded[start : start + shard_size], start=start))
            shard, trajectories = _collect_shard(collector, processor, store, shard_index, chunk, bar)
            if trajectories is not None:
                trajectory_shards.append(trajectories)
            shards.append(shard)
            bar.set_postfix(groups=sum(len(s) for s in shards))
    return shards, trajectory_shards


def _collect_shard(
    collector: SelectionCollector,
    processor: Any,
    store: ShardStore | None,
    shard_index: int,
    chunk: list[IndexedPrompt],
    bar: Any,
) -> tuple[Any, Any]:
    """One shard's groups as a `datasets.Dataset` (and its trajectories, or `None`), saved to `store` if any."""
    import datasets

    if collector.settings.mode == "teacher_forced":
        rows, trajectory_rows = collector.teacher_forced_shard(chunk, bar)
    else:
        rows, trajectory_rows = collector.on_policy_shard(processor, chunk, bar), []
    shard = datasets.Dataset.from_dict(_columns(rows), features=selection_features())
    trajectories = None
    if collector.settings.trajectories:
        trajectories = datasets.Dataset.from_dict(
            _columns(trajectory_rows, trajectory_features()), features=trajectory_features()
        )
        if store is not None:
            trajectories = store.save(shard_index, trajectories, TRAJECTORIES_DIR)
    if store is not None:
        shard = store.save(shard_index, shard)
    return shard, trajectories


def _finish(
    shards: list, trajectory_shards: list, store: ShardStore | None, settings: CollectionSettings, *, num_prompts: int
):
    """The collected dataset (and trajectories), written to `store` if any; an error when nothing was collected."""
    import datasets

    mode = settings.mode
    dataset = datasets.concatenate_datasets(shards)
    if len(dataset) == 0:
        hint = (
            "raise `fraction`, raise `max_new_tokens`, or lower `warmup_tokens`"
            if mode == "teacher_forced"
            else "raise `trigger_rate` (or lower `trigger_threshold`), raise `max_new_tokens`, or lower "
            "`warmup_tokens`"
        )
        raise ValueError(
            f"No selection group was collected from {num_prompts} prompts in `{mode}` mode: the student generated no "
            f"eligible step (generations shorter than `warmup_tokens`={settings.warmup_tokens}, or no trigger). Give "
            f"more or longer prompts, {hint}."
        )
    logger.info(f"Collected {len(dataset)} selection groups from {num_prompts} prompts ({mode}).")
    trajectories = datasets.concatenate_datasets(trajectory_shards) if settings.trajectories else None
    if store is not None:
        dataset, trajectories = store.finish(dataset, trajectories)
    return (dataset, trajectories) if settings.trajectories else dataset


def _columns(rows: list[dict[str, Any]], features=None) -> dict[str, list]:
    return {name: [row[name] for row in rows] for name in (features or selection_features())}
