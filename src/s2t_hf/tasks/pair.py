"""A teacher/student pair of tiny Llama models trained from scratch on the arithmetic task, cached on disk.

[`train_pair`] trains a ~150K-parameter teacher and a ~62K-parameter student with `transformers.Trainer` on a fresh
stream of training problems, evaluates greedy accuracy on validation problems as it goes, keeps the teacher's best
checkpoint and the student checkpoint whose accuracy sits in a target window well below the teacher (so that
selection has something to fix), and saves both with the tokenizer. A second call with the same settings loads the
cache instead ([`load_pair`]). By default the two models train in two processes at once, one CPU thread each.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel, TrainerCallback
from transformers.utils import logging

from ..generation import generate_batched
from ..prompts import prompt_token_ids
from ..version import __version__
from .arithmetic import ArithmeticProblem, ArithmeticTaskConfig, check_answer, generate_problems, iter_problems
from .tokenizer import build_tokenizer, padded_vocab_size


__all__ = [
    "PAIR_INFO_NAME",
    "PairTrainingConfig",
    "default_pair_dir",
    "evaluate_greedy",
    "generate_solutions",
    "load_pair",
    "train_pair",
]

logger = logging.get_logger(__name__)

PAIR_INFO_NAME = "pair_info.json"
ROLES = ("teacher", "student")
# Fields that change how training runs but not what it produces; they do not invalidate a cache. `max_minutes` only
# changes the result when it fires, and a pair it stopped is never loaded as the full run (see `train_pair`).
_EXECUTION_FIELDS = ("parallel", "num_threads", "max_minutes")


@dataclass
class PairTrainingConfig:
    """
    Settings of [`train_pair`]: model sizes, training budget, evaluation cadence and checkpoint selection.

    Args:
        teacher_hidden_size (`int`, *optional*, defaults to `64`):
            Teacher hidden size.
        teacher_intermediate_size (`int`, *optional*, defaults to `256`):
            Teacher MLP size.
        teacher_num_layers (`int`, *optional*, defaults to `2`):
            Teacher decoder layers.
        teacher_num_heads (`int`, *optional*, defaults to `4`):
            Teacher attention heads.
        student_hidden_size (`int`, *optional*, defaults to `40`):
            Student hidden size.
        student_intermediate_size (`int`, *optional*, defaults to `160`):
            Student MLP size.
        student_num_layers (`int`, *optional*, defaults to `2`):
            Student decoder layers.
        student_num_heads (`int`, *optional*, defaults to `4`):
            Student attention heads.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Share the input embedding and the output head (as small Llama/Qwen checkpoints do).
        spare_vocab_rows (`int`, *optional*, defaults to `32`):
            Fewest embedding rows above the tokenizer's vocabulary (reserved for S2T-Local bins); the total is rounded
            up to a multiple of 64.
        teacher_max_steps (`int`, *optional*, defaults to `4500`):
            Teacher optimisation steps (fewer if it reaches `teacher_stop_accuracy` first, or if the opt-in
            `max_minutes` fires).
        student_max_steps (`int`, *optional*, defaults to `5000`):
            Student optimisation steps (fewer once its accuracy has passed the target window).
        batch_size (`int`, *optional*, defaults to `32`):
            Problems per step; every step draws fresh problems.
        teacher_learning_rate (`float`, *optional*, defaults to `3e-3`):
            Peak AdamW learning rate of the teacher.
        student_learning_rate (`float`, *optional*, defaults to `3e-3`):
            Peak AdamW learning rate of the student.
        warmup_steps (`int`, *optional*, defaults to `100`):
            Linear warm-up steps before the cosine decay.
        weight_decay (`float`, *optional*, defaults to `0.01`):
            AdamW weight decay.
        eval_steps (`int`, *optional*, defaults to `250`):
            Evaluate greedy validation accuracy every this many teacher steps.
        student_eval_steps (`int`, *optional*, defaults to `100`):
            Evaluate the student this often: its useful accuracy window can be short.
        eval_problems (`int`, *optional*, defaults to `200`):
            Validation problems used to select checkpoints.
        test_problems (`int`, *optional*, defaults to `500`):
            Test problems used to report the selected checkpoints' accuracy (0 to skip).
        teacher_stop_accuracy (`float`, *optional*, defaults to `0.98`):
            Stop the teacher once its validation accuracy reaches this.
        student_min_accuracy (`float`, *optional*, defaults to `0.3`):
            Lower end of the student's target validation accuracy.
        student_max_accuracy (`float`, *optional*, defaults to `0.6`):
            Upper end of the student's target validation accuracy; training stops after `student_patience`
            evaluations above it.
        student_target_accuracy (`float`, *optional*, defaults to `0.45`):
            Among the checkpoints inside the window, the one closest to this accuracy is kept (the latest on ties).
        student_patience (`int`, *optional*, defaults to `2`):
            Evaluations above `student_max_accuracy` before the student stops.
        seed (`int`, *optional*, defaults to `0`):
            Seed of initialisation, data order and validation problems.
        task (`ArithmeticTaskConfig`, *optional*):
            Difficulty knobs of the problems.
        parallel (`bool`, *optional*, defaults to `True`):
            Train teacher and student at once in two worker processes. Execution setting: does not change the cache.
        num_threads (`int`, *optional*):
            Torch threads per training process; defaults to 1 when `parallel` else all cores.
        max_minutes (`float`, *optional*):
            Opt-in safety net: a wall-clock limit of each model's training, in minutes. By default (`None`) training
            stops on steps and validation accuracy only, so a seed gives the same pair on any machine. When set and
            exceeded, training stops at the next evaluation, keeps the best checkpoint so far, records `stop_reason`
            `"max_minutes"` and logs a warning: the pair then depends on the machine's speed. Such a pair is loaded
            from the cache only by a call with the same `max_minutes`; any other call trains it again.
    """

    teacher_hidden_size: int = field(default=64, metadata={"help": "Teacher hidden size."})
    teacher_intermediate_size: int = field(default=256, metadata={"help": "Teacher MLP size."})
    teacher_num_layers: int = field(default=2, metadata={"help": "Teacher decoder layers."})
    teacher_num_heads: int = field(default=4, metadata={"help": "Teacher attention heads."})
    student_hidden_size: int = field(default=40, metadata={"help": "Student hidden size."})
    student_intermediate_size: int = field(default=160, metadata={"help": "Student MLP size."})
    student_num_layers: int = field(default=2, metadata={"help": "Student decoder layers."})
    student_num_heads: int = field(default=4, metadata={"help": "Student attention heads."})
    tie_word_embeddings: bool = field(default=True, metadata={"help": "Share input embedding and output head."})
    spare_vocab_rows: int = field(default=32, metadata={"help": "Fewest embedding rows above the tokenizer."})
    teacher_max_steps: int = field(default=4500, metadata={"help": "Teacher optimisation steps."})
    student_max_steps: int = field(default=5000, metadata={"help": "Student optimisation steps."})
    batch_size: int = field(default=32, metadata={"help": "Problems per step."})
    teacher_learning_rate: float = field(default=3e-3, metadata={"help": "Teacher peak learning rate."})
    student_learning_rate: float = field(default=3e-3, metadata={"help": "Student peak learning rate."})
    warmup_steps: int = field(default=100, metadata={"help": "Warm-up steps."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    eval_steps: int = field(default=250, metadata={"help": "Teacher evaluation interval (steps)."})
    student_eval_steps: int = field(default=100, metadata={"help": "Student evaluation interval (steps)."})
    eval_problems: int = field(default=200, metadata={"help": "Validation problems for checkpoint selection."})
    test_problems: int = field(default=500, metadata={"help": "Test problems for the final report."})
    teacher_stop_accuracy: float = field(default=0.98, metadata={"help": "Stop the teacher at this accuracy."})
    student_min_accuracy: float = field(default=0.3, metadata={"help": "Student target window, lower end."})
    student_max_accuracy: float = field(default=0.6, metadata={"help": "Student target window, upper end."})
    student_target_accuracy: float = field(default=0.45, metadata={"help": "Preferred student accuracy."})
    student_patience: int = field(default=2, metadata={"help": "Evaluations above the window before stopping."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    task: ArithmeticTaskConfig = field(default_factory=ArithmeticTaskConfig, metadata={"help": "Task knobs."})
    parallel: bool = field(default=True, metadata={"help": "Train both models at once in two processes."})
    num_threads: int | None = field(default=None, metadata={"help": "Torch threads per training process."})
    max_minutes: float | None = field(
        default=None, metadata={"help": "Opt-in wall-clock limit per model, in minutes (None: no time limit)."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.task, dict):
            self.task = ArithmeticTaskConfig(**self.task)
        for name in (
            "teacher_hidden_size", "teacher_intermediate_size", "teacher_num_layers", "teacher_num_heads",
            "student_hidden_size", "student_intermediate_size", "student_num_layers", "student_num_heads",
            "teacher_max_steps", "student_max_steps", "batch_size", "eval_steps", "student_eval_steps",
            "eval_problems", "student_patience",
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        for role in ROLES:
            hidden, heads = getattr(self, f"{role}_hidden_size"), getattr(self, f"{role}_num_heads")
            if hidden % heads:
                raise ValueError(
                    f"`{role}_hidden_size` ({hidden}) must be divisible by `{role}_num_heads` ({heads}); change one."
                )
        if not 0.0 <= self.student_min_accuracy <= self.student_max_accuracy <= 1.0:
            raise ValueError(
                "`student_min_accuracy` and `student_max_accuracy` must satisfy 0 <= min <= max <= 1, got "
                f"{self.student_min_accuracy} and {self.student_max_accuracy}."
            )
        if not self.student_min_accuracy <= self.student_target_accuracy <= self.student_max_accuracy:
            raise ValueError(
                f"`student_target_accuracy` ({self.student_target_accuracy}) must lie in [student_min_accuracy, "
                f"student_max_accuracy] = [{self.student_min_accuracy}, {self.student_max_accuracy}]."
            )
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"`max_minutes` must be positive or None, got {self.max_minutes}.")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"`num_threads` must be >= 1 or None, got {self.num_threads}.")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PairTrainingConfig:
        """Build settings from [`~PairTrainingConfig.to_dict`] output; unknown keys are ignored with a warning."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning(f"Ignoring unknown `PairTrainingConfig` keys: {unknown}.")
        return cls(**{k: v for k, v in data.items() if k in known})

    def cache_key(self) -> dict[str, Any]:
        """The settings that determine the trained models (execution settings left out)."""
        return {k: v for k, v in self.to_dict().items() if k not in _EXECUTION_FIELDS}

    def model_config(self, role: str, tokenizer) -> LlamaConfig:
        """The `LlamaConfig` of the `"teacher"` or the `"student"` for `tokenizer`."""
        if role not in ROLES:
            raise ValueError(f"`role` must be one of {ROLES}, got {role!r}.")
        return LlamaConfig(
            vocab_size=padded_vocab_size(len(tokenizer), self.spare_vocab_rows),
            hidden_size=getattr(self, f"{role}_hidden_size"),
            intermediate_size=getattr(self, f"{role}_intermediate_size"),
            num_hidden_layers=getattr(self, f"{role}_num_layers"),
            num_attention_heads=getattr(self, f"{role}_num_heads"),
            num_key_value_heads=getattr(self, f"{role}_num_heads"),
            max_position_embeddings=tokenizer.model_max_length,
            tie_word_embeddings=self.tie_word_embeddings,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )


