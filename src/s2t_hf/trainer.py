"""`S2TTrainer`: selection distillation of a local selector with the `transformers.Trainer`.

Each training example is a selection group (see [`collect_selection_data`]): a context, the student's K candidates
and the teacher's probabilities of them. The trainer encodes every context **once** with its K candidates appended
under a 4-D attention mask (each candidate sees the context and itself, all at the position after the context, as
at inference on the KV cache), reads the B bin logits at the candidate positions, turns them into candidate logits with
the same [`~s2t_hf.selection.local_candidate_logits`] the processor uses, and minimises the selection loss of
[`s2t_hf.losses`] plus the LM-KL term from the same forward's context positions against a no-grad forward with the
adapter disabled (no second model copy).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging

from .config import CONFIG_NAME, RESIDUAL_LOG_PROBS, SCORING_KINDS
from .collator import PromptGroupedSampler, SelectionGroupCollator, check_selection_columns
from .kv import (
    architecture_scoring_support,
    output_rows,
    packed_candidate_masks,
    positions_from_attention_mask,
    unmark_dequantized_gguf,
)
from .losses import lm_kl_per_position, selection_loss, selection_metrics
from .selection import local_candidate_logits, selector_log_probs
from .trainer_log import LogFileCallback, ProgressWithoutLogs


__all__ = ["S2TTrainer", "S2TTrainingArguments"]

logger = logging.get_logger(__name__)

MODEL_CARD_NAME = "README.md"


@dataclass
class S2TTrainingArguments(TrainingArguments):
    r"""
    Arguments of [`S2TTrainer`]: every [`~transformers.TrainingArguments`] field, plus the fields below. Defaults
    follow the paper (AdamW, learning rate 5e-5, 4 groups per batch, 3 epochs, gradient clipping 1.0);
    `remove_unused_columns` defaults to `False` because the collator reads the dataset's own columns.

    For early stopping and the best checkpoint, use the Trainer's own machinery: `eval_strategy="steps"`,
    `metric_for_best_model="eval_agreement"`, `load_best_model_at_end=True` and an `EarlyStoppingCallback`.

    Args:
        candidate_temperature (`float`, *optional*, defaults to `1.0`):
            `T` in `softmax(s / T)` over the candidate logits `s` (cross-entropy and teacher-KL terms).
        margin (`float`, *optional*, defaults to `1.0`):
            `m` of the hinge `max(0, m - (s[c*] - max_{c != c*} s[c]))`; 0 disables the term.
        teacher_kl_weight (`float`, *optional*, defaults to `0.1`):
            `lambda`, the weight of `KL(p_T || softmax(s / T))`.
        lm_kl_weight (`float`, *optional*, defaults to `0.1`):
            `beta`, the weight of KL(base || adapted) of the next-token distributions on the context positions. 0 skips
            the term and the adapter-disabled forward it needs.
        scoring (`str`, *optional*):
            `"pure"` or `"residual"` candidate logits (see [`S2TConfig`]). Defaults to the selector's config; a value
            given here is written into the selector's config, so the saved selector decodes as it was trained.
        residual_tau (`float`, *optional*):
            Temperature of the residual form's score term. Defaults to the selector's config (written into it if set).
        residual_log_probs (`str`, *optional*):
            `"selector"` or `"student"`: whose log-probabilities the residual form adds the score to (see
            [`S2TConfig`]). With `"student"` they are the groups' `student_probs` (the student as collected, adapter
            off), so the adapter learns only through the bins. Defaults to the selector's config (written into it if
            set).
        packing (`bool`, *optional*, defaults to `True`):
            Encode each context once with its K candidates under a 4-D mask. `False` re-encodes K copies of every
            context (slow; kept as a reference). Packing needs `eager` or `sdpa` attention, position ids that place
            every candidate (not ALiBi: Bloom, MPT, Falcon with `alibi=True`) and attention layers only (no linear
            attention or state-space layers); otherwise the trainer falls back to copies. Sliding windows are kept.
        max_context_length (`int`, *optional*):
            Keep only the last `max_context_length` tokens of each context (the paper truncates to 512).
        group_by_prompt (`bool`, *optional*, defaults to `False`):
            Batch the groups prompt by prompt (prompts shuffled, needs the `prompt_index` column of
            [`collect_selection_data`]), so the groups of one prompt share one encoding of their context under packing:
            several times faster when prompts have several groups each (about 5x for 10% of a GSM8K solution's
            steps). The loss is unchanged; batches are less mixed. Contexts cut by `max_context_length` no longer
            share.
    """

    candidate_temperature: float = field(
        default=1.0, metadata={"help": "Temperature T of softmax(s / T) over the candidate logits."}
    )
    margin: float = field(default=1.0, metadata={"help": "Margin m of the hinge term (0 disables it)."})
    teacher_kl_weight: float = field(default=0.1, metadata={"help": "Weight lambda of KL(p_T || softmax(s / T))."})
    lm_kl_weight: float = field(
        default=0.1, metadata={"help": "Weight beta of KL(base || adapted) on the context positions (0 skips it)."}
    )
    scoring: str | None = field(
        default=None,
        metadata={"help": f"Candidate logits, one of {SCORING_KINDS}; defaults to the selector's config."},
    )
    residual_tau: float | None = field(
        default=None, metadata={"help": "Temperature of the residual score term; defaults to the selector's config."}
    )
    residual_log_probs: str | None = field(
        default=None,
        metadata={
            "help": f"Whose log-probabilities the residual form uses, one of {RESIDUAL_LOG_PROBS}; defaults to the "
            "selector's config."
        },
    )
    packing: bool = field(
        default=True, metadata={"help": "Encode each context once with its K candidates under a 4-D mask."}
    )
    max_context_length: int | None = field(
        default=None, metadata={"help": "Keep only the last tokens of each context (e.g. 512)."}
    )
    group_by_prompt: bool = field(
        default=False,
        metadata={"help": "Batch the groups prompt by prompt so each prompt's context is encoded once (faster)."},
    )
    # changed defaults
    per_device_train_batch_size: int = field(
        default=4, metadata={"help": "Selection groups per device and step (the paper uses 4)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the collator reads the selection-group columns."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.label_names is None:
            self.label_names = []
        if self.candidate_temperature <= 0:
            raise ValueError(f"`candidate_temperature` must be positive, got {self.candidate_temperature}.")
        for name in ("margin", "teacher_kl_weight", "lm_kl_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be non-negative, got {getattr(self, name)}.")
        if self.scoring is not None and self.scoring not in SCORING_KINDS:
            raise ValueError(f"`scoring` must be one of {SCORING_KINDS} or None, got {self.scoring!r}.")
        if self.residual_tau is not None and self.residual_tau <= 0:
            raise ValueError(f"`residual_tau` must be positive, got {self.residual_tau}.")
        if self.residual_log_probs is not None and self.residual_log_probs not in RESIDUAL_LOG_PROBS:
            raise ValueError(
                f"`residual_log_probs` must be one of {RESIDUAL_LOG_PROBS} or None, got {self.residual_log_probs!r}."
            )
        if self.max_context_length is not None and self.max_context_length < 1:
            raise ValueError(
                f"`max_context_length` must be a positive integer or None, got {self.max_context_length}."
            )
        if self.remove_unused_columns:
            raise ValueError(
                "`remove_unused_columns=True` would drop the selection-group columns (`context_ids`, `cand_ids`, "
                "`teacher_probs`) that the collator reads; set `remove_unused_columns=False`."
            )


def _check_dataset(dataset: Any, name: str, needs_student_probs: bool = False) -> None:
    """Refuses an empty dataset, or one without the selection-group columns (and `student_probs` where the residual
    form reads them), before training starts."""
    for part in dataset.values() if isinstance(dataset, dict) else [dataset]:
        if part is None or isinstance(part, torch.utils.data.IterableDataset):
            continue
        if hasattr(part, "__len__") and len(part) == 0:
            raise ValueError(
                f"`{name}` is empty: it holds no selection groups. Collect some with `collect_selection_data`, or "
                "check the filter or split that emptied it."
            )
        columns = getattr(part, "column_names", None)
        if columns is None:
            continue
        check_selection_columns(columns)
        if needs_student_probs and "student_probs" not in columns:
            raise ValueError(
                f"`{name}` has no `student_probs` column, which `residual_log_probs='student'` reads (the student's "
                "probabilities of the candidates). Collect the groups with `collect_selection_data`, which records "
                "them, or train with `residual_log_probs='selector'`."
            )


def _collected_log_probs(inputs: dict[str, torch.Tensor], cand_mask: torch.Tensor) -> torch.Tensor:
    """The student's log-probabilities of each group's candidates from the batch's `student_probs` (0 on padding)."""
    student_probs = inputs.get("student_probs")
    if student_probs is None:
        raise ValueError(
            "`residual_log_probs='student'` needs the groups' `student_probs` (every group of the batch): collect "
            "them with `collect_selection_data`, or train with `residual_log_probs='selector'`."
        )
    tiny = torch.finfo(torch.float32).tiny
    return torch.where(cand_mask, student_probs.float().clamp_min(tiny).log(), 0.0)


