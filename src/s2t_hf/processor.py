"""`S2TLogitsProcessor`: Select-to-Think decoding inside `model.generate`."""

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

from .config import THRESHOLD_TRIGGERS, S2TConfig
from .kv import (
    GenerationStateHook,
    architecture_scoring_support,
    cache_scoring_support,
    can_drop_last,
    output_rows,
    positions_from_attention_mask,
    require_decoder_only,
    score_candidates_by_recompute,
    score_candidates_on_cache,
)
from .prompts import left_pad, prompt_token_ids
from .selection import local_candidate_logits, selector_log_probs, top_k_candidates
from .teachers import Teacher, TeacherChoice, as_teacher
from .triggers import entropy_signal, kl_signal, threshold_for_rate


logger = logging.get_logger(__name__)

# why S2T-Local cannot score on the live cache when the adapter is disabled while generating and changes keys and values
_ADAPTER_CHANGES_CACHE = (
    "the cache was built without the adapter (`adapter_mode='scoring'`) and the adapter changes keys and values "
    "(create the selector with `preserve_cache=True` to score on the cache)"
)

INPUTS_EMBEDS_REFUSED = (
    "`generate` was given the prompt as `inputs_embeds`: S2T needs its token ids (the teacher reads them and "
    "candidates are scored after them). Pass `input_ids` (and `attention_mask`) instead."
)


def forced_scores(scores: torch.Tensor, chosen: torch.Tensor, triggered: torch.Tensor) -> torch.Tensor:
    """`scores` with every triggered row `-inf` but at its `chosen` token (score 0), so any decoding emits it."""
    forced = torch.full_like(scores, float("-inf")).scatter_(-1, chosen.clamp_min(0)[:, None], 0.0)
    return torch.where(triggered[:, None], forced, scores)