def default_pair_dir(seed: int = 0) -> Path:
    """
    Where [`train_pair`] caches the pair of a seed: `$S2T_HF_CACHE/arithmetic-pair-seed{seed}`, with `S2T_HF_CACHE`
    defaulting to `~/.cache/s2t_hf`.

    Args:
        seed (`int`, *optional*, defaults to `0`):
            The pair's seed.

    Returns:
        `pathlib.Path`
    """
    root = os.environ.get("S2T_HF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "s2t_hf")
    return Path(root) / f"arithmetic-pair-seed{seed}"


# ----------------------------------------------------------------------------------------------------------------
# Generation and accuracy
# ----------------------------------------------------------------------------------------------------------------


def _prompt_ids(tokenizer, problems: Sequence[ArithmeticProblem]) -> list[list[int]]:
    """Each problem's prompt: its chat applied to the tokenizer's chat template (the bare text without a template)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return prompt_token_ids(
        [p.messages if has_template else p.text for p in problems], tokenizer, chat_template=has_template,
        add_special_tokens=False, name="problems",
    )


def generate_solutions(
    model: PreTrainedModel,
    tokenizer,
    problems: Sequence[ArithmeticProblem],
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    show_progress: bool = False,
    **generate_kwargs: Any,
) -> list[str]:
    """
    Generate a solution for each problem with [`s2t_hf.generate_batched`]: batches of left-padded prompts, greedy by
    default.

    The prompt is the tokenizer's chat template applied to the problem text (the bare text if the tokenizer has no
    template). Embedding rows above the tokenizer's vocabulary are never generated.

    Args:
        model (`PreTrainedModel`):
            A causal LM.
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer (its `padding_side` does not matter: prompts are padded on the left).
        problems (`Sequence[ArithmeticProblem]`):
            The problems (anything with `.text` and `.messages`).
        batch_size (`int`, *optional*, defaults to `64`):
            Problems per `generate` call.
        max_new_tokens (`int`, *optional*):
            Defaults to the longest possible solution of the default task plus one.
        show_progress (`bool`, *optional*, defaults to `False`):
            Show a tqdm bar over problems.
        generate_kwargs (`dict`, *optional*):
            Passed to `generate_batched` and on to `model.generate` (e.g. `logits_processor=[...]`, `do_sample=True`;
            `s2t=processor` decodes with the fused S2T loop).

    Returns:
        `list[str]`: The completions, special tokens removed, in the order of `problems`.
    """
    if not problems:
        return []
    max_new_tokens = max_new_tokens or ArithmeticTaskConfig().max_solution_words + 1
    vocab_rows = model.get_output_embeddings().weight.shape[0]
    if vocab_rows > len(tokenizer) and "suppress_tokens" not in generate_kwargs:
        generate_kwargs["suppress_tokens"] = list(range(len(tokenizer), vocab_rows))
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("desc", "solutions")
    was_training = model.training
    model.eval()
    try:
        return generate_batched(
            model, _prompt_ids(tokenizer, problems), tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, show_progress=show_progress,
            **generate_kwargs,
        )  # type: ignore[return-value]
    finally:
        model.train(was_training)


def evaluate_greedy(
    model: PreTrainedModel,
    tokenizer,
    problems: Sequence[ArithmeticProblem],
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    **generate_kwargs: Any,
) -> float:
    """
    Greedy accuracy of `model` on `problems`: the share of completions whose final answer is right.

    Args:
        model (`PreTrainedModel`):
            A causal LM.
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer.
        problems (`Sequence[ArithmeticProblem]`):
            The problems (anything with `.text`, `.messages` and `.answer`).
        batch_size (`int`, *optional*, defaults to `64`):
            Problems per `generate` call.
        max_new_tokens (`int`, *optional*):
            Defaults to the longest possible solution plus one.
        generate_kwargs (`dict`, *optional*):
            Passed to `model.generate`, e.g. `logits_processor=[s2t]` to measure S2T decoding.

    Returns:
        `float`: Accuracy in [0, 1] (0 for no problems).

    Examples:

    ```python
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from s2t_hf.tasks import build_tokenizer, evaluate_greedy, generate_problems
    >>> tokenizer = build_tokenizer()
    >>> config = LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, num_key_value_heads=2)
    >>> model = AutoModelForCausalLM.from_config(config)
    >>> evaluate_greedy(model, tokenizer, generate_problems(4), max_new_tokens=4)
    0.0
    ```
    """
    if not problems:
        return 0.0
    completions = generate_solutions(model, tokenizer, problems, batch_size, max_new_tokens, **generate_kwargs)
    return sum(check_answer(c, p.answer) for c, p in zip(completions, problems)) / len(problems)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


class ArithmeticStream(torch.utils.data.IterableDataset):
    """
    Endless training examples: `input_ids` of `chat prompt + solution + eos`, `labels` masked (-100) on the prompt.

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            The task tokenizer.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the problem stream (train split only).
        config (`ArithmeticTaskConfig`, *optional*):
            Difficulty knobs.
    """

    def __init__(self, tokenizer, seed: int = 0, config: ArithmeticTaskConfig | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.seed = seed
        self.config = config

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for problem in iter_problems("train", self.seed, self.config):
            prompt_ids = _prompt_ids(self.tokenizer, [problem])[0]
            solution_ids = self.tokenizer(problem.solution, add_special_tokens=False)["input_ids"]
            solution_ids = [*solution_ids, self.tokenizer.eos_token_id]
            yield {
                "input_ids": [*prompt_ids, *solution_ids],
                "labels": [-100] * len(prompt_ids) + solution_ids,
            }


def _collate(pad_token_id: int):
    def collate(examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):  # right padding: positions match left-padded generation
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    return collate


class _SelectionCallback(TrainerCallback):
    """Evaluate greedy validation accuracy every `eval_steps`, keep snapshots, decide when to stop."""

    def __init__(self, role, settings: PairTrainingConfig, tokenizer, problems, progress_file: Path | None):
        self.role = role
        self.settings = settings
        self.tokenizer = tokenizer
        self.problems = problems
        self.progress_file = progress_file
        self.eval_steps = settings.eval_steps if role == "teacher" else settings.student_eval_steps
        self.history: list[dict[str, float]] = []
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self.above = 0
        self.start = time.monotonic()
        self.max_steps = getattr(settings, f"{role}_max_steps")
        self.stop_reason = "max_steps"

    def _write_progress(self, step: int, done: bool = False) -> None:
        if self.progress_file is None:
            return
        last = self.history[-1]["accuracy"] if self.history else None
        payload = {"step": step, "max_steps": self.max_steps, "accuracy": last, "done": done}
        tmp = self.progress_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, self.progress_file)

    def evaluate(self, model, step: int) -> float:
        accuracy = evaluate_greedy(model, self.tokenizer, self.problems, batch_size=len(self.problems))
        elapsed = time.monotonic() - self.start
        self.history.append({"step": step, "accuracy": accuracy, "seconds": round(elapsed, 1)})
        self.snapshots[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        logger.info(f"{self.role} step {step}: validation greedy accuracy {accuracy:.3f} ({elapsed:.0f} s)")
        return accuracy

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % 10 == 0:
            self._write_progress(step)
        if step % self.eval_steps and step < self.max_steps:
            return control
        accuracy = self.evaluate(model, step)
        self._write_progress(step)
        if self.role == "teacher":
            self._keep_best_snapshots()
            if accuracy >= self.settings.teacher_stop_accuracy:
                control.should_training_stop, self.stop_reason = True, "teacher_stop_accuracy"
        else:
            self.above = self.above + 1 if accuracy > self.settings.student_max_accuracy else 0
            if self.above >= self.settings.student_patience:
                control.should_training_stop, self.stop_reason = True, "above_student_window"
            self._drop_useless_student_snapshots()
        limit = self.settings.max_minutes
        if limit is not None and time.monotonic() - self.start > 60 * limit and not control.should_training_stop:
            control.should_training_stop, self.stop_reason = True, "max_minutes"
            logger.info(f"{self.role}: `max_minutes` ({limit}) reached at step {step} of {self.max_steps}; stopping.")
        return control

    def _keep_best_snapshots(self) -> None:
        best = self.select()
        self.snapshots = {step: snap for step, snap in self.snapshots.items() if step == best}

    def _drop_useless_student_snapshots(self) -> None:
        keep = {self.select(), self.history[-1]["step"]}
        self.snapshots = {step: snap for step, snap in self.snapshots.items() if step in keep}

    def select(self) -> int:
        """The step of the checkpoint to keep."""
        if self.role == "teacher":  # best accuracy, latest on ties
            return max(self.history, key=lambda h: (h["accuracy"], h["step"]))["step"]
        low, high = self.settings.student_min_accuracy, self.settings.student_max_accuracy
        inside = [h for h in self.history if low <= h["accuracy"] <= high]
        if inside:  # the closest to the target inside the window, the latest (most trained) on ties
            target = self.settings.student_target_accuracy
            return min(inside, key=lambda h: (round(abs(h["accuracy"] - target), 6), -h["step"]))["step"]
        # Otherwise the closest to the window (latest on ties).
        return min(
            self.history, key=lambda h: (max(low - h["accuracy"], h["accuracy"] - high, 0.0), -h["step"])
        )["step"]


def _train_one(
    role: str, settings: PairTrainingConfig, output_dir: Path, progress_file: Path | None = None
) -> dict[str, Any]:
    """Train one model of the pair, save it (and the tokenizer) under `output_dir/role`, return its record."""
    from transformers import Trainer, TrainingArguments

    if settings.num_threads is not None:
        torch.set_num_threads(settings.num_threads)
    tokenizer = build_tokenizer()
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_config(settings.model_config(role, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    problems = generate_problems(settings.eval_problems, "validation", settings.seed, settings.task)
    callback = _SelectionCallback(role, settings, tokenizer, problems, progress_file)
    max_steps = getattr(settings, f"{role}_max_steps")
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=max_steps,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=getattr(settings, f"{role}_learning_rate"),
            lr_scheduler_type="cosine",
            warmup_steps=min(settings.warmup_steps, max_steps // 2),
            weight_decay=settings.weight_decay,
            max_grad_norm=1.0,
            logging_steps=max(1, min(100, max_steps // 10)),
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            remove_unused_columns=False,
            seed=settings.seed,
        )
        stream_seed = settings.seed * 2 + ROLES.index(role)  # teacher and student see different problems
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=ArithmeticStream(tokenizer, stream_seed, settings.task),
            data_collator=_collate(tokenizer.pad_token_id),
            callbacks=[callback],
        )
        started = time.monotonic()
        trainer.train()
        train_seconds = time.monotonic() - started
    if not callback.history or callback.history[-1]["step"] != trainer.state.global_step:
        callback.evaluate(model, trainer.state.global_step)
    step = callback.select()
    model.load_state_dict(callback.snapshots[step])
    model.eval()
    record: dict[str, Any] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "selected_step": step,
        "steps_trained": trainer.state.global_step,
        "stop_reason": callback.stop_reason,
        "validation_accuracy": next(h["accuracy"] for h in callback.history if h["step"] == step),
        "train_seconds": round(train_seconds, 1),
        "history": callback.history,
    }
    if settings.test_problems:
        test = generate_problems(settings.test_problems, "test", settings.seed, settings.task)
        record["test_accuracy"] = evaluate_greedy(model, tokenizer, test, batch_size=256)
    if role == "student":
        low, high = settings.student_min_accuracy, settings.student_max_accuracy
        if not low <= record["validation_accuracy"] <= high:
            logger.warning(
                f"No student checkpoint reached validation accuracy in [{low}, {high}]; kept step {step} with "
                f"{record['validation_accuracy']:.3f}. Change `student_max_steps`, `student_learning_rate` or the "
                "student size to move it into the window."
            )
    target = output_dir / role
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (output_dir / f".{role}_record.json").write_text(json.dumps(record, indent=2))
    if progress_file is not None:
        callback._write_progress(trainer.state.global_step, done=True)
    return record


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run_workers(settings: PairTrainingConfig, output_dir: Path) -> dict[str, dict[str, Any]]:
    """Train teacher and student in two worker processes, showing one progress bar."""
    settings_file = output_dir / ".settings.json"
    settings_file.write_text(json.dumps(settings.to_dict()))
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", str(settings.num_threads or 1))
    processes, logs = {}, {}
    for role in ROLES:
        logs[role] = open(output_dir / f"train_{role}.log", "w")
        processes[role] = subprocess.Popen(
            [sys.executable, "-m", "s2t_hf.tasks._pair_worker", role, str(settings_file), str(output_dir)],
            stdout=logs[role],
            stderr=subprocess.STDOUT,
            env=env,
        )
    total = settings.teacher_max_steps + settings.student_max_steps
    bar = logging.tqdm(total=total, desc="training arithmetic pair", unit="step")
    try:
        while any(p.poll() is None for p in processes.values()):
            time.sleep(2.0)
            progress = {r: _read_json(output_dir / f".progress_{r}.json") or {} for r in ROLES}
            done = sum(
                p.get("max_steps", 0) if p.get("done") else p.get("step", 0) for p in progress.values()
            )
            bar.update(max(0, min(total, done) - bar.n))
            bar.set_postfix(
                {f"{r}_acc": f"{p['accuracy']:.2f}" for r, p in progress.items() if p.get("accuracy") is not None},
                refresh=False,
            )
        bar.update(total - bar.n)
    finally:
        bar.close()
        for process in processes.values():
            if process.poll() is None:
                process.kill()
        for log in logs.values():
            log.close()
    records = {}
    for role, process in processes.items():
        record = _read_json(output_dir / f".{role}_record.json")
        if process.returncode != 0 or record is None:
            tail = (output_dir / f"train_{role}.log").read_text()[-3000:]
            raise RuntimeError(f"Training the {role} failed (exit code {process.returncode}). Log tail:\n{tail}")
        records[role] = record
    return records


def _cut_short(info: dict[str, Any]) -> list[str]:
    """The roles of a pair's info (or records) whose training the opt-in `max_minutes` stopped."""
    return [role for role in ROLES if (info.get(role) or {}).get("stop_reason") == "max_minutes"]


