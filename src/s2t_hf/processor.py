"""`S2TLogitsProcessor`: Select-to-Think decoding inside `model.generate`.

The processor is an orchestrator. Each concern is an object resolved once, at construction:

- the trigger policy ([`~s2t_hf.triggers.TriggerPolicy`], from `config.trigger`): which rows trigger;
- the selection policy ([`~s2t_hf.selection.SelectionPolicy`], from `config.selection`): which token they emit;
- the local scorer ([`~s2t_hf.local_scoring.LocalScorer`]) of S2T-Local: the extra forward and its path;
- the step tracker ([`~s2t_hf.steps.StepTracker`]): the guards of every step, finished rows, the one host sync;
- statistics and trigger records ([`~s2t_hf.stats`]);
- the selector's adapter state ([`~s2t_hf.adapter_state.AdapterState`]).

The fused loop (`s2t_hf.generate`) talks to it through a [`~s2t_hf.fused.FusedSession`] only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, PreTrainedModel
from transformers.generation.logits_process import LOGITS_PROCESSOR_INPUTS_DOCSTRING
from transformers.utils import add_start_docstrings, logging

from .calibration import calibrate_threshold
from .config import S2TConfig
from .fused import FusedSession
from .kv import output_rows, require_decoder_only, unwrap_model
from .local_scoring import LocalScorer, check_cache_path, encodes_last_token
from .selection import SELECTIONS, PendingSelection, Selection, top_k_candidates
from .state_hook import GenerationStateHook
from .stats import CallStats, RunningTotals, TriggerRecord, trigger_records
from .steps import INPUTS_EMBEDS_REFUSED, DecodingStep, StepTracker
from .teachers import Teacher, TeacherChoice, as_teacher
from .teachers.teacher_prompts import check_teacher_prompts, rows_of_prompts
from .triggers import TRIGGERS


__all__ = ["INPUTS_EMBEDS_REFUSED", "PendingSelection", "S2TLogitsProcessor", "forced_scores"]

logger = logging.get_logger(__name__)


def forced_scores(scores: torch.Tensor, chosen: torch.Tensor, triggered: torch.Tensor) -> torch.Tensor:
    """`scores` with every triggered row `-inf` but at its `chosen` token (score 0), so any decoding emits it."""
    forced = torch.full_like(scores, float("-inf")).scatter_(-1, chosen.clamp_min(0)[:, None], 0.0)
    return torch.where(triggered[:, None], forced, scores)


def _config_from(config: S2TConfig | None, config_kwargs: dict[str, Any]) -> S2TConfig:
    """The processor's config: `config` (or the defaults) with the fields in `config_kwargs` replaced."""
    fields = {f.name for f in dataclasses.fields(S2TConfig)}
    unknown = sorted(set(config_kwargs) - fields)
    if unknown:
        close = {name: difflib.get_close_matches(name, fields, n=1) for name in unknown}
        hints = ", ".join(f"`{n}`" + (f" (did you mean `{c[0]}`?)" if c else "") for n, c in close.items())
        raise TypeError(f"Unknown S2T setting(s) {hints}; the settings are the fields of `S2TConfig`.")
    if config is None:
        config = S2TConfig(**config_kwargs)
    elif config_kwargs:
        config = dataclasses.replace(config, **config_kwargs)
    if not isinstance(config, S2TConfig):
        raise TypeError(f"`config` must be an `S2TConfig`, got {type(config).__name__}.")
    return config


