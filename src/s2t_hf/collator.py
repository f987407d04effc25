"""The training side of selection groups: [`SelectionGroupCollator`] turns a list of groups (rows of the dataset
[`~s2t_hf.data.collect_selection_data`] builds) into the tensors [`S2TTrainer`] reads, and
[`check_selection_columns`] names the columns a group needs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .prompts import is_token_id


__all__ = ["PromptGroupedSampler", "SelectionGroupCollator", "check_selection_columns"]


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
        share_contexts (`bool`, *optional*, defaults to `False`):
            Encode a context once for every group of the batch whose context is a prefix of it (the groups of one
            prompt are: each is the prompt and the reply up to its step). The batch then has one row per longest
            context, and `group_rows` / `context_lengths` say where each group's context ends. Exact: each group's
            candidates see only their own context. [`S2TTrainer`] turns it on with packing; it pays off when a batch
            holds several groups of one prompt (`S2TTrainingArguments(group_by_prompt=True)`).

    Returns (from `__call__`) a dict of tensors, for `N` groups in `R` context rows (`R = N` without sharing):

    - `input_ids`, `attention_mask` (`(R, length)`): the contexts, left padded;
    - `cand_ids`, `cand_mask` (`(N, K)`): candidate ids and `True` for real candidates, in the order of the features;
    - `teacher_probs`, and `student_probs` when every group has it (`(N, K)`, float32, 0 for padding);
    - with `share_contexts=True` only: `group_rows` (`(N,)`, the row of each group's context) and `context_lengths`
      (`(N,)`, the real tokens of its context, which are the first ones of the row).

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
    >>> shared = SelectionGroupCollator(share_contexts=True)([
    ...     {"context_ids": [5, 6], "cand_ids": [1, 2], "teacher_probs": [0.1, 0.6]},
    ...     {"context_ids": [5, 6, 7], "cand_ids": [3, 4], "teacher_probs": [0.3, 0.2]},
    ... ])
    >>> shared["input_ids"].tolist(), shared["group_rows"].tolist(), shared["context_lengths"].tolist()
    ([[5, 6, 7]], [0, 0], [2, 3])

    ```
    """

    pad_token_id: int = 0
    max_context_length: int | None = None
    pad_to_multiple_of: int | None = None
    share_contexts: bool = False

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
        rows, group_rows = _context_rows(contexts) if self.share_contexts else (contexts, None)
        length = max(len(c) for c in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        candidates = [_token_ids(f["cand_ids"], "cand_ids") for f in features]
        if any(len(c) == 0 for c in candidates):
            raise ValueError("A selection group has no `cand_ids`; every group needs its candidates (K >= 2).")
        num_candidates = max(len(c) for c in candidates)
        batch = len(features)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, context in enumerate(rows):
            input_ids[i, length - len(context) :] = torch.tensor(context, dtype=torch.long)
            attention_mask[i, length - len(context) :] = 1
        cand_ids = torch.full((batch, num_candidates), self.pad_token_id, dtype=torch.long)
        cand_mask = torch.zeros((batch, num_candidates), dtype=torch.bool)
        teacher_probs = torch.zeros((batch, num_candidates), dtype=torch.float32)
        with_student = all(f.get("student_probs") is not None for f in features)
        student_probs = torch.zeros((batch, num_candidates), dtype=torch.float32)
        for i, (feature, cands) in enumerate(zip(features, candidates)):
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
        if group_rows is not None:
            out["group_rows"] = torch.tensor(group_rows, dtype=torch.long)
            out["context_lengths"] = torch.tensor([len(c) for c in contexts], dtype=torch.long)
        return out


def _context_rows(contexts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The fewest contexts that hold every context of `contexts` as a prefix (longest first), and each one's row."""
    rows: list[list[int]] = []
    group_rows = [0] * len(contexts)
    for i in sorted(range(len(contexts)), key=lambda i: -len(contexts[i])):
        context = contexts[i]
        row = next((r for r, longer in enumerate(rows) if longer[: len(context)] == context), None)
        if row is None:
            row = len(rows)
            rows.append(context)
        group_rows[i] = row
    return rows, group_rows


class PromptGroupedSampler(torch.utils.data.Sampler[int]):
    """
    Yields the indices of selection groups prompt by prompt, in a shuffled order of prompts, so that consecutive
    groups (one batch) mostly come from one prompt and [`SelectionGroupCollator`] with `share_contexts=True` encodes
    their common context once. Used by [`S2TTrainer`] with `S2TTrainingArguments(group_by_prompt=True)`.

    Args:
        prompt_ids (`Sequence[int]`):
            The prompt of each group (the `prompt_index` column of [`collect_selection_data`]).
        seed (`int`, *optional*, defaults to 0):
            With the epoch (`set_epoch`), fixes the order, so a resumed run sees the same batches.

    Examples:

    ```python
    >>> from s2t_hf.collator import PromptGroupedSampler
    >>> prompts = [0, 1, 0, 2, 1, 0]
    >>> order = list(PromptGroupedSampler(prompts, seed=0))
    >>> sorted(order)  # every group once
    [0, 1, 2, 3, 4, 5]
    >>> [prompts[i] for i in order] in ([0, 0, 0, 1, 1, 2], [0, 0, 0, 2, 1, 1], [1, 1, 0, 0, 0, 2],
    ...                                 [1, 1, 2, 0, 0, 0], [2, 0, 0, 0, 1, 1], [2, 1, 1, 0, 0, 0])  # prompt by prompt
    True

    ```
    """

    def __init__(self, prompt_ids: Sequence[int], seed: int = 0):
        self.prompt_ids = [int(p) for p in prompt_ids]
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __iter__(self):
        by_prompt: dict[int, list[int]] = {}
        for index, prompt in enumerate(self.prompt_ids):
            by_prompt.setdefault(prompt, []).append(index)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        prompts = list(by_prompt)
        for i in torch.randperm(len(prompts), generator=generator).tolist():
            yield from by_prompt[prompts[i]]


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
