"""[`CrossTokenizerScorer`]: a local teacher with its own tokenizer scores the student's candidates as text.

S2T's teacher never generates: at a trigger it only compares the student's K candidates after a shared text. Across
tokenizers that comparison is made on strings. For one row:

1. The context is the teacher's prompt (its own, or the student's prompt as text) followed by the student's
   continuation as exact bytes ([`~s2t_hf.teachers.token_text.TokenText`]; no decode clean-up). An incomplete UTF-8
   character at its end is carried over into the candidates.
2. The teacher encodes the context `c` and every candidate string `c + s_k` in one batched call. Its tokenization of
   the context may change when a candidate is appended (a context ending mid-word: "the" + "n" is one token "then").
   The *trunk* is the longest token prefix all these encodings share; the rest of the context (the remainder `r`) is
   scored again inside each branch. This is the boundary repair: it backs off exactly as far as the teacher's own
   tokenizer needs.
3. The K branches (`r + s_k` as the teacher tokenizes them) are teacher-forced in one forward that shares the trunk's
   KV cache. A candidate's score is `log P(enc(c + s_k)) - log P(enc(c))`: the log-likelihood of the whole string
   under the teacher's canonical tokenization, relative to the context's (exact for the comparison; the same value
   as `log P(s_k | c)` when the remainder is empty).
4. A candidate whose string is a strict prefix of another's (" the" and " then") is corrected by the teacher's
   probability of *not* going on towards the longer one: `log(1 - P(next token agrees with the extra text))`.
5. An end token of the student (its EOS, end-of-turn) is scored as the teacher's end tokens (their probabilities
   summed). A candidate that cannot be scored as text (another special token, an incomplete UTF-8 character even with
   the carried-over bytes, an empty string) is left out (never chosen; its score is `-inf`). When that is the
   student's own top-1, the row is *unscored*: the student keeps its token, and the `teacher_unscored` statistic
   counts it.

Per row the scorer keeps the trunk's KV cache across triggers; a trunk that does not extend the cached one (rare: the
teacher's tokenization changed further back) is encoded again from the start.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from ..kv import cache_argument, model_device, unwrap_model
from .base import vocabulary_difference
from .teacher_prompts import RenderedPrompt, leading_special_ids, render_teacher_prompt
from .token_text import TokenText, end_token_ids, split_incomplete_utf8


__all__ = ["CrossTokenizerScorer", "RowScores", "ScoringPlan", "generation_end_ids", "uses_text_scoring"]


def generation_end_ids(model: torch.nn.Module) -> list[int]:
    """The end-of-sequence ids of `model`'s generation config (a PEFT model is unwrapped), as a list."""
    eos = getattr(getattr(unwrap_model(model), "generation_config", None), "eos_token_id", None)
    return [eos] if isinstance(eos, int) else list(eos or [])


def uses_text_scoring(candidate_scoring: str, student_tokenizer: Any, teacher_tokenizer: Any) -> bool:
    """
    Whether a teacher scores the candidates as text: `candidate_scoring="text"`, or `"auto"` with two tokenizers
    whose vocabularies differ ([`~s2t_hf.teachers.vocabulary_difference`]). `"tokens"` with different vocabularies
    raises a `ValueError` that points to `"auto"`.
    """
    difference = None
    if student_tokenizer is not None and teacher_tokenizer is not None:
        difference = vocabulary_difference(student_tokenizer, teacher_tokenizer)
    if candidate_scoring == "text" or (candidate_scoring == "auto" and difference is not None):
        return True
    if difference is not None:
        raise ValueError(
            f"The teacher's tokenizer is not the student's: {difference}. `candidate_scoring='tokens'` compares the "
            "two models token by token, which needs one tokenizer. Use `candidate_scoring='auto'` (or 'text') to "
            "score the candidates as text under the teacher's own tokenizer."
        )
    return False


@dataclass
class RowScores:
    """
    The teacher's scores of one row's candidates.

    Args:
        log_probs (`list[float]`): per candidate, `log P(enc(context + candidate)) - log P(enc(context))`
            (`-inf` for an invalid candidate).
        scored (`bool`): whether the student's top-1 could be scored exactly (candidates that could not are `-inf`);
            when `False` the student keeps its own token.
    """

    log_probs: list[float]
    scored: bool


