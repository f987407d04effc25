"""The teacher interface: what S2T decoding and selection-group collection ask of a teacher.

A [`Teacher`] answers, for the *triggered rows* of a decoding step:

- [`~Teacher.select`]: which of the student's candidates it prefers (S2T), with its top-1 token (for the
  `teacher_hits` statistic) and, on request, its log-probabilities of the candidates (for `records`);
- [`~Teacher.takeover`]: its own next token (the Takeover baseline);
- [`~Teacher.candidate_log_probs`]: its log-probabilities of given candidates;

and, for data collection, [`~Teacher.score_trajectories`]: teacher-forced log-probabilities of the candidates at given
positions of whole trajectories. Only a teacher with `full_distribution = True` also gives
[`~Teacher.next_log_probs`], its distribution over the whole vocabulary at every row, which the `kl` trigger needs, and
[`~Teacher.trajectory_log_probs`], the same for every position of whole trajectories (teacher-forced collection).

The implementations live beside this module: [`~s2t_hf.teachers.LocalTeacher`] (`local.py`) and
[`~s2t_hf.teachers.RemoteTeacher`] (`remote.py`, over the JSON client of `transport.py`).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


__all__ = ["Teacher", "TeacherChoice", "UnusedTeacher", "vocabulary_difference"]


def vocabulary_difference(student_tokenizer: Any, teacher_tokenizer: Any) -> str | None:
    """
    How two tokenizers' vocabularies differ where S2T compares them, or `None` where they agree: every id below the
    smaller vocabulary's size must be the same token in both, and every special token the two share must have the
    same id. Sizes alone decide nothing (a 49K vocabulary fits inside a 262K one).

    Args:
        student_tokenizer (`PreTrainedTokenizerBase`): the student's tokenizer.
        teacher_tokenizer (`PreTrainedTokenizerBase`): the teacher's tokenizer.

    Returns:
        `str` naming the first difference (an id, its two tokens), or `None`.

    Examples:

    ```python
    >>> from s2t_hf.tasks import build_tokenizer
    >>> from s2t_hf.teachers import vocabulary_difference
    >>> vocabulary_difference(build_tokenizer(), build_tokenizer(extra_words=["zebra"])) is None  # a prefix
    True

    ```
    """
    if student_tokenizer is teacher_tokenizer:
        return None
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    compared = min(len(student_vocab), len(teacher_vocab))
    student_tokens = {i: t for t, i in student_vocab.items() if i < compared}
    teacher_tokens = {i: t for t, i in teacher_vocab.items() if i < compared}
    if student_tokens != teacher_tokens:
        first = min(i for i in set(student_tokens) | set(teacher_tokens) if student_tokens.get(i) != teacher_tokens.get(i))
        return (
            f"id {first} is {student_tokens.get(first)!r} for the student and {teacher_tokens.get(first)!r} for the "
            f"teacher (compared on the first {compared} ids)"
        )
    student_special = set(getattr(student_tokenizer, "all_special_tokens", []) or [])
    teacher_special = set(getattr(teacher_tokenizer, "all_special_tokens", []) or [])
    for token in sorted(student_special & teacher_special):
        if student_vocab.get(token) != teacher_vocab.get(token):
            return (
                f"the special token {token!r} is id {student_vocab.get(token)} for the student and "
                f"{teacher_vocab.get(token)} for the teacher"
            )
    return None


@dataclass
class TeacherChoice:
    """
    The teacher's answer at one trigger step, for the triggered rows only (`n` rows, `K` candidates).

    Args:
        token_ids (`torch.LongTensor` of shape `(n,)`):
            The token the teacher chose for each row.
        positions (`torch.LongTensor` of shape `(n,)`, *optional*):
            For [`Teacher.select`]: the position (0..K-1) of the chosen candidate among the candidates.
        top1 (`torch.LongTensor` of shape `(n,)`, *optional*):
            The teacher's argmax over its whole vocabulary (feeds the `teacher_hits` statistic); `None` when the
            teacher cannot tell.
        candidate_log_probs (`torch.FloatTensor` of shape `(n, K)`, *optional*):
            The teacher's absolute log-probabilities of the candidates (float32), when asked for or free. A teacher
            with another tokenizer gives `log P(context + candidate) - log P(context)` as strings.
        unscored (`torch.BoolTensor` of shape `(n,)`, *optional*):
            Rows the teacher could not score exactly (a teacher with another tokenizer: a candidate that is not
            text, an incomplete UTF-8 character); they keep the student's top-1 (`teacher_unscored` statistic).
    """

    token_ids: torch.Tensor
    positions: torch.Tensor | None = None
    top1: torch.Tensor | None = None
    candidate_log_probs: torch.Tensor | None = None
    unscored: torch.Tensor | None = None


class Teacher(abc.ABC):
    """
    The interface S2T decoding ([`S2TLogitsProcessor`]) and [`collect_selection_data`] use to ask a teacher.

    Tensors in: `input_ids` and `attention_mask` of shape `(batch, length)` as `generate` holds them (left padding
    included), `rows` (a `torch.LongTensor` of the triggered rows' indices), and per triggered row `candidate_ids` and
    `valid` of shape `(n, K)`. Tensors out live on `input_ids`' device.

    Per-generation state (a cache) is cleared by [`~Teacher.reset`], which the processor calls whenever a new
    `generate` call starts. `calls` and `tokens` count the teacher's work since the last reset (the processor's
    `teacher_calls` and `teacher_tokens` statistics).
    """

    #: Whether [`~Teacher.next_log_probs`] is available (the whole-vocabulary distribution at every row).
    full_distribution: bool = False
    #: Whether the teacher can read a prompt of its own (`teacher_prompts`) before the student's continuation.
    reads_teacher_prompts: bool = False
    #: Whether one instance may answer for many prompts at once, from several threads: it keeps no state between
    #: calls that depends on the prompt (a served teacher). [`~s2t_hf.serving.ServedS2T`] needs it.
    shareable_across_prompts: bool = False

    def __init__(self) -> None:
        self.calls = 0
        self.tokens = 0
        self.prompt_lengths: list[int] | None = None
        self.teacher_prompts: list | None = None

    def prepare(self, student: torch.nn.Module, tokenizer: Any = None, blocked_ids: Sequence[int] = ()) -> None:
        """
        Checks that the teacher can serve `student` (the student's tokenizer, or its own with the candidates scored as
        text) and records the rows it must never choose (`blocked_ids`: the selector's reserved bins, suppressed rows).
        Called by the processor and by `collect_selection_data`.
        """
        self.blocked_ids = torch.tensor(sorted({int(i) for i in blocked_ids}), dtype=torch.long)

    def reset(self) -> None:
        """Clears the per-generation state (cache) and the counters."""
        self.calls = 0
        self.tokens = 0

    def begin(self, prompt_lengths: Sequence[int], teacher_prompts: Sequence[Any] | None = None) -> None:
        """
        Starts a generation (the processor calls it at the first step, after [`~Teacher.reset`]; data collection
        before it scores a batch).

        Args:
            prompt_lengths (`Sequence[int]`):
                Per row, where the student's continuation starts in the token ids the teacher will be given (the
                padded prompt width in `generate`; each trajectory's prompt length in collection).
            teacher_prompts (`Sequence[str | list[dict]]`, *optional*):
                Per row, the prompt the teacher reads instead of the student's (a string, or chat messages rendered
                with the teacher's chat template), followed by the student's continuation.
        """
        if teacher_prompts is not None and len(teacher_prompts) != len(prompt_lengths):
            raise ValueError(
                f"{len(teacher_prompts)} teacher prompts for {len(prompt_lengths)} rows: give one per row."
            )
        if teacher_prompts is not None and not self.reads_teacher_prompts:
            raise NotImplementedError(
                f"{type(self).__name__} cannot read a prompt of its own (`teacher_prompts`): use a `LocalTeacher`."
            )
        self.prompt_lengths = [int(n) for n in prompt_lengths]
        self.teacher_prompts = None if teacher_prompts is None else list(teacher_prompts)

    def row_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, row: int) -> tuple[list, list]:
        """A row's student prompt (left padding dropped) and continuation as token-id lists, split where
        [`~Teacher.begin`] said the continuation starts (the whole row is continuation before any `begin`)."""
        start = self.prompt_lengths[0] if self.prompt_lengths else 0
        ids, mask = input_ids[row].tolist(), attention_mask[row].tolist()
        return [i for i, m in zip(ids[:start], mask[:start]) if m], ids[start:]

    @property
    def cached_tokens(self) -> int:
        """Tokens the teacher holds in its per-generation cache (0 for a teacher without one)."""
        return 0

    def next_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """
        The teacher's log-probabilities of the next token at every row, over the student's output rows (float32,
        blocked rows at `-inf`), shape `(batch, vocab)`. Only teachers with `full_distribution = True`.
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot give its distribution over the whole vocabulary at every step. The `kl` "
            "trigger and `lazy_teacher=False` need it: use the `entropy` or `random` trigger, or a `LocalTeacher`."
        )

    def trajectory_log_probs(self, sequences: torch.Tensor, attention_mask: torch.Tensor, num_new: int) -> torch.Tensor:
        """
        Teacher-forced log-probabilities at the last `num_new` positions of `sequences` (left-padded by
        `attention_mask`), over the student's output rows, shape `(batch, num_new, vocab)` (float32, blocked rows at
        `-inf`). Teacher-forced collection (`collect_selection_data`) asks it of a teacher with
        `full_distribution = True`; only such teachers implement it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} says `full_distribution = True` but does not implement `trajectory_log_probs`, "
            "which teacher-forced collection needs from such a teacher: implement it (the teacher's log-probabilities "
            "at the last `num_new` positions of each sequence), or set `full_distribution = False`."
        )

    @abc.abstractmethod
    def select(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rows: torch.Tensor,
        candidate_ids: torch.Tensor,
        valid: torch.Tensor,
        *,
        with_log_probs: bool = False,
    ) -> TeacherChoice:
        """S2T selection: the valid candidate the teacher finds most probable, for each triggered row."""

    @abc.abstractmethod
    def takeover(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rows: torch.Tensor,
        candidate_ids: torch.Tensor | None = None,
        *,
        allowed: torch.Tensor | None = None,
        with_log_probs: bool = False,
    ) -> TeacherChoice:
        """
        Takeover: the teacher's own greedy next token (never a blocked row), for each triggered row.

        `allowed` (`torch.BoolTensor` of shape `(n, vocab)` over the student's output rows, *optional*) restricts the
        choice to the tokens the generation's earlier logits processors left finite (`min_new_tokens`,
        `bad_words_ids`, grammars...): the teacher's argmax among the allowed tokens.
        """

    @abc.abstractmethod
    def candidate_log_probs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, candidate_ids: torch.Tensor
    ) -> torch.Tensor:
        """The teacher's absolute log-probabilities (float32) of `candidate_ids`, shape `(n, K)`."""

    @abc.abstractmethod
    def score_trajectories(
        self, trajectories: Sequence[Sequence[int]], positions: torch.Tensor, candidate_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Teacher-forced scoring for data collection: the teacher reads whole trajectories (prompt + generated tokens)
        and scores the candidates at some of their positions.

        Args:
            trajectories (sequence of token-id lists):
                The trajectories, without padding.
            positions (`torch.LongTensor` of shape `(n, 2)`):
                `(b, t)` pairs: the distribution after the first `t` tokens of trajectory `b`, the one that predicts
                its token `t` (`1 <= t < len(trajectories[b])`).
            candidate_ids (`torch.LongTensor` of shape `(n, K)`):
                The candidates at each position.

        Returns:
            `(candidate_log_probs, top1)`: the teacher's absolute log-probabilities of the candidates, shape `(n, K)`
            (float32), and its argmax over the vocabulary, shape `(n,)`.
        """


class UnusedTeacher(Teacher):
    """Stands in for the teacher where none may be consulted, e.g. `s2t-hf calibrate` of the entropy trigger
    (calibration decodes without triggers): any call raises."""

    def _consulted(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "A teacher was consulted where none was given (UnusedTeacher); give a real teacher (`--teacher`)."
        )

    select = takeover = candidate_log_probs = score_trajectories = _consulted
