"""Training one model of the arithmetic pair: the endless example stream, checkpoint selection on validation accuracy,
and the worker process that [`~s2t_hf.tasks.train_pair`] starts for each model."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging

from ..trainer_log import LogFileCallback
from .arithmetic import ArithmeticTaskConfig, generate_problems, iter_problems
from .pair_config import ROLES, PairTrainingConfig
from .solutions import evaluate_greedy, problem_prompt_ids
from .tokenizer import build_tokenizer


__all__ = ["ArithmeticStream", "collate_examples", "train_one", "worker_main"]

logger = logging.get_logger(__name__)


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
            prompt_ids = problem_prompt_ids(self.tokenizer, [problem])[0]
            solution_ids = self.tokenizer(problem.solution, add_special_tokens=False)["input_ids"]
            solution_ids = [*solution_ids, self.tokenizer.eos_token_id]
            yield {
                "input_ids": [*prompt_ids, *solution_ids],
                "labels": [-100] * len(prompt_ids) + solution_ids,
            }


def collate_examples(pad_token_id: int):
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


def train_one(
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
            data_collator=collate_examples(tokenizer.pad_token_id),
            callbacks=[callback],
        )
        # the trainer's log dictionaries go to a file, not between the caller's progress bars
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(LogFileCallback(output_dir / f"train_{role}_log.jsonl"))
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


def exit_with_parent(parent_pid: int, interval: float = 1.0) -> threading.Thread:
    """
    Ends this process (exit code 1) once `parent_pid` is no longer its parent: a worker whose parent was killed
    (SIGTERM, SIGKILL: no `finally` runs there) stops instead of training on as an orphan. Watches from a daemon
    thread.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def worker_main(argv: list[str] | None = None) -> None:
    """Worker entry point of [`train_pair`]: `python -m s2t_hf.tasks._pair_worker ROLE SETTINGS_JSON OUTPUT_DIR`."""
    parser = argparse.ArgumentParser(description="Train one model of the arithmetic pair (used by `train_pair`).")
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("settings")
    parser.add_argument("output_dir")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is no longer the parent")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        exit_with_parent(args.parent_pid)
    settings = PairTrainingConfig.from_dict(json.loads(Path(args.settings).read_text()))
    settings.num_threads = settings.num_threads or 1
    import logging as std_logging

    handler = std_logging.StreamHandler()
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    library_logger = std_logging.getLogger("s2t_hf")
    library_logger.addHandler(handler)
    library_logger.setLevel(std_logging.INFO)
    output_dir = Path(args.output_dir)
    train_one(args.role, settings, output_dir, output_dir / f".progress_{args.role}.json")
