"""[`RemoteTextScoring`]: a served teacher ([`~s2t_hf.teachers.RemoteTeacher`]) with another tokenizer than the
student's scores the candidates as text, as the local teacher does with
[`~s2t_hf.teachers.cross_tokenizer.CrossTokenizerScorer`].

The scorer plans each row with no forward ([`~s2t_hf.teachers.cross_tokenizer.CrossTokenizerScorer.plan`]: the
teacher's tokens of the shared trunk, and per candidate the branch it teacher-forces). This module asks the server, per
distinct prefix `trunk + branch[:j]`, for the log-probabilities of the token ids the scorer needs next (the branch's
next token; after a whole branch, the tokens of the prefix correction and the end tokens), and hands them back to the
scorer ([`~s2t_hf.teachers.cross_tokenizer.CrossTokenizerScorer.finish`]). With a server that serves vLLM's
`logprob_token_ids` that is one request per prefix (up to 128 ids each); otherwise one request per id, constrained to
it (`allowed_token_ids=[id]`). Takeover asks for the teacher's greedy token after the whole context and emits the
student's token that starts its text ([`~s2t_hf.teachers.cross_tokenizer.CrossTokenizerScorer.student_token`]).

It knows the vLLM protocol only through the callable it is given, which sends one `/v1/completions` request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .base import Teacher, TeacherChoice
from .cross_tokenizer import CrossTokenizerScorer, ScoringPlan
from .transport import JSONClient, ServerError


__all__ = ["RemoteTextScoring", "serves_logprob_token_ids"]

# the most ids vLLM reads in one `logprob_token_ids` request (its `MAX_LOGPROB_TOKEN_IDS`)
_MAX_LOGPROB_TOKEN_IDS = 128
_ID_LOG_PROBS = ("logprob_token_ids", "allowed_token_ids")


def serves_logprob_token_ids(complete: Callable[..., dict[str, Any]], tokenizer: Any) -> bool:
    """
    Whether the server behind `complete` answers vLLM's `logprob_token_ids` (two probe requests).

    Args:
        complete (`Callable[..., dict]`):
            One `/v1/completions` request, as [`RemoteTextScoring`] takes it.
        tokenizer (`PreTrainedTokenizerBase`):
            The served model's tokenizer.

    Returns:
        `bool`: `False` when the server rejects the field (an HTTP 4xx answer) or ignores it; a [`ServerError`] with
        another status is raised.
    """
    prompt = list(tokenizer("12 + 7 =")["input_ids"]) or [0]
    greedy = complete(prompt, logprobs=1)["token"]
    probe = [i for i in (len(tokenizer) - 1, len(tokenizer) // 2, 1) if i != greedy][:2]
    try:
        answer = complete(prompt, logprobs=len(probe), logprob_token_ids=probe)
    except ServerError as error:
        if error.status is None or error.status >= 500:
            raise
        return False  # a server that rejects the field
    # a server that ignores the field answers its top-2, which holds the greedy token: never both probe ids
    return all(i in answer["top"] for i in probe)


class RemoteTextScoring:
    r"""
    The text path of a served teacher: [`~s2t_hf.teachers.RemoteTeacher`] builds one in `prepare` when its tokenizer
    is not the student's, and hands it `select`, `takeover`, `candidate_log_probs` and `score_trajectories` (the same
    arguments and answers as the [`~s2t_hf.teachers.Teacher`] interface). The values are exact, so the choices are the
    local teacher's. See the module's description.

    Args:
        scorer (`CrossTokenizerScorer`):
            The scorer without a model (`CrossTokenizerScorer(None, teacher_tokenizer, student_tokenizer, ...)`): it
            plans the rows and finishes their scores.
        complete (`Callable[..., dict]`):
            One `/v1/completions` request: `complete(prompt_ids, **params)` sends the teacher-token prompt with the
            sampling parameters `params` (`logprobs`, `allowed_token_ids`, `logprob_token_ids`) and returns the
            answer's generated token, its log-probability and its top log-probabilities as
            `{"token": int, "log_prob": float, "top": dict[int, float]}`.
        client (`JSONClient`):
            The client that carries the requests: its `map` sends them concurrently; its `base_url` and
            `error_class` make the errors.
        id_log_probs (`str`):
            How the log-probabilities of given ids are read: `"logprob_token_ids"` (vLLM's extension, up to 128 ids a
            request) or `"allowed_token_ids"` (one request per id, constrained to it). [`serves_logprob_token_ids`]
            tells which one a server serves.
        teacher (`Teacher`):
            The teacher it scores for: its `row_tokens` and `prompt_lengths` split a row into prompt and
            continuation, and its `calls` and `tokens` count the requests.
        max_model_len (`int`, *optional*):
            The server's longest context; a longer teacher prompt raises `client.error_class`.
    """

    def __init__(
        self,
        scorer: CrossTokenizerScorer,
        complete: Callable[..., dict[str, Any]],
        client: JSONClient,
        *,
        id_log_probs: str,
        teacher: Teacher,
        max_model_len: int | None = None,
    ):
        if id_log_probs not in _ID_LOG_PROBS:
            raise ValueError(
                f"`id_log_probs` must be 'logprob_token_ids' or 'allowed_token_ids', got {id_log_probs!r}. "
                "`serves_logprob_token_ids(complete, tokenizer)` tells which one the server serves."
            )
        self.scorer = scorer
        self.complete = complete
        self.client = client
        self.id_log_probs = id_log_probs
        self.teacher = teacher
        self.max_model_len = max_model_len

    # ------------------------------------------------------------------ the requests

    def _check_length(self, prompt: Sequence[int]) -> None:
        if self.max_model_len is not None and len(prompt) >= self.max_model_len:
            raise self.client.error_class(
                f"A context of {len(prompt)} teacher tokens does not fit the teacher server's `max_model_len` of "
                f"{self.max_model_len}. Restart the server with a larger `--max-model-len`."
            )

    def _log_probs_of_ids(self, queries: dict[tuple[int, ...], set[int]]) -> dict[tuple[int, ...], dict[int, float]]:
        """The teacher's log-probabilities of the given ids after each prompt (concurrent requests)."""
        jobs = []
        for prompt, ids in queries.items():
            self._check_length(prompt)
            ids = sorted(ids)
            width = _MAX_LOGPROB_TOKEN_IDS if self.id_log_probs == "logprob_token_ids" else 1
            jobs += [(prompt, ids[start : start + width]) for start in range(0, len(ids), width)]

        def one(job: tuple[tuple[int, ...], list[int]]) -> dict[int, float]:
            prompt, ids = job
            if self.id_log_probs == "allowed_token_ids":
                return {ids[0]: self.complete(list(prompt), logprobs=0, allowed_token_ids=ids)["log_prob"]}
            top = self.complete(list(prompt), logprobs=len(ids), logprob_token_ids=ids)["top"]
            if any(i not in top for i in ids):
                raise self.client.error_class(
                    f"The teacher server at {self.client.base_url} answered `logprob_token_ids` without some of the "
                    f"ids asked for ({[i for i in ids if i not in top][:5]})."
                )
            return {i: top[i] for i in ids}

        values: dict[tuple[int, ...], dict[int, float]] = {}
        for (prompt, _), answer in zip(jobs, self.client.map(one, jobs)):
            values.setdefault(prompt, {}).update(answer)
        self.teacher.tokens += sum(len(prompt) for prompt, _ in jobs)
        return values

    # ------------------------------------------------------------------ scores

    def _finish_plans(self, plans: list[ScoringPlan | None]) -> list:
        """The candidates' scores of each planned row (`None`: unscored), from one round of requests."""
        queries: dict[tuple[int, ...], set[int]] = {}
        for plan in plans:
            if plan is None:
                continue
            forced = plan.forced()
            for branch in forced:
                for j, token in enumerate(branch):
                    queries.setdefault(tuple(plan.trunk + branch[:j]), set()).add(token)
            for i, ids in self.scorer.after_reads(plan).items():
                queries.setdefault(tuple(plan.trunk + (forced[i] if i is not None else [])), set()).update(ids)
        values = self._log_probs_of_ids(queries)
        scores = []
        for plan in plans:
            if plan is None:
                scores.append(None)
                continue
            forced = plan.forced()
            token_log_probs = [
                [values[tuple(plan.trunk + branch[:j])][token] for j, token in enumerate(branch)] for branch in forced
            ]

            def log_probs_after(i: int | None, ids: list[int], plan=plan, forced=forced) -> torch.Tensor:
                after = values[tuple(plan.trunk + (forced[i] if i is not None else []))]
                return torch.tensor([after[t] for t in ids], dtype=torch.float32)

            scores.append(self.scorer.finish(plan, token_log_probs, log_probs_after))
        return scores

    def _scores(self, keyed_rows: list, candidate_ids: torch.Tensor, valid: torch.Tensor):
        """
        Text scoring of rows given as `(key, prompt_ids, continuation_ids)`: `(log_probs (n, K), unscored (n,))`, the
        log-probabilities `-inf` at candidates that cannot be scored and `nan` in unscored rows.
        """
        plans = [
            self.scorer.plan(key, prompt, continuation, candidates, ok)
            for (key, prompt, continuation), candidates, ok in zip(keyed_rows, candidate_ids.tolist(), valid.tolist())
        ]
        scores = self._finish_plans(plans)
        self.teacher.calls += 1
        width = candidate_ids.shape[1]
        device = candidate_ids.device
        log_probs = torch.tensor(
            [s.log_probs if s is not None else [float("nan")] * width for s in scores], dtype=torch.float32
        ).reshape(candidate_ids.shape)
        unscored = torch.tensor([s is None for s in scores], dtype=torch.bool)
        return log_probs.to(device), unscored.to(device)

    def _keyed_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor) -> list:
        return [(row, *self.teacher.row_tokens(input_ids, attention_mask, row)) for row in rows.tolist()]

    # ------------------------------------------------------------------ the interface

    def select(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        rows: torch.Tensor,
        candidate_ids: torch.Tensor,
        valid: torch.Tensor,
    ) -> TeacherChoice:
        """S2T selection: the valid candidate the teacher's text scores rank first (the student's own in unscored
        rows), with the scores as `candidate_log_probs`."""
        scores, unscored = self._scores(self._keyed_rows(input_ids, attention_mask, rows), candidate_ids, valid)
        positions = scores.masked_fill(~valid | scores.isnan(), float("-inf")).argmax(-1).masked_fill(unscored, 0)
        return TeacherChoice(
            token_ids=candidate_ids.gather(-1, positions[:, None])[:, 0],
            positions=positions,
            candidate_log_probs=scores,
            unscored=unscored,
        )

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
        """Takeover: the student's token that starts the text of the teacher's greedy token (`-1`, unscored, where
        there is none)."""
        keyed = self._keyed_rows(input_ids, attention_mask, rows)
        contexts = [self.scorer.context_token_ids(*row) for row in keyed]
        asked = [n for n, tokens in enumerate(contexts) if tokens is not None]
        for n in asked:
            self._check_length(contexts[n])

        def one(n: int) -> int:
            return self.complete(contexts[n], logprobs=0)["token"]

        tokens = [-1] * len(keyed)
        for n, best in zip(asked, self.client.map(one, asked)):
            _, prompt, continuation = keyed[n]
            token = self.scorer.student_token(
                best, [*prompt, *continuation], allowed=allowed[n] if allowed is not None else None
            )
            tokens[n] = -1 if token is None else token
        self.teacher.calls += 1
        self.teacher.tokens += sum(len(contexts[n]) for n in asked)
        token_ids = torch.tensor(tokens, dtype=torch.long, device=input_ids.device)
        log_probs = None
        if with_log_probs and candidate_ids is not None:
            log_probs, _ = self._scores(keyed, candidate_ids, torch.ones_like(candidate_ids, dtype=torch.bool))
        return TeacherChoice(token_ids=token_ids, candidate_log_probs=log_probs, unscored=token_ids < 0)

    def candidate_log_probs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, candidate_ids: torch.Tensor
    ) -> torch.Tensor:
        """The candidates' text scores, shape `(n, K)` (`nan` in unscored rows)."""
        valid = torch.ones_like(candidate_ids, dtype=torch.bool)
        return self._scores(self._keyed_rows(input_ids, attention_mask, rows), candidate_ids, valid)[0]

    def score_trajectories(
        self, trajectories: Sequence[Sequence[int]], positions: torch.Tensor, candidate_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced collection: the candidates' text scores at `(b, t)` positions of the trajectories, and `-1`
        as the top-1 (the teacher has none over the student's vocabulary)."""
        prompt_lengths = self.teacher.prompt_lengths or [0] * len(trajectories)
        keyed = [
            (b, list(trajectories[b][: prompt_lengths[b]]), list(trajectories[b][prompt_lengths[b] : t]))
            for b, t in positions.tolist()
        ]
        log_probs, _ = self._scores(keyed, candidate_ids, torch.ones_like(candidate_ids, dtype=torch.bool))
        return log_probs, torch.full_like(candidate_ids[:, 0], -1)  # no top-1 over another vocabulary
