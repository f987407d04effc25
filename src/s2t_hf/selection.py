"""Selection among the student's top-K candidates: by a teacher, by a teacher takeover, or by the local selector.

The tensor functions are pure so that the processor (at inference) and the trainer (for the loss) compute exactly the
same candidate logits. The selection *policies* ([`SelectionPolicy`], registered in [`SELECTIONS`]) apply them at a
decoding step: they ask the teacher, or score the candidates with the local selector.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def top_k_candidates(
    scores: torch.Tensor, k: int, ratio: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The student's top-K candidates of each row.

    A NaN logit counts as `-inf` (such a token is never a valid candidate) and `+inf` as the largest float32, so that a
    row's `+inf` tokens share its probability and one bad logit cannot reorder a row. In a row without any finite
    logit no candidate is valid but the (arbitrary) top-1.

    Args:
        scores (`torch.Tensor` of shape `(batch, vocab)`): the student's logits (masked rows at `-inf`).
        k (`int`): number of candidates, clipped to the vocabulary size.
        ratio (`float`, *optional*): if set, candidates with probability below `ratio * p_max` are marked invalid.

    Returns:
        `(ids, log_probs, valid)` each of shape `(batch, min(k, vocab))`: candidate ids (best first), the student's
        log-probabilities over the full vocabulary (float32), and a boolean mask of candidates that may be selected
        (the top-1 always may).
    """
    k = min(k, scores.shape[-1])
    finite_max = torch.finfo(torch.float32).max
    clean = torch.nan_to_num(scores.float(), nan=float("-inf"), posinf=finite_max, neginf=float("-inf"))
    log_probs = torch.log_softmax(clean, dim=-1)
    values, ids = log_probs.topk(k, dim=-1)
    # beside a `+inf` logit every other token's log-probability rounds to the float32 minimum: probability zero
    values = values.masked_fill(values <= -finite_max, float("-inf"))
    valid = torch.isfinite(values)
    if ratio is not None:
        valid &= values >= values[:, :1] + torch.log(torch.tensor(ratio, dtype=values.dtype))
    valid[:, 0] = True
    return ids, values, valid