@dataclass
class _ForwardOutput:
    candidate_logits: torch.Tensor  # (batch, K, vocab) at the candidate positions
    last_context_logits: torch.Tensor  # (batch, vocab) at the last context position
    context_logits: torch.Tensor | None  # (rows, length, vocab) when the LM-KL term needs them


def _group_contexts(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group's context row, its context length, and the column after its context in the (left-padded) row; one
    row per group unless the collator shared contexts (`group_rows`, `context_lengths`)."""
    attention_mask = inputs["attention_mask"]
    rows, length = attention_mask.shape
    real_lengths = attention_mask.sum(-1)
    group_rows = inputs.get("group_rows")
    if group_rows is None:
        group_rows, context_lengths = torch.arange(rows, device=attention_mask.device), real_lengths
    else:
        context_lengths = inputs["context_lengths"]
    return group_rows, context_lengths, length - real_lengths[group_rows] + context_lengths


class S2TTrainer(Trainer):
    r"""
    A [`~transformers.Trainer`] that distils the teacher's selections into an [`S2TSelector`] (LoRA + the B reserved
    output rows), on selection groups from [`collect_selection_data`].

    The loss of a group, with `p_T` the teacher's probabilities renormalised over the group, `c*` their argmax and `s`
    the selector's candidate logits (exactly those the processor selects with at inference), is
    `CE(softmax(s / T), c*) + hinge(m - (s[c*] - max_{c != c*} s[c])) + lambda * KL(p_T || softmax(s / T))` plus
    `beta * KL_LM`; the batch loss is normalised by the number of groups of the whole accumulated batch, so gradient
    accumulation is exact.

    Logged metrics (training and evaluation, averaged over groups and processes): `agreement` (selector's choice =
    teacher's choice), `student_agreement` (the student's own top-1 = teacher's choice, the baseline), `spearman` (rank
    correlation of `s` with the teacher's probabilities), `lm_kl`, and the loss terms `ce`, `hinge`, `teacher_kl`.

    Checkpoints (`output_dir/checkpoint-N`) and the final model are selector adapters in the
    [`S2TSelector.save_pretrained`] format (PEFT adapter + `s2t_config.json` + model card), loadable with
    [`S2TSelector.from_pretrained`] and [`S2TLogitsProcessor.from_pretrained`].

    Runs like any Trainer script under `accelerate launch` / `torchrun` (several processes: metrics are gathered, the
    loss normalisation counts the groups of every process). On CPUs, start the processes with `accelerate launch
    --multi_gpu --num_processes N` and set `use_cpu=True` (`accelerate launch --cpu` starts a single process).

    Args:
        selector (`S2TSelector`):
            The trainable selector (from [`S2TSelector.create`], or `from_pretrained(..., is_trainable=True)`). Its
            `model` is what trains.
        args (`S2TTrainingArguments`, *optional*):
            Training arguments; defaults to `S2TTrainingArguments()`.
        data_collator (*optional*):
            Defaults to [`SelectionGroupCollator`] (left padding, `max_context_length` from `args`).
        train_dataset, eval_dataset (`datasets.Dataset`, *optional*):
            Selection groups (`context_ids`, `cand_ids`, `teacher_probs`, optionally `student_probs`). `eval_dataset`
            may be a dict of datasets.
        processing_class (`PreTrainedTokenizerBase`, *optional*):
            Saved with every checkpoint; its pad token pads contexts.
        kwargs:
            Other [`~transformers.Trainer`] arguments (`callbacks`, `optimizers`, `compute_metrics`, ...).

    Examples:

    ```python
    >>> import tempfile
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from s2t_hf import S2TSelector, S2TTrainer, S2TTrainingArguments, collect_selection_data
    >>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    >>> _ = torch.manual_seed(0)
    >>> student, teacher = AutoModelForCausalLM.from_config(config), AutoModelForCausalLM.from_config(config)
    >>> groups = collect_selection_data(student, teacher, prompts=[[2, 3, 4], [5, 6]], top_k=4, fraction=0.3,
    ...                                 max_new_tokens=10, show_progress=False)
    >>> selector = S2TSelector.create(student, num_bins=4, lora_r=2)
    >>> args = S2TTrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=2, report_to="none", save_strategy="no",
    ...                             use_cpu=True)
    >>> trainer = S2TTrainer(selector=selector, args=args, train_dataset=groups)
    >>> trainer.train().global_step  # the progress callback prints the final logs  # doctest: +ELLIPSIS
    {'train_runtime': ...}
    2
    >>> metrics = trainer.evaluate(groups)
    >>> {"eval_agreement", "eval_student_agreement", "eval_spearman", "eval_lm_kl"} <= set(metrics)
    True

    ```
    """

    _tag_names = ["s2t_hf", "select-to-think", "selection-distillation"]
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        selector: Any,
        args: S2TTrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ):
        from .selector import S2TSelector

        if not isinstance(selector, S2TSelector):
            raise TypeError(
                f"`selector` must be an `S2TSelector`, got {type(selector).__name__}. Build one with "
                "`S2TSelector.create(model, tokenizer)` or load one with `S2TSelector.from_pretrained(model, path, "
                "is_trainable=True)`."
            )
        if "model" in kwargs:
            raise TypeError("`S2TTrainer` trains `selector.model`; pass `selector=` instead of `model=`.")
        if args is None:
            args = S2TTrainingArguments(output_dir="s2t-selector")
        if not isinstance(args, S2TTrainingArguments):
            raise TypeError(
                f"`args` must be `S2TTrainingArguments`, got {type(args).__name__}; it adds the loss settings and "
                "`remove_unused_columns=False`."
            )
        if not any(p.requires_grad for p in selector.model.parameters()):
            raise ValueError(
                "The selector has no trainable parameter (loaded for inference?). Load it with "
                "`S2TSelector.from_pretrained(model, path, is_trainable=True)` to continue training."
            )
        unmark_dequantized_gguf(selector.model)
        overrides = {}
        if args.scoring is not None:
            overrides["scoring"] = args.scoring
        if args.residual_tau is not None:
            overrides["residual_tau"] = args.residual_tau
        if args.residual_log_probs is not None:
            overrides["residual_log_probs"] = args.residual_log_probs
        if overrides:
            selector.config = dataclasses.replace(selector.config, **overrides)
        anchored = selector.config.scoring == "residual" and selector.config.residual_log_probs == "student"
        _check_dataset(train_dataset, "train_dataset", needs_student_probs=anchored)
        _check_dataset(eval_dataset, "eval_dataset", needs_student_probs=anchored)
        self.selector = selector
        can_pack, reason = architecture_scoring_support(selector.base_model)
        self._pack = args.packing and can_pack
        if args.packing and not self._pack:
            logger.warning(f"Packing is off: {reason}. Encoding K copies of every context instead (slower).")
        if args.group_by_prompt:
            for name, dataset in (("train_dataset", train_dataset),):
                if dataset is not None and "prompt_index" not in getattr(dataset, "column_names", []):
                    raise ValueError(
                        f"`group_by_prompt=True` needs a `prompt_index` column in `{name}` (as `collect_selection_data` "
                        "writes); add one or set `group_by_prompt=False`."
                    )
        if data_collator is None:
            pad = getattr(processing_class, "pad_token_id", None)
            if pad is None:
                pad = getattr(selector.base_model.config, "pad_token_id", None)
            data_collator = SelectionGroupCollator(
                pad_token_id=int(pad or 0), max_context_length=args.max_context_length, share_contexts=self._pack
            )
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(lambda: [0.0, 0]),
            "eval": defaultdict(lambda: [0.0, 0]),
        }
        super().__init__(
            model=selector.model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # the loss is normalised by the groups of the whole accumulated batch (see `_get_num_items_in_batch`); older
        # releases read this flag instead of `loss_is_scaled_for_ga` to skip their own division
        self.model_accepts_loss_kwargs = True
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        """With `group_by_prompt`, a [`PromptGroupedSampler`] over the `prompt_index` column; else the Trainer's."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.group_by_prompt and dataset is not None:
            return PromptGroupedSampler(dataset["prompt_index"], seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    # -----------------------------------------------------------------------------------------------------------------
    # Loss

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """The number of selection groups in the accumulated batch (summed over processes), to normalise the loss."""
        if not batch_samples or "cand_ids" not in batch_samples[0]:
            return None
        count = torch.tensor(sum(int(batch["cand_ids"].shape[0]) for batch in batch_samples), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def _forward(self, model: nn.Module, inputs: dict[str, torch.Tensor], need_context_logits: bool) -> _ForwardOutput:
        input_ids, attention_mask, cand_ids = inputs["input_ids"], inputs["attention_mask"], inputs["cand_ids"]
        batch, length = input_ids.shape
        num_candidates = cand_ids.shape[1]
        if not bool(attention_mask[:, -1].all()):
            raise ValueError(
                "Contexts must be padded on the left (every row's last column is a real token); use "
                "`SelectionGroupCollator`, the default collator."
            )
        if self._pack:
            return self._packed_forward(model, inputs, need_context_logits)
        if inputs.get("group_rows") is not None:
            raise ValueError(
                "The batch shares contexts between groups (`SelectionGroupCollator(share_contexts=True)`), which needs "
                "packing; this trainer encodes K copies instead. Use a collator with `share_contexts=False`."
            )
        # Reference path: K copies of every context, each followed by one candidate, ordinary 2-D mask.
        ids = torch.cat(
            [input_ids.repeat_interleave(num_candidates, dim=0), cand_ids.reshape(-1, 1)], dim=1
        )
        mask = torch.cat(
            [
                attention_mask.repeat_interleave(num_candidates, dim=0),
                attention_mask.new_ones(batch * num_candidates, 1),
            ],
            dim=1,
        )
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions_from_attention_mask(mask),
            use_cache=False,
            logits_to_keep=0 if need_context_logits else 2,
        ).logits
        logits = logits.view(batch, num_candidates, logits.shape[1], logits.shape[2])
        return _ForwardOutput(
            candidate_logits=logits[:, :, -1],
            last_context_logits=logits[:, 0, -2],
            context_logits=logits[:, 0, :length] if need_context_logits else None,
        )

    def _packed_forward(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], need_context_logits: bool
    ) -> _ForwardOutput:
        """
        One forward per context row: the row's context, then for each group of the row (one, or several whose contexts
        are prefixes of the row's, see `SelectionGroupCollator(share_contexts=True)`) a slot of K + 1 tokens under a
        4-D mask: the group's last context token again (its logits are those of the context position, read at the end
        of the sequence so `logits_to_keep` stays an integer) and its K candidates, each seeing the group's context
        and itself, at the position after the group's context.
        """
        input_ids, attention_mask, cand_ids = inputs["input_ids"], inputs["attention_mask"], inputs["cand_ids"]
        rows, length = input_ids.shape
        groups, num_candidates = cand_ids.shape
        group_rows, context_lengths, ends = _group_contexts(inputs)
        # slot of each group within its row, in order of appearance
        same_row = group_rows[None, :] == group_rows[:, None]
        slots = (same_row & torch.ones_like(same_row).tril(-1)).sum(-1)
        num_slots = int(slots.max()) + 1
        width = num_candidates + 1
        last_tokens = input_ids[group_rows, ends - 1]
        slot_ids = torch.full((rows, num_slots, width), int(input_ids[0, 0]), dtype=torch.long, device=input_ids.device)
        slot_ids[group_rows, slots] = torch.cat([last_tokens[:, None], cand_ids], dim=1)
        # empty slots see only themselves (end 0) and are never read
        slot_ends = torch.zeros((rows, num_slots, width), dtype=torch.long, device=input_ids.device)
        slot_ends[group_rows, slots] = torch.cat(
            [(ends - 1)[:, None], ends[:, None].expand(groups, num_candidates)], dim=1
        )
        slot_positions = torch.zeros_like(slot_ends)
        slot_positions[group_rows, slots] = torch.cat(
            [(context_lengths - 1)[:, None], context_lengths[:, None].expand(groups, num_candidates)], dim=1
        )
        dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
        queries = num_slots * width
        mask = packed_candidate_masks(
            self.selector.base_model, attention_mask, queries, dtype, prefix_ends=slot_ends.view(rows, queries)
        )
        logits = model(
            input_ids=torch.cat([input_ids, slot_ids.view(rows, queries)], dim=1),
            attention_mask=mask,
            position_ids=torch.cat([positions_from_attention_mask(attention_mask), slot_positions.view(rows, queries)], 1),
            use_cache=False,
            logits_to_keep=0 if need_context_logits else queries,
        ).logits
        slot_logits = logits[:, -queries:].view(rows, num_slots, width, -1)[group_rows, slots]
        return _ForwardOutput(
            candidate_logits=slot_logits[:, 1:],
            last_context_logits=slot_logits[:, 0],
            context_logits=logits[:, :length] if need_context_logits else None,
        )

    @staticmethod
    def _group_lm_kl(base_logits, context_logits, inputs: dict[str, torch.Tensor], reserved) -> torch.Tensor:
        """The LM-KL term of each group: per position on the context rows, averaged over each group's context."""
        attention_mask = inputs["attention_mask"]
        per_position = lm_kl_per_position(base_logits, context_logits, ignore_token_ids=reserved)
        group_rows, _, ends = _group_contexts(inputs)
        columns = torch.arange(attention_mask.shape[1], device=ends.device)
        weights = attention_mask[group_rows].bool() & (columns[None] < ends[:, None])
        weights = weights.to(per_position.dtype)
        return (per_position[group_rows] * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)

    def _base_logits(self, inputs: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
        """Logits of the base model (adapter disabled, no grad) on the contexts; the last `keep` positions (0: all)."""
        attention_mask = inputs["attention_mask"]
        with torch.no_grad(), self.selector.adapter_disabled():
            return self.selector.model(
                input_ids=inputs["input_ids"],
                attention_mask=attention_mask,
                position_ids=positions_from_attention_mask(attention_mask),
                use_cache=False,
                logits_to_keep=keep,
            ).logits

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        The selection-distillation loss of a batch of groups (see the class docstring), summed over groups and divided
        by `num_items_in_batch` (the groups of the whole accumulated batch) when given, else averaged.

        Returns:
            The loss, and with `return_outputs=True` also a dict with `candidate_logits` `(batch, K)` (`-inf` for
            padding candidates), `teacher_choice` `(batch,)`, the per-group `loss` and (when computed) `lm_kl`.
        """
        args = self.args
        config = self.selector.config
        cand_ids = inputs["cand_ids"]
        rows = output_rows(self.selector.base_model)
        largest = int(torch.maximum(inputs["input_ids"].max(), cand_ids.max()))
        if largest >= rows:
            raise ValueError(
                f"The batch holds token id {largest} but the selector's model has {rows} vocabulary rows: the "
                "selection groups were collected with another model or tokenizer. Collect them with the base model "
                "of the selector."
            )
        cand_mask = inputs.get("cand_mask")
        if cand_mask is None:
            cand_mask = torch.ones_like(cand_ids, dtype=torch.bool)
        bins = torch.tensor(self.selector.bin_token_ids, device=cand_ids.device)
        # rows that are never generated (bins and the learned trigger's row) are left out of every distribution
        reserved = torch.tensor(self.selector.reserved_token_ids, device=cand_ids.device)
        use_lm_kl = args.lm_kl_weight > 0
        base_logits = self._base_logits(inputs, keep=0) if use_lm_kl else None
        forward = self._forward(model, inputs, need_context_logits=use_lm_kl)

        student_log_probs = None
        if config.scoring == "residual" and config.residual_log_probs == "student":
            # the student's own log-probabilities as collected (adapter off), as the processor reads them from the
            # step's scores: constants of the loss, so the adapter learns only through the bins
            student_log_probs = _collected_log_probs(inputs, cand_mask)
        elif config.scoring == "residual":
            # the selector's own log-probabilities of the candidates (adapter on, bins masked), as the processor
            # computes them in both adapter modes
            student_log_probs = selector_log_probs(forward.last_context_logits, cand_ids, reserved)
        bin_logits = forward.candidate_logits.index_select(-1, bins)
        candidate_logits = local_candidate_logits(
            bin_logits,
            self.selector.bin_values.to(bin_logits.device),
            config.scoring,
            config.residual_tau,
            student_log_probs,
        )
        terms = selection_loss(
            candidate_logits,
            inputs["teacher_probs"],
            cand_mask,
            temperature=args.candidate_temperature,
            margin=args.margin,
            teacher_kl_weight=args.teacher_kl_weight,
        )
        per_group = terms.loss
        lm_kl = None
        if use_lm_kl:
            lm_kl = self._group_lm_kl(base_logits, forward.context_logits, inputs, reserved)
            per_group = per_group + args.lm_kl_weight * lm_kl

        if num_items_in_batch is not None:
            loss = per_group.sum() / num_items_in_batch
            if args.average_tokens_across_devices and args.world_size > 1:
                loss = loss * self.accelerator.num_processes
        else:
            loss = per_group.mean()

        self._record_metrics(model.training, candidate_logits, inputs, cand_mask, terms, lm_kl)
        if return_outputs:
            outputs = {
                "candidate_logits": candidate_logits.detach().masked_fill(~cand_mask, float("-inf")),
                "teacher_choice": terms.teacher_choice,
                "loss": per_group.detach(),
            }
            if lm_kl is not None:
                outputs["lm_kl"] = lm_kl.detach()
            return loss, outputs
        return loss

    # -----------------------------------------------------------------------------------------------------------------
    # Metrics

    def _record_metrics(self, training: bool, candidate_logits, inputs, cand_mask, terms, lm_kl) -> None:
        values = selection_metrics(candidate_logits, inputs["teacher_probs"], inputs.get("student_probs"), cand_mask)
        values.update(ce=terms.cross_entropy, hinge=terms.hinge, teacher_kl=terms.teacher_kl)
        if lm_kl is not None:
            values["lm_kl"] = lm_kl
        names = sorted(values)
        stacked = torch.stack([values[name].detach().float() for name in names], dim=-1)
        mode = "train" if training else "eval"
        gathered = self.accelerator.gather_for_metrics(stacked) if mode == "eval" else self.accelerator.gather(stacked)
        sums = gathered.sum(0).tolist()
        for name, total in zip(names, sums):
            entry = self._metrics[mode][name]
            entry[0] += total
            entry[1] += gathered.shape[0]

    def log_to_file(self, path: str | os.PathLike) -> None:
        """
        Writes the trainer's logs (loss, learning rate, evaluation metrics) to `path`, one JSON line each, instead of
        printing them on the console between the progress bars; the bars stay (unless `disable_tqdm`). For scripts
        whose console shows their own progress, such as `s2t-hf demo` and `s2t-hf train`.

        Args:
            path (`str` or `os.PathLike`):
                The file to append to (its folder is created).
        """
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)
        if not self.args.disable_tqdm:
            self.add_callback(ProgressWithoutLogs())
        self.add_callback(LogFileCallback(path))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the averaged selection metrics of the current mode (training or evaluation) to `logs`."""
        mode = "train" if "loss" in logs else "eval"
        averaged = {name: total / count for name, (total, count) in self._metrics[mode].items() if count}
        if mode == "eval":
            prefix = next((k[: -len("_loss")] for k in logs if k.endswith("_loss") and k != "train_loss"), "eval")
            averaged = {f"{prefix}_{name}": value for name, value in averaged.items()}
        logs.update(averaged)
        self._metrics[mode].clear()
        super().log(logs, start_time)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Evaluation step: the loss and, unless `prediction_loss_only`, the candidate logits and teacher's choice."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), outputs["candidate_logits"], outputs["teacher_choice"]

    # -----------------------------------------------------------------------------------------------------------------
    # Saving

    def _card_metrics(self) -> dict[str, float] | None:
        """The latest evaluation results (and the best metric) for the model card."""
        metrics: dict[str, float] = {}
        for entry in reversed(self.state.log_history):
            found = {k: v for k, v in entry.items() if k.startswith("eval_") and isinstance(v, (int, float))}
            if found:
                metrics.update(found)
                metrics["step"] = entry.get("step", self.state.global_step)
                break
        if self.state.best_metric is not None and self.args.metric_for_best_model:
            metrics[f"best_{self.args.metric_for_best_model}"] = self.state.best_metric
        return metrics or None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Saves the selector adapter (PEFT adapter + `s2t_config.json` + model card), the tokenizer and the args."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        if state_dict is not None:
            logger.warning("`S2TTrainer` saves the selector's own adapter weights; the given `state_dict` is ignored.")
        os.makedirs(output_dir, exist_ok=True)
        logger.info(f"Saving the S2T selector to {output_dir}")
        self.selector.save_pretrained(output_dir, metrics=self._card_metrics())
        self._add_card_tags(output_dir, self._tag_names)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _add_card_tags(self, output_dir: str, tags: list[str] | str | None) -> None:
        from huggingface_hub import ModelCard

        path = os.path.join(output_dir, MODEL_CARD_NAME)
        if not tags or not os.path.isfile(path):
            return
        card = ModelCard.load(path)
        existing = list(card.data.tags or [])
        for tag in [tags] if isinstance(tags, str) else tags:
            if tag not in existing:
                existing.append(tag)
        card.data.tags = existing
        card.save(path)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """
        Writes the selector's model card (usage, settings, latest evaluation metrics) into `output_dir/README.md`, with
        the trainer's tags plus `tags`, and the Hub repository as the location in the usage snippet.
        """
        if not self.is_world_process_zero():
            return
        output_dir = self.args.output_dir
        location = getattr(self, "hub_model_id", None) or self.args.hub_model_id or output_dir
        card = self.selector.model_card(location, self._card_metrics())
        with open(os.path.join(output_dir, MODEL_CARD_NAME), "w", encoding="utf-8") as f:
            f.write(card)
        extra = [tags] if isinstance(tags, str) else list(tags or [])
        self._add_card_tags(output_dir, self._tag_names + extra)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The Trainer copies only the PEFT files of a checkpoint into `output_dir` before pushing; a selector also
        # needs its `s2t_config.json` and model card.
        if self.is_world_process_zero():
            for name in (CONFIG_NAME, MODEL_CARD_NAME):
                source = os.path.join(checkpoint_folder, name)
                same = os.path.abspath(checkpoint_folder) == os.path.abspath(self.args.output_dir)
                if os.path.isfile(source) and not same:
                    shutil.copy(source, os.path.join(self.args.output_dir, name))
        super()._push_from_checkpoint(checkpoint_folder)