class S2TLogitsProcessor(LogitsProcessor):
    r"""
    Select to Think (S2T) as a [`~transformers.LogitsProcessor`]: at uncertain decoding steps (triggers), the next token
    is chosen among the model's own top-K candidates by a selector instead of taken from the model's own ranking.

    - `selection="teacher"` (collaborative S2T): the candidate the teacher model finds most probable.
    - `selection="takeover"` (baseline): the teacher's own argmax over the whole vocabulary.
    - `selection="local"` (S2T-Local): the candidate with the highest expected bin value under a trained
      [`S2TSelector`]; no teacher. Load one with [`S2TLogitsProcessor.from_pretrained`].

    At an untriggered step the scores pass through unchanged (except reserved bin rows, which are always masked). At a
    triggered step every token but the selected one is set to `-inf`, so greedy search and sampling both emit it.

    `generate` hands a logits processor only `(input_ids, scores)`. The processor obtains the rest itself: it registers
    a forward pre-hook on `model` that records the attention mask (left padding included), the position ids and the live
    KV cache of each forward. Pass the same `model` you call `generate` on, and call [`~S2TLogitsProcessor.remove_hooks`]
    (or use the processor as a context manager) when done. The teacher keeps its own KV cache; when the trigger does not
    need the teacher (every trigger but `kl`), the teacher runs only at trigger steps and catches up on all tokens since
    its last call in one forward.

    Supported: greedy search and multinomial sampling, any batch size, left padding, `num_return_sequences`. Beam search
    and assisted generation raise an error.

    Args:
        model (`PreTrainedModel`):
            The student: the model whose `generate` you call (a PEFT model is unwrapped).
        config (`S2TConfig`, *optional*):
            Decoding settings; keyword arguments in `config_kwargs` override its fields.
        teacher (`PreTrainedModel` or `Teacher`, *optional*):
            The teacher, needed by `selection="teacher"`/`"takeover"` and `trigger="kl"`: a transformers model (it
            may sit on another device and dtype; probabilities are compared in float32 on the student's device) or a
            [`~s2t_hf.teachers.Teacher`], e.g. a [`~s2t_hf.teachers.RemoteTeacher`] served by vLLM (not with `kl`).
        selector (`S2TSelector`, *optional*):
            The local selector, needed by `selection="local"` and by `trigger="learned"` (whose signal is the logit of
            the selector's trigger row: a linear probe on the student's final hidden state, read from the scores
            `generate` computes anyway). With `adapter_mode="scoring"` the selector's LoRA is off while the student
            generates, whatever the selection.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The student's tokenizer. Needed with a teacher of another tokenizer
            (`LocalTeacher(model, tokenizer=teacher_tokenizer)`, whose candidates are then scored as text), with
            `teacher_prompts`, and when the teacher's and the student's output layers are padded differently.
        teacher_prompts (`list[str]` or `list[list[dict]]`, *optional*):
            One prompt per prompt row that the teacher reads instead of the student's prompt, followed by the
            student's continuation: a string, or chat messages rendered with the teacher's own chat template (a
            system prompt, or privileged information such as a reference solution: a "hinted" teacher). Set
            `processor.teacher_prompts` again before each `generate` call with other prompts.
        eos_token_id (`int` or `list[int]`, *optional*):
            End-of-sequence ids: rows that emitted one stop counting and triggering. Defaults to the model's
            generation config.
        lazy_teacher (`bool`, *optional*, defaults to `True`):
            Run the teacher only at trigger steps when the trigger allows it. `False` runs it at every step.
        record_triggers (`bool`, *optional*, defaults to `False`):
            Keep one record per trigger (context, candidates, probabilities, choice) in `processor.records`.
        config_kwargs:
            Fields of [`S2TConfig`], e.g. `trigger="entropy"`, `trigger_threshold=1.2`, `top_k=8`.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from s2t_hf import S2TLogitsProcessor
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    >>> student = AutoModelForCausalLM.from_config(config)
    >>> teacher = AutoModelForCausalLM.from_config(config)
    >>> with S2TLogitsProcessor(student, teacher=teacher, trigger="always", selection="teacher", top_k=4) as s2t:
    ...     out = student.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False,
    ...                            logits_processor=[s2t])
    ...     s2t.stats["triggers"]
    2

    ```
    """

    def __init__(
        self,
        model: PreTrainedModel,
        config: S2TConfig | None = None,
        *,
        teacher: PreTrainedModel | Teacher | None = None,
        selector: Any = None,
        tokenizer: Any = None,
        eos_token_id: int | Sequence[int] | None = None,
        lazy_teacher: bool = True,
        record_triggers: bool = False,
        teacher_prompts: Sequence[Any] | None = None,
        **config_kwargs: Any,
    ):
        config = _config_from(config, config_kwargs)
        if model is None or not isinstance(model, torch.nn.Module):
            raise TypeError(
                "`model` must be the model you call `generate` on: the processor reads its attention mask and cache."
            )
        self.model = model
        self.student = unwrap_model(model)
        require_decoder_only(self.student)
        self.teacher = teacher
        self.teacher_interface = as_teacher(teacher, tokenizer)
        self.selector = selector
        self.tokenizer = tokenizer
        self.record_triggers = record_triggers
        self._check_collaborators(config)
        self.trigger_policy = TRIGGERS[config.trigger](config, selector=selector)
        self.lazy_teacher = lazy_teacher and not self.trigger_policy.needs_teacher_every_step
        self.student_vocab = output_rows(self.student)
        reserved = list(selector.reserved_token_ids) if selector is not None else list(config.reserved_token_ids)
        self.reserved_ids = torch.tensor(sorted(reserved), dtype=torch.long)
        bad = [i for i in reserved if not 0 <= i < self.student_vocab]
        if bad:
            raise ValueError(
                f"Reserved rows {bad} (bins, trigger) lie outside the model's {self.student_vocab} output rows. Was the "
                "selector saved for another model?"
            )
        if self.teacher_interface is not None:
            self.teacher_interface.prepare(self.student, tokenizer, reserved)
        self._check_sizes(config, lazy_teacher)
        self.teacher_prompts = check_teacher_prompts(teacher_prompts)
        if self.teacher_prompts is not None and self.teacher_interface is None:
            raise ValueError("`teacher_prompts` are read by a teacher: pass `teacher=` as well.")
        generation_config = getattr(self.student, "generation_config", None)
        if eos_token_id is None:
            eos_token_id = getattr(generation_config, "eos_token_id", None)
        if isinstance(eos_token_id, int):
            eos_token_id = [eos_token_id]
        self.eos_token_ids = torch.tensor(list(eos_token_id or []), dtype=torch.long)
        self.pad_token_id = getattr(generation_config, "pad_token_id", None) or 0

        self.adapter_state = selector.adapter_state if selector is not None else None
        # a selection that reads the student's logits after each candidate (S2T-Local) gets a scorer
        local = SELECTIONS[config.selection].scores_candidates
        # whether the adapter leaves the cache as the base model's (checked once: it walks the modules)
        preserves_cache = local and selector.preserves_cache
        if local:
            check_cache_path(self.student, config, preserves_cache)
        # re-encoding the step's last token on a sliding-window layer needs the layer's state from before the forward
        self.state_hook = GenerationStateHook(
            self.student, keep_previous_sliding=local and encodes_last_token(config),
            watch_row=self.trigger_policy.watch_row,
        )
        self.scorer = None
        if local:
            self.scorer = LocalScorer(
                self.student, self.state_hook, config, self.adapter_state,
                preserves_cache=preserves_cache, pad_token_id=self.pad_token_id,
            )
        self.selection_policy = SELECTIONS[config.selection](
            config, teacher=self.teacher_interface, scorer=self.scorer, selector=selector,
            with_log_probs=record_triggers,
        )
        self.tracker = StepTracker(self.state_hook, self.eos_token_ids, config.warmup_tokens)
        self._config = config
        self.call_stats = CallStats()
        self.running_totals = RunningTotals()
        self.trigger_records: list[TriggerRecord] = []
        self._session: FusedSession | None = None
        # set by `from_pretrained`, whose selector the caller never held: closing switches its adapter off
        self.restores_model_on_close = False
        self._open_adapter()
        self.reset()

    # ------------------------------------------------------------------ construction

    def _check_collaborators(self, config: S2TConfig) -> None:
        """The teacher and the selector the settings need are there, and the selector belongs to `model`."""
        if config.needs_teacher and self.teacher is None:
            raise ValueError(
                f"`selection={config.selection!r}` with `trigger={config.trigger!r}` needs a `teacher` model. Pass "
                "`teacher=...`, or use `selection='local'` with a trained selector and a teacher-free trigger."
            )
        teacher_model = self.teacher
        if not isinstance(teacher_model, torch.nn.Module):
            teacher_model = getattr(teacher_model, "model", None)  # a `LocalTeacher`'s model
        if isinstance(teacher_model, torch.nn.Module) and unwrap_model(teacher_model) is self.student:
            raise ValueError(
                "The teacher is the student's own model object: the teacher's forwards would pass through the "
                "processor's hook on `model` and be taken for the student's steps. To use the student's weights as the "
                "teacher (e.g. a hinted teacher with `teacher_prompts`), pass a copy: "
                "`LocalTeacher(copy.deepcopy(model), tokenizer=tokenizer)`."
            )
        if SELECTIONS[config.selection].scores_candidates and self.selector is None:
            raise ValueError(
                "`selection='local'` needs a trained `selector` (an `S2TSelector`); load one with "
                "`S2TLogitsProcessor.from_pretrained(path_or_repo_id, model=model)`."
            )
        if self.selector is None:
            return
        from .selector import S2TSelector

        if not isinstance(self.selector, S2TSelector):
            raise TypeError(
                f"`selector` must be an `S2TSelector`, got {type(self.selector).__name__}; load one with "
                "`S2TSelector.from_pretrained(model, path)` (or use `S2TLogitsProcessor.from_pretrained`)."
            )
        if unwrap_model(self.selector.model) is not self.student:
            raise ValueError(
                "The selector is attached to another model than `model`. Load it onto the model you generate with: "
                "`S2TSelector.from_pretrained(model, path)`."
            )

    def _check_sizes(self, config: S2TConfig, lazy_teacher: bool) -> None:
        for name in ("top_k", "signal_top_k"):
            if getattr(config, name) > self.student_vocab:
                raise ValueError(
                    f"`{name}={getattr(config, name)}` exceeds the model's {self.student_vocab} output rows; set "
                    f"`{name}` to at most {self.student_vocab} (the paper uses `top_k=8`)."
                )
        teacher = self.teacher_interface
        if teacher is not None and not teacher.full_distribution and not self.lazy_teacher:
            reason = "the `kl` trigger" if self.trigger_policy.needs_teacher_every_step else "`lazy_teacher=False`"
            raise ValueError(
                f"{reason} needs the teacher's distribution over the whole vocabulary at every step, which a "
                f"`{type(teacher).__name__}` cannot give (a served teacher, or one with another tokenizer). Use the "
                "`entropy`, `learned` or `random` trigger (calibrated without a teacher), or a local teacher model "
                "with the student's tokenizer."
            )

    @property
    def config(self) -> S2TConfig:
        """The decoding settings; assigning a new config hands it to the trigger, the selection and the scorer."""
        return self._config

    @config.setter
    def config(self, config: S2TConfig) -> None:
        if not isinstance(config, S2TConfig):
            raise TypeError(f"`config` must be an `S2TConfig`, got {type(config).__name__}.")
        self._config = config
        for part in (self.trigger_policy, self.selection_policy, self.scorer):
            if part is not None:
                part.config = config
        self.tracker.warmup_tokens = config.warmup_tokens

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        model: PreTrainedModel,
        *,
        teacher: PreTrainedModel | Teacher | None = None,
        revision: str | None = None,
        token: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
        **kwargs: Any,
    ) -> S2TLogitsProcessor:
        """
        Loads a trained local selector (an S2T selector adapter: PEFT weights + `s2t_config.json`) onto `model` and
        returns a processor that decodes with it (S2T-Local), with the saved trigger, threshold and K.

        Args:
            path_or_repo_id (`str` or `os.PathLike`):
                A directory written by `S2TSelector.save_pretrained` or `S2TTrainer`, or a Hub repository id (read
                through the Hugging Face cache, so `HF_HUB_OFFLINE=1` works once it is cached).
            model (`PreTrainedModel`):
                The base model the selector was trained on. The adapter is injected in place and is active only while
                the processor is open: once it is closed (the end of a `with` block, or `remove_hooks()`), `model`
                computes the base model's logits again, and opening the processor again (`with s2t:`) switches the
                selector back on.
            teacher (`PreTrainedModel`, *optional*):
                Only needed if you override `selection` or `trigger` to use a teacher.
            kwargs:
                Other arguments of [`S2TLogitsProcessor`] (e.g. `record_triggers`) or [`S2TConfig`] fields to override
                (e.g. `trigger_threshold=2.0`).

        Examples:

        ```python
        >>> s2t = S2TLogitsProcessor.from_pretrained("org/qwen2.5-1.5b-s2t", model=model)  # doctest: +SKIP
        >>> out = model.generate(**inputs, logits_processor=[s2t])  # doctest: +SKIP
        ```
        """
        from .selector import S2TSelector

        selector = S2TSelector.from_pretrained(
            model,
            path_or_repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
        config_fields = {f.name for f in dataclasses.fields(S2TConfig)}
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in config_fields}
        overrides.setdefault("selection", "local")
        config = dataclasses.replace(selector.config, **overrides)
        processor = cls(model, config, teacher=teacher, selector=selector, **kwargs)
        processor.restores_model_on_close = True
        return processor

    # ------------------------------------------------------------------ opening and closing

    def _open_adapter(self) -> None:
        """The selector as the processor generates with it: LoRA off under `adapter_mode="scoring"`, rows merged."""
        if self.adapter_state is None:
            return
        if self.restores_model_on_close:  # switched off when the processor last closed
            self.adapter_state.set_rows(True)
        if self.config.adapter_mode == "scoring":
            self.adapter_state.set_lora(False)
        else:
            if self.restores_model_on_close:
                self.adapter_state.set_lora(True)
            # under `adapter_mode="generate"` the LoRA is on for every token, generated or scored: merged into the
            # weights while the processor is open, it costs what the base model costs
            self.adapter_state.merge_lora(True)
        # PEFT's trainable-token layers rebuild the whole output matrix at every forward while they are active;
        # merged, they cost nothing. Only the reserved rows change, and those are never generated (masked) nor fed,
        # so the student's own distribution is untouched: they stay merged while the processor is open.
        self.adapter_state.merge_rows(True)

    def remove_hooks(self) -> None:
        """
        Removes the forward pre-hook from the model and unmerges the selector's bin rows and, under
        `adapter_mode="generate"`, its LoRA (merged while the processor is open). Then a processor given an
        `S2TSelector` leaves the selector's adapter active (LoRA on, as the selector was before, e.g. to train it
        further), while one loaded by [`~S2TLogitsProcessor.from_pretrained`] (`restores_model_on_close`) switches the
        adapter off: the model computes the base model's logits again until the processor is opened again.
        """
        self.state_hook.remove()
        if self.adapter_state is not None and self.restores_model_on_close:
            self.adapter_state.merge_lora(False)
            self.adapter_state.set_lora(False)
            self.adapter_state.set_rows(False)
        elif self.adapter_state is not None:
            if self.config.adapter_mode == "scoring":
                self.adapter_state.set_lora(True)
            self.adapter_state.merge_lora(False)
            self.adapter_state.merge_rows(False)

    def __enter__(self) -> S2TLogitsProcessor:
        """Opens the processor: its hook is registered again if an earlier `with` block (or `remove_hooks`) removed it."""
        self.state_hook.attach()
        self._open_adapter()
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove_hooks()

    @contextlib.contextmanager
    def fused_session(self, model: torch.nn.Module, cache: Any) -> Iterator[FusedSession]:
        """
        The [`~s2t_hf.fused.FusedSession`] of one `generate` call of the fused loop on `model` and its `cache`: the
        loop's only way to the processor. Held by the processor while the block runs.
        """
        if self.state_hook.module is not model and self.student is not model:
            raise ValueError("`s2t` was built for another model; build it with the model you call `generate` on.")
        self._session = FusedSession.decide(self, self.state_hook, model, cache)
        try:
            yield self._session
        finally:
            self._session = None

    # ------------------------------------------------------------------ state and statistics

    def reset(self) -> None:
        """
        Clears the per-generation state. Called automatically when a new `generate` call starts (the last call's
        statistics are added to [`~S2TLogitsProcessor.total_stats`] first).
        """
        if self.call_stats.started:
            self.running_totals.add(self.stats)
        self.call_stats.clear()
        self.tracker.clear()
        if self.teacher_interface is not None:
            self.teacher_interface.reset()
        if self.scorer is not None:
            self.scorer.reset()
        self.trigger_policy.reset()
        if self._session is not None:
            self._session.pending = None
        self.trigger_records = []

    @property
    def records(self) -> list[dict[str, Any]]:
        """
        With `record_triggers=True`, one dictionary per trigger of the last `generate` call: `row`, `step`, `signal`,
        `context_ids`, `cand_ids`, `student_probs`, `chosen_id` and, where known, `teacher_probs`, `teacher_top1`,
        `local_scores` (see [`~s2t_hf.stats.TriggerRecord`]).
        """
        return [record.to_dict() for record in self.trigger_records]

    def reset_total_stats(self) -> None:
        """Starts [`~S2TLogitsProcessor.total_stats`] afresh (the current call's statistics included)."""
        self.running_totals.clear()
        self.call_stats.clear()

    @property
    def total_stats(self) -> dict[str, Any]:
        """
        Statistics summed over every `generate` call since the processor was built, [`reset_total_stats`] was called
        or [`calibrate`] ran: the counts of [`stats`] (`steps`, `triggers`, `flips`, `teacher_calls`, ...), their rates,
        and `generate_calls`. Use it for a dataset decoded in several batches; `stats` describes the last call only.
        """
        return self.running_totals.as_dict(self.stats if self.call_stats.started else None)

    @property
    def stats(self) -> dict[str, Any]:
        """
        Statistics of the last `generate` call: totals and per-row lists.

        - `steps`: generated tokens of unfinished rows; `eligible_steps`: those after the warm-up (the denominator of
          `trigger_rate`);
        - `triggers`, `trigger_rate`, `flips` (the selected token differs from the student's top-1);
        - `teacher_hits`: triggers where the teacher's top-1 token was among the candidates (`teacher_hit_rate`);
        - `teacher_calls`, `teacher_tokens`: teacher forward calls and the tokens they encoded;
        - `local_calls`: extra student forwards that scored candidates; `local_path`: `cache`, `fused` or `recompute`.
        """
        teacher, scorer = self.teacher_interface, self.scorer
        return self.call_stats.as_dict(
            {
                "teacher_calls": teacher.calls if teacher is not None else 0,
                "teacher_tokens": teacher.tokens if teacher is not None else 0,
                "local_calls": scorer.calls if scorer is not None else 0,
                "local_path": scorer.last_path if scorer is not None else None,
            }
        )

    def local_scoring_path(self) -> tuple[str, str]:
        """
        The path S2T-Local scores candidates on in the current `generate` call and why: `("cache", reason)` (one forward
        of the triggered rows on the live cache, sliding-window layers included) or `("recompute", reason)` (every
        prefix encoded again, the last resort). Decided once per `generate` call.
        """
        if self.scorer is None:
            raise ValueError("Only `selection='local'` scores candidates with the student; this processor does not.")
        return self.scorer.path()

    # ------------------------------------------------------------------ the processor

    def _begin_step(self, input_ids: torch.Tensor, scores: torch.Tensor) -> DecodingStep:
        """Guards the call, resets at a new `generate` call, masks the reserved rows, and finds the eligible rows."""
        if self.tracker.starts_generation(input_ids):
            self.reset()
        first = self.tracker.first_step
        index, active = self.tracker.begin(input_ids, scores, refuse_inputs_embeds=self.trigger_policy.can_fire)
        if first:
            self.call_stats.start(input_ids.shape[0], input_ids.device)
            if self.teacher_interface is not None:
                prompts = self.teacher_prompts
                if prompts is not None:
                    prompts = rows_of_prompts(prompts, input_ids.shape[0])
                self.teacher_interface.begin([input_ids.shape[1]] * input_ids.shape[0], prompts)
        watched = None
        if self.trigger_policy.watch_row is not None:
            watched = self.tracker.watched_logits(scores, type(self.student).__name__)
        if self.reserved_ids.numel():
            scores = scores.index_fill(-1, self.reserved_ids.to(scores.device), float("-inf"))
        return DecodingStep(
            input_ids, scores, index, active, self.tracker.eligible(index, active), trigger_logits=watched,
            teacher=self.teacher_interface,
        )

    @add_start_docstrings(LOGITS_PROCESSOR_INPUTS_DOCSTRING)
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = self._begin_step(input_ids, scores)
        if not self.trigger_policy.can_fire:
            # nothing to decide: a few element-wise ops, no host sync, nothing that grows with the length
            self.call_stats.count_step(step.active, step.eligible)
            return step.scores
        step.attention_mask = self.tracker.attention_mask(input_ids)
        signal = self.trigger_policy.signal(step)
        if self.teacher_interface is not None and not self.lazy_teacher and step.active.any():
            step.teacher_log_probs()  # the teacher follows every step
        triggered = self.trigger_policy.fire(signal, step.eligible)
        self.call_stats.count_step(step.active, step.eligible, triggered)
        if not self.tracker.any_triggered(triggered, step.scores, step.active, step.index):  # the one host sync
            return step.scores
        candidate_ids, candidate_log_probs, valid = top_k_candidates(
            step.scores, self.config.top_k, self.config.candidate_ratio
        )
        pending = PendingSelection(
            input_ids, step.attention_mask, signal, triggered, candidate_ids, candidate_log_probs, valid,
            step.teacher_distribution,
        )
        session = self._session
        if session is not None and session.fused:
            # the fused loop scores the candidates in its next decoding forward and completes the selection; until
            # then the triggered rows may emit only their valid candidates
            session.hand_over(pending)
            allowed = torch.zeros_like(step.scores, dtype=torch.bool).scatter_(-1, candidate_ids, valid)
            return torch.where(triggered[:, None] & ~allowed, float("-inf"), step.scores)
        selection = self.selection_policy.select(step, pending)
        self._account(pending, selection)
        return forced_scores(step.scores, selection.chosen, triggered)

    def complete_selection(self, pending: PendingSelection, logits: torch.Tensor, path: str | None = None) -> Selection:
        """
        Local selection of a pending step from the student's logits at the candidates of its triggered rows, and its
        accounting. Called through a [`~s2t_hf.fused.FusedSession`] by the fused loop.

        Args:
            pending (`PendingSelection`): the step's triggered rows and candidates.
            logits (`torch.Tensor` of shape `(triggered, K, vocab)`): the selector's logits after each candidate.
            path (`str`, *optional*): `"fused"` when the logits come from the fused loop's decoding forward.

        Returns:
            [`~s2t_hf.selection.Selection`]: `chosen` (every row's token, -1 where not triggered) and `positions` (the
            chosen candidate's position in each triggered row).
        """
        selection = self.selection_policy.complete(pending, logits)
        if path == "fused":
            self.scorer.note_fused()
        self._account(pending, selection)
        return selection

    def _account(self, pending: PendingSelection, selection: Selection) -> None:
        """Statistics and records of a step whose triggered rows have been decided."""
        triggered, candidate_ids = pending.triggered, pending.candidate_ids
        teacher_choice = selection.teacher_choice
        if teacher_choice is None and pending.teacher_log_probs is not None:
            # local selection under the `kl` trigger: the teacher's distribution is already there
            teacher_rows = pending.teacher_log_probs[triggered.nonzero()[:, 0]]
            teacher_choice = TeacherChoice(
                token_ids=teacher_rows.argmax(-1),
                top1=teacher_rows.argmax(-1),
                candidate_log_probs=teacher_rows.gather(-1, candidate_ids[triggered]),
            )
        top1 = teacher_choice.top1 if teacher_choice is not None else None
        unscored = teacher_choice.unscored if teacher_choice is not None else None
        self.call_stats.count_decisions(triggered, selection.chosen, candidate_ids, top1, unscored)
        if self.record_triggers:
            step = pending.input_ids.shape[1] - self.tracker.prompt_length
            self.trigger_records += trigger_records(
                step, pending, selection.chosen, teacher_choice, selection.local_logits
            )

    def calibrate(
        self,
        prompts: Iterable[Any],
        target_rate: float | None = None,
        *,
        tokenizer: Any = None,
        batch_size: int = 8,
        chat_template: bool | None = None,
        **generate_kwargs: Any,
    ) -> float:
        """
        Sets `trigger_threshold` so that the trigger fires on a fraction `target_rate` of eligible steps.

        Generates greedily (no triggers) on `prompts`, collects the trigger signal (entropy, KL or the learned trigger
        row's logit) at every eligible step and takes its `1 - target_rate` quantile. Held-out prompts then trigger at
        about that rate. See [`~s2t_hf.calibration.calibrate_threshold`].

        Args:
            prompts (iterable of `str`, of chat messages or of token-id lists):
                Calibration prompts, formatted as [`~s2t_hf.prompts.encode_prompts`] and
                [`~s2t_hf.generation.generate_batched`] format them: strings and chat messages go through the chat
                template when the tokenizer has one. Strings need `tokenizer` (or the one given to the processor).
                Calibrate on prompts like the ones you will generate from: the threshold is a quantile of the signal
                on them.
            target_rate (`float`, *optional*):
                Desired trigger rate in (0, 1); defaults to `config.trigger_rate`.
            tokenizer (`PreTrainedTokenizerBase`, *optional*):
                Tokenizer for string prompts.
            batch_size (`int`, *optional*, defaults to 8):
                Prompts per `generate` call.
            chat_template (`bool`, *optional*):
                Format strings and chat messages with the tokenizer's chat template (generation prompt added). By
                default on when the tokenizer has a template, as in `encode_prompts` and `generate_batched`; pass
                `False` for strings already formatted (they are then tokenized as plain text).
            generate_kwargs:
                Passed to `generate` (e.g. `max_new_tokens=128`). Sampling is turned off.

        Returns:
            `float`: the threshold, also stored in `processor.config.trigger_threshold`.
        """
        return calibrate_threshold(
            self, prompts, target_rate, tokenizer=tokenizer, batch_size=batch_size, chat_template=chat_template,
            **generate_kwargs
        )
