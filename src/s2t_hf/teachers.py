"""Teachers: what S2T decoding and selection-group collection ask of a teacher, behind one interface.

A [`Teacher`] answers, for the *triggered rows* of a decoding step:

- [`~Teacher.select`]: which of the student's candidates it prefers (S2T), with its top-1 token (for the
  `teacher_hits` statistic) and, on request, its log-probabilities of the candidates (for `records`);
- [`~Teacher.takeover`]: its own next token (the Takeover baseline);
- [`~Teacher.candidate_log_probs`]: its log-probabilities of given candidates;

and, for data collection, [`~Teacher.score_trajectories`]: teacher-forced log-probabilities of the candidates at given
positions of whole trajectories. Only a teacher with `full_distribution = True` also gives
[`~Teacher.next_log_probs`], its distribution over the whole vocabulary at every row, which the `kl` trigger needs.

Two implementations:

- [`LocalTeacher`]: a transformers model in this process, with its own KV cache that catches up on every token since
  its last call in one forward (lazy teacher). `S2TLogitsProcessor(teacher=model)` wraps a model in it.
- [`RemoteTeacher`]: a model served by vLLM (or another server of the OpenAI-compatible `/v1/completions` API that
  accepts token-id prompts and vLLM's sampling extensions). The S2T choice is one constrained greedy token
  (`allowed_token_ids=<candidates>`, `temperature=0`, `max_tokens=1`); Takeover is one plain greedy token;
  teacher-forced collection reads `prompt_logprobs`. See `docs/serving.md`.
"""

from __future__ import annotations

import abc
import http.client
import json
import threading
import time
import urllib.parse
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.utils import logging

from .kv import cache_argument, output_rows, positions_from_attention_mask
from .selection import takeover_selection, teacher_selection


__all__ = ["LocalTeacher", "RemoteTeacher", "RemoteTeacherError", "Teacher", "TeacherChoice", "as_teacher"]