@dataclasses.dataclass
class PendingSelection:
    """A step whose triggered rows wait for their candidates' scores (local selection)."""

    input_ids: torch.Tensor
    mask: torch.Tensor
    signal: torch.Tensor | None
    triggered: torch.Tensor
    candidate_ids: torch.Tensor
    candidate_log_probs: torch.Tensor
    valid: torch.Tensor
    teacher_log_probs: torch.Tensor | None = None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (PEFT modifies it in place, so hooks on it see every forward)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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
            The shared tokenizer. Needed only when the teacher's and the student's output sizes differ (padded
            vocabularies): only the tokenizer's ids are compared then.
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
        **config_kwargs: Any,
    ):
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
        if model is None or not isinstance(model, torch.nn.Module):
            raise TypeError(
                "`model` must be the model you call `generate` on: the processor reads its attention mask and cache."
            )
        self.config = config
        self.model = model
        self.student = _unwrap(model)
        require_decoder_only(self.student)
        self.teacher = teacher
        self._teacher = as_teacher(teacher, tokenizer)
        self.selector = selector
        self.tokenizer = tokenizer
        self.lazy_teacher = lazy_teacher and config.trigger != "kl"
        self.record_triggers = record_triggers

        if config.needs_teacher and teacher is None:
            raise ValueError(
                f"`selection={config.selection!r}` with `trigger={config.trigger!r}` needs a `teacher` model. Pass "
                "`teacher=...`, or use `selection='local'` with a trained selector and a teacher-free trigger."
            )
        if config.selection == "local" and selector is None:
            raise ValueError(
                "`selection='local'` needs a trained `selector` (an `S2TSelector`); load one with "
                "`S2TLogitsProcessor.from_pretrained(path_or_repo_id, model=model)`."
            )
        if config.trigger == "learned" and selector is None:
            raise ValueError(
                "`trigger='learned'` reads the learned trigger row of a selector: pass `selector=...` (an `S2TSelector` "
                "created with `learned_trigger=True` and fit with `s2t_hf.learned_trigger.fit_trigger_row`), or load "
                "one with `S2TLogitsProcessor.from_pretrained(path_or_repo_id, model=model)` (add "
                "`selection='teacher', teacher=...` for collaborative S2T)."
            )
        if selector is not None:
            self._check_selector(selector)
        self._trigger_row: int | None = None
        if config.trigger == "learned":
            self._trigger_row = self._learned_trigger_row(selector, config)
        self.student_vocab = output_rows(self.student)
        for name in ("top_k", "signal_top_k"):
            if getattr(config, name) > self.student_vocab:
                raise ValueError(
                    f"`{name}={getattr(config, name)}` exceeds the model's {self.student_vocab} output rows; set "
                    f"`{name}` to at most {self.student_vocab} (the paper uses `top_k=8`)."
                )
        if self._teacher is not None and not self._teacher.full_distribution and not self.lazy_teacher:
            reason = "the `kl` trigger" if config.trigger == "kl" else "`lazy_teacher=False`"
            raise ValueError(
                f"{reason} needs the teacher's distribution over the whole vocabulary at every step, which a "
                f"`{type(self._teacher).__name__}` cannot give. Use the `entropy` or `random` trigger (calibrated "
                "without a teacher), or a local teacher model."
            )

        reserved: list[int] = []
        if selector is not None:
            reserved = list(selector.reserved_token_ids)
        else:
            reserved = list(config.reserved_token_ids)
        self.reserved_ids = torch.tensor(sorted(reserved), dtype=torch.long)
        bad = [i for i in reserved if not 0 <= i < self.student_vocab]
        if bad:
            raise ValueError(
                f"Reserved rows {bad} (bins, trigger) lie outside the model's {self.student_vocab} output rows. Was the selector "
                "saved for another model?"
            )
        if self._teacher is not None:
            self._teacher.prepare(self.student, tokenizer, reserved)
        if eos_token_id is None:
            eos_token_id = getattr(getattr(self.student, "generation_config", None), "eos_token_id", None)
        if isinstance(eos_token_id, int):
            eos_token_id = [eos_token_id]
        self.eos_token_ids = torch.tensor(list(eos_token_id or []), dtype=torch.long)
        self.pad_token_id = getattr(getattr(self.student, "generation_config", None), "pad_token_id", None) or 0

        # whether the adapter leaves the cache as the base model's (checked once: it walks the modules)
        self._selector_preserves_cache = config.selection == "local" and selector.preserves_cache
        if config.selection == "local" and config.local_path == "cache":
            # what the model or the adapter rules out is said now, not at the first trigger
            if config.adapter_mode == "scoring" and not self._selector_preserves_cache:
                ok, reason = False, _ADAPTER_CHANGES_CACHE
            else:
                ok, reason = architecture_scoring_support(self.student)
            if not ok:
                raise ValueError(
                    f"`local_path='cache'` cannot serve this {type(self.student).__name__}: {reason}. Use "
                    "`local_path='auto'` (scores on the cache where it can, else recomputes the prefixes) or "
                    "`local_path='recompute'`."
                )
        self._calibrating = False
        self._forwards_seen = -1
        self._cumulative: dict[str, int] = {}
        self._signals: list[torch.Tensor] = []
        self._generator: torch.Generator | None = None
        # The residual form with `adapter_mode="scoring"` encodes the step's last token again (adapter on); on a
        # sliding-window layer that needs the layer's state from before the step's forward.
        self._rescore = config.selection == "local" and config.scoring == "residual" and config.adapter_mode == "scoring"
        self._hook = GenerationStateHook(
            self.student, on_prefill=self.reset, keep_previous_sliding=self._rescore, watch_row=self._trigger_row
        )
        # set by the fused decoding loop (`s2t_hf.generate`) while it runs: local selection is then deferred to its
        # decoding forward instead of a forward of its own
        self._fused = False
        self.pending: PendingSelection | None = None
        # the adapter's layers, switched directly at each scoring call (walking the whole model each time costs as
        # much as a forward of a small model)
        self._adapter_layers: list[torch.nn.Module] = []
        # PEFT's trainable-token layers (the bin rows) rebuild the whole embedding / output matrix at every forward
        # while they are active; merged, they cost nothing. Only the bin rows change, and those are never generated
        # (masked) nor fed, so the student's own distribution is untouched: they stay merged, in both adapter modes,
        # while the processor is open.
        self._token_layers: list[torch.nn.Module] = []
        if selector is not None:
            from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
            from peft.tuners.tuners_utils import BaseTunerLayer

            tuner_layers = [m for m in selector.model.modules() if isinstance(m, BaseTunerLayer)]
            self._token_layers = [m for m in tuner_layers if isinstance(m, TrainableTokensLayer)]
            if config.adapter_mode == "scoring":
                self._adapter_layers = [m for m in tuner_layers if not isinstance(m, TrainableTokensLayer)]
                self._enable_adapter(False)
            self._merge_token_layers(True)
        self.reset()

    # ------------------------------------------------------------------ construction helpers

    def _check_selector(self, selector: Any) -> None:
        from .selector import S2TSelector

        if not isinstance(selector, S2TSelector):
            raise TypeError(
                f"`selector` must be an `S2TSelector`, got {type(selector).__name__}; load one with "
                "`S2TSelector.from_pretrained(model, path)` (or use `S2TLogitsProcessor.from_pretrained`)."
            )
        if _unwrap(selector.model) is not self.student:
            raise ValueError(
                "The selector is attached to another model than `model`. Load it onto the model you generate with: "
                "`S2TSelector.from_pretrained(model, path)`."
            )

    @staticmethod
    def _learned_trigger_row(selector: Any, config: S2TConfig) -> int:
        """The selector's trigger row, once it is checked to be fit for the hidden states this processor decodes with."""
        row = selector.trigger_token_id
        if row is None:
            raise ValueError(
                "`trigger='learned'` needs a selector with a trigger row: this one was created without one. Create it "
                "with `S2TSelector.create(..., learned_trigger=True)` and fit the row with "
                "`s2t_hf.learned_trigger.fit_trigger_row(selector, trajectories)`."
            )
        fit_on = selector.config.trigger_adapter_mode
        if fit_on is None:
            raise ValueError(
                "The selector's trigger row was never fit (it is still zero: a constant logit that cannot rank steps). "
                "Fit it with `s2t_hf.learned_trigger.fit_trigger_row(selector, trajectories)` first."
            )
        if fit_on != config.adapter_mode:
            what = {"scoring": "the base model's (LoRA off)", "generate": "the adapted model's (LoRA on)"}
            logger.warning(
                f"The learned trigger row was fit on {what[fit_on]} hidden states, but this processor generates with "
                f"`adapter_mode={config.adapter_mode!r}`, i.e. {what[config.adapter_mode]}: its logit is read off "
                f"other hidden states than it was fit on. Pass `adapter_mode={fit_on!r}`, or fit the row again with "
                f"`fit_trigger_row(..., adapter_mode={config.adapter_mode!r})`."
            )
        return int(row)

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
                The base model the selector was trained on; the adapter is injected in place.
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
        return cls(model, config, teacher=teacher, selector=selector, **kwargs)

    def remove_hooks(self) -> None:
        """
        Removes the forward pre-hook from the model, re-enables a selector adapter disabled for scoring and unmerges
        the selector's bin rows (merged while the processor is open).
        """
        self._hook.remove()
        self._enable_adapter(True)
        self._merge_token_layers(False)

    def _merge_token_layers(self, merged: bool) -> None:
        for layer in self._token_layers:
            if merged and not layer.merged and not layer.disable_adapters:
                layer.merge()
            elif not merged and layer.merged:
                layer.unmerge()

    def __enter__(self) -> S2TLogitsProcessor:
        """Opens the processor: its hook is registered again if an earlier `with` block (or `remove_hooks`) removed it."""
        self._hook.attach()
        if self._adapter_layers:
            self._enable_adapter(False)
        self._merge_token_layers(True)
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove_hooks()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """
        Clears the per-generation state. Called automatically when a new `generate` call starts (the last call's
        statistics are added to [`~S2TLogitsProcessor.total_stats`] first).
        """
        self._add_to_totals()
        self._prompt_length: int | None = None
        self._previous_ids: torch.Tensor | None = None
        self._finished: torch.Tensor | None = None
        if self._teacher is not None:
            self._teacher.reset()
        self._teacher_logits: torch.Tensor | None = None
        self._row_stats: dict[str, torch.Tensor] = {}
        self._totals: dict[str, Any] = {"teacher_calls": 0, "teacher_tokens": 0, "local_calls": 0, "local_path": None}
        self._scoring_path: tuple[str, str] | None = None
        self.pending = None
        self.records: list[dict[str, Any]] = []
        if self.config.seed is not None:
            self._generator = torch.Generator().manual_seed(self.config.seed)

    _SUMMED_STATS = ("steps", "eligible_steps", "triggers", "flips", "teacher_hits", "teacher_calls", "teacher_tokens",
                     "local_calls")

    def _add_to_totals(self) -> None:
        if not getattr(self, "_row_stats", None):
            return  # nothing decoded since the last reset
        current = self.stats
        for name in self._SUMMED_STATS:
            self._cumulative[name] = self._cumulative.get(name, 0) + current[name]
        self._cumulative["generate_calls"] = self._cumulative.get("generate_calls", 0) + 1
        self._row_stats = {}

    def reset_total_stats(self) -> None:
        """Starts [`~S2TLogitsProcessor.total_stats`] afresh (the current call's statistics included)."""
        self._cumulative = {}
        self._row_stats = {}

    @property
    def total_stats(self) -> dict[str, Any]:
        """
        Statistics summed over every `generate` call since the processor was built, [`reset_total_stats`] was called
        or [`calibrate`] ran: the counts of [`stats`] (`steps`, `triggers`, `flips`, `teacher_calls`, ...), their rates,
        and `generate_calls`. Use it for a dataset decoded in several batches; `stats` describes the last call only.
        """
        totals = dict(self._cumulative)
        calls = totals.get("generate_calls", 0)
        if self._row_stats:
            current = self.stats
            for name in self._SUMMED_STATS:
                totals[name] = totals.get(name, 0) + current[name]
            calls += 1
        out = {name: totals.get(name, 0) for name in self._SUMMED_STATS}
        out["generate_calls"] = calls
        return _with_rates(out)

    @property
    def stats(self) -> dict[str, Any]:
        """
        Statistics of the last `generate` call: totals and per-row lists.

        - `steps`: generated tokens of unfinished rows; `eligible_steps`: those after the warm-up (the denominator of
          `trigger_rate`);
        - `triggers`, `trigger_rate`, `flips` (the selected token differs from the student's top-1);
        - `teacher_hits`: triggers where the teacher's top-1 token was among the candidates (`teacher_hit_rate`);
        - `teacher_calls`, `teacher_tokens`: teacher forward calls and the tokens they encoded;
        - `local_calls`: extra student forwards that scored candidates; `local_path`: `cache` or `recompute`.
        """
        out: dict[str, Any] = dict(self._totals)
        if self._teacher is not None:
            out["teacher_calls"], out["teacher_tokens"] = self._teacher.calls, self._teacher.tokens
        names = ("steps", "eligible_steps", "triggers", "flips", "teacher_hits")
        for name in names:
            values = self._row_stats.get(name)
            out[name] = int(values.sum()) if values is not None else 0
            out[f"{name}_per_row"] = values.tolist() if values is not None else []
        return _with_rates(out)

    # ------------------------------------------------------------------ the processor

    def _start(self, input_ids: torch.Tensor) -> None:
        batch = input_ids.shape[0]
        self._prompt_length = input_ids.shape[1]
        self._finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        self._row_stats = {
            name: torch.zeros(batch, dtype=torch.long, device=input_ids.device)
            for name in ("steps", "eligible_steps", "triggers", "flips", "teacher_hits")
        }

    def _check_step(self, input_ids: torch.Tensor) -> None:
        record = self._hook.last
        if not self._hook.attached:
            raise ValueError(
                "S2TLogitsProcessor is closed (its `with` block ended or `remove_hooks()` was called): use it inside "
                "`with S2TLogitsProcessor(...) as s2t:`, or open it again with another `with` block."
            )
        if record is None or self._hook.forwards == self._forwards_seen:
            raise ValueError(
                "S2TLogitsProcessor was called without a new forward of its `model` since its last step. Either "
                "`generate` runs on another model than the processor's (build the processor with the model you call "
                "`generate` on), or this is assisted generation (`assistant_model=...`), where the assistant's own "
                "decoding calls the logits processors, or prompt-lookup generation (`prompt_lookup_num_tokens=...`), "
                "which verifies several tokens per forward. S2T supports greedy search and sampling only: remove "
                "`assistant_model` / `prompt_lookup_num_tokens`."
            )
        self._forwards_seen = self._hook.forwards
        if record.input_length > 1 and record.cache_length_before > 0:
            raise ValueError(
                "S2TLogitsProcessor supports greedy search and sampling only; this generate call verifies several "
                "tokens per forward (assisted or prompt-lookup decoding). Remove `assistant_model` / "
                "`prompt_lookup_num_tokens`."
            )
        if self._previous_ids is None:
            return
        previous = self._previous_ids
        if input_ids.shape[0] != previous.shape[0] or input_ids.shape[1] != previous.shape[1] + 1:
            # a new generate call without a cache: start over
            self.reset()
            return
        if previous.shape[1] == 0:  # the first step after a prompt given as `inputs_embeds`
            return
        # O(batch) and no host sync here: checked at the step's one sync (`_any_triggered`)
        self._reordered = (input_ids[:, -2] != previous[:, -1]).any()

    def _any_triggered(self, triggered: torch.Tensor, scores: torch.Tensor, active: torch.Tensor) -> bool:
        """
        The step's one host sync: whether any row triggered, checked together with whether rows were reordered since
        the last step and whether an active row's scores are broken (NaN or `+inf`, or no finite token left).
        """
        # one reduction: a row's max is NaN if it holds a NaN, +inf if it holds +inf, -inf if no token is finite
        broken = ~torch.isfinite(scores.amax(-1))
        checks = [triggered.any(), (broken & active).any()]
        if self._reordered is not None:
            checks.append(self._reordered)
        flags = torch.stack(checks).tolist()
        if flags[1]:
            rows = (broken & active).nonzero()[:, 0].tolist()
            raise ValueError(
                f"The scores of row(s) {rows} at generation step {self._step} hold NaN or +inf, or no "
                "finite token: the model's logits are broken (e.g. an overflow in float16; try bfloat16 or float32), "
                "or the logits processors before S2T ruled out every token."
            )
        if len(flags) > 2 and flags[2]:
            raise ValueError(
                "S2TLogitsProcessor supports greedy search and sampling only: rows were reordered between steps, as "
                "beam search does. Use `num_beams=1`."
            )
        return bool(flags[0])

    def _attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        record = self._hook.last
        mask = record.attention_mask if record is not None else None
        if mask is None and record is not None and not record.mask_readable and input_ids.shape[0] > 1:
            raise ValueError(
                "This `generate` call passes the model a prepared attention mask (one per kind of layer, with a static "
                "cache) from which the processor cannot read the batch's left padding. Use the default dynamic cache "
                "(remove `cache_implementation`) or generate one prompt at a time."
            )
        if mask is None or mask.shape != input_ids.shape:
            return torch.ones_like(input_ids)
        return mask.to(input_ids.device)

    def _learned_trigger_logits(self, scores: torch.Tensor) -> torch.Tensor:
        """
        The learned trigger's row logit at this step, as the model computed it: recorded by the hook from the model's
        output, so the logits processors before S2T (`suppress_tokens`, `prefix_allowed_tokens_fn`, a grammar) that
        rule the row out, as they rule out every token they do not allow, leave the signal as it was.
        """
        logits = self._hook.last.watched_logits
        if logits is None or logits.shape[0] != scores.shape[0]:
            raise ValueError(
                "The learned trigger could not read its row from the model's output: the forward of "
                f"{type(self.student).__name__} returned no `logits` of shape (batch, length, vocab). Use a "
                "transformers causal LM, or another trigger."
            )
        return logits.to(scores.device)

    def _signal(
        self, scores: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, trigger_logits: torch.Tensor | None
    ) -> torch.Tensor | None:
        kind = self.config.trigger
        if kind == "learned":
            if self.config.trigger_entropy_weight:
                return trigger_logits + self.config.trigger_entropy_weight * entropy_signal(
                    scores, self.config.signal_top_k
                )
            return trigger_logits
        if kind == "entropy":
            return entropy_signal(scores, self.config.signal_top_k)
        if kind == "kl":
            self._teacher_logits = self._teacher.next_log_probs(input_ids, mask)
            return kl_signal(scores, self._teacher_logits, self.config.signal_top_k)
        return None

    def _trigger(self, signal: torch.Tensor | None, eligible: torch.Tensor) -> torch.Tensor:
        kind = self.config.trigger
        if self._calibrating or kind == "never":
            return torch.zeros_like(eligible)
        if kind == "always":
            return eligible.clone()
        if kind == "random":
            draws = torch.rand(eligible.shape[0], generator=self._generator).to(eligible.device)
            return eligible & (draws < self.config.trigger_rate)
        if self.config.trigger_threshold is None:
            raise ValueError(
                f"The `{kind}` trigger needs a threshold: set `trigger_threshold=...` or call "
                "`processor.calibrate(prompts, target_rate=...)` first."
            )
        return eligible & (signal > self.config.trigger_threshold)

    @add_start_docstrings(LOGITS_PROCESSOR_INPUTS_DOCSTRING)
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._reordered = None
        self._check_step(input_ids)
        if self._prompt_length is None:
            if input_ids.shape[1] == 0 and self.config.trigger != "never":
                raise ValueError(INPUTS_EMBEDS_REFUSED)
            if bool((torch.logsumexp(scores.float(), dim=-1).abs() < 1e-4).all()):
                raise ValueError(
                    "S2TLogitsProcessor supports greedy search and sampling only, but it received normalised "
                    "log-probabilities, as beam search passes them. Use `num_beams=1`."
                )
            self._start(input_ids)
        self._previous_ids = input_ids
        self._teacher_logits = None
        device = scores.device
        trigger_logits = self._learned_trigger_logits(scores) if self._trigger_row is not None else None
        if self.reserved_ids.numel():
            scores = scores.index_fill(-1, self.reserved_ids.to(device), float("-inf"))

        generated = self._step = input_ids.shape[1] - self._prompt_length
        if generated > 0 and self.eos_token_ids.numel():
            self._finished |= torch.isin(input_ids[:, -1], self.eos_token_ids.to(input_ids.device))
        active = ~self._finished
        eligible = active & (generated >= self.config.warmup_tokens)
        if self.config.trigger == "never" and not self._calibrating:
            # nothing to decide: a few element-wise ops, no host sync, nothing that grows with the length
            self._row_stats["steps"] += active
            self._row_stats["eligible_steps"] += eligible
            return scores
        mask = self._attention_mask(input_ids)
        signal = self._signal(scores, input_ids, mask, trigger_logits)
        if self._teacher_logits is None and self._teacher is not None and not self.lazy_teacher and active.any():
            self._teacher_logits = self._teacher.next_log_probs(input_ids, mask)
        if self._calibrating and signal is not None:
            self._signals.append(signal[eligible].detach().cpu())
        triggered = self._trigger(signal, eligible)
        self._row_stats["steps"] += active
        self._row_stats["eligible_steps"] += eligible
        self._row_stats["triggers"] += triggered
        if not self._any_triggered(triggered, scores, active):
            return scores

        candidate_ids, candidate_log_probs, valid = top_k_candidates(
            scores, self.config.top_k, self.config.candidate_ratio
        )
        # the teacher answers for the triggered rows only (a remote teacher is asked about nothing else)
        rows = triggered.nonzero()[:, 0]
        selection = self.config.selection
        teacher_choice: TeacherChoice | None = None
        chosen = torch.full_like(candidate_ids[:, 0], -1)
        if selection == "teacher":
            teacher_choice = self._teacher.select(
                input_ids, mask, rows, candidate_ids[rows], valid[rows], with_log_probs=self.record_triggers
            )
            chosen[rows] = teacher_choice.token_ids
        elif selection == "takeover":
            # the teacher's argmax among the tokens the earlier logits processors left (min_new_tokens, bad words...)
            teacher_choice = self._teacher.takeover(
                input_ids, mask, rows, candidate_ids[rows], allowed=torch.isfinite(scores[rows]),
                with_log_probs=self.record_triggers,
            )
            chosen[rows] = teacher_choice.token_ids
        else:
            pending = PendingSelection(
                input_ids, mask, signal, triggered, candidate_ids, candidate_log_probs, valid, self._teacher_logits
            )
            if self._fused and self.config.adapter_mode == "generate":
                # the fused loop scores the candidates in its next decoding forward and calls `complete_selection`;
                # until then the triggered rows may emit only their valid candidates
                self.pending = pending
                allowed = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, candidate_ids, valid)
                return torch.where(triggered[:, None] & ~allowed, float("-inf"), scores)
            logits = self._score_candidates(input_ids, mask, candidate_ids[triggered], triggered)
            chosen, _ = self.complete_selection(pending, logits)  # accounts for the step itself
        if selection != "local":
            # a token the earlier processors ruled out is never emitted: where a teacher had no allowed token to give
            # (-1) or gave a ruled-out one, the row keeps the student's top-1
            ruled_out = ~torch.isfinite(scores.gather(-1, chosen.clamp_min(0)[:, None])[:, 0]) | (chosen < 0)
            chosen = torch.where(triggered & ruled_out, candidate_ids[:, 0], chosen)
            self._account(
                input_ids, mask, signal, triggered, candidate_ids, candidate_log_probs, teacher_choice, chosen, None
            )
        return forced_scores(scores, chosen, triggered)

    def _account(
        self, input_ids, mask, signal, triggered, candidate_ids, candidate_log_probs, teacher_choice, chosen,
        local_logits, teacher_log_probs=None,
    ) -> None:
        """Statistics and records of a step whose triggered rows have been decided."""
        rows = triggered.nonzero()[:, 0]
        if teacher_choice is None and teacher_log_probs is not None:
            # local selection under the `kl` trigger: the teacher's distribution is already there
            teacher_rows = teacher_log_probs[rows]
            teacher_choice = TeacherChoice(
                token_ids=teacher_rows.argmax(-1),
                top1=teacher_rows.argmax(-1),
                candidate_log_probs=teacher_rows.gather(-1, candidate_ids[rows]),
            )
        self._row_stats["flips"] += triggered & (chosen != candidate_ids[:, 0])
        if teacher_choice is not None and teacher_choice.top1 is not None:
            hit = (candidate_ids[rows] == teacher_choice.top1[:, None]).any(-1)
            self._row_stats["teacher_hits"][rows] += hit.long()
        if self.record_triggers:
            self._record(
                input_ids, mask, signal, triggered, candidate_ids, candidate_log_probs, teacher_choice, chosen,
                local_logits,
            )

    def complete_selection(self, pending: PendingSelection, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Local selection of a step from the logits at the candidates of its triggered rows.

        Args:
            pending (`PendingSelection`): the step's triggered rows and candidates.
            logits (`torch.Tensor` of shape `(triggered, K, vocab)`): the selector's logits after each candidate
                (`(triggered, 1 + K, vocab)` when the last token was encoded again, its logits first).

        Returns:
            `(chosen, positions)`: the chosen token of every row (-1 where not triggered), shape `(batch,)`, and the
            chosen candidate's position (0..K-1) in each triggered row, shape `(triggered,)`.
        """
        triggered = pending.triggered
        candidate_ids = pending.candidate_ids[triggered]
        if self._rescore:
            candidate_log_probs = selector_log_probs(logits[:, 0], candidate_ids, self.reserved_ids)
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
        self._account(
            pending.input_ids, pending.mask, pending.signal, triggered, pending.candidate_ids,
            pending.candidate_log_probs, None, chosen, local_logits, pending.teacher_log_probs,
        )
        return chosen, positions

    # ------------------------------------------------------------------ local selection

    @contextlib.contextmanager
    def _adapter_for_scoring(self) -> Iterator[None]:
        if self.config.adapter_mode != "scoring":
            yield
            return
        # Only the flag that `enable_adapters` sets: its requires-grad bookkeeping (PEFT's `set_adapter`) costs a
        # third of a small model's forward, twice per triggered step. Grads stay off, as `enable_adapters(False)` left
        # them.
        for layer in self._adapter_layers:
            layer._disable_adapters = False
        try:
            yield
        finally:
            for layer in self._adapter_layers:
                layer._disable_adapters = True

    def _enable_adapter(self, enabled: bool) -> None:
        for layer in self._adapter_layers:
            layer.enable_adapters(enabled)

    def local_scoring_path(self) -> tuple[str, str]:
        """
        The path S2T-Local scores candidates on in the current `generate` call and why: `("cache", reason)` (one forward
        of the triggered rows on the live cache, sliding-window layers included) or `("recompute", reason)` (every
        prefix encoded again, the last resort). Decided once per `generate` call.
        """
        if self._scoring_path is None:
            self._scoring_path = self._decide_scoring_path()
        return self._scoring_path

    def _decide_scoring_path(self) -> tuple[str, str]:
        wanted = self.config.local_path
        if wanted == "recompute":
            return "recompute", "requested"
        if self.config.adapter_mode == "scoring" and not self._selector_preserves_cache:
            reason = _ADAPTER_CHANGES_CACHE
        else:
            ok, reason = cache_scoring_support(self._hook.cache, self.student)
            if ok:
                return "cache", "the live cache can be scored on"
        if wanted == "cache":
            raise ValueError(f"`local_path='cache'` was requested but {reason}. Use `local_path='auto'` or 'recompute'.")
        logger.info(f"S2T-Local scores candidates by recomputing their prefixes: {reason}.")
        return "recompute", reason

    def _score_candidates(
        self, input_ids: torch.Tensor, mask: torch.Tensor, candidate_ids: torch.Tensor, triggered: torch.Tensor
    ) -> torch.Tensor:
        """The selector's logits after each candidate of the triggered rows (one extra forward of those rows only)."""
        path, _ = self.local_scoring_path()
        if path == "cache" and self._rescore and not can_drop_last(self._hook.cache, self._hook.previous_sliding):
            # right after the prefill of a prompt longer than a sliding window, the window has already dropped tokens
            # the prompt's last token attends to: this one step re-encodes its prefixes
            path = "recompute"
        self._totals["local_calls"] += 1
        self._totals["local_path"] = path
        rows = triggered.nonzero()[:, 0]
        # The residual form adds the selector's own log-probabilities of the candidates. While the adapter generates
        # they are the scores; with `adapter_mode="scoring"` the last token is encoded again with the adapter on.
        with self._hook.pause(), self._adapter_for_scoring():
            if path == "cache":
                record = self._hook.last
                if record.position_ids is not None and record.position_ids.shape[-1] >= 1:
                    next_positions = record.position_ids.reshape(input_ids.shape[0], -1)[:, -1].to(input_ids.device) + 1
                else:
                    next_positions = positions_from_attention_mask(mask)[:, -1] + 1
                return score_candidates_on_cache(
                    self.student, self._hook.cache, mask, next_positions, candidate_ids,
                    last_token_ids=input_ids[:, -1] if self._rescore else None,
                    rows=rows if rows.numel() < input_ids.shape[0] else None,
                    previous=self._hook.previous_sliding,
                )
            return score_candidates_by_recompute(
                self.student,
                input_ids[rows],
                mask[rows],
                candidate_ids,
                max_context=self.config.max_context,
                pad_token_id=self.pad_token_id,
                with_last_token=self._rescore,
            )

    # ------------------------------------------------------------------ records and calibration

    def _record(
        self, input_ids, mask, signal, triggered, candidate_ids, candidate_log_probs, teacher_choice, chosen,
        local_logits,
    ):
        step = input_ids.shape[1] - self._prompt_length
        for index, row in enumerate(triggered.nonzero()[:, 0].tolist()):
            context = input_ids[row][mask[row].bool()]
            record = {
                "row": row,
                "step": step,
                "signal": float(signal[row]) if signal is not None else None,
                "context_ids": context.tolist(),
                "cand_ids": candidate_ids[row].tolist(),
                "student_probs": candidate_log_probs[row].exp().tolist(),
                "chosen_id": int(chosen[row]),
            }
            if teacher_choice is not None:
                if teacher_choice.candidate_log_probs is not None:
                    record["teacher_probs"] = teacher_choice.candidate_log_probs[index].exp().tolist()
                if teacher_choice.top1 is not None:
                    record["teacher_top1"] = int(teacher_choice.top1[index])
            if local_logits is not None:
                record["local_scores"] = local_logits[index].tolist()
            self.records.append(record)

    def calibrate(
        self,
        prompts: Iterable[Any],
        target_rate: float | None = None,
        *,
        tokenizer: Any = None,
        batch_size: int = 8,
        **generate_kwargs: Any,
    ) -> float:
        """
        Sets `trigger_threshold` so that the trigger fires on a fraction `target_rate` of eligible steps.

        Generates greedily (no triggers) on `prompts`, collects the trigger signal (entropy, KL or the learned trigger
        row's logit) at every eligible step
        and takes its `1 - target_rate` quantile. Held-out prompts then trigger at about that rate.

        Args:
            prompts (iterable of `str` or of token-id lists):
                Calibration prompts. Strings need `tokenizer` (or the one given to the processor); a chat template
                is not applied here, so pass prompts formatted the way you will generate.
            target_rate (`float`, *optional*):
                Desired trigger rate in (0, 1); defaults to `config.trigger_rate`.
            tokenizer (`PreTrainedTokenizerBase`, *optional*):
                Tokenizer for string prompts.
            batch_size (`int`, *optional*, defaults to 8):
                Prompts per `generate` call.
            generate_kwargs:
                Passed to `generate` (e.g. `max_new_tokens=128`). Sampling is turned off.

        Returns:
            `float`: the threshold, also stored in `processor.config.trigger_threshold`.
        """
        if self.config.trigger not in THRESHOLD_TRIGGERS:
            raise ValueError(
                f"Only the {', '.join(f'`{t}`' for t in THRESHOLD_TRIGGERS)} triggers have a threshold; this processor "
                f"uses {self.config.trigger!r}."
            )
        target_rate = target_rate if target_rate is not None else self.config.trigger_rate
        if target_rate is None:
            raise ValueError("Give `target_rate`, the fraction of eligible steps that should trigger (e.g. 0.01).")
        if not 0.0 < target_rate < 1.0:
            raise ValueError(f"`target_rate` must lie in (0, 1), got {target_rate}.")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("`prompts` is empty; give at least one calibration prompt.")
        self._signals = []
        self._calibrating = True
        try:
            tokenizer = tokenizer or self.tokenizer
            pad = getattr(tokenizer, "pad_token_id", None)
            pad = pad if pad is not None else self.pad_token_id
            for batch in _prompt_batches(prompts, tokenizer, batch_size, self.student.device, pad):
                self.model.generate(**batch, **{**generate_kwargs, "do_sample": False}, logits_processor=[self])
        finally:
            self._calibrating = False
        threshold = threshold_for_rate(torch.cat(self._signals), target_rate)
        self._signals = []
        self.config = dataclasses.replace(self.config, trigger_threshold=threshold, trigger_rate=target_rate)
        logger.info(f"Calibrated the {self.config.trigger} trigger to {threshold:.4f} for a {target_rate:.1%} rate.")
        self.reset()
        self.reset_total_stats()  # calibration decoded nothing to count
        return threshold


def _with_rates(counts: dict[str, Any]) -> dict[str, Any]:
    """`counts` with `trigger_rate`, `teacher_hit_rate` and `flip_rate` added (0 where nothing was counted)."""
    counts["trigger_rate"] = counts["triggers"] / counts["eligible_steps"] if counts["eligible_steps"] else 0.0
    counts["teacher_hit_rate"] = counts["teacher_hits"] / counts["triggers"] if counts["triggers"] else 0.0
    counts["flip_rate"] = counts["flips"] / counts["triggers"] if counts["triggers"] else 0.0
    return counts


def _prompt_batches(
    prompts: list[Any], tokenizer: Any, batch_size: int, device: torch.device, pad_token_id: int
) -> Iterator[dict]:
    """Left-padded batches of `input_ids` + `attention_mask` from strings or token-id lists (no chat template)."""
    rows = prompt_token_ids(prompts, tokenizer, chat_template=False)
    for start in range(0, len(rows), batch_size):
        yield left_pad(rows[start : start + batch_size], pad_token_id, device)