def _warn_cut_short(info: dict[str, Any], settings: PairTrainingConfig, output_dir: Path) -> None:
    """Warn that the pair of `info` (trained with `settings`) was stopped by `max_minutes`, if it was."""
    roles = _cut_short(info)
    if roles:
        steps = ", ".join(
            f"the {r} at step {info[r]['steps_trained']} of {getattr(settings, f'{r}_max_steps')}" for r in roles
        )
        logger.warning(
            f"`max_minutes` ({settings.max_minutes}) stopped the training of the pair in {output_dir} before its "
            f"step and accuracy criteria: {steps}. This pair depends on the machine's speed; leave "
            "`max_minutes=None` (the default) to train the same pair on any machine."
        )


def train_pair(
    output_dir: str | os.PathLike | None = None,
    seed: int = 0,
    config: PairTrainingConfig | None = None,
    overwrite: bool = False,
) -> tuple[PreTrainedModel, PreTrainedModel, Any]:
    """
    Train (or load from the cache) the arithmetic teacher/student pair.

    The teacher (~150K parameters) trains until its validation greedy accuracy reaches `teacher_stop_accuracy` and
    keeps its best checkpoint; the student (~62K parameters) keeps, among its checkpoints whose accuracy lies in
    `[student_min_accuracy, student_max_accuracy]`, the one closest to `student_target_accuracy`. Both are evaluated
    often on validation problems, saved in safetensors with the tokenizer under `output_dir/teacher` and
    `output_dir/student`, and described in `output_dir/pair_info.json` (settings, parameter counts, validation and
    test accuracy, each model's `stop_reason`, timings). With the default settings both train at once in two
    processes (one thread each), about 12 minutes on an idle 2-core CPU. Training stops on steps and validation
    accuracy only, never on the wall clock, so a seed gives the same pair on a quiet or a loaded machine;
    `max_minutes` is an opt-in time limit that warns when it fires, and a pair it cut short is loaded from the cache
    only by a call with the same `max_minutes`.

    Args:
        output_dir (`str` or `os.PathLike`, *optional*):
            The cache directory; defaults to [`default_pair_dir`] of `seed`.
        seed (`int`, *optional*, defaults to `0`):
            Seed of everything; overrides `config.seed`.
        config (`PairTrainingConfig`, *optional*):
            Sizes and budget; defaults to `PairTrainingConfig()`.
        overwrite (`bool`, *optional*, defaults to `False`):
            Retrain even if `output_dir` holds a pair trained with other settings (a pair with the same settings is
            loaded, unless `overwrite` is set or `max_minutes` cut it short; see above).

    Returns:
        `tuple`: `(teacher, student, tokenizer)`, the models in eval mode.
    """
    settings = copy.deepcopy(config) if config is not None else PairTrainingConfig()
    settings.seed = seed
    output_dir = Path(output_dir) if output_dir is not None else default_pair_dir(seed)
    info = _read_json(output_dir / PAIR_INFO_NAME)
    if info is not None and not overwrite:
        stored = PairTrainingConfig.from_dict(info.get("settings", {}))
        if stored.cache_key() != settings.cache_key():
            raise ValueError(
                f"`output_dir` ({output_dir}) holds a pair trained with other settings. Pass `overwrite=True` to "
                "retrain it, or choose another `output_dir`."
            )
        if not _cut_short(info) or stored.max_minutes == settings.max_minutes:
            logger.info(f"Loading the cached arithmetic pair from {output_dir}.")
            _warn_cut_short(info, stored, output_dir)
            return load_pair(output_dir)
        logger.warning(
            f"The pair cached in {output_dir} was cut short by `max_minutes={stored.max_minutes}` "
            f"({', '.join(_cut_short(info))}), so it is not the run these settings ask for "
            f"(`max_minutes={settings.max_minutes}`); training it again."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / PAIR_INFO_NAME).unlink(missing_ok=True)
    started = time.monotonic()
    if settings.parallel:
        records = _run_workers(settings, output_dir)
    else:
        records = {role: _train_one(role, settings, output_dir) for role in ROLES}
    _warn_cut_short(records, settings, output_dir)
    tokenizer = build_tokenizer()
    info = {
        "library_version": __version__,
        "task": "arithmetic",
        "seed": seed,
        "tokenizer_size": len(tokenizer),
        "vocab_size": padded_vocab_size(len(tokenizer), settings.spare_vocab_rows),
        "wall_seconds": round(time.monotonic() - started, 1),
        "settings": settings.to_dict(),
        **records,
    }
    tmp = output_dir / (PAIR_INFO_NAME + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, output_dir / PAIR_INFO_NAME)
    for leftover in [".settings.json", *(f".{r}_record.json" for r in ROLES), *(f".progress_{r}.json" for r in ROLES)]:
        (output_dir / leftover).unlink(missing_ok=True)
    return load_pair(output_dir)


