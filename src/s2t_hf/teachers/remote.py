"""[`RemoteTeacher`]: a teacher served by vLLM, asked over HTTP. This module holds the protocol (what to ask of
`/v1/completions`, `/tokenize` and `/detokenize`, and how to read the answers);
[`~s2t_hf.teachers.transport.JSONClient`] carries the requests (connections, retries, timeouts, threads).

The server is vLLM, or another server of the OpenAI-compatible `/v1/completions` API that accepts token-id prompts and
vLLM's sampling extensions. The S2T choice is one constrained greedy token (`allowed_token_ids=<candidates>`,
`temperature=0`, `max_tokens=1`); Takeover is one plain greedy token; teacher-forced collection reads
`prompt_logprobs`. A served teacher with another tokenizer than the student's scores the candidates as text
([`~s2t_hf.teachers.remote_text_scoring.RemoteTextScoring`], with
[`~s2t_hf.teachers.cross_tokenizer.CrossTokenizerScorer`]), reading log-probabilities of given token ids. See
`docs/serving.md`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .base import Teacher, TeacherChoice
from .cross_tokenizer import CrossTokenizerScorer, generation_end_ids, uses_text_scoring
from .remote_text_scoring import RemoteTextScoring, serves_logprob_token_ids
from .teacher_prompts import check_teacher_prompts
from .token_text import end_token_ids
from .transport import JSONClient, ServerError, server_root


__all__ = ["RemoteTeacher", "RemoteTeacherError"]


class RemoteTeacherError(ServerError):
    """The teacher server could not be reached, or answered with an error or without what S2T needs."""


_TOKEN_PREFIX = "token_id:"


def _token_id(key: str) -> int:
    """A token id from vLLM's `return_tokens_as_token_ids` form (`token_id:123`) or a plain integer string."""
    return int(key[len(_TOKEN_PREFIX) :]) if key.startswith(_TOKEN_PREFIX) else int(key)


def _check_served_tokenizer(client: JSONClient, model: str, tokenizer: Any) -> None:
    """Checks through vLLM's `/tokenize` and `/detokenize` that the server at `client` encodes as `tokenizer` does
    (warns when there is no `tokenizer` or no `/tokenize` endpoint)."""
    if tokenizer is None:
        warnings.warn(
            "`RemoteTeacher` got no `tokenizer`, so it cannot check the server's tokenizer. "
            "Pass the served model's own tokenizer as `tokenizer=` to have it checked.",
            stacklevel=3,
        )
        return
    probe = "S2T checks the teacher's tokenizer: 12 + 7 = 19, naïve café, 東京."
    expected = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    try:
        answer = client.request(
            "POST", "/tokenize", {"model": model, "prompt": probe, "add_special_tokens": False}
        )
    except RemoteTeacherError as error:
        if error.status != 404:
            raise
        warnings.warn(
            f"The teacher server at {client.base_url} has no `/tokenize` endpoint, so its tokenizer could not be "
            "checked. Make sure `tokenizer=` is the served model's own.",
            stacklevel=3,
        )
        return
    if not isinstance(answer, dict) or not isinstance(answer.get("tokens", []), list):
        raise RemoteTeacherError(
            f"The teacher server at {client.base_url} answered `/tokenize` without a list of `tokens`: "
            f"{str(answer)[:300]}."
        )
    if list(answer.get("tokens", [])) != expected:
        raise ValueError(
            f"The teacher server's tokenizer does not match `tokenizer`: {probe!r} encodes to "
            f"{answer.get('tokens')} on the server and to {expected} here. Pass the served model's own tokenizer as "
            "`tokenizer=` (the student's for a teacher of the same family; another one makes the teacher score the "
            "candidates as text)."
        )
    # the ends of the vocabulary: same size and order (ordinary tokens: servers may skip special ones in decoding)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    probes = sorted({ordinary[0], ordinary[len(ordinary) // 2], ordinary[-1]}) if ordinary else []
    for token_id in probes:
        answer = client.request("POST", "/detokenize", {"model": model, "tokens": [token_id]})
        local = tokenizer.decode([token_id])
        if not isinstance(answer, dict) or answer.get("prompt") != local:
            raise ValueError(
                f"The teacher server's tokenizer does not match `tokenizer`: token id {token_id} decodes to "
                f"{answer.get('prompt')!r} on the server and to {local!r} here (vocabularies of different size or "
                "order). Pass the served model's own tokenizer as `tokenizer=`."
            )


