"""Settings of the arithmetic teacher/student pair ([`PairTrainingConfig`]) and where the pair is cached."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import LlamaConfig
from transformers.utils import logging

from .arithmetic import ArithmeticTaskConfig
from .tokenizer import padded_vocab_size


__all__ = ["PAIR_INFO_NAME", "ROLES", "PairTrainingConfig", "default_pair_dir"]

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