@dataclass
class ScoringPlan:
    """
    What the teacher reads to score one row's candidates: the `trunk` (teacher tokens shared by the context and every
    candidate string), the context's `remainder` after it, and per text candidate `k` its string and its `branch`
    (the teacher's tokens of remainder + candidate after the trunk); per special candidate the teacher ids it stands
    for.
    """

    trunk: list[int]
    remainder: list[int]
    strings: dict[int, str]
    branches: dict[int, list[int]]
    specials: dict[int, list[int]]
    num_candidates: int

    def forced(self) -> list[list[int]]:
        """The token sequences to teacher-force after the trunk: each branch, then the remainder (when not empty)."""
        return [*self.branches.values(), *([self.remainder] if self.remainder else [])]


@dataclass
class _RowCache:
    ids: list[int]
    cache: Any
    last: torch.Tensor  # the teacher's log-probabilities after `ids`, float32


def _common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for i in range(length):
        if any(s[i] != first[i] for s in sequences[1:]):
            return i
    return length


class CrossTokenizerScorer:
    """
    Scores the student's candidates as text under a local teacher's own tokenizer (see the module's description).

    Args:
        model (`PreTrainedModel` or `None`): the teacher model; `None` for a teacher asked elsewhere (a served one),
            which uses only [`~CrossTokenizerScorer.plan`], [`~CrossTokenizerScorer.finish`] and the text helpers.
        tokenizer (`PreTrainedTokenizerBase`): the teacher's tokenizer.
        student_tokenizer (`PreTrainedTokenizerBase`): the student's tokenizer.
        student_end_ids (`Sequence[int]`, *optional*): more ids that end the student's reply (its generation config's
            `eos_token_id`).
        counters (`Teacher`, *optional*): the teacher whose `calls` and `tokens` count the forwards.
        teacher_end_ids (`Sequence[int]`, *optional*): more ids that end the teacher's reply; defaults to the model's
            generation config's `eos_token_id`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        student_tokenizer: Any,
        student_end_ids: Sequence[int] = (),
        counters: Any = None,
        teacher_end_ids: Sequence[int] | None = None,
    ):
        self.model = unwrap_model(model) if model is not None else None
        self.tokenizer = tokenizer
        self.student_tokenizer = student_tokenizer
        self.student_text = TokenText(student_tokenizer)
        self.teacher_text = TokenText(tokenizer)
        teacher_eos = teacher_end_ids
        if teacher_eos is None:
            teacher_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        teacher_eos = [teacher_eos] if isinstance(teacher_eos, int) else list(teacher_eos or [])
        self.teacher_end_ids = end_token_ids(tokenizer, teacher_eos)
        self.student_end_ids = set(end_token_ids(student_tokenizer, student_end_ids))
        self.student_skipped_ids = {
            int(i) for i in (student_tokenizer.bos_token_id, student_tokenizer.pad_token_id) if i is not None
        }
        # a plain-text prompt starts after the teacher's BOS: the one its tokenizer adds, or else its `bos_token`
        # in place of a student prompt's leading BOS
        self.default_prefix = leading_special_ids(tokenizer)
        self.teacher_bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.counters = counters
        self.prompts: list[RenderedPrompt] | None = None
        self._by_first_byte: dict[int, list[tuple[int, bytes]]] | None = None
        self.rows: dict[int, _RowCache] = {}

    # ------------------------------------------------------------------ per generation

    def reset(self) -> None:
        """Forgets the per-row caches and the teacher prompts."""
        self.rows = {}
        self.prompts = None

    def set_prompts(self, prompts: Sequence[Any] | None) -> None:
        """The teacher prompt of each row (strings or chat messages), or `None` for the student's prompt as text."""
        self.rows = {}
        self.prompts = None if prompts is None else [render_teacher_prompt(p, self.tokenizer) for p in prompts]

    # ------------------------------------------------------------------ text

    def context(self, key: int, prompt_ids: Sequence[int], continuation_ids: Sequence[int]):
        """
        `(prefix_ids, text, tail)` of a row: the teacher's tokens before the text, the text (teacher prompt and the
        student's continuation up to its last complete character) and the incomplete character's bytes after it; or
        `None` when the continuation cannot be read as bytes.
        """
        if self.prompts is not None:
            prefix, prompt_text = self.prompts[key].prefix_ids, self.prompts[key].text
        else:
            kept = [i for i in prompt_ids if int(i) not in self.student_skipped_ids]
            prefix = self.default_prefix
            if not prefix and prompt_ids and int(prompt_ids[0]) == self.student_tokenizer.bos_token_id:
                prefix = self.teacher_bos
            prompt_text = self.student_text.text(kept)
        continuation = self.student_text.continuation_bytes(prompt_ids, continuation_ids)
        if continuation is None:
            return None
        complete, tail = split_incomplete_utf8(continuation)
        return list(prefix), prompt_text + complete.decode("utf-8", errors="replace"), tail

    def context_token_ids(
        self, key: int, prompt_ids: Sequence[int], continuation_ids: Sequence[int]
    ) -> list[int] | None:
        """The teacher's tokens of a row's whole context (takeover), or `None` when it ends in an incomplete character
        or cannot be read as bytes."""
        context = self.context(key, prompt_ids, continuation_ids)
        if context is None or context[2]:
            return None
        prefix, text, _ = context
        return [*prefix, *self._encode([text])[0]]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ forwards

    def _count(self, tokens: int) -> None:
        if self.counters is not None:
            self.counters.calls += 1
            self.counters.tokens += tokens

    @torch.no_grad()
    def _advance(self, key: int, trunk: list[int]) -> _RowCache:
        """The row's cache holding `trunk` (extended from the cached tokens, or encoded again)."""
        row = self.rows.get(key)
        if row is not None and len(row.ids) <= len(trunk) and trunk[: len(row.ids)] == row.ids:
            new = trunk[len(row.ids) :]
            if not new:
                return row
        else:
            row = _RowCache([], DynamicCache(config=self.model.config), torch.empty(0))
            new = trunk
        device = model_device(self.model)
        start = len(row.ids)
        logits = self.model(
            input_ids=torch.tensor([new], device=device),
            attention_mask=torch.ones(1, len(trunk), dtype=torch.long, device=device),
            position_ids=torch.arange(start, len(trunk), device=device)[None],
            use_cache=True,
            logits_to_keep=1,
            **{cache_argument(self.model): row.cache},
        ).logits[0, -1]
        self._count(len(new))
        row.ids, row.last = list(trunk), torch.log_softmax(logits.float(), dim=-1)
        self.rows[key] = row
        return row

    @torch.no_grad()
    def _branches(self, row: _RowCache, branches: list[list[int]]) -> tuple[list[list[float]], torch.Tensor]:
        """
        Teacher-forces `branches` after the row's trunk in one forward sharing its cache: each branch's token
        log-probabilities, and the teacher's log-probabilities after each whole branch, shape `(n, vocab)`.
        """
        device = model_device(self.model)
        n, width, trunk = len(branches), max(len(b) for b in branches), len(row.ids)
        ids = torch.zeros(n, width, dtype=torch.long, device=device)
        mask = torch.ones(n, trunk + width, dtype=torch.long, device=device)
        for i, branch in enumerate(branches):
            ids[i, : len(branch)] = torch.tensor(branch, device=device)
            mask[i, trunk + len(branch) :] = 0
        cache = copy.deepcopy(row.cache)
        cache.batch_repeat_interleave(n)
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=torch.arange(trunk, trunk + width, device=device)[None].expand(n, -1),
            use_cache=True,
            **{cache_argument(self.model): cache},
        ).logits
        self._count(sum(len(b) for b in branches))
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        # the distribution before each branch token: the trunk's last, then the branch's own positions
        before = torch.cat([row.last.to(log_probs.device)[None, None].expand(n, 1, -1), log_probs[:, :-1]], dim=1)
        token_log_probs = before.gather(-1, ids[..., None].to(before.device))[..., 0]
        lengths = torch.tensor([len(b) for b in branches], device=log_probs.device)
        after = log_probs[torch.arange(n, device=log_probs.device), lengths - 1]
        return [token_log_probs[i, : len(b)].tolist() for i, b in enumerate(branches)], after

    # ------------------------------------------------------------------ scoring

    def special_as_teacher_ids(self, student_id: int) -> list[int] | None:
        """
        The teacher tokens a special student token stands for: the teacher's special token of the same text (e.g.
        `<|im_start|>` in both), else the teacher's end tokens for a student end token (EOS, end-of-turn); `None` for
        a plain-text token (and `[]` for a special token the teacher has no counterpart of).
        """
        if student_id not in self.student_text.special_ids and student_id not in self.student_end_ids:
            return None
        content = self.student_tokenizer.convert_ids_to_tokens(student_id)
        teacher_id = self.tokenizer.convert_tokens_to_ids(content) if content is not None else None
        same_text = teacher_id is not None and self.tokenizer.convert_ids_to_tokens(teacher_id) == content
        if same_text and teacher_id in self.teacher_text.special_ids:
            return [teacher_id]
        return list(self.teacher_end_ids) if student_id in self.student_end_ids else []

    def _teacher_tokens_by_first_byte(self) -> dict[int, list[tuple[int, bytes]]]:
        if self._by_first_byte is None:
            index: dict[int, list[tuple[int, bytes]]] = {}
            for i in range(len(self.tokenizer)):
                if i in self.teacher_text.special_ids:
                    continue
                data = self.teacher_text.following_bytes(i)
                if data:
                    index.setdefault(data[0], []).append((i, data))
            self._by_first_byte = index
        return self._by_first_byte

    def towards(self, extensions: list[bytes]) -> list[int]:
        """Teacher tokens whose bytes agree with one of `extensions` (one is a prefix of the other), for the
        correction of a candidate that is a string prefix of others."""
        if not extensions:
            return []
        index = self._teacher_tokens_by_first_byte()
        ids = set()
        for extension in extensions:
            for i, data in index.get(extension[0], []):
                if data.startswith(extension) or extension.startswith(data):
                    ids.add(i)
        return sorted(ids)

    def corrections(self, plan: ScoringPlan) -> dict[int, list[int]]:
        """Per text candidate `k` that is a string prefix of others, the teacher tokens towards the longer ones (step
        4; read after its branch)."""
        corrections = {}
        for k, string in plan.strings.items():
            extensions = [s[len(string) :].encode() for j, s in plan.strings.items() if j != k and s.startswith(string)]
            towards = self.towards([e for e in extensions if e])
            if towards:
                corrections[k] = towards
        return corrections

    def after_reads(self, plan: ScoringPlan) -> dict[int | None, list[int]]:
        """
        The teacher ids whose log-probabilities [`~CrossTokenizerScorer.finish`] reads after forced sequence `i` of
        `plan.forced()` (`None`: after the trunk alone), for a teacher that is asked for them ahead (a served one).
        """
        reads: dict[int | None, set[int]] = {}
        corrections = self.corrections(plan)
        for i, k in enumerate(plan.strings):
            reads.setdefault(i, set()).update(corrections.get(k, []))
        after_remainder = len(plan.branches) if plan.remainder else None
        for teacher_ids in plan.specials.values():
            reads.setdefault(after_remainder, set()).update(teacher_ids)
        return {i: sorted(ids) for i, ids in reads.items() if ids}

    def plan(
        self, key: int, prompt_ids: Sequence[int], continuation_ids: Sequence[int], candidate_ids: Sequence[int],
        valid: Sequence[bool],
    ) -> ScoringPlan | None:
        """
        What the teacher must read to score one row's candidates (steps 1, 2 and 5 of the module's description), with
        no forward: the trunk and the branches, or `None` when the row cannot be scored (the student keeps its token).
        """
        context = self.context(key, prompt_ids, continuation_ids)
        if context is None:
            return None
        prefix, text, tail = context
        strings: dict[int, str] = {}
        specials: dict[int, list[int]] = {}
        context_ids = [*prompt_ids, *continuation_ids]
        for k, (candidate, ok) in enumerate(zip(candidate_ids, valid)):
            if not ok:
                continue
            candidate = int(candidate)
            special = self.special_as_teacher_ids(candidate)
            if special is not None:
                if special and not tail:
                    specials[k] = special
                elif k == 0:
                    return None  # a special token the teacher cannot read here: the student keeps it
                continue
            data = self.student_text.continuation_bytes(context_ids, [candidate])
            try:
                string = (tail + data).decode("utf-8") if data else None
            except UnicodeDecodeError:  # still an incomplete character: only the next token can tell
                string = None
            if string is None and k == 0:
                return None  # the student's own token cannot be compared: it keeps it
            if string is not None:
                strings[k] = string
        encodings = self._encode([text, *(text + s for s in strings.values())])
        context_tokens = [*prefix, *encodings[0]]
        branches = {k: [*prefix, *e] for k, e in zip(strings, encodings[1:])}
        trunk_length = _common_prefix([context_tokens, *branches.values()])
        if trunk_length == 0 or len(branches.get(0, [None] * (trunk_length + 1))) == trunk_length:
            return None  # no token to condition on, or a top-1 the teacher's tokenizer drops
        # a candidate the teacher's tokenizer drops entirely (no token of its own) cannot be compared
        branches = {k: b[trunk_length:] for k, b in branches.items() if len(b) > trunk_length}
        return ScoringPlan(
            trunk=context_tokens[:trunk_length],
            remainder=context_tokens[trunk_length:],
            strings={k: strings[k] for k in branches},
            branches=branches,
            specials=specials,
            num_candidates=len(candidate_ids),
        )

    def finish(self, plan: ScoringPlan, token_log_probs: list[list[float]], log_probs_after: Any) -> RowScores:
        """
        The candidates' scores from the teacher's answers about `plan.forced()` (steps 3 to 5).

        Args:
            plan (`ScoringPlan`): the row's plan.
            token_log_probs (`list[list[float]]`): per forced sequence, the log-probabilities of its tokens.
            log_probs_after (`Callable[[int | None, list[int]], torch.Tensor]`): the teacher's log-probabilities of
                given token ids after the trunk and forced sequence `i` (`None`: after the trunk alone).
        """
        remainder_log_prob = sum(token_log_probs[-1]) if plan.remainder else 0.0
        log_probs = [float("-inf")] * plan.num_candidates
        corrections = self.corrections(plan)
        for i, k in enumerate(plan.strings):
            log_probs[k] = sum(token_log_probs[i]) - remainder_log_prob
            towards = corrections.get(k)
            if towards:
                mass = float(log_probs_after(i, towards).exp().sum())
                log_probs[k] += math.log1p(-min(mass, 1.0 - 1e-6))
        after_remainder = len(plan.branches) if plan.remainder else None
        for k, teacher_ids in plan.specials.items():
            log_probs[k] = float(torch.logsumexp(log_probs_after(after_remainder, teacher_ids).float(), dim=0))
        return RowScores(log_probs, scored=True)

    def score(
        self, key: int, prompt_ids: Sequence[int], continuation_ids: Sequence[int], candidate_ids: Sequence[int],
        valid: Sequence[bool],
    ) -> RowScores:
        """The teacher's scores of one row's candidates (see the module's description)."""
        plan = self.plan(key, prompt_ids, continuation_ids, candidate_ids, valid)
        if plan is None:
            return RowScores([0.0 if v else float("-inf") for v in valid], scored=False)
        row = self._advance(key, plan.trunk)
        forced = plan.forced()
        token_log_probs, after = self._branches(row, forced) if forced else ([], None)

        def log_probs_after(i: int | None, ids: list[int]) -> torch.Tensor:
            return (row.last if i is None else after[i])[ids]

        return self.finish(plan, token_log_probs, log_probs_after)

    def greedy_token(
        self, key: int, prompt_ids: Sequence[int], continuation_ids: Sequence[int], allowed: Any = None
    ) -> int | None:
        """
        Takeover: the teacher's greedy next token after the row's text, as the student's token that starts its text
        (the student's first end token for a teacher end token), or `None` when it cannot be written so (it needs
        another student token first, is ruled out by `allowed`, or the context ends in an incomplete character).

        A teacher token whose text the student writes with several tokens advances by its first: the student goes
        on from the new text, and the teacher is asked again at the next trigger.
        """
        tokens = self.context_token_ids(key, prompt_ids, continuation_ids)
        if tokens is None:
            return None
        row = self._advance(key, tokens)
        return self.student_token(int(row.last.argmax()), [*prompt_ids, *continuation_ids], allowed)

    def student_token(self, teacher_id: int, context_ids: Sequence[int], allowed: Any = None) -> int | None:
        """
        A teacher token as the student's token that starts its text after `context_ids` (the student's first end
        token for a teacher end token), or `None` when it cannot be written so or `allowed` rules it out.
        """
        if teacher_id in self.teacher_end_ids:
            ends = sorted(self.student_end_ids)
            eos = self.student_tokenizer.eos_token_id
            student = eos if eos is not None else (ends[0] if ends else None)
        else:
            student = self._student_token_for(self.teacher_text.token_bytes(teacher_id), list(context_ids))
        if student is None or (allowed is not None and not bool(allowed[student])):
            return None
        return student

    def _student_token_for(self, data: bytes, context_ids: list[int]) -> int | None:
        """The student token that starts `data` after `context_ids` (its tokenization of the text's first token)."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        ids = self.student_tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if not ids:
            return None
        first = self.student_text.continuation_bytes(context_ids, [ids[0]])
        return int(ids[0]) if first and data.startswith(first) else None