class RemoteTeacher(Teacher):
    r"""
    A teacher served by vLLM (or SGLang, or any server of the OpenAI-compatible `/v1/completions` API that takes
    token-id prompts and vLLM's sampling extensions), queried over HTTP. No server package is needed on the client.

    What each operation sends, per triggered row, with the row's context as a token-id prompt (left padding removed,
    so positions are those of the local teacher):

    - [`~RemoteTeacher.select`] (S2T): `allowed_token_ids=<valid candidates>`, `temperature=0`, `max_tokens=1`,
      `logprobs=1` (or `top_logprobs` when `with_log_probs`): the server returns its argmax among the candidates, and
      (vLLM's default `raw_logprobs` mode) the log-probabilities of its top tokens over the *whole* vocabulary, whose
      first is the teacher's top-1 (the `teacher_hits` statistic is exact).
    - [`~RemoteTeacher.takeover`]: plain greedy, one token (`logit_bias=-100` on blocked rows).
    - [`~RemoteTeacher.candidate_log_probs`] and `with_log_probs=True` (the processor's `records`): the candidates
      among the returned top `top_logprobs` are read from the answer; every other candidate costs one more one-token
      request constrained to it (`allowed_token_ids=[c]`, `logprobs=0`), which returns its raw log-probability. All
      values are exact; the extra requests reuse the server's prefix cache.
    - [`~RemoteTeacher.score_trajectories`] (teacher-forced collection): one request carrying every trajectory as a
      prompt with `prompt_logprobs=top_logprobs`; candidates outside the returned top-N are scored as above.

    The rows of one step go out as concurrent requests (each row has its own `allowed_token_ids`); the server batches
    them. Failed requests (no connection, timeout, HTTP 5xx/429) are retried `max_retries` times with exponential
    backoff, then raise [`RemoteTeacherError`].

    At construction the teacher checks that the server is reachable, that it serves `model`, that its tokenizer
    matches `tokenizer` (through vLLM's `/tokenize` and `/detokenize`), and that it honours `allowed_token_ids` and
    returns raw log-probabilities (one probe request).

    **A teacher with another tokenizer.** When `tokenizer` (the served model's) is not the student's tokenizer given to
    the processor (checked on the vocabularies in [`~RemoteTeacher.prepare`]), the teacher scores the student's
    candidates as text under its own tokenizer, as [`~s2t_hf.teachers.LocalTeacher`] does
    ([`~s2t_hf.teachers.remote_text_scoring.RemoteTextScoring`], built in `prepare`): the client plans each row
    ([`~s2t_hf.teachers.cross_tokenizer.CrossTokenizerScorer.plan`]: the teacher's tokens of the shared trunk, and per
    candidate the branch it teacher-forces) and asks the server, per distinct prefix `trunk + branch[:j]`, for the
    log-probabilities of the token ids it needs next (the branch's next token; after a whole branch, the tokens of the
    prefix correction and the end tokens). With a server that serves vLLM's `logprob_token_ids` (checked once, in
    `prepare`) that is one request per prefix (up to 128 ids each); otherwise one request per id, constrained to it
    (`allowed_token_ids=[id]`). Every request reuses the server's prefix cache (`prompt_logprobs`, which skips it, is
    not used). The values are exact, so the choices are the local teacher's. Takeover asks for the teacher's greedy
    token after the whole context and emits the student's token that starts its text
    ([`~s2t_hf.teachers.cross_tokenizer.CrossTokenizerScorer.student_token`]). Teacher prompts (`teacher_prompts`)
    are read on this path, rendered with the teacher tokenizer's own template.

    The remote teacher has no whole-vocabulary distribution over the student's vocabulary: the `kl` trigger and
    `lazy_teacher=False` raise an error with it. `teacher_calls` counts trigger steps that asked the server (one batch
    of requests each) and `teacher_tokens` the prompt tokens sent (the server's prefix cache re-encodes only what is new).

    Args:
        base_url (`str`):
            The server's address, e.g. `"http://127.0.0.1:8000"` (a trailing `/v1` is accepted).
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The served model's tokenizer, checked against the server's: the student's for a teacher of the same family
            (token ids are compared), or the teacher's own (another family: the candidates are scored as text).
            Strongly recommended; without it the check is skipped with a warning.
        model (`str`, *optional*):
            The served model's name; defaults to the only (first) model the server lists.
        api_key (`str`, *optional*):
            Sent as `Authorization: Bearer <api_key>` when set.
        timeout (`float`, *optional*, defaults to 60.0):
            Seconds to wait for one answer.
        max_retries (`int`, *optional*, defaults to 3):
            Retries of a failed request.
        backoff (`float`, *optional*, defaults to 0.5):
            Seconds before the first retry; doubled at each further one.
        max_concurrency (`int`, *optional*, defaults to 32):
            Requests in flight at once.
        top_logprobs (`int`, *optional*, defaults to 20):
            Top log-probabilities asked for when candidate log-probabilities are needed (at most the server's
            `--max-logprobs`).
        candidate_scoring (`str`, *optional*, defaults to `"auto"`):
            `"tokens"` compares token ids (one tokenizer), `"text"` scores the candidates as strings under the
            teacher's tokenizer, `"auto"` picks `"text"` exactly when `tokenizer` is not the student's.
        check (`bool`, *optional*, defaults to `True`):
            Run the construction checks.

    Examples:

    ```python
    >>> from s2t_hf import S2TLogitsProcessor
    >>> from s2t_hf.teachers import RemoteTeacher
    >>> teacher = RemoteTeacher("http://127.0.0.1:8000", tokenizer=tokenizer)  # doctest: +SKIP
    >>> s2t = S2TLogitsProcessor(student, teacher=teacher, trigger="entropy", trigger_threshold=1.0)  # doctest: +SKIP
    >>> out = student.generate(**inputs, logits_processor=[s2t])  # doctest: +SKIP
    >>> # a served teacher of another family: its own tokenizer here, the student's to the processor
    >>> gemma = RemoteTeacher("http://127.0.0.1:8001", tokenizer=gemma_tokenizer)  # doctest: +SKIP
    >>> s2t = S2TLogitsProcessor(student, teacher=gemma, tokenizer=student_tokenizer, trigger="entropy",
    ...                          trigger_threshold=1.0)  # doctest: +SKIP
    ```
    """

    full_distribution = False
    # each request carries its whole context; only the text path (another tokenizer) keeps per-prompt state
    shareable_across_prompts = True

    def __init__(
        self,
        base_url: str,
        tokenizer: Any = None,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_concurrency: int = 32,
        top_logprobs: int = 20,
        candidate_scoring: str = "auto",
        check: bool = True,
    ):
        super().__init__()
        if candidate_scoring not in ("auto", "tokens", "text"):
            raise ValueError(f"`candidate_scoring` must be 'auto', 'tokens' or 'text', got {candidate_scoring!r}.")
        #: The JSON-over-HTTP client that carries the requests (connections, retries, timeouts, threads).
        self.client = JSONClient(
            server_root(base_url),
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_concurrency=max_concurrency,
            server_name="teacher server",
            error_class=RemoteTeacherError,
            rejection_hint=self._rejection_hint,
        )
        if not isinstance(top_logprobs, int) or top_logprobs < 1:
            raise ValueError(f"`top_logprobs` must be a positive integer, got {top_logprobs!r}.")
        self.base_url = self.client.base_url
        self.tokenizer = tokenizer
        self.top_logprobs = top_logprobs
        self.candidate_scoring = candidate_scoring
        #: Set by `prepare` when the teacher scores candidates as text (another tokenizer than the student's).
        self.text_scorer: CrossTokenizerScorer | None = None
        #: How the text path reads log-probabilities of given ids: `"logprob_token_ids"` (one request per prefix) or
        #: `"allowed_token_ids"` (one per id); found out by the first `prepare` that needs it.
        self.id_log_probs: str | None = None
        # the text path that `select`, `takeover`, `candidate_log_probs` and `score_trajectories` hand over to
        self._text_scoring: RemoteTextScoring | None = None
        self.blocked_ids = torch.zeros(0, dtype=torch.long)
        self.max_model_len: int | None = None
        self.model_root: str | None = None
        self.model = model
        self._discover_model()
        if check:
            _check_served_tokenizer(self.client, self.model, self.tokenizer)
            self._check_capabilities()

    @property
    def requests(self) -> int:
        """The HTTP requests the server answered, retries included."""
        return self.client.requests

    @property
    def api_key(self) -> str | None:
        return self.client.api_key

    @property
    def timeout(self) -> float:
        return self.client.timeout

    @property
    def max_retries(self) -> int:
        return self.client.max_retries

    @property
    def backoff(self) -> float:
        return self.client.backoff

    @property
    def max_concurrency(self) -> int:
        return self.client.max_concurrency

    def close(self) -> None:
        """Stops the request threads (their connections close with them)."""
        self.client.close()

    def __repr__(self) -> str:
        return f"RemoteTeacher(base_url={self.base_url!r}, model={self.model!r})"

    # ------------------------------------------------------------------ the vLLM requests

    def _rejection_hint(self, text: str) -> str:
        """What to change when the server rejects a request that asked for too many log-probabilities."""
        if "logprobs" not in text:
            return ""
        return (
            f" Lower `top_logprobs` (now {self.top_logprobs}) or start the server with a larger `--max-logprobs`."
        )

    def _complete(self, prompt: list[int], **params: Any) -> dict:
        """One `/v1/completions` request for one token-id prompt (or a list of them); returns the answer."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, **params}
        body.setdefault("return_tokens_as_token_ids", True)
        return self.client.request("POST", "/v1/completions", body)

    # ------------------------------------------------------------------ construction checks

    def _discover_model(self) -> None:
        answer = self.client.request("GET", "/v1/models")
        data = answer.get("data", []) if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise RemoteTeacherError(
                f"The teacher server at {self.base_url} answered `/v1/models` without a list of models (`data`): "
                f"{str(answer)[:300]}."
            )
        served = [entry for entry in data if isinstance(entry, dict) and isinstance(entry.get("id"), str)]
        names = [entry.get("id") for entry in served]
        if self.model is None:
            if not names:
                raise RemoteTeacherError(f"The teacher server at {self.base_url} lists no model at `/v1/models`.")
            self.model = names[0]
        elif self.model not in names:
            raise RemoteTeacherError(
                f"The teacher server at {self.base_url} does not serve `model={self.model!r}`; it serves {names}. "
                "Pass one of these (or leave `model` unset to take the first)."
            )
        entry = served[names.index(self.model)]
        max_model_len = entry.get("max_model_len")
        self.max_model_len = max_model_len if isinstance(max_model_len, int) and max_model_len > 0 else None
        #: What the server loaded for `model` (vLLM lists the path or repository as `root`), part of a collection's
        #: identity.
        self.model_root = entry.get("root")

    def _check_capabilities(self) -> None:
        prompt = [0, 1] if self.tokenizer is None else list(self.tokenizer("12 + 7 =")["input_ids"]) or [0]
        greedy = self._parse_one(self._complete(prompt, logprobs=2))
        other = next(i for i in range(3) if i != greedy["token"])
        constrained = self._complete(prompt, logprobs=2, allowed_token_ids=[other])
        parsed = self._parse_one(constrained)
        if parsed["token"] != other:
            raise RemoteTeacherError(
                f"The teacher server at {self.base_url} ignores `allowed_token_ids` (asked for token {other} only, it "
                f"returned {parsed['token']}). S2T needs vLLM's `allowed_token_ids` extension of `/v1/completions`; "
                "serve the teacher with vLLM (`python -m vllm.entrypoints.openai.api_server ...`)."
            )
        if greedy["token"] not in parsed["top"]:
            raise RemoteTeacherError(
                f"The teacher server at {self.base_url} returns log-probabilities after `allowed_token_ids` is "
                "applied (a processed log-probability mode), so the teacher's top-1 and the candidates' absolute "
                "probabilities cannot be read. Serve it with vLLM's default `--logprobs-mode raw_logprobs`."
            )

    def _complete_one(self, prompt: list[int], **params: Any) -> dict[str, Any]:
        """One `/v1/completions` request for one token-id prompt; returns its generated token, that token's
        log-probability and the top log-probabilities (the text path's `complete`)."""
        return self._parse_one(self._complete(prompt, **params))

    def _parse_one(self, answer: dict, index: int = 0) -> dict[str, Any]:
        """The generated token, its log-probability and the top log-probabilities of one choice."""
        try:
            choice = next(c for c in answer["choices"] if c.get("index", 0) == index)
            logprobs = choice["logprobs"]
            token = _token_id(logprobs["tokens"][0])
            if token < 0:
                raise ValueError(f"negative token id {token}")
            top = {_token_id(k): float(v) for k, v in (logprobs.get("top_logprobs") or [{}])[0].items()}
            return {"token": token, "log_prob": float(logprobs["token_logprobs"][0]), "top": top}
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, StopIteration) as error:
            raise RemoteTeacherError(
                f"The teacher server at {self.base_url} answered without the token and log-probabilities S2T needs "
                f"({type(error).__name__}: {error}; answer {str(answer)[:300]}). It must support token-id prompts, "
                "`logprobs` and `return_tokens_as_token_ids` (vLLM does)."
            ) from error

    # ------------------------------------------------------------------ the interface

    def prepare(self, student: torch.nn.Module, tokenizer: Any = None, blocked_ids: Sequence[int] = ()) -> None:
        super().prepare(student, tokenizer, blocked_ids)
        self.text_scorer = None
        self._text_scoring = None
        self.reads_teacher_prompts = False
        if uses_text_scoring(self.candidate_scoring, tokenizer, self.tokenizer):
            self._prepare_text_scoring(student, tokenizer)
            return
        if tokenizer is None or self.tokenizer is None:
            return
        if len(tokenizer) != len(self.tokenizer):
            raise ValueError(
                f"The processor's `tokenizer` ({len(tokenizer)} tokens) is not the one the `RemoteTeacher` was "
                f"checked with ({len(self.tokenizer)} tokens). Give the processor the student's tokenizer and the "
                "teacher the served model's own, `RemoteTeacher(base_url, tokenizer=teacher_tokenizer)`."
            )

    def _prepare_text_scoring(self, student: torch.nn.Module, tokenizer: Any) -> None:
        if tokenizer is None or self.tokenizer is None:
            raise ValueError(
                "Scoring the candidates as text needs both tokenizers: the served teacher's as "
                "`RemoteTeacher(base_url, tokenizer=teacher_tokenizer)` and the student's as `tokenizer=` of the "
                "processor (or of `collect_selection_data`)."
            )
        # the served model's generation config is not visible here: its tokenizer's end tokens stand for it
        self.text_scorer = CrossTokenizerScorer(
            None, self.tokenizer, tokenizer, generation_end_ids(student), teacher_end_ids=end_token_ids(self.tokenizer)
        )
        self.reads_teacher_prompts = True
        if self.id_log_probs is None:
            served = serves_logprob_token_ids(self._complete_one, self.tokenizer)
            self.id_log_probs = "logprob_token_ids" if served else "allowed_token_ids"
        self._text_scoring = RemoteTextScoring(
            self.text_scorer,
            self._complete_one,
            self.client,
            id_log_probs=self.id_log_probs,
            teacher=self,
            max_model_len=self.max_model_len,
        )

    def reset(self) -> None:
        super().reset()
        if self.text_scorer is not None:
            self.text_scorer.reset()

    def begin(self, prompt_lengths, teacher_prompts=None) -> None:
        teacher_prompts = check_teacher_prompts(teacher_prompts)
        super().begin(prompt_lengths, teacher_prompts)
        if self.text_scorer is not None:
            self.text_scorer.set_prompts(teacher_prompts)

    # ------------------------------------------------------------------ the interface (token ids)

    def _contexts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor) -> list[list[int]]:
        contexts = []
        for row in rows.tolist():
            context = input_ids[row][attention_mask[row].bool()].tolist()
            if self.max_model_len is not None and len(context) >= self.max_model_len:
                raise RemoteTeacherError(
                    f"A context of {len(context)} tokens does not fit the teacher server's `max_model_len` of "
                    f"{self.max_model_len}. Restart the server with a larger `--max-model-len`."
                )
            contexts.append(context)
        self.tokens += sum(len(c) for c in contexts)
        return contexts

    def _fill_log_probs(
        self, contexts: list[list[int]], candidate_ids: torch.Tensor, tops: list[dict]
    ) -> torch.Tensor:
        """Candidate log-probabilities from the returned top log-probabilities, the rest by constrained requests."""
        candidates = candidate_ids.tolist()
        values = [[tops[n].get(c) for c in row] for n, row in enumerate(candidates)]
        missing = [(n, k) for n, row in enumerate(values) for k, v in enumerate(row) if v is None]

        def one(item):
            n, k = item
            answer = self._complete(contexts[n], logprobs=0, allowed_token_ids=[candidates[n][k]])
            return self._parse_one(answer)["log_prob"]

        for (n, k), value in zip(missing, self.client.map(one, missing)):
            values[n][k] = value
        return torch.tensor(values, dtype=torch.float32, device=candidate_ids.device)

    def select(self, input_ids, attention_mask, rows, candidate_ids, valid, *, with_log_probs=False) -> TeacherChoice:
        if self._text_scoring is not None:
            return self._text_scoring.select(input_ids, attention_mask, rows, candidate_ids, valid)
        contexts = self._contexts(input_ids, attention_mask, rows)
        allowed = [[c for c, ok in zip(ids, oks) if ok] for ids, oks in zip(candidate_ids.tolist(), valid.tolist())]
        count = self.top_logprobs if with_log_probs else 1

        def one(n):
            return self._parse_one(self._complete(contexts[n], logprobs=count, allowed_token_ids=allowed[n]))

        answers = self.client.map(one, list(range(len(contexts))))
        self.calls += 1
        device = candidate_ids.device
        token_ids = torch.tensor([a["token"] for a in answers], dtype=torch.long, device=device)
        matches = candidate_ids == token_ids[:, None]
        if not bool(matches.any(-1).all()):
            raise self._outside_allowed_ids()
        top1 = None  # the teacher's top-1 over its vocabulary: the first of its raw top log-probabilities
        if all(a["top"] for a in answers):
            top1 = torch.tensor([max(a["top"], key=a["top"].get) for a in answers], dtype=torch.long, device=device)
        log_probs = None
        if with_log_probs:
            tops = [{**a["top"], a["token"]: a["log_prob"]} for a in answers]
            log_probs = self._fill_log_probs(contexts, candidate_ids, tops)
        return TeacherChoice(token_ids=token_ids, positions=matches.long().argmax(-1), top1=top1,
                             candidate_log_probs=log_probs)

    def takeover(
        self, input_ids, attention_mask, rows, candidate_ids=None, *, allowed=None, with_log_probs=False
    ) -> TeacherChoice:
        if self._text_scoring is not None:
            return self._text_scoring.takeover(
                input_ids, attention_mask, rows, candidate_ids, allowed=allowed, with_log_probs=with_log_probs
            )
        contexts = self._contexts(input_ids, attention_mask, rows)
        params: dict[str, Any] = {"logprobs": self.top_logprobs if with_log_probs else 0}
        if self.blocked_ids.numel():
            params["logit_bias"] = {str(i): -100 for i in self.blocked_ids.tolist()}
        allowed_rows = allowed.cpu() if allowed is not None else None

        def one(n: int) -> dict[str, Any]:
            answer = self._parse_one(self._complete(contexts[n], **params))
            if allowed_rows is None or self._is_allowed(allowed_rows[n], answer["token"]):
                return answer
            # the greedy token is ruled out by an earlier logits processor: the argmax among the allowed tokens (one
            # more request, constrained to them; the tokens the server answered with stay the unconstrained top-1)
            allowed_ids = allowed_rows[n].nonzero()[:, 0].tolist()
            constrained = self._parse_one(self._complete(contexts[n], **params, allowed_token_ids=allowed_ids))
            if not self._is_allowed(allowed_rows[n], constrained["token"]):
                raise self._outside_allowed_ids()
            return {**constrained, "top1": answer["token"]}

        answers = self.client.map(one, list(range(len(contexts))))
        self.calls += 1
        device = input_ids.device
        token_ids = torch.tensor([a["token"] for a in answers], dtype=torch.long, device=device)
        top1 = torch.tensor([a.get("top1", a["token"]) for a in answers], dtype=torch.long, device=device)
        log_probs = None
        if with_log_probs and candidate_ids is not None:
            tops = [{**a["top"], a["token"]: a["log_prob"]} for a in answers]
            log_probs = self._fill_log_probs(contexts, candidate_ids, tops)
        return TeacherChoice(token_ids=token_ids, top1=top1, candidate_log_probs=log_probs)

    def _outside_allowed_ids(self) -> RemoteTeacherError:
        return RemoteTeacherError(
            f"The teacher server at {self.base_url} returned a token outside `allowed_token_ids`; it does not support "
            "vLLM's `allowed_token_ids` extension."
        )

    @staticmethod
    def _is_allowed(allowed_row: torch.Tensor, token: int) -> bool:
        return 0 <= token < allowed_row.shape[0] and bool(allowed_row[token])

    def candidate_log_probs(self, input_ids, attention_mask, rows, candidate_ids) -> torch.Tensor:
        if self._text_scoring is not None:
            return self._text_scoring.candidate_log_probs(input_ids, attention_mask, rows, candidate_ids)
        contexts = self._contexts(input_ids, attention_mask, rows)
        self.calls += 1
        return self._fill_log_probs(contexts, candidate_ids, [{} for _ in contexts])

    def score_trajectories(self, trajectories, positions, candidate_ids):
        if self._text_scoring is not None:
            return self._text_scoring.score_trajectories(trajectories, positions, candidate_ids)
        positions_list = positions.tolist()
        needed: dict[int, int] = {}
        for b, t in positions_list:
            needed[b] = max(needed.get(b, 0), t)
        order = sorted(needed)
        prompts = [list(trajectories[b][: needed[b] + 1]) for b in order]
        for prompt in prompts:
            if self.max_model_len is not None and len(prompt) > self.max_model_len:
                raise RemoteTeacherError(
                    f"A trajectory of {len(prompt)} tokens does not fit the teacher server's `max_model_len` of "
                    f"{self.max_model_len}. Restart the server with a larger `--max-model-len`."
                )
        self.tokens += sum(len(p) for p in prompts)
        answer = self._complete(prompts, logprobs=0, prompt_logprobs=self.top_logprobs)
        self.calls += 1
        by_row = {}
        tops, top1, contexts = [], [], []
        try:
            for choice in answer["choices"]:
                index = choice["index"]
                if not isinstance(index, int) or not 0 <= index < len(order):
                    raise IndexError(f"choice index {index!r} outside the {len(order)} prompts sent")
                by_row[order[index]] = choice["prompt_logprobs"]
            for b, t in positions_list:
                entry = by_row[b][t]
                table = {_token_id(k): float(v["logprob"]) for k, v in entry.items()}
                ranked = [_token_id(k) for k, v in entry.items() if v.get("rank") == 1]
                tops.append(table)
                top1.append(ranked[0] if ranked else max(table, key=table.get))
                contexts.append(list(trajectories[b][:t]))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
            raise RemoteTeacherError(
                f"The teacher server at {self.base_url} answered without `prompt_logprobs` "
                f"({type(error).__name__}: {error}). Teacher-forced collection needs vLLM's `prompt_logprobs` "
                "extension of `/v1/completions`."
            ) from error
        log_probs = self._fill_log_probs(contexts, candidate_ids, tops)
        return log_probs, torch.tensor(top1, dtype=torch.long, device=candidate_ids.device)