logger = logging.get_logger(__name__)


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
            The teacher's absolute log-probabilities of the candidates (float32), when asked for or free.
    """

    token_ids: torch.Tensor
    positions: torch.Tensor | None = None
    top1: torch.Tensor | None = None
    candidate_log_probs: torch.Tensor | None = None


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

    def __init__(self) -> None:
        self.calls = 0
        self.tokens = 0

    def prepare(self, student: torch.nn.Module, tokenizer: Any = None, blocked_ids: Sequence[int] = ()) -> None:
        """
        Checks that the teacher can serve `student` (same tokenizer) and records the rows it must never choose
        (`blocked_ids`: the selector's reserved bins, suppressed rows). Called by the processor and by
        `collect_selection_data`.
        """
        self.blocked_ids = torch.tensor(sorted({int(i) for i in blocked_ids}), dtype=torch.long)

    def reset(self) -> None:
        """Clears the per-generation state (cache) and the counters."""
        self.calls = 0
        self.tokens = 0

    def next_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """
        The teacher's log-probabilities of the next token at every row, over the student's output rows (float32,
        blocked rows at `-inf`), shape `(batch, vocab)`. Only teachers with `full_distribution = True`.
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot give its distribution over the whole vocabulary at every step. The `kl` "
            "trigger and `lazy_teacher=False` need it: use the `entropy` or `random` trigger, or a `LocalTeacher`."
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


# ---------------------------------------------------------------------------------------------------------------------
# Local teacher


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class LocalTeacher(Teacher):
    r"""
    A transformers causal LM as the teacher, in this process. It may sit on another device and dtype than the student;
    probabilities are compared in float32 on the student's device.

    It keeps its own KV cache across the steps of one `generate` call: each call encodes only the tokens since the
    previous one (one forward, so a teacher consulted only at trigger steps catches up lazily).

    Args:
        model (`PreTrainedModel`):
            The teacher model (a PEFT model is unwrapped).
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The shared tokenizer. Needed only when the teacher's and the student's output sizes differ (padded
            vocabularies): only the tokenizer's ids are compared then.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from s2t_hf.teachers import LocalTeacher
    >>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=2)
    >>> _ = torch.manual_seed(0)
    >>> student, model = AutoModelForCausalLM.from_config(config), AutoModelForCausalLM.from_config(config)
    >>> teacher = LocalTeacher(model)
    >>> teacher.prepare(student)
    >>> ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    >>> choice = teacher.select(ids, mask, torch.tensor([0]), torch.tensor([[8, 9, 10]]), torch.ones(1, 3, dtype=bool))
    >>> int(choice.token_ids[0]) in (8, 9, 10), teacher.calls
    (True, 1)

    ```
    """

    full_distribution = True

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None):
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"`model` must be a transformers model (`PreTrainedModel`), got {type(model).__name__}. For a served "
                "teacher use `RemoteTeacher`."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size: int | None = None
        self.comparable_vocab: int | None = None
        self.teacher_rows: int | None = None
        self.blocked_ids = torch.zeros(0, dtype=torch.long)
        self.reset()

    def prepare(self, student: torch.nn.Module, tokenizer: Any = None, blocked_ids: Sequence[int] = ()) -> None:
        super().prepare(student, tokenizer, blocked_ids)
        if _device(_unwrap(self.model)).type == "meta":
            raise ValueError(
                "The teacher's weights are on the `meta` device (an empty model, e.g. built under `init_empty_weights` "
                "or loaded with an offloading `device_map` that left them unmaterialised). Load its weights onto a real "
                "device, e.g. `from_pretrained(..., device_map='auto')` or `.to('cuda')`."
            )
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        student_vocab = output_rows(_unwrap(student))
        teacher_vocab = output_rows(_unwrap(self.model))
        self.vocab_size = self.comparable_vocab = student_vocab
        self.teacher_rows = teacher_vocab
        if teacher_vocab == student_vocab:
            return
        size = len(tokenizer) if tokenizer is not None else None
        if size is not None and size <= min(teacher_vocab, student_vocab):
            # Padded vocabularies of one tokenizer (e.g. Qwen2.5-1.5B with 151936 rows and 32B with 152064):
            # compare on the tokenizer's ids only.
            self.comparable_vocab = size
            return
        raise ValueError(
            f"The teacher has {teacher_vocab} output rows but the student has {student_vocab}. S2T compares their "
            "probabilities token by token, so both must use the same tokenizer. If they do and only the padding of "
            "the output layer differs, pass `tokenizer=` so only the tokenizer's ids are compared."
        )

    def reset(self) -> None:
        super().reset()
        self._cache = None
        self._seen = 0
        self._last: torch.Tensor | None = None

    def _check_prepared(self) -> None:
        if self.vocab_size is None:
            raise RuntimeError("Call `teacher.prepare(student)` before using the teacher (the processor does it).")

    def _to_student_vocab(self, logits: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Log-probabilities on the student's indexing: rows beyond the comparable vocabulary and blocked rows out."""
        logits = logits.to(device=device, dtype=torch.float32)
        full = torch.full((*logits.shape[:-1], self.vocab_size), float("-inf"), device=logits.device)
        full[..., : self.comparable_vocab] = logits[..., : self.comparable_vocab]
        if self.blocked_ids.numel():
            full.index_fill_(-1, self.blocked_ids.to(full.device), float("-inf"))
        return torch.log_softmax(full, dim=-1)

    def next_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Advances the teacher's cache to the current prefix and returns its log-probabilities (float32)."""
        self._check_prepared()
        if self._last is not None and self._seen == input_ids.shape[1]:
            return self._last  # already asked at this step (e.g. by the `kl` trigger)
        teacher = _unwrap(self.model)
        device = _device(teacher)
        if self._cache is None:
            self._cache = DynamicCache(config=teacher.config)
            self._seen = 0
        new_ids = input_ids[:, self._seen :]
        # only a student with more output rows than the teacher can emit an id the teacher lacks (one sync then)
        largest = int(new_ids.max()) if self.teacher_rows < self.vocab_size and new_ids.numel() else -1
        if largest >= self.teacher_rows:
            raise ValueError(
                f"The student generated token id {largest}, a padding row of its output layer beyond the "
                f"teacher's {self.teacher_rows} rows, so the teacher cannot read it. Keep the student off the rows "
                f"above the tokenizer: `generate(..., suppress_tokens=list(range({self.comparable_vocab}, "
                f"{self.vocab_size})))`."
            )
        positions = positions_from_attention_mask(attention_mask)[:, self._seen :]
        with torch.no_grad():
            logits = teacher(
                input_ids=new_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=positions.to(device),
                use_cache=True,
                logits_to_keep=1,
                **{cache_argument(teacher): self._cache},
            ).logits[:, -1]
        self.calls += 1
        self.tokens += int(new_ids.shape[1])
        self._seen = input_ids.shape[1]
        self._last = self._to_student_vocab(logits, input_ids.device)
        return self._last

    def select(self, input_ids, attention_mask, rows, candidate_ids, valid, *, with_log_probs=False) -> TeacherChoice:
        log_probs = self.next_log_probs(input_ids, attention_mask)[rows]
        positions = teacher_selection(candidate_ids, valid, log_probs)
        return TeacherChoice(
            token_ids=candidate_ids.gather(-1, positions[:, None])[:, 0],
            positions=positions,
            top1=log_probs.argmax(-1),
            candidate_log_probs=log_probs.gather(-1, candidate_ids),
        )

    def takeover(
        self, input_ids, attention_mask, rows, candidate_ids=None, *, allowed=None, with_log_probs=False
    ) -> TeacherChoice:
        log_probs = self.next_log_probs(input_ids, attention_mask)[rows]
        token_ids = takeover_selection(log_probs, allowed=allowed)
        return TeacherChoice(
            token_ids=token_ids,
            top1=log_probs.argmax(-1),
            candidate_log_probs=log_probs.gather(-1, candidate_ids) if candidate_ids is not None else None,
        )

    def candidate_log_probs(self, input_ids, attention_mask, rows, candidate_ids) -> torch.Tensor:
        return self.next_log_probs(input_ids, attention_mask)[rows].gather(-1, candidate_ids)

    @torch.no_grad()
    def trajectory_log_probs(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor, num_new: int
    ) -> torch.Tensor:
        """
        Teacher-forced log-probabilities at the last `num_new` positions of `sequences` (one forward, no cache), on
        the student's indexing, shape `(batch, num_new, vocab)` (float32, on `sequences`' device).
        """
        self._check_prepared()
        teacher = _unwrap(self.model)
        device = _device(teacher)
        positions = positions_from_attention_mask(attention_mask)
        logits = teacher(
            input_ids=sequences.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=positions.to(device),
            use_cache=False,
            logits_to_keep=num_new,
        ).logits
        self.calls += 1
        self.tokens += int(attention_mask.sum())
        return self._to_student_vocab(logits.to(sequences.device), sequences.device)

    def score_trajectories(self, trajectories, positions, candidate_ids):
        rows = sorted({int(b) for b in positions[:, 0].tolist()})
        index = {b: i for i, b in enumerate(rows)}
        lengths = [len(trajectories[b]) for b in rows]
        width = max(lengths)
        pad = 0
        device = candidate_ids.device
        sequences = torch.tensor([[pad] * (width - n) + list(trajectories[b]) for b, n in zip(rows, lengths)],
                                 device=device)
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=device)
        log_probs = self.trajectory_log_probs(sequences, mask, width)
        batch_rows = torch.tensor([index[int(b)] for b in positions[:, 0].tolist()], device=device)
        # after the first t tokens of a row of length n: column width - n + t - 1 of the padded batch
        cols = [width - lengths[index[int(b)]] + int(t) - 1 for b, t in positions.tolist()]
        cols = torch.tensor(cols, device=device)
        selected = log_probs[batch_rows, cols]
        return selected.gather(-1, candidate_ids), selected.argmax(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Remote teacher


class RemoteTeacherError(RuntimeError):
    """The teacher server could not be reached, or answered with an error or without what S2T needs."""


_TOKEN_PREFIX = "token_id:"


def _token_id(key: str) -> int:
    """A token id from vLLM's `return_tokens_as_token_ids` form (`token_id:123`) or a plain integer string."""
    return int(key[len(_TOKEN_PREFIX) :]) if key.startswith(_TOKEN_PREFIX) else int(key)


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

    The remote teacher has no whole-vocabulary distribution: the `kl` trigger and `lazy_teacher=False` raise an error
    with it. `teacher_calls` counts trigger steps that asked the server (one batch of requests each) and
    `teacher_tokens` the prompt tokens sent (the server's prefix cache re-encodes only what is new).

    Args:
        base_url (`str`):
            The server's address, e.g. `"http://127.0.0.1:8000"` (a trailing `/v1` is accepted).
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The student's tokenizer, checked against the server's. Strongly recommended; without it the check is
            skipped with a warning.
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
        check (`bool`, *optional*, defaults to `True`):
            Run the construction checks.

    Examples:

    ```python
    >>> from s2t_hf import S2TLogitsProcessor
    >>> from s2t_hf.teachers import RemoteTeacher
    >>> teacher = RemoteTeacher("http://127.0.0.1:8000", tokenizer=tokenizer)  # doctest: +SKIP
    >>> s2t = S2TLogitsProcessor(student, teacher=teacher, trigger="entropy", trigger_threshold=1.0)  # doctest: +SKIP
    >>> out = student.generate(**inputs, logits_processor=[s2t])  # doctest: +SKIP
    ```
    """

    full_distribution = False

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
        check: bool = True,
    ):
        super().__init__()
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"`base_url` must be an http(s) address such as 'http://127.0.0.1:8000', got {base_url!r}."
            )
        for name, value in (("max_concurrency", max_concurrency), ("top_logprobs", top_logprobs)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"`max_retries` must be a non-negative integer, got {max_retries!r}.")
        if timeout <= 0 or backoff < 0:
            raise ValueError(f"`timeout` must be positive and `backoff` non-negative, got {timeout} and {backoff}.")
        url = base_url.rstrip("/")
        if url.endswith("/v1"):
            url = url[: -len("/v1")]
        parsed = urllib.parse.urlsplit(url)
        self.base_url = url
        self._scheme, self._host, self._port = parsed.scheme, parsed.hostname, parsed.port
        self._prefix = parsed.path
        self.tokenizer = tokenizer
        self.api_key = api_key
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_concurrency = max_concurrency
        self.top_logprobs = top_logprobs
        self.blocked_ids = torch.zeros(0, dtype=torch.long)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="s2t-teacher")
        self.max_model_len: int | None = None
        self.model = model
        self.requests = 0
        self._discover_model()
        if check:
            self._check_tokenizer()
            self._check_capabilities()

    # ------------------------------------------------------------------ HTTP

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            connection = cls(self._host, self._port, timeout=self.timeout)
            self._local.connection = connection
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
        self._local.connection = None

    def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        """One HTTP request with retries; returns the decoded JSON answer."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        payload = json.dumps(body).encode() if body is not None else None
        url = f"{self.base_url}{path}"
        cause = None
        attempt = 0
        while attempt <= self.max_retries:
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            reused = getattr(self._local, "connection", None) is not None
            try:
                connection = self._connection()
                connection.request(method, self._prefix + path, body=payload, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as error:  # refused, reset, timeout, closed
                self._drop_connection()
                cause = f"{type(error).__name__}: {error}"
                if not (reused and isinstance(error, (ConnectionError, http.client.RemoteDisconnected))):
                    attempt += 1
                # a kept-alive connection the server closed while idle: try again at once on a new one
                continue
            self.requests += 1
            if response.status == 429 or response.status >= 500:
                cause = f"HTTP {response.status}: {data[:300].decode(errors='replace')}"
                attempt += 1
                continue
            if response.status >= 400:
                text = data[:500].decode(errors="replace")
                hint = ""
                if "logprobs" in text:
                    hint = (
                        f" Lower `top_logprobs` (now {self.top_logprobs}) or start the server with a larger "
                        "`--max-logprobs`."
                    )
                raise RemoteTeacherError(
                    f"The teacher server at {self.base_url} rejected `{method} {path}` with HTTP {response.status}: "
                    f"{text}{hint}"
                )
            try:
                return json.loads(data)
            except json.JSONDecodeError as error:
                raise RemoteTeacherError(
                    f"The teacher server at {url} answered with something that is not JSON: {data[:200]!r}."
                ) from error
        raise RemoteTeacherError(
            f"The teacher server at {self.base_url} did not answer `{method} {path}` after {self.max_retries + 1} "
            f"tries ({cause}). Is it running and reachable? Check `base_url`, or raise `timeout` / `max_retries`."
        )

    def close(self) -> None:
        """Stops the request threads (their connections close with them)."""
        self._pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"RemoteTeacher(base_url={self.base_url!r}, model={self.model!r})"

    def _complete(self, prompt: list[int], **params: Any) -> dict:
        """One `/v1/completions` request for one token-id prompt (or a list of them); returns the answer."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, **params}
        body.setdefault("return_tokens_as_token_ids", True)
        return self._request("POST", "/v1/completions", body)

    def _map(self, function, items: list) -> list:
        if len(items) == 1:
            return [function(items[0])]
        return list(self._pool.map(function, items))

    # ------------------------------------------------------------------ construction checks

    def _discover_model(self) -> None:
        answer = self._request("GET", "/v1/models")
        served = [entry for entry in answer.get("data", []) if isinstance(entry, dict)]
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
        self.max_model_len = entry.get("max_model_len")

    def _check_tokenizer(self) -> None:
        if self.tokenizer is None:
            warnings.warn(
                "`RemoteTeacher` got no `tokenizer`, so it cannot check that the server's tokenizer is the student's. "
                "S2T compares token ids: pass `tokenizer=` to have them checked.",
                stacklevel=3,
            )
            return
        tokenizer = self.tokenizer
        probe = "S2T checks the teacher's tokenizer: 12 + 7 = 19, naïve café, 東京."
        expected = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        try:
            answer = self._request(
                "POST", "/tokenize", {"model": self.model, "prompt": probe, "add_special_tokens": False}
            )
        except RemoteTeacherError as error:
            if "HTTP 404" not in str(error):
                raise
            warnings.warn(
                f"The teacher server at {self.base_url} has no `/tokenize` endpoint, so its tokenizer could not be "
                "checked against the student's. Make sure both use the same tokenizer.",
                stacklevel=3,
            )
            return
        if list(answer.get("tokens", [])) != expected:
            raise ValueError(
                f"The teacher server's tokenizer does not match `tokenizer`: {probe!r} encodes to "
                f"{answer.get('tokens')} on the server and to {expected} here. S2T compares token ids, so the teacher "
                "must use the student's tokenizer (serve a teacher of the same model family)."
            )
        # the ends of the vocabulary: same size and order (ordinary tokens: servers may skip special ones in decoding)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        ordinary = [i for i in range(len(tokenizer)) if i not in special]
        probes = sorted({ordinary[0], ordinary[len(ordinary) // 2], ordinary[-1]}) if ordinary else []
        for token_id in probes:
            answer = self._request("POST", "/detokenize", {"model": self.model, "tokens": [token_id]})
            local = tokenizer.decode([token_id])
            if answer.get("prompt") != local:
                raise ValueError(
                    f"The teacher server's tokenizer does not match `tokenizer`: token id {token_id} decodes to "
                    f"{answer.get('prompt')!r} on the server and to {local!r} here (vocabularies of different size or "
                    "order). S2T compares token ids, so the teacher must use the student's tokenizer."
                )

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

    def _parse_one(self, answer: dict, index: int = 0) -> dict[str, Any]:
        """The generated token, its log-probability and the top log-probabilities of one choice."""
        try:
            choice = next(c for c in answer["choices"] if c.get("index", 0) == index)
            logprobs = choice["logprobs"]
            token = _token_id(logprobs["tokens"][0])
            top = {_token_id(k): float(v) for k, v in (logprobs.get("top_logprobs") or [{}])[0].items()}
            return {"token": token, "log_prob": float(logprobs["token_logprobs"][0]), "top": top}
        except (KeyError, IndexError, TypeError, ValueError, StopIteration) as error:
            raise RemoteTeacherError(
                f"The teacher server at {self.base_url} answered without the token and log-probabilities S2T needs "
                f"({type(error).__name__}: {error}; answer {str(answer)[:300]}). It must support token-id prompts, "
                "`logprobs` and `return_tokens_as_token_ids` (vLLM does)."
            ) from error

    # ------------------------------------------------------------------ the interface

    def prepare(self, student: torch.nn.Module, tokenizer: Any = None, blocked_ids: Sequence[int] = ()) -> None:
        super().prepare(student, tokenizer, blocked_ids)
        if tokenizer is not None and self.tokenizer is not None and len(tokenizer) != len(self.tokenizer):
            raise ValueError(
                f"The processor's `tokenizer` ({len(tokenizer)} tokens) is not the one the `RemoteTeacher` was "
                f"checked with ({len(self.tokenizer)} tokens). S2T compares token ids, so both must use one tokenizer."
            )

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

        for (n, k), value in zip(missing, self._map(one, missing)):
            values[n][k] = value
        return torch.tensor(values, dtype=torch.float32, device=candidate_ids.device)

    def select(self, input_ids, attention_mask, rows, candidate_ids, valid, *, with_log_probs=False) -> TeacherChoice:
        contexts = self._contexts(input_ids, attention_mask, rows)
        allowed = [[c for c, ok in zip(ids, oks) if ok] for ids, oks in zip(candidate_ids.tolist(), valid.tolist())]
        count = self.top_logprobs if with_log_probs else 1

        def one(n):
            return self._parse_one(self._complete(contexts[n], logprobs=count, allowed_token_ids=allowed[n]))

        answers = self._map(one, list(range(len(contexts))))
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

        answers = self._map(one, list(range(len(contexts))))
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
        contexts = self._contexts(input_ids, attention_mask, rows)
        self.calls += 1
        return self._fill_log_probs(contexts, candidate_ids, [{} for _ in contexts])

    def score_trajectories(self, trajectories, positions, candidate_ids):
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
        try:
            for choice in answer["choices"]:
                by_row[order[choice["index"]]] = choice["prompt_logprobs"]
            for b, t in positions_list:
                by_row[b][t].items()
        except (KeyError, IndexError, TypeError, AttributeError) as error:
            raise RemoteTeacherError(
                f"The teacher server at {self.base_url} answered without `prompt_logprobs` "
                f"({type(error).__name__}: {error}). Teacher-forced collection needs vLLM's `prompt_logprobs` "
                "extension of `/v1/completions`."
            ) from error
        tops, top1, contexts = [], [], []
        for b, t in positions_list:
            entry = by_row[b][t]
            table = {_token_id(k): float(v["logprob"]) for k, v in entry.items()}
            ranked = [_token_id(k) for k, v in entry.items() if v.get("rank") == 1]
            tops.append(table)
            top1.append(ranked[0] if ranked else max(table, key=table.get))
            contexts.append(list(trajectories[b][:t]))
        log_probs = self._fill_log_probs(contexts, candidate_ids, tops)
        return log_probs, torch.tensor(top1, dtype=torch.long, device=candidate_ids.device)


def as_teacher(teacher: Any, tokenizer: Any = None) -> Teacher | None:
    """A [`Teacher`] from a `Teacher` (returned as is), a transformers model (wrapped in a [`LocalTeacher`]), or
    `None`."""
    if teacher is None or isinstance(teacher, Teacher):
        return teacher
    if isinstance(teacher, torch.nn.Module):
        return LocalTeacher(teacher, tokenizer=tokenizer)
    raise TypeError(
        f"`teacher` must be a transformers model or a `Teacher` (`LocalTeacher`, `RemoteTeacher`), got "
        f"{type(teacher).__name__}."
    )