def teacher_selection(candidate_ids: torch.Tensor, valid: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """
    S2T selection: the valid candidate with the highest teacher probability. Ties go to the student's higher rank; a
    NaN teacher log-probability counts as `-inf`, so a row where the teacher gives no valid candidate a finite value
    keeps the student's top-1 (position 0).

    Args:
        candidate_ids (`torch.Tensor` of shape `(batch, K)`): candidates, best first for the student.
        valid (`torch.Tensor` of shape `(batch, K)`): which candidates may be chosen.
        teacher_log_probs (`torch.Tensor` of shape `(batch, vocab)`): the teacher's log-probabilities.

    Returns:
        `torch.Tensor` of shape `(batch,)`: the position (0..K-1) of the chosen candidate in each row.
    """
    teacher = teacher_log_probs.float().gather(-1, candidate_ids)
    teacher = teacher.masked_fill(~valid | teacher.isnan(), float("-inf"))
    return teacher.argmax(-1)


def takeover_selection(
    teacher_log_probs: torch.Tensor, blocked_ids: torch.Tensor | None = None, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """
    Takeover baseline: the teacher's argmax over the whole vocabulary, minus `blocked_ids` (e.g. reserved rows) and,
    when `allowed` is given, among the allowed tokens only.

    Args:
        teacher_log_probs (`torch.Tensor` of shape `(batch, vocab)`): the teacher's log-probabilities (or logits).
        blocked_ids (`torch.LongTensor`, *optional*): token ids never chosen.
        allowed (`torch.BoolTensor` of shape `(batch, vocab')`, *optional*): the tokens each row may choose (e.g. those
            the student's processed scores leave finite); `vocab'` may be smaller than `vocab` (extra rows are
            blocked).

    Returns:
        `torch.Tensor` of shape `(batch,)`: token ids; -1 in a row whose allowed tokens all have `-inf` teacher scores
        (the teacher cannot rank any of them; the processor then keeps the student's top-1).
    """
    logits = teacher_log_probs.float()
    logits = logits.masked_fill(torch.isnan(logits), float("-inf"))  # a NaN never wins
    if blocked_ids is not None and blocked_ids.numel():
        logits = logits.index_fill(-1, blocked_ids.to(logits.device), float("-inf"))
    if allowed is None:
        return logits.argmax(-1)
    allowed = allowed.to(logits.device)
    width = min(allowed.shape[-1], logits.shape[-1])
    logits, allowed = logits[..., :width], allowed[..., :width]
    masked = logits.masked_fill(~allowed, float("-inf"))
    best = masked.argmax(-1)
    return torch.where(torch.isfinite(masked.amax(-1)), best, torch.full_like(best, -1))


def expected_bin_value(bin_logits: torch.Tensor, bin_values: torch.Tensor) -> torch.Tensor:
    """
    Expected bin value: `sum_b softmax(bin_logits)_b * bin_values_b`, computed in float32.

    Args:
        bin_logits (`torch.Tensor` of shape `(..., B)`):
            Logits of the B reserved rows.
        bin_values (`torch.Tensor` of shape `(B,)`):
            Value of each bin, e.g. `torch.linspace(0, 1, B)`.

    Returns:
        `torch.Tensor` of shape `(...)` and dtype float32: the score.

    Examples:

    ```python
    >>> import torch
    >>> from s2t_hf.selection import expected_bin_value
    >>> expected_bin_value(torch.zeros(2, 4), torch.linspace(0, 1, 4))
    tensor([0.5000, 0.5000])

    ```
    """
    if bin_logits.shape[-1] != bin_values.shape[-1] or bin_values.dim() != 1:
        raise ValueError(
            f"`bin_logits` must end with one logit per bin ({bin_values.shape[-1]} bins in `bin_values` of shape "
            f"{tuple(bin_values.shape)}), got shape {tuple(bin_logits.shape)}."
        )
    probs = torch.softmax(bin_logits.float(), dim=-1)
    return probs @ bin_values.to(device=probs.device, dtype=torch.float32)


def selector_log_probs(
    logits: torch.Tensor, candidate_ids: torch.Tensor, blocked_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """
    Log-probabilities of the candidates under next-token `logits`, with `blocked_ids` (the bins) excluded from the
    softmax, in float32: the selector's own term of the `residual` form.

    Args:
        logits (`torch.Tensor` of shape `(batch, vocab)`): next-token logits at the decision step.
        candidate_ids (`torch.Tensor` of shape `(batch, K)`): the candidates.
        blocked_ids (`torch.Tensor`, *optional*): ids left out of the softmax.

    Returns:
        `torch.Tensor` of shape `(batch, K)`, float32.
    """
    logits = logits.float()
    if blocked_ids is not None and blocked_ids.numel():
        logits = logits.index_fill(-1, blocked_ids.to(logits.device), float("-inf"))
    return torch.log_softmax(logits, dim=-1).gather(-1, candidate_ids.to(logits.device))


def local_candidate_logits(
    bin_logits: torch.Tensor,
    bin_values: torch.Tensor,
    scoring: str = "pure",
    residual_tau: float = 0.1,
    student_log_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Candidate logits of S2T-Local: the processor selects their argmax and the trainer's loss is computed on them.

    - `pure`: the expected bin value (paper).
    - `residual`: the student's log-probability of the candidate plus expected bin value / `residual_tau`, so the
      selector learns a correction to the student's own ranking (why: docs/settings.md, "Residual or pure scoring").
      The log-probabilities are the selector's (adapter on) or, with `residual_log_probs="student"`, the student's
      as it generates; the caller passes whichever applies.

    Args:
        bin_logits (`torch.Tensor` of shape `(batch, K, B)`): reserved-row logits at each candidate's position.
        bin_values (`torch.Tensor` of shape `(B,)`): the bin values.
        scoring (`str`, *optional*, defaults to `"pure"`): `"pure"` or `"residual"`.
        residual_tau (`float`, *optional*, defaults to 0.1): temperature of the score in the residual form.
        student_log_probs (`torch.Tensor` of shape `(batch, K)`, *optional*): needed by the residual form.

    Returns:
        `torch.Tensor` of shape `(batch, K)`, float32.
    """
    score = expected_bin_value(bin_logits, bin_values)
    if scoring == "pure":
        return score
    if scoring == "residual":
        if student_log_probs is None:
            raise ValueError("The `residual` scoring form needs `student_log_probs` of the candidates.")
        return student_log_probs.float() + score / residual_tau
    raise ValueError(f"`scoring` must be 'pure' or 'residual', got {scoring!r}.")


# ---------------------------------------------------------------------------------------------------------------------
# Selection policies: which token a triggered row emits. The processor builds one from `config.selection` through
# `SELECTIONS`.


@dataclasses.dataclass
class Selection:
    """
    The outcome of a decided step.

    Args:
        chosen (`torch.LongTensor` of shape `(batch,)`): the token each triggered row emits (-1 in other rows).
        teacher_choice (`TeacherChoice`, *optional*): the teacher's answer for the triggered rows.
        local_logits (`torch.Tensor` of shape `(n, K)`, *optional*): the local selector's candidate logits of the `n`
            triggered rows.
        positions (`torch.LongTensor` of shape `(n,)`, *optional*): the chosen candidate's position (0..K-1) in each
            triggered row, where the policy knows it.
    """

    chosen: torch.Tensor
    teacher_choice: Any = None
    local_logits: torch.Tensor | None = None
    positions: torch.Tensor | None = None


@dataclasses.dataclass
class PendingSelection:
    """
    A triggered step waiting for its selection: the step's rows, which of them triggered, and their candidates. The
    selection policies decide it; the fused loop holds it until its decoding forward has scored the candidates.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch, length)`): the sequences so far.
        mask (`torch.LongTensor` of shape `(batch, length)`): their attention mask (left padding included).
        signal (`torch.Tensor` of shape `(batch,)`, *optional*): the trigger's signal.
        triggered (`torch.BoolTensor` of shape `(batch,)`): the rows that triggered.
        candidate_ids (`torch.LongTensor` of shape `(batch, K)`): every row's top-K candidates, best first.
        candidate_log_probs (`torch.FloatTensor` of shape `(batch, K)`): the student's log-probabilities of them.
        valid (`torch.BoolTensor` of shape `(batch, K)`): the candidates that may be chosen.
        teacher_log_probs (`torch.FloatTensor` of shape `(batch, vocab)`, *optional*): the teacher's distribution,
            where the step already computed it (the `kl` trigger).
    """

    input_ids: torch.Tensor
    mask: torch.Tensor
    signal: torch.Tensor | None
    triggered: torch.Tensor
    candidate_ids: torch.Tensor
    candidate_log_probs: torch.Tensor
    valid: torch.Tensor
    teacher_log_probs: torch.Tensor | None = None


class SelectionPolicy:
    """
    Chooses the token of every triggered row of a step. Built once by the processor from its config.

    To add a selection kind, subclass this and register it: `SELECTIONS["name"] = MySelection`;
    `S2TConfig(selection="name")` then selects it.

    Class attributes:
        needs_teacher (`bool`): whether the policy asks a teacher.
        scores_candidates (`bool`): whether the policy reads the student's logits after each candidate (the fused loop
            can then score them inside its decoding forward: [`complete`]).

    Args:
        config (`S2TConfig`): the processor's settings.
        teacher (`Teacher`, *optional*): the teacher, for the policies that ask one.
        scorer (`LocalScorer`, *optional*): the forward that scores candidates, for local selection.
        selector (`S2TSelector`, *optional*): the local selector (bin rows and values).
        with_log_probs (`bool`, *optional*, defaults to `False`): ask the teacher for the candidates' probabilities
            (trigger records).
    """

    needs_teacher = False
    scores_candidates = False

    def __init__(self, config, *, teacher=None, scorer=None, selector=None, with_log_probs: bool = False):
        self.config = config
        self.teacher = teacher
        self.scorer = scorer
        self.selector = selector
        self.with_log_probs = with_log_probs

    def select(self, step, pending: PendingSelection) -> Selection:
        """
        The token of every triggered row of `step` (a [`~s2t_hf.steps.DecodingStep`]) among its candidates
        (`pending`).
        """
        raise NotImplementedError


class _TeacherPolicy(SelectionPolicy):
    needs_teacher = True

    def select(self, step, pending: PendingSelection) -> Selection:
        triggered, candidate_ids = pending.triggered, pending.candidate_ids
        # the teacher answers for the triggered rows only (a remote teacher is asked about nothing else)
        rows = triggered.nonzero()[:, 0]
        choice = self.ask(step, rows, candidate_ids[rows], pending.valid[rows])
        chosen = torch.full_like(candidate_ids[:, 0], -1)
        chosen[rows] = choice.token_ids
        # a token the earlier logits processors ruled out is never emitted: where a teacher had no allowed token to
        # give (-1) or gave a ruled-out one, the row keeps the student's top-1
        ruled_out = ~torch.isfinite(step.scores.gather(-1, chosen.clamp_min(0)[:, None])[:, 0]) | (chosen < 0)
        chosen = torch.where(triggered & ruled_out, candidate_ids[:, 0], chosen)
        return Selection(chosen, teacher_choice=choice, positions=choice.positions)

    def ask(self, step, rows: torch.Tensor, candidate_ids: torch.Tensor, valid: torch.Tensor):
        raise NotImplementedError


class TeacherSelection(_TeacherPolicy):
    """Collaborative S2T: the valid candidate the teacher finds most probable."""

    def ask(self, step, rows, candidate_ids, valid):
        return self.teacher.select(
            step.input_ids, step.attention_mask, rows, candidate_ids, valid, with_log_probs=self.with_log_probs
        )


class TakeoverSelection(_TeacherPolicy):
    """The baseline: the teacher's own argmax among the tokens the earlier logits processors left."""

    def ask(self, step, rows, candidate_ids, valid):
        # (min_new_tokens, bad words, grammars... leave some tokens finite)
        return self.teacher.takeover(
            step.input_ids, step.attention_mask, rows, candidate_ids,
            allowed=torch.isfinite(step.scores[rows]), with_log_probs=self.with_log_probs,
        )


class LocalSelection(SelectionPolicy):
    """S2T-Local: the candidate with the highest candidate logit under the trained selector's bins."""

    scores_candidates = True

    def __init__(self, config, *, teacher=None, scorer=None, selector=None, with_log_probs: bool = False):
        super().__init__(config, teacher=teacher, scorer=scorer, selector=selector, with_log_probs=with_log_probs)
        # the rows left out of the selector's own softmax (residual form): every reserved row (bins, trigger)
        self.blocked_ids = torch.tensor(sorted(selector.reserved_token_ids), dtype=torch.long)

    def select(self, step, pending: PendingSelection) -> Selection:
        triggered = pending.triggered
        logits = self.scorer.score(pending.input_ids, pending.mask, pending.candidate_ids[triggered], triggered)
        return self.complete(pending, logits)

    def complete(self, pending: PendingSelection, logits: torch.Tensor) -> Selection:
        """
        The selection of a step from the student's logits after the candidates of its triggered rows.

        Args:
            pending (`PendingSelection`): the step's triggered rows and candidates.
            logits (`torch.Tensor` of shape `(triggered, K, vocab)`): the logits after each candidate
                (`(triggered, 1 + K, vocab)` when the last token was encoded again, its logits first).
        """
        triggered = pending.triggered
        candidate_ids = pending.candidate_ids[triggered]
        if self.scorer.encodes_last_token:
            candidate_log_probs = selector_log_probs(logits[:, 0], candidate_ids, self.blocked_ids)
            logits = logits[:, 1:]
        else:
            candidate_log_probs = pending.candidate_log_probs[triggered]
        local_logits = local_candidate_logits(
            logits[..., self.selector.bin_token_ids],
            self.selector.bin_values,
            self.config.scoring,
            self.config.residual_tau,
            candidate_log_probs,
        )
        positions = local_logits.masked_fill(~pending.valid[triggered], float("-inf")).argmax(-1)
        chosen = torch.full_like(pending.candidate_ids[:, 0], -1)
        chosen[triggered] = candidate_ids.gather(-1, positions[:, None])[:, 0]
        return Selection(chosen, local_logits=local_logits, positions=positions)


#: The selection kinds `S2TConfig.selection` accepts, by name.
SELECTIONS: dict[str, type[SelectionPolicy]] = {
    "teacher": TeacherSelection,
    "takeover": TakeoverSelection,
    "local": LocalSelection,
}