def load_pair(path: str | os.PathLike) -> tuple[PreTrainedModel, PreTrainedModel, Any]:
    """
    Load a pair saved by [`train_pair`].

    Args:
        path (`str` or `os.PathLike`):
            The pair's directory (holding `teacher/`, `student/` and `pair_info.json`).

    Returns:
        `tuple`: `(teacher, student, tokenizer)`, the models in eval mode.
    """
    path = Path(path)
    missing = [name for name in ("teacher", "student", PAIR_INFO_NAME) if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"`path` ({path}) is not a trained arithmetic pair: {missing} missing. Train one with `train_pair`."
        )
    teacher = AutoModelForCausalLM.from_pretrained(path / "teacher", trust_remote_code=False).eval()
    student = AutoModelForCausalLM.from_pretrained(path / "student", trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(path / "student", trust_remote_code=False)
    return teacher, student, tokenizer


def _worker_main(argv: list[str] | None = None) -> None:
    """Worker entry point of [`train_pair`]: `python -m s2t_hf.tasks._pair_worker ROLE SETTINGS_JSON OUTPUT_DIR`."""
    parser = argparse.ArgumentParser(description="Train one model of the arithmetic pair (used by `train_pair`).")
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("settings")
    parser.add_argument("output_dir")
    args = parser.parse_args(argv)
    settings = PairTrainingConfig.from_dict(json.loads(Path(args.settings).read_text()))
    settings.num_threads = settings.num_threads or 1
    import logging as std_logging

    handler = std_logging.StreamHandler()
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    library_logger = std_logging.getLogger("s2t_hf")
    library_logger.addHandler(handler)
    library_logger.setLevel(std_logging.INFO)
    output_dir = Path(args.output_dir)
    _train_one(args.role, settings, output_dir, output_dir / f".progress_{args.role}.json")

