"""The whole S2T pipeline on a laptop CPU, on the built-in arithmetic task (`s2t-hf demo`).

Stages: train or load the teacher/student pair -> calibrate triggers -> local sufficiency (hit@K at trigger steps) ->
collect selection data (and the student's labelled trajectories) -> train the local selector (pure and residual forms)
and fit its learned trigger row -> evaluate Greedy, Maj@8, S2T, Takeover and S2T-Local on the test split, with the
entropy, KL and learned triggers, and accuracy against trigger rate -> table, JSON and PNG plots.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .config import S2TConfig
from .demo_report import format_table, learned_trigger_targets, ordered_rows, write_plots
from .generation import generate_batched
from .kv import output_rows
from .processor import S2TLogitsProcessor
from .prompts import prompt_token_ids


__all__ = ["DemoConfig", "format_table", "learned_trigger_targets", "run_demo", "write_plots"]

logger = logging.get_logger(__name__)


@dataclass
class DemoConfig:
    """
    Settings of `s2t-hf demo`. A first run took 30.7 minutes on 2 CPU cores (seed 1, 2026-12-07): the pair's training
    14.2, the rest 16.5 (what a run with a cached pair takes; per-request timing, paired with a greedy run each time, is
    most of the evaluation). `learned_trigger=False, sweep_rates=()` leaves out the learned
    trigger's rows and the rate sweep (16 decodes of the test split, 3 of them timed per request).
    """

    seed: int = field(default=0, metadata={"help": "Seed of the task, the pair and the selector."})
    output_dir: str = field(default="s2t_demo", metadata={"help": "Where results, plots and the selector go."})
    pair_dir: str | None = field(default=None, metadata={"help": "Cache of the trained pair (default: ~/.cache)."})
    pair_settings: dict[str, Any] | None = field(
        default=None, metadata={"help": "Fields of `PairTrainingConfig` overriding its defaults (sizes, budget)."}
    )
    num_test: int = field(default=500, metadata={"help": "Test problems per method."})
    num_calibration: int = field(default=200, metadata={"help": "Validation problems for calibration and hit@K."})
    num_train_problems: int = field(default=3000, metadata={"help": "Training problems for selection data."})
    num_dev_groups: int = field(default=1000, metadata={"help": "Held-out groups for early stopping."})
    trigger_rate: float = field(default=0.10, metadata={"help": "Target trigger rate at inference."})
    learned_trigger: bool = field(
        default=True,
        metadata={
            "help": "Fit the selector's learned trigger row on the collected trajectories and add S2T and S2T-Local "
            "rows with it, at `trigger_rate` and at half of it."
        },
    )
    trigger_label: str = field(
        default="fixable",
        metadata={"help": "What the learned trigger predicts: one of `s2t_hf.learned_trigger.TRIGGER_LABELS`."},
    )
    sweep_rates: tuple[float, ...] = field(
        default=(0.025, 0.05, 0.1, 0.2),
        metadata={
            "help": "Trigger rates of the accuracy-against-rate sweep (entropy and learned triggers, S2T and the best "
            "S2T-Local form); empty: no sweep."
        },
    )
    collect_fraction: float = field(default=0.10, metadata={"help": "Fraction of positions kept as groups."})
    collect_signal: str = field(
        default="entropy",
        metadata={
            "help": "How collection ranks positions: `entropy` (where S2T-Local's teacher-free trigger fires) or `kl` "
            "(where the teacher disagrees)."
        },
    )
    top_k: int = field(default=8, metadata={"help": "Candidates at inference."})
    collect_top_k: int = field(default=16, metadata={"help": "Candidates per selection group."})
    maj_samples: int = field(default=8, metadata={"help": "Sampled paths for majority voting."})
    maj_temperatures: tuple[float, ...] = field(default=(0.7, 0.3), metadata={"help": "Temperatures of Maj@N."})
    batch_size: int = field(default=64, metadata={"help": "Problems per generate call."})
    num_latency: int = field(
        default=50,
        metadata={
            "help": "Test problems decoded one at a time (batch size 1) to time each method per request; Maj@N "
            "decodes its N samples of a problem as one batch."
        },
    )
    selector_epochs: float = field(default=3.0, metadata={"help": "Epochs of selector training."})
    selector_learning_rate: float = field(default=2e-3, metadata={"help": "Learning rate of selector training."})
    selector_batch_size: int = field(default=32, metadata={"help": "Groups per training step."})
    residual_tau: float = field(default=0.1, metadata={"help": "Temperature of the residual form."})
    selector_training_args: dict[str, Any] | None = field(
        default=None, metadata={"help": "Fields of `S2TTrainingArguments` overriding the demo's choices."}
    )
    forms: tuple[str, ...] = field(default=("pure", "residual"), metadata={"help": "Selector forms to train."})
    local_adapter_mode: str = field(
        default="scoring",
        metadata={
            "help": "`scoring`: the selector's LoRA is active only while candidates are scored, so untriggered tokens "
            "stay the student's own (at this scale the adapted student's own generation degraded: see "
            "docs/benchmarks.md); `generate`: active during generation, as in the paper."
        },
    )
    selector_preserve_cache: bool = field(
        default=True,
        metadata={
            "help": "LoRA only where it leaves the KV cache as the student's "
            "(`S2TSelector.create(preserve_cache=True)`), so that with `local_adapter_mode='scoring'` candidates are "
            "scored on the live cache."
        },
    )
    fused: bool = field(
        default=True,
        metadata={
            "help": "Decode S2T methods with the fused loop (`s2t_hf.generate`), which scores S2T-Local candidates "
            "inside the decoding forward where the adapter mode allows it; `False`: the drop-in processor path. Both "
            "give the same tokens."
        },
    )
    plots: bool = field(default=True, metadata={"help": "Write PNG plots (needs matplotlib)."})


def _encode(tokenizer, problems) -> list[list[int]]:
    """The problems' chats through the tokenizer's chat template, as token ids."""
    return prompt_token_ids([p.messages for p in problems], tokenizer, chat_template=True, name="problems")


class _Generator:
    """Batched, left-padded generation of the task's solutions (`generate_batched`), with timing."""

    def __init__(self, tokenizer, batch_size: int, max_new_tokens: int, fused: bool = True):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.fused = fused

    def generate_kwargs(self, model) -> dict[str, Any]:
        """`generate`'s arguments; the output rows above the tokenizer are suppressed."""
        suppress = list(range(len(self.tokenizer), output_rows(model)))
        return dict(
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            suppress_tokens=suppress or None,
        )

    def run(
        self, model, prompts, processor=None, desc="generate", batch_size: int | None = None, **kwargs
    ) -> tuple[list[str], float]:
        """The decoded solutions and the seconds they took; `processor` decodes with S2T (fused loop if `fused`)."""
        gen = {**self.generate_kwargs(model), "do_sample": False, **kwargs}
        if processor is not None and not self.fused:
            gen["logits_processor"] = [processor]
        started = time.perf_counter()
        continuations = generate_batched(
            model, prompts, self.tokenizer, batch_size=batch_size or self.batch_size, decode=False,
            s2t=processor if self.fused else None, desc=desc, **gen,
        )
        seconds = time.perf_counter() - started
        # tokens generated by the last call, up to each row's end of sequence
        self.last_new_tokens = sum(len(ids) for ids in continuations)
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in continuations], seconds


