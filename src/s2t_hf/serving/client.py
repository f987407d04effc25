"""`ServedS2T`: S2T decoding against a vLLM server that serves the student, by stop-and-resume.

The server runs the student with [`S2TVllmLogitsProcessor`](vllm_processor.py) loaded. Each prompt is one request that
carries the trigger's settings; where the trigger fires, the processor ends the request with the sentinel token. The
client then asks for the student's top-K at that step (one one-token request, the reserved rows masked), selects one
candidate (S2T-Local: the selector's bins after each candidate, read by K one-token requests to the selector's LoRA
that keep only the bin rows; S2T: a [`RemoteTeacher`]), appends it and resumes the request. Between triggers the
engine decodes with continuous batching, as for any request.

Every scoring request reads *processed* log-probabilities (`--logprobs-mode processed_logprobs`): the softmax over the
rows the processor keeps. vLLM 0.32 answers a batch that mixes `logprob_token_ids` requests with top-n requests
wrongly (the top-n requests get the padding of the others), so the client uses top-n requests only.

The decoding of one prompt is a generator of requests (`_decode`): the sync driver runs it on threads, the asyncio
driver in the event loop, with the same logic.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import threading
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.utils import logging

from ..config import S2TConfig
from ..prompts import prompt_token_ids
from ..selection import local_candidate_logits, top_k_candidates
from ..stats import with_rates
from ..teachers import Teacher
from ..teachers.transport import JSONClient, ServerError, server_root
from .manifest import VLLM_PROCESSOR, ServingManifest


logger = logging.get_logger(__name__)

_TOKEN_PREFIX = "token_id:"
# the selector's top log-probabilities asked for on the context (vLLM's default `--max-logprobs`)
ADAPTER_LOGPROBS = 20
# a session yields a list of calls (each a function of no argument: one HTTP request, or a teacher's answer) and
# receives their results in the same order
Calls = list[Callable[[], Any]]


class ServedS2TError(ServerError):
    """The server cannot run S2T as asked (processor, adapter, raw log-probabilities, reserved rows), or it failed."""


def _token_id(key: str) -> int:
    return int(key[len(_TOKEN_PREFIX):]) if key.startswith(_TOKEN_PREFIX) else int(key)


@dataclass
class ServedCompletion:
    """
    One prompt's S2T decoding through the server.

    Args:
        token_ids (`list[int]`): the generated tokens (an end token included, as `generate` returns it).
        text (`str`): their text.
        finish_reason (`str`): `"stop"` (an end token or a stop string) or `"length"`.
        triggers (`int`): steps where the trigger fired (and the client selected the token).
        flips (`int`): triggers whose selected token is not the student's top-1.
        trigger_steps (`list[int]`): the generated positions of the triggers.
        requests (`int`): requests this prompt sent (decoding segments, candidate scoring).
        trigger_seconds (`list[float]`): per trigger, the wall time from the stopped request's answer to the selected
            token (the top-K and scoring round trips).
        teacher_hits (`int`): triggers where the teacher's own top-1 was the selected token (teacher selection).
    """

    token_ids: list[int]
    text: str
    finish_reason: str
    triggers: int = 0
    flips: int = 0
    trigger_steps: list[int] = field(default_factory=list)
    requests: int = 0
    trigger_seconds: list[float] = field(default_factory=list)
    teacher_hits: int = 0


def _check_shareable(teacher: Any) -> None:
    """Refuses a teacher that cannot answer for many prompts at once (one cache for every prompt)."""
    if not isinstance(teacher, Teacher):
        raise TypeError(f"`teacher` must be a `RemoteTeacher`, got {type(teacher).__name__}.")
    if not teacher.shareable_across_prompts:
        raise ValueError(
            f"`teacher` ({type(teacher).__name__}) keeps one state (its cache) for one generation, but a served "
            "student selects for many prompts at once, from several threads, and would mix their contexts. Serve the "
            "teacher with vLLM and pass a `RemoteTeacher(base_url, tokenizer=tokenizer)`, or decode with a local "
            "teacher in transformers (`S2TLogitsProcessor(student, teacher=...)`)."
        )


class ServedS2T:
    """
    S2T decoding with the student served by vLLM: the trigger runs in the engine, the selection in this client.

    Args:
        base_url (`str`): the server, e.g. `"http://127.0.0.1:8000"`.
        config (`S2TConfig`): the S2T settings: `trigger` (`entropy`, `learned`, `random`, `always`, `never`),
            `trigger_threshold`, `warmup_tokens`, `top_k`, `candidate_ratio`, `selection` (`"local"` or `"teacher"`),
            and for S2T-Local the selector's `bin_token_ids`, `bin_values`, `scoring`, `residual_tau`, `adapter_mode`.
        manifest (`ServingManifest`): the served checkpoint's reserved rows and sentinel (`s2t_serving.json`).
        tokenizer (`PreTrainedTokenizerBase`): the student's tokenizer (prompts as text, stop strings, end tokens).
        teacher (`RemoteTeacher`, *optional*): for `selection="teacher"`; it must share the student's tokenizer. A
            teacher that keeps per-generation state (a `LocalTeacher`: one cache) is refused, since the client selects
            for many prompts at once (`Teacher.shareable_across_prompts`).
        model (`str`, *optional*): the served base model's name; found on the server when not given.
        api_key, timeout, max_retries, backoff: as for [`RemoteTeacher`].
        max_concurrency (`int`, *optional*, defaults to 32): prompts decoded at once (and requests in flight for one
            trigger's scoring).
        check_server (`bool`, *optional*, defaults to `True`): probe the server once, before the first prompt, for the
            processor, raw log-probabilities and the adapter.

    Examples: see `docs/serving.md` and `examples/served_student.py`.
    """

    def __init__(
        self,
        base_url: str,
        config: S2TConfig,
        manifest: ServingManifest,
        tokenizer: Any,
        *,
        teacher: Any = None,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 2,
        backoff: float = 0.5,
        max_concurrency: int = 32,
        check_server: bool = True,
    ):
        if not isinstance(config, S2TConfig):
            raise TypeError(f"`config` must be an `S2TConfig`, got {type(config).__name__}.")
        if not isinstance(manifest, ServingManifest):
            raise TypeError(f"`manifest` must be a `ServingManifest`, got {type(manifest).__name__}.")
        if tokenizer is None:
            raise ValueError("`tokenizer` is required (the student's).")
        if config.trigger not in ("entropy", "learned", "random", "always", "never"):
            raise ValueError(
                f"`trigger={config.trigger!r}` cannot run in the engine: a served student supports `entropy`, "
                "`learned`, `random`, `always` and `never` (the `kl` trigger needs the teacher at every step)."
            )
        if config.trigger in ("entropy", "learned") and config.trigger_threshold is None:
            raise ValueError(
                f"The `{config.trigger}` trigger needs `config.trigger_threshold` (calibrate it with "
                "`S2TLogitsProcessor.calibrate` on the student in transformers, or set it)."
            )
        if config.trigger == "random" and config.trigger_rate is None:
            raise ValueError("The `random` trigger needs `config.trigger_rate`.")
        if config.trigger == "learned" and manifest.trigger_token_id is None:
            raise ValueError("`trigger='learned'` needs a selector with a trigger row; this export has none.")
        if config.selection == "local":
            if config.bin_token_ids is None:
                raise ValueError("`selection='local'` needs the selector's config (`bin_token_ids`): use `from_export`.")
        elif config.selection == "teacher":
            if teacher is None:
                raise ValueError("`selection='teacher'` needs `teacher=` (a `RemoteTeacher`).")
            _check_shareable(teacher)
        else:
            raise ValueError(f"A served student supports `selection='local'` or `'teacher'`, got {config.selection!r}.")
        self.config = config
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.teacher = teacher
        self.client = JSONClient(
            server_root(base_url), api_key=api_key, timeout=timeout, max_retries=max_retries, backoff=backoff,
            max_concurrency=max_concurrency, server_name="vLLM server", error_class=ServedS2TError,
        )
        self.max_concurrency = max_concurrency
        self.reserved = set(manifest.reserved_token_ids)
        self.end_ids = set(self._end_token_ids())
        self.model = model
        self.check_server = check_server
        self._checked = False
        self.totals = self._zero_totals()
        if teacher is not None:
            teacher.prepare(None, tokenizer, sorted(self.reserved))
            if getattr(teacher, "text_scorer", None) is not None:
                raise ValueError(
                    "The teacher has another tokenizer than the student: a served student selects with a teacher that "
                    "shares its tokenizer (the text path runs only in `S2TLogitsProcessor` for now)."
                )

    # ---------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_export(cls, export_dir: str | os.PathLike, base_url: str, tokenizer: Any = None, **kwargs: Any):
        """
        The client of a student exported by [`export_for_vllm`] and served by `base_url`: its `s2t_config.json`
        (trigger, selector) and `model/s2t_serving.json`. Settings of the config can be overridden with
        `config_overrides={...}`.
        """
        export_dir = os.fspath(export_dir)
        overrides = kwargs.pop("config_overrides", None) or {}
        config = S2TConfig.from_pretrained(export_dir, **overrides)
        manifest = ServingManifest.from_pretrained(os.path.join(export_dir, "model"))
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.path.join(export_dir, "model"))
        return cls(base_url, config, manifest, tokenizer, **kwargs)

    def _end_token_ids(self) -> list[int]:
        ids = self.tokenizer.eos_token_id
        return [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))

    @staticmethod
    def _zero_totals() -> dict[str, int]:
        return {"prompts": 0, "steps": 0, "eligible_steps": 0, "triggers": 0, "flips": 0, "teacher_hits": 0,
                "requests": 0, "local_calls": 0, "teacher_calls": 0}

    @property
    def stats(self) -> dict[str, Any]:
        """Counts summed over every prompt since the client was made (or `reset_stats`), with the rates."""
        return with_rates(dict(self.totals))

    def reset_stats(self) -> None:
        self.totals = self._zero_totals()

    def close(self) -> None:
        self.client.close()

    # ---------------------------------------------------------------------------------------------------------------
    # requests

    def _complete(self, body: dict) -> dict:
        return self.client.request("POST", "/v1/completions", body)

    def _served_models(self) -> tuple[str, list[str]]:
        """The served base model's name and every served name (adapters included)."""
        answer = self.client.request("GET", "/v1/models")
        models = answer.get("data") if isinstance(answer, dict) else None
        named = isinstance(models, list) and all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in models)
        if not named:
            raise ServedS2TError(
                f"The server at {self.client.base_url} answered `/v1/models` without a list of models with an `id`: "
                f"{str(answer)[:300]}."
            )
        names = [m["id"] for m in models]
        base = [m["id"] for m in models if not m.get("parent")]
        if not base:
            raise ServedS2TError(f"The server at {self.client.base_url} lists no base model ({names}).")
        return base[0], names

    def _check_adapter(self, names: list[str]) -> None:
        if self.manifest.adapter_name is not None and self.config.selection == "local":
            if self.manifest.adapter_name not in names:
                raise ServedS2TError(
                    f"The server at {self.client.base_url} does not serve the selector's adapter "
                    f"{self.manifest.adapter_name!r} (it serves {names}). Start it with `--enable-lora --lora-modules "
                    f"{self.manifest.adapter_name}=EXPORT/adapter --max-lora-rank {self.manifest.lora_rank}`."
                )

    def _check(self) -> None:
        """One probe: a request that must stop at once on the sentinel, with raw log-probabilities."""
        if self._checked:
            return
        base, names = self._served_models()
        if self.model is None:
            self.model = base
        if self.check_server:
            prompt = list(self.tokenizer("1 + 1 =")["input_ids"]) or [0]
            try:
                answer = self._complete(self._body(prompt, 1, args={"s2t_trigger": "always", "s2t_warmup": 0}))
            except ServedS2TError as error:
                if error.status != 400:
                    raise
                raise ServedS2TError(
                    f"The server at {self.client.base_url} refused S2T's probe request ({error}). Serve the exported "
                    f"`model/` folder (it has the reserved rows) with `--logits-processors {VLLM_PROCESSOR}` (see "
                    "`VllmExport.serve_args()`).", status=400,
                ) from error
            tokens, _ = self._tokens(answer)
            if tokens != [self.manifest.sentinel_token_id]:
                raise ServedS2TError(
                    f"The server at {self.client.base_url} does not run S2T's logits processor: a request that must "
                    f"stop at once on the sentinel token {self.manifest.sentinel_token_id} generated {tokens}. Start "
                    f"it with `--logits-processors {VLLM_PROCESSOR}` and `--model` on the exported `model/` folder "
                    "(see `VllmExport.serve_args()`)."
                )
            # two rows the processor must keep alone: the first ordinary token and the sentinel
            keep = [next(i for i in range(len(self.reserved) + 1) if i not in self.reserved),
                    self.manifest.sentinel_token_id]
            top = self._top(self._complete(self._body(prompt, 1, logprobs=2, keep=keep)))
            total = sum(math.exp(v) for v in top.values())
            if set(top) != set(keep) or abs(total - 1.0) > 1e-3:
                raise ServedS2TError(
                    f"The server at {self.client.base_url} does not return processed log-probabilities (a request "
                    f"that keeps only rows {keep} got {top}). Start it with `--logprobs-mode processed_logprobs`."
                )
            self._check_adapter(names)
        self._checked = True

    def _body(self, prompt: list[int], max_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
              seed: int | None = None, args: dict | None = None, model: str | None = None,
              logprobs: int | None = None, keep: list[int] | None = None) -> dict:
        body = {
            "model": model or self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p, "stop_token_ids": [self.manifest.sentinel_token_id], "skip_special_tokens": False,
            "return_token_ids": True,
        }
        if logprobs is not None:
            body["logprobs"] = logprobs
            body["return_tokens_as_token_ids"] = True
        if seed is not None:
            body["seed"] = seed
        args = dict(args or {})
        if keep is not None:
            args["s2t_keep"] = list(keep)
        if args:
            body["vllm_xargs"] = args
        return body

    def _choice(self, answer: dict) -> dict:
        """The answer's one choice (a request sends one prompt: its `index` is 0)."""
        try:
            choice = answer["choices"][0]
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                raise TypeError(f"a choice must be an object of index 0, got {str(choice)[:100]}")
            return choice
        except (KeyError, IndexError, TypeError) as error:
            raise ServedS2TError(
                f"The server at {self.client.base_url} answered without a completion: {str(answer)[:300]}."
            ) from error

    def _tokens(self, answer: dict) -> tuple[list[int], dict]:
        """The generated token ids (the stop token included) and the choice."""
        choice = self._choice(answer)
        tokens = choice.get("token_ids")
        if tokens is None:
            raise ServedS2TError(
                f"The server at {self.client.base_url} does not return `token_ids` (`return_token_ids`, vLLM 0.10 and "
                "later)."
            )
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in tokens):
            raise ServedS2TError(
                f"The server at {self.client.base_url} answered `token_ids` that are not a list of token ids: "
                f"{str(tokens)[:300]}."
            )
        return list(tokens), choice

    def _top(self, answer: dict) -> dict[int, float]:
        """The log-probabilities of a one-token request's step."""
        choice = self._choice(answer)
        try:
            row = (choice["logprobs"]["top_logprobs"] or [{}])[0]
            top = {_token_id(k): float(v) for k, v in row.items()}
            if any(i < 0 for i in top):
                raise ValueError(f"negative token ids {sorted(i for i in top if i < 0)[:5]}")
            return top
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
            raise ServedS2TError(
                f"The server at {self.client.base_url} answered without log-probabilities "
                f"({type(error).__name__}: {error}; answer {str(answer)[:300]})."
            ) from error

    def _trigger_args(self, offset: int) -> dict[str, Any]:
        config = self.config
        args: dict[str, Any] = {"s2t_trigger": config.trigger, "s2t_warmup": config.warmup_tokens,
                                "s2t_offset": offset, "s2t_signal_top_k": config.signal_top_k}
        if config.trigger_threshold is not None:
            args["s2t_threshold"] = float(config.trigger_threshold)
        if config.trigger == "random":
            args["s2t_rate"] = float(config.trigger_rate)
            if config.seed is not None:
                args["s2t_seed"] = int(config.seed)
        if config.trigger == "learned" and config.trigger_entropy_weight:
            args["s2t_entropy_weight"] = float(config.trigger_entropy_weight)
        return args

    # ---------------------------------------------------------------------------------------------------------------
    # one prompt: a generator of calls

    def _decode(self, prompt: list[int], max_new_tokens: int, temperature: float, top_p: float, seed: int | None,
                stop: Sequence[str]) -> Generator[Calls, list[Any], ServedCompletion]:
        generated: list[int] = []
        result = ServedCompletion(token_ids=generated, text="", finish_reason="length")
        generation_model = self._generation_model()
        while len(generated) < max_new_tokens:
            body = self._body(prompt + generated, max_new_tokens - len(generated), temperature=temperature,
                              top_p=top_p, seed=None if seed is None else seed + len(generated),
                              args=self._trigger_args(len(generated)), model=generation_model)
            if stop:
                body["stop"] = list(stop)
            (answer,) = yield [functools.partial(self._complete, body)]
            result.requests += 1
            tokens, choice = self._tokens(answer)
            at_trigger = choice.get("stop_reason") == self.manifest.sentinel_token_id
            leaked = self.reserved.intersection(tokens[:-1] if at_trigger else tokens)
            if leaked:
                raise ServedS2TError(
                    f"The server generated reserved rows {sorted(leaked)}: it does not mask them. Start it with "
                    f"`--logits-processors {VLLM_PROCESSOR}` on the exported `model/` folder."
                )
            if not at_trigger:
                generated.extend(tokens)
                result.finish_reason = str(choice.get("finish_reason") or "length")
                break
            generated.extend(tokens[:-1])
            stopped_at = time.perf_counter()
            step = len(generated)
            context = prompt + generated
            # the student's top-K at the triggered step, the reserved rows masked (its own model: base or adapter);
            # for S2T-Local, in parallel, the selector on the context: its log-probabilities (the residual form's
            # term), and the context's prefill under the adapter, which the K candidate requests then find cached
            calls = [functools.partial(self._complete, self._body(context, 1, model=generation_model,
                                                                  logprobs=max(self.config.top_k, ADAPTER_LOGPROBS)))]
            local = self.config.selection == "local"
            adapter = self.manifest.adapter_name or self.model
            if local and generation_model != adapter:
                calls.append(functools.partial(self._complete, self._body(context, 1, model=adapter,
                                                                          logprobs=ADAPTER_LOGPROBS)))
            answers = yield calls
            result.requests += len(calls)
            student_top = self._top(answers[0])
            candidate_ids, valid = self._candidates(student_top)
            adapter_top = self._top(answers[-1]) if local else None
            chosen = yield from self._select(context, candidate_ids, valid, adapter_top, result)
            generated.append(chosen)
            result.trigger_seconds.append(time.perf_counter() - stopped_at)
            result.triggers += 1
            result.flips += int(chosen != candidate_ids[0])
            result.trigger_steps.append(step)
            if chosen in self.end_ids:
                result.finish_reason = "stop"
                break
            if stop and any(s in self.tokenizer.decode(generated) for s in stop):
                result.finish_reason = "stop"
                break
        result.text = self.tokenizer.decode(generated, skip_special_tokens=True)
        return result

    def _generation_model(self) -> str:
        if self.config.selection == "local" and self.config.adapter_mode == "generate" and self.manifest.adapter_name:
            return self.manifest.adapter_name
        return self.model

    def _candidates(self, top: dict[int, float]) -> tuple[list[int], list[bool]]:
        """The student's top-K (best first) and which may be chosen (`candidate_ratio`), from its log-probabilities at
        the triggered step with the reserved rows masked."""
        ids = [i for i, value in top.items() if i not in self.reserved and math.isfinite(value)]
        if not ids:
            raise ServedS2TError(f"The server returned no candidate at a triggered step ({top}).")
        scores = torch.full((1, max(ids) + 1), float("-inf"))
        scores[0, ids] = torch.tensor([top[i] for i in ids])
        candidate_ids, _, valid = top_k_candidates(scores, min(self.config.top_k, len(ids)), self.config.candidate_ratio)
        return candidate_ids[0].tolist(), valid[0].tolist()

    def _select(self, context: list[int], candidate_ids: list[int], valid: list[bool],
                adapter_top: dict[int, float] | None, result: ServedCompletion) -> Generator[Calls, list[Any], int]:
        if self.config.selection == "teacher":
            ((choice, top1),) = yield [functools.partial(self._teacher_select, context, candidate_ids, valid)]
            result.requests += 1
            result.teacher_hits += int(top1 == choice)
            return choice
        config = self.config
        adapter = self.manifest.adapter_name or self.model
        bins = list(config.bin_token_ids)
        # after each candidate, the softmax over the bins alone: exactly the softmax of the bin logits
        calls = [functools.partial(self._complete, self._body(context + [c], 1, model=adapter, logprobs=len(bins),
                                                              keep=bins))
                 for c in candidate_ids]
        residual = config.scoring == "residual"
        # the residual form's term: the selector's log-probabilities of the candidates with the reserved rows masked
        # (`selector_log_probs`), read from its top log-probabilities on the context; where a candidate is not among
        # them, one more request keeps only the candidates (log-probabilities renormalised over them: the same shift
        # for every candidate, so the same argmax)
        missing = residual and any(c not in adapter_top for c in candidate_ids)
        if missing:
            calls.append(functools.partial(self._complete, self._body(context, 1, model=adapter,
                                                                      logprobs=len(candidate_ids),
                                                                      keep=candidate_ids)))
        answers = yield calls
        result.requests += len(calls)
        bin_log_probs = []
        for answer in answers[: len(candidate_ids)]:
            top = self._top(answer)
            bin_log_probs.append([top.get(b, float("-inf")) for b in bins])
        student_log_probs = None
        if residual:
            top = self._top(answers[-1]) if missing else adapter_top
            student_log_probs = torch.tensor([[top.get(c, float("-inf")) for c in candidate_ids]])
        logits = local_candidate_logits(
            torch.tensor([bin_log_probs]), torch.tensor(config.resolved_bin_values(), dtype=torch.float32),
            config.scoring, config.residual_tau, student_log_probs,
        )[0]
        logits = logits.masked_fill(~torch.tensor(valid), float("-inf"))
        return candidate_ids[int(logits.argmax())]

    def _teacher_select(self, context: list[int], candidate_ids: list[int], valid: list[bool]) -> tuple[int, Any]:
        """The teacher's choice among the candidates, and its own top-1 (`None` where it cannot tell)."""
        input_ids = torch.tensor([context])
        choice = self.teacher.select(
            input_ids, torch.ones_like(input_ids), torch.tensor([0]), torch.tensor([candidate_ids]),
            torch.tensor([valid]),
        )
        token = int(choice.token_ids[0])
        top1 = int(choice.top1[0]) if choice.top1 is not None else None
        return (token if token >= 0 else candidate_ids[0]), top1

    # ---------------------------------------------------------------------------------------------------------------
    # drivers

    def _sessions(self, prompts: Sequence[Any], max_new_tokens: int, temperature: float, top_p: float,
                  seed: int | None, stop: Sequence[str]) -> list[Generator]:
        """One decoding generator per prompt (strings tokenized as plain text, or token ids), the arguments checked."""
        if isinstance(prompts, (str, dict)) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("`prompts` must be a non-empty list of strings or of token-id lists.")
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}.")
        encoded = prompt_token_ids(prompts, self.tokenizer, chat_template=False)
        return [self._decode(p, max_new_tokens, temperature, top_p, seed, tuple(stop)) for p in encoded]

    def _count(self, completions: list[ServedCompletion]) -> None:
        for c in completions:
            self.totals["prompts"] += 1
            self.totals["steps"] += len(c.token_ids)
            self.totals["eligible_steps"] += max(0, len(c.token_ids) - self.config.warmup_tokens)
            self.totals["triggers"] += c.triggers
            self.totals["flips"] += c.flips
            self.totals["requests"] += c.requests
            self.totals["teacher_hits"] += c.teacher_hits
            self.totals["teacher_calls" if self.config.selection == "teacher" else "local_calls"] += c.triggers

    def _run_sync(self, session: Generator, cancelled: threading.Event | None = None) -> ServedCompletion | None:
        """Runs one prompt's requests in this thread; returns `None`, sending nothing more, once `cancelled` is set
        (another prompt failed)."""
        try:
            calls = next(session)
            while True:
                if cancelled is not None and cancelled.is_set():
                    session.close()
                    return None
                results = [calls[0]()] if len(calls) == 1 else self.client.map(lambda call: call(), calls)
                calls = session.send(results)
        except StopIteration as done:
            return done.value
        except BaseException:
            if cancelled is not None:
                cancelled.set()  # at once, before this worker takes the next prompt
            raise

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> list[ServedCompletion]:
        """
        Decodes every prompt with S2T, up to `max_concurrency` at once, and returns one [`ServedCompletion`] each, in
        order. The first error (a [`ServedS2TError`] once a request has failed all its tries) is raised at once: the
        prompts not yet started are dropped and the running ones send no further request.

        Args:
            prompts (`list[str]` or `list[list[int]]`): texts (encoded with the tokenizer, as given: apply a chat
                template first) or token ids.
            max_new_tokens (`int`, *optional*, defaults to 64): tokens to generate at most per prompt.
            temperature (`float`, *optional*, defaults to 0.0): sampling temperature of the untriggered steps (0:
                greedy). Triggered steps emit the selected token.
            top_p (`float`, *optional*, defaults to 1.0): nucleus sampling of the untriggered steps.
            seed (`int`, *optional*): the server's sampling seed (each resumed segment gets `seed + position`).
            stop (`list[str]`, *optional*): stop strings.
        """
        sessions = self._sessions(prompts, max_new_tokens, temperature, top_p, seed, stop)
        self._check()
        cancelled = threading.Event()
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(sessions)), thread_name_prefix="s2t-prompt")
        try:
            futures = [pool.submit(self._run_sync, session, cancelled) for session in sessions]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            # fail fast: the prompts not started are dropped, the running ones stop before their next request
            if failed:
                raise failed[0].exception()
            completions = [f.result() for f in futures]
        finally:
            cancelled.set()
            pool.shutdown(wait=False, cancel_futures=True)
        self._count(completions)
        return completions

    async def agenerate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> list[ServedCompletion]:
        """The asyncio form of [`~ServedS2T.generate`]: every prompt is a task of the running event loop (the HTTP
        requests run on worker threads, at most `max_concurrency` at once). The first error cancels the other tasks
        and is raised."""
        sessions = self._sessions(prompts, max_new_tokens, temperature, top_p, seed, stop)
        await asyncio.to_thread(self._check)
        limit = asyncio.Semaphore(self.max_concurrency)
        failed = False

        async def call(function: Callable[[], Any]) -> Any:
            nonlocal failed
            async with limit:
                if failed:  # another prompt failed: send nothing more
                    raise asyncio.CancelledError
                try:
                    return await asyncio.to_thread(function)
                except Exception:
                    failed = True
                    raise

        async def run(session: Generator) -> ServedCompletion:
            try:
                calls = next(session)
                while True:
                    results = await asyncio.gather(*(call(c) for c in calls))
                    calls = session.send(list(results))
            except StopIteration as done:
                return done.value

        tasks = [asyncio.ensure_future(run(session)) for session in sessions]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except BaseException:  # the caller cancelled: so are the prompts
            for task in tasks:
                task.cancel()
            raise
        if pending:  # fail fast: a prompt failed, the others are cancelled (requests in flight end on their own)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        errors = [task.exception() for task in done if not task.cancelled() and task.exception() is not None]
        if errors:
            raise errors[0]
        completions = [task.result() for task in tasks]
        self._count(completions)
        return completions