def _accuracy(completions, problems) -> float:
    from .metrics import load_metric
    from .tasks import extract_answer

    predictions = []
    for text in completions:
        answer = extract_answer(text)
        predictions.append("" if answer is None else str(answer))
    result = load_metric("answer_accuracy").compute(
        predictions=predictions, references=[str(p.answer) for p in problems]
    )
    return result["accuracy"]


def _majority_accuracy(samples: list[str], problems, n: int) -> float:
    from .tasks import extract_answer

    correct = 0
    for i, problem in enumerate(problems):
        answers = [extract_answer(t) for t in samples[i * n : (i + 1) * n]]
        votes = Counter(a for a in answers if a is not None)
        if votes and votes.most_common(1)[0][0] == problem.answer:
            correct += 1
    return correct / len(problems)


def run_demo(config: DemoConfig | None = None) -> dict[str, Any]:
    """
    Runs the whole pipeline and returns the results (also written to `output_dir/results.json`).

    Args:
        config (`DemoConfig`, *optional*): the settings; defaults reproduce `docs/benchmarks.md`.
    """
    config = config or DemoConfig()
    os.makedirs(config.output_dir, exist_ok=True)
    results: dict[str, Any] = {"config": dataclasses.asdict(config), "timings": {}}
    demo_started = time.perf_counter()
    stages = tqdm(total=8, desc="s2t demo")

    def stage(name: str):
        stages.set_postfix_str(name)
        logger.info(f"Stage: {name}")

    stage("teacher/student pair")
    pair = _train_or_load_pair(config, results)
    stages.update()
    run = _DemoRun(config, *pair)
    stage("calibrate triggers")
    results["thresholds"] = thresholds = _calibrate_thresholds(run)
    stages.update()
    stage("local sufficiency")
    results["hit_at_k"] = _local_sufficiency(run, thresholds)
    stages.update()
    stage("greedy, Maj@N, S2T, Takeover")
    _evaluate_methods_without_training(run, thresholds)
    stages.update()
    stage("collect selection data")
    split, trajectories = _collect(run, results)
    stages.update()
    stage("train the selector")
    selectors, learned = _train_selectors(run, split, trajectories, thresholds["entropy"], results)
    stages.update()
    stage("evaluate S2T-Local")
    _evaluate_local(run, selectors, learned, results)
    stages.update()
    if config.sweep_rates and selectors:
        stage("accuracy against trigger rate")
        results["rate_sweep"] = _rate_sweep(run, selectors, learned)
    stages.update()
    stages.close()

    results["methods"] = ordered_rows(run.methods)
    results["targets"] = learned_trigger_targets(results)
    results["timings"]["total_s"] = time.perf_counter() - demo_started
    with open(os.path.join(config.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if config.plots:
        write_plots(results, config.output_dir)
    return results


class _DemoRun:
    """
    What the stages of one demo run share: the settings, the pair, the problems and their prompts, the generator, and
    the table's rows (`methods`), which [`~_DemoRun.record`] fills.
    """

    def __init__(self, config: DemoConfig, teacher, student, tokenizer):
        from .tasks import ArithmeticTaskConfig, generate_problems

        self.config = config
        self.teacher, self.student, self.tokenizer = teacher, student, tokenizer
        self.test = generate_problems(config.num_test, "test", seed=config.seed)
        calibration = generate_problems(config.num_calibration, "validation", seed=config.seed)
        train = generate_problems(config.num_train_problems, "train", seed=config.seed)
        self.test_prompts, self.calibration_prompts, self.train_prompts = (
            _encode(tokenizer, self.test),
            _encode(tokenizer, calibration),
            _encode(tokenizer, train),
        )
        self.latency_prompts = self.test_prompts[: config.num_latency]
        self.runner = _Generator(
            tokenizer, config.batch_size, ArithmeticTaskConfig().max_solution_words + 1, config.fused
        )
        self.common = dict(eos_token_id=tokenizer.eos_token_id, tokenizer=tokenizer)
        self.methods: dict[str, dict[str, Any]] = {}

    def latency(self, model, processor=None, samples: int = 1, **kwargs) -> tuple[float, float, float]:
        """
        Seconds to decode the latency problems one request at a time (the N samples of Maj@N as one batch); its ratio
        to the student's greedy decoding of the same problems timed just before (shared machines drift); and the
        ratio of the times per generated token (methods write solutions of different lengths).
        """
        runner = self.runner
        greedy_seconds = runner.run(self.student, self.latency_prompts, desc="latency greedy", batch_size=1)[1]
        greedy_tokens = runner.last_new_tokens
        prompts = [p for p in self.latency_prompts for _ in range(samples)]
        seconds = runner.run(model, prompts, processor, desc="latency", batch_size=samples, **kwargs)[1]
        per_token = (seconds / runner.last_new_tokens) / (greedy_seconds / greedy_tokens) * samples
        return seconds, seconds / greedy_seconds, per_token

    def record(self, name, completions, seconds, stats=None, accuracy=None, latency_s=None) -> None:
        """Adds the row `name` to the table: its accuracy on the test split, times and trigger statistics."""
        methods = self.methods
        methods[name] = {
            "accuracy": accuracy if accuracy is not None else _accuracy(completions, self.test),
            "seconds": seconds,
        }
        if latency_s is not None:
            seconds, ratio, per_token = latency_s
            methods[name].update(latency_seconds=seconds, latency_ratio=ratio, latency_per_token_ratio=per_token)
        if stats is not None:
            methods[name].update(
                trigger_rate=stats["trigger_rate"], flip_rate=stats["flip_rate"], teacher_calls=stats["teacher_calls"]
            )
        logger.info(f"{name}: {methods[name]}")

    def evaluate(self, selector, selection: str, kind: str, rate: float, name: str | None, desc: str):
        """Calibrates `kind` to `rate` on the validation problems and decodes the test split; `name` records a row of
        the table (with its per-request time). Returns the accuracy, the statistics and the calibrated processor's
        config."""
        config = self.config
        model = selector.base_model if selector is not None else self.student
        kwargs = dict(teacher=self.teacher) if kind == "kl" or selection != "local" else {}
        local = dict(selector=selector, adapter_mode=config.local_adapter_mode) if selector is not None else {}
        with S2TLogitsProcessor(
            model, selector.config if selector is not None else None, selection=selection, trigger=kind,
            top_k=config.top_k, **local, **kwargs, **self.common,
        ) as s2t:
            threshold = s2t.calibrate(
                self.calibration_prompts, target_rate=rate, batch_size=config.batch_size,
                **self.runner.generate_kwargs(model),
            )
            completions, seconds = self.runner.run(model, self.test_prompts, s2t, desc=desc)
            stats, local_path = s2t.total_stats, s2t.stats["local_path"]  # every batch of the test set
            accuracy = _accuracy(completions, self.test)
            if name is not None:
                # per-request time at the demo's rate; a half-rate row decodes the same way, only less often
                timed = self.latency(model, s2t) if rate == config.trigger_rate else None
                self.record(name, completions, seconds, stats, accuracy=accuracy, latency_s=timed)
                self.methods[name]["trigger_threshold"] = threshold
                if selection == "local":
                    self.methods[name]["local_path"] = local_path
            return accuracy, stats, s2t.config


# ---------------------------------------------------------------------------------------------------------------------
# The stages of `run_demo`


def _train_or_load_pair(config: DemoConfig, results: dict[str, Any]):
    """1. The teacher/student pair, trained (or loaded from `pair_dir`); returns `(teacher, student, tokenizer)`."""
    from .tasks import PairTrainingConfig, default_pair_dir, train_pair

    started = time.perf_counter()
    pair_dir = config.pair_dir or str(default_pair_dir(config.seed))
    pair_settings = PairTrainingConfig.from_dict(config.pair_settings) if config.pair_settings else None
    teacher, student, tokenizer = train_pair(pair_dir, seed=config.seed, config=pair_settings)
    results["timings"]["pair_s"] = time.perf_counter() - started
    with open(os.path.join(pair_dir, "pair_info.json")) as f:
        results["pair"] = json.load(f)
    return teacher, student, tokenizer


def _calibrate_thresholds(run: _DemoRun) -> dict[str, float]:
    """2. The entropy and KL triggers' thresholds at the demo's trigger rate, on the validation problems."""
    config = run.config
    thresholds = {}
    for kind in ("entropy", "kl"):
        with S2TLogitsProcessor(run.student, teacher=run.teacher, trigger=kind, selection="teacher",
                                **run.common) as s2t:
            thresholds[kind] = s2t.calibrate(
                run.calibration_prompts, target_rate=config.trigger_rate, batch_size=config.batch_size,
                **run.runner.generate_kwargs(run.student),
            )
    return thresholds


def _local_sufficiency(run: _DemoRun, thresholds: dict[str, float]) -> dict[str, Any]:
    """3. Local sufficiency: hit@K of the teacher's top-1 in the student's top-K at trigger steps."""
    from .metrics import load_metric

    config = run.config
    hit = {}
    for kind in ("entropy", "kl"):
        with S2TLogitsProcessor(
            run.student, teacher=run.teacher, trigger=kind, trigger_threshold=thresholds[kind], selection="teacher",
            top_k=config.collect_top_k, record_triggers=True, **run.common,
        ) as s2t:
            records = []
            for start in range(0, len(run.calibration_prompts), config.batch_size):
                prompts = run.calibration_prompts[start : start + config.batch_size]
                run.runner.run(run.student, prompts, s2t, desc=f"hit@K {kind}")
                records.extend(s2t.records)
        hit[kind] = load_metric("hit_at_k").compute(
            predictions=[r["cand_ids"] for r in records],
            references=[r["teacher_top1"] for r in records],
            ks=[1, 2, 4, 8, 16],
        )
        hit[kind]["steps"] = len(records)
    return hit


def _evaluate_methods_without_training(run: _DemoRun, thresholds: dict[str, float]) -> None:
    """4. The rows that need no training: Greedy, the teacher's greedy, Maj@N, S2T and Takeover."""
    config, runner, student, teacher = run.config, run.runner, run.student, run.teacher
    for model in (student, teacher):  # warm-up, so the first timed method pays no start-up cost
        runner.run(model, run.test_prompts[: config.batch_size], desc="warm-up")
    run.latency(student)  # warm-up at batch size 1
    completions, seconds = runner.run(student, run.test_prompts, desc="greedy")
    run.record("Greedy", completions, seconds, latency_s=run.latency(student))
    completions, seconds = runner.run(teacher, run.test_prompts, desc="teacher")
    run.record("Teacher greedy", completions, seconds, latency_s=run.latency(teacher))
    for temperature in config.maj_temperatures:
        torch.manual_seed(config.seed)
        repeated = [p for p in run.test_prompts for _ in range(config.maj_samples)]
        samples, seconds = runner.run(
            student, repeated, desc=f"maj@{config.maj_samples} T={temperature}", do_sample=True,
            temperature=temperature, top_k=0,
        )
        run.record(
            f"Maj@{config.maj_samples} (T={temperature})", samples, seconds,
            accuracy=_majority_accuracy(samples, run.test, config.maj_samples),
            latency_s=run.latency(student, samples=config.maj_samples, do_sample=True, temperature=temperature,
                                  top_k=0),
        )
    for selection, name in (("teacher", "S2T"), ("takeover", "Takeover")):
        for kind in ("entropy", "kl"):
            with S2TLogitsProcessor(
                student, teacher=teacher, trigger=kind, trigger_threshold=thresholds[kind], selection=selection,
                top_k=config.top_k, **run.common,
            ) as s2t:
                completions, seconds = runner.run(student, run.test_prompts, s2t, desc=f"{name} {kind}")
                stats = s2t.total_stats  # every batch of the test set
                run.record(f"{name} ({kind})", completions, seconds, stats, latency_s=run.latency(student, s2t))


def _collect(run: _DemoRun, results: dict[str, Any]):
    """5. Selection data and the student's labelled trajectories; returns the train/dev split of the groups and the
    trajectories."""
    from .data import collect_selection_data

    config, student, tokenizer = run.config, run.student, run.tokenizer
    started = time.perf_counter()
    dataset, trajectories = collect_selection_data(
        student, run.teacher, tokenizer, run.train_prompts, mode="teacher_forced", top_k=config.collect_top_k,
        fraction=config.collect_fraction, signal=config.collect_signal, max_new_tokens=run.runner.max_new_tokens,
        batch_size=config.batch_size,
        chat_template=False, suppress_token_ids=list(range(len(tokenizer), output_rows(student))),
        save_to=os.path.join(config.output_dir, "collection"), return_trajectories=True,
    )
    results["timings"]["collect_s"] = time.perf_counter() - started
    split = _split_by_prompt(dataset, config.num_dev_groups, config.seed)
    results["selection_groups"] = {"train": len(split["train"]), "dev": len(split["test"])}
    return split, trajectories


def _train_selectors(run: _DemoRun, split, trajectories, entropy_threshold: float, results: dict[str, Any]):
    """6. The local selector of each form, and its learned trigger row when the labels vary; returns the selectors by
    form and whether they have the learned trigger."""
    from .learned_trigger import fit_trigger_row

    config = run.config
    selectors = {}
    learned = config.learned_trigger and _labels_vary(trajectories, config)
    for form in config.forms:
        started = time.perf_counter()
        selectors[form], results.setdefault("selector_training", {})[form] = _train_selector(
            config, form, run.student, run.tokenizer, split, entropy_threshold
        )
        results["timings"][f"train_{form}_s"] = time.perf_counter() - started
        if learned:
            started = time.perf_counter()
            # the row reads the hidden states the student generates with (the base model's in scoring mode), so it is
            # the same for every form; each selector carries its own copy
            report = fit_trigger_row(
                selectors[form], trajectories, label=config.trigger_label, top_k=config.top_k,
                adapter_mode=config.local_adapter_mode, target_rate=config.trigger_rate, seed=config.seed,
            )
            results.setdefault("learned_trigger", {})[form] = report
            results["timings"][f"fit_trigger_{form}_s"] = time.perf_counter() - started
            logger.info(f"Learned trigger ({form}): held-out AUROC {report['auroc']}")
    return selectors, learned


def _evaluate_local(run: _DemoRun, selectors: dict[str, Any], learned: bool, results: dict[str, Any]) -> None:
    """7. S2T-Local with each trigger (thresholds recalibrated on the adapted student: its distribution moved a little
    in training), each selector saved, and collaborative S2T with the learned trigger."""
    config = run.config
    triggers = ["entropy", "kl"] + (["learned"] if learned else [])
    # the saved selectors decode with the learned trigger (its row is in the adapter) when there is one
    saved_trigger = "learned" if learned else "entropy"
    for form, selector in selectors.items():
        for kind in triggers:
            rates = [config.trigger_rate] + ([config.trigger_rate / 2] if kind == "learned" else [])
            for rate in rates:
                name = f"S2T-Local {form} ({kind}{', half rate' if rate != config.trigger_rate else ''})"
                _, _, processor_config = run.evaluate(selector, "local", kind, rate, name, name)
                results.setdefault("local_thresholds", {})[f"{form}/{kind}@{rate:g}"] = (
                    processor_config.trigger_threshold
                )
                if kind == saved_trigger and rate == config.trigger_rate:
                    selector.config = dataclasses.replace(processor_config, selection="local")
                    selector.save_pretrained(
                        os.path.join(config.output_dir, f"selector-{form}"),
                        metrics={"test accuracy": run.methods[name]["accuracy"]},
                    )
        completions, seconds = run.runner.run(selector.base_model, run.test_prompts,
                                              desc=f"greedy with {form} adapter")
        run.record(f"Greedy with {form} adapter (LoRA on)", completions, seconds,
                   latency_s=run.latency(selector.base_model))
    if learned and selectors:
        # collaborative S2T with the learned trigger: the teacher selects, the selector's row only says when (with
        # `adapter_mode="scoring"` the student generates as itself, so any form's selector serves)
        selector = next(iter(selectors.values()))
        for rate in (config.trigger_rate, config.trigger_rate / 2):
            name = f"S2T (learned{', half rate' if rate != config.trigger_rate else ''})"
            run.evaluate(selector, "teacher", "learned", rate, name, name)


def _rate_sweep(run: _DemoRun, selectors: dict[str, Any], learned: bool) -> dict[str, Any]:
    """8. Accuracy against trigger rate, for S2T and the best S2T-Local form, with the entropy and learned triggers
    (a rate the table already has reuses its row)."""
    config, methods = run.config, run.methods
    best_form = max(selectors, key=lambda f: methods[f"S2T-Local {f} (entropy)"]["accuracy"])
    sweep = {}
    for method, selection, selector in (
        ("S2T", "teacher", next(iter(selectors.values()))), (f"S2T-Local {best_form}", "local", selectors[best_form])
    ):
        for kind in ("entropy", "learned") if learned else ("entropy",):
            points = []
            for rate in config.sweep_rates:
                name = _row_name(method, kind, rate, config.trigger_rate)
                if name is not None and name in methods:  # a row of the table already
                    row = methods[name]
                    points.append(dict(target_rate=rate, accuracy=row["accuracy"], trigger_rate=row["trigger_rate"],
                                       teacher_calls=row["teacher_calls"]))
                    continue
                accuracy, stats, _ = run.evaluate(
                    selector if kind == "learned" or selection == "local" else None, selection, kind, rate, None,
                    f"{method} {kind} @ {rate:g}",
                )
                points.append(dict(target_rate=rate, accuracy=accuracy, trigger_rate=stats["trigger_rate"],
                                   teacher_calls=stats["teacher_calls"]))
            sweep.setdefault(method, {})[kind] = points
    return sweep


def _labels_vary(trajectories, config: DemoConfig) -> bool:
    """Whether the trajectories hold both labels of the learned trigger (a pair whose student always agrees with the
    teacher leaves nothing to learn: the learned rows are then left out, with a warning)."""
    from .learned_trigger import trigger_labels

    labels = torch.cat([trigger_labels(row, config.top_k, config.trigger_label) for row in trajectories])
    if labels.numel() and 0 < int(labels.sum()) < labels.numel():
        return True
    logger.warning(
        f"The learned trigger is left out: every collected position has the same `{config.trigger_label}` label "
        f"({labels.numel()} positions), so there is nothing to fit."
    )
    return False


def _row_name(method: str, kind: str, rate: float, demo_rate: float) -> str | None:
    """The table row of `method` with the `kind` trigger at `rate`, if the demo decodes one."""
    if math.isclose(rate, demo_rate):
        return f"{method} ({kind})"
    if kind == "learned" and math.isclose(rate, demo_rate / 2):
        return f"{method} (learned, half rate)"
    return None


def _split_by_prompt(dataset, num_dev_groups: int, seed: int):
    """Train/dev split of selection groups by prompt, so no prompt contributes to both sides."""
    from datasets import DatasetDict

    if len(dataset) < 2:
        raise ValueError(f"Only {len(dataset)} selection group(s) were collected; use more training problems.")
    prompts = sorted(set(dataset["prompt_index"]))
    generator = torch.Generator().manual_seed(seed)
    order = [prompts[i] for i in torch.randperm(len(prompts), generator=generator).tolist()]
    per_prompt = max(1, len(dataset) // max(1, len(prompts)))
    dev_prompts = set(order[: max(1, min(len(prompts) // 5, num_dev_groups // per_prompt))])
    is_dev = [p in dev_prompts for p in dataset["prompt_index"]]
    return DatasetDict(
        train=dataset.select([i for i, d in enumerate(is_dev) if not d]),
        test=dataset.select([i for i, d in enumerate(is_dev) if d]),
    )


def _train_selector(config: DemoConfig, form: str, student, tokenizer, split, entropy_threshold: float):
    from transformers import EarlyStoppingCallback

    from .selector import S2TSelector
    from .trainer import S2TTrainer, S2TTrainingArguments

    model = copy.deepcopy(student)
    selector_config = S2TConfig(
        selection="local", scoring=form, residual_tau=config.residual_tau, top_k=config.top_k,
        trigger="entropy", trigger_threshold=entropy_threshold, trigger_rate=config.trigger_rate,
        adapter_mode=config.local_adapter_mode,
    )
    selector = S2TSelector.create(
        model, tokenizer, num_bins=16, use_lora=True, preserve_cache=config.selector_preserve_cache,
        learned_trigger=config.learned_trigger, config=selector_config,
    )
    output_dir = os.path.join(config.output_dir, f"selector-{form}")
    steps_per_epoch = max(1, len(split["train"]) // config.selector_batch_size)
    args = S2TTrainingArguments(
        output_dir=output_dir,
        num_train_epochs=config.selector_epochs,
        per_device_train_batch_size=config.selector_batch_size,
        per_device_eval_batch_size=64,
        learning_rate=config.selector_learning_rate,
        # the pure score lives in [0, 1]: sharpen its softmax as the residual form does, and scale the margin with it
        candidate_temperature=config.residual_tau if form == "pure" else 1.0,
        margin=config.residual_tau if form == "pure" else 1.0,
        # with the adapter active only while scoring, the student's own generation cannot drift: no LM-KL term
        lm_kl_weight=0.0 if config.local_adapter_mode == "scoring" else 0.1,
        # the teacher's whole distribution over the candidates, not only its choice (+4-6 points on the demo)
        teacher_kl_weight=1.0,
        lr_scheduler_type="constant",
        eval_strategy="steps",
        eval_steps=max(20, steps_per_epoch // 4),
        save_strategy="steps",
        save_steps=max(20, steps_per_epoch // 4),
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_agreement",
        greater_is_better=True,
        logging_steps=20,
        report_to="none",
        seed=config.seed,
        use_cpu=True,
        disable_tqdm=False,
    )
    if config.selector_training_args:
        args = dataclasses.replace(args, **config.selector_training_args)
    trainer = S2TTrainer(
        selector=selector,
        args=args,
        train_dataset=split["train"],
        eval_dataset=split["test"],
        callbacks=[EarlyStoppingCallback(early_stopping_patience=4)],
    )
    trainer.log_to_file(os.path.join(output_dir, "trainer_log.jsonl"))  # the console keeps the demo's own progress
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(output_dir)
    return selector, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
