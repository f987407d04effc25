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
from .kv import output_rows
from .processor import S2TLogitsProcessor
from .prompts import generate_batched, prompt_token_ids


logger = logging.get_logger(__name__)


@dataclass
class DemoConfig:
    """
    Settings of `s2t-hf demo`. The first run took 27.4 minutes on 2 idle CPU cores: the pair's training 13.7, the rest
    13.6 (what a run with a cached pair takes; 20.3 with `num_latency=100`: per-request timing, paired with a greedy
    run each time, is most of the evaluation). `learned_trigger=False, sweep_rates=()` leaves out the learned
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
    from .data import collect_selection_data
    from .learned_trigger import fit_trigger_row
    from .metrics import load_metric
    from .selector import S2TSelector
    from .tasks import ArithmeticTaskConfig, PairTrainingConfig, default_pair_dir, generate_problems, train_pair

    config = config or DemoConfig()
    os.makedirs(config.output_dir, exist_ok=True)
    results: dict[str, Any] = {"config": dataclasses.asdict(config), "timings": {}}
    demo_started = time.perf_counter()
    stages = tqdm(total=8, desc="s2t demo")

    def stage(name: str):
        stages.set_postfix_str(name)
        logger.info(f"Stage: {name}")

    # 1. the pair
    stage("teacher/student pair")
    started = time.perf_counter()
    pair_dir = config.pair_dir or str(default_pair_dir(config.seed))
    pair_settings = PairTrainingConfig.from_dict(config.pair_settings) if config.pair_settings else None
    teacher, student, tokenizer = train_pair(pair_dir, seed=config.seed, config=pair_settings)
    results["timings"]["pair_s"] = time.perf_counter() - started
    with open(os.path.join(pair_dir, "pair_info.json")) as f:
        results["pair"] = json.load(f)
    stages.update()

    test = generate_problems(config.num_test, "test", seed=config.seed)
    calibration = generate_problems(config.num_calibration, "validation", seed=config.seed)
    train = generate_problems(config.num_train_problems, "train", seed=config.seed)
    test_prompts, calibration_prompts, train_prompts = (
        _encode(tokenizer, test),
        _encode(tokenizer, calibration),
        _encode(tokenizer, train),
    )
    runner = _Generator(tokenizer, config.batch_size, ArithmeticTaskConfig().max_solution_words + 1, config.fused)
    common = dict(eos_token_id=tokenizer.eos_token_id, tokenizer=tokenizer)

    # 2. calibration
    stage("calibrate triggers")
    thresholds = {}
    for kind in ("entropy", "kl"):
        with S2TLogitsProcessor(student, teacher=teacher, trigger=kind, selection="teacher", **common) as s2t:
            thresholds[kind] = s2t.calibrate(
                calibration_prompts, target_rate=config.trigger_rate, batch_size=config.batch_size,
                **runner.generate_kwargs(student),
            )
    results["thresholds"] = thresholds
    stages.update()

    # 3. local sufficiency: hit@K of the teacher's top-1 in the student's top-K at trigger steps
    stage("local sufficiency")
    hit = {}
    for kind in ("entropy", "kl"):
        with S2TLogitsProcessor(
            student, teacher=teacher, trigger=kind, trigger_threshold=thresholds[kind], selection="teacher",
            top_k=config.collect_top_k, record_triggers=True, **common,
        ) as s2t:
            records = []
            for start in range(0, len(calibration_prompts), config.batch_size):
                runner.run(student, calibration_prompts[start : start + config.batch_size], s2t, desc=f"hit@K {kind}")
                records.extend(s2t.records)
        hit[kind] = load_metric("hit_at_k").compute(
            predictions=[r["cand_ids"] for r in records],
            references=[r["teacher_top1"] for r in records],
            ks=[1, 2, 4, 8, 16],
        )
        hit[kind]["steps"] = len(records)
    results["hit_at_k"] = hit
    stages.update()

    # 4. methods that need no training
    stage("greedy, Maj@N, S2T, Takeover")
    methods: dict[str, dict[str, Any]] = {}
    for model in (student, teacher):  # warm-up, so the first timed method pays no start-up cost
        runner.run(model, test_prompts[: config.batch_size], desc="warm-up")

    latency_prompts = test_prompts[: config.num_latency]

    def latency(model, processor=None, samples: int = 1, **kwargs) -> tuple[float, float, float]:
        """
        Seconds to decode the latency problems one request at a time (the N samples of Maj@N as one batch); its ratio
        to the student's greedy decoding of the same problems timed just before (shared machines drift); and the
        ratio of the times per generated token (methods write solutions of different lengths).
        """
        greedy_seconds = runner.run(student, latency_prompts, desc="latency greedy", batch_size=1)[1]
        greedy_tokens = runner.last_new_tokens
        prompts = [p for p in latency_prompts for _ in range(samples)]
        seconds = runner.run(model, prompts, processor, desc="latency", batch_size=samples, **kwargs)[1]
        per_token = (seconds / runner.last_new_tokens) / (greedy_seconds / greedy_tokens) * samples
        return seconds, seconds / greedy_seconds, per_token

    def record(name, completions, seconds, stats=None, accuracy=None, latency_s=None):
        methods[name] = {
            "accuracy": accuracy if accuracy is not None else _accuracy(completions, test),
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

    latency(student)  # warm-up at batch size 1
    completions, seconds = runner.run(student, test_prompts, desc="greedy")
    record("Greedy", completions, seconds, latency_s=latency(student))
    completions, seconds = runner.run(teacher, test_prompts, desc="teacher")
    record("Teacher greedy", completions, seconds, latency_s=latency(teacher))
    for temperature in config.maj_temperatures:
        torch.manual_seed(config.seed)
        repeated = [p for p in test_prompts for _ in range(config.maj_samples)]
        samples, seconds = runner.run(
            student, repeated, desc=f"maj@{config.maj_samples} T={temperature}", do_sample=True,
            temperature=temperature, top_k=0,
        )
        record(
            f"Maj@{config.maj_samples} (T={temperature})", samples, seconds,
            accuracy=_majority_accuracy(samples, test, config.maj_samples),
            latency_s=latency(student, samples=config.maj_samples, do_sample=True, temperature=temperature, top_k=0),
        )
    for selection, name in (("teacher", "S2T"), ("takeover", "Takeover")):
        for kind in ("entropy", "kl"):
            with S2TLogitsProcessor(
                student, teacher=teacher, trigger=kind, trigger_threshold=thresholds[kind], selection=selection,
                top_k=config.top_k, **common,
            ) as s2t:
                completions, seconds = runner.run(student, test_prompts, s2t, desc=f"{name} {kind}")
                stats = s2t.total_stats  # every batch of the test set
                record(f"{name} ({kind})", completions, seconds, stats, latency_s=latency(student, s2t))
    stages.update()

    # 5. selection data
    stage("collect selection data")
    started = time.perf_counter()
    dataset, trajectories = collect_selection_data(
        student, teacher, tokenizer, train_prompts, mode="teacher_forced", top_k=config.collect_top_k,
        fraction=config.collect_fraction, signal=config.collect_signal, max_new_tokens=runner.max_new_tokens,
        batch_size=config.batch_size,
        chat_template=False, suppress_token_ids=list(range(len(tokenizer), output_rows(student))),
        save_to=os.path.join(config.output_dir, "collection"), return_trajectories=True,
    )
    results["timings"]["collect_s"] = time.perf_counter() - started
    split = _split_by_prompt(dataset, config.num_dev_groups, config.seed)
    results["selection_groups"] = {"train": len(split["train"]), "dev": len(split["test"])}
    stages.update()

    # 6. train the local selector(s)
    stage("train the selector")
    selectors = {}
    learned = config.learned_trigger and _labels_vary(trajectories, config)
    for form in config.forms:
        started = time.perf_counter()
        selectors[form], results.setdefault("selector_training", {})[form] = _train_selector(
            config, form, student, tokenizer, split, thresholds["entropy"]
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
    stages.update()

    # 7. S2T-Local: thresholds recalibrated on the adapted student (its distribution moved a little in training)
    stage("evaluate S2T-Local")
    triggers = ["entropy", "kl"] + (["learned"] if learned else [])

    def evaluate(selector, selection: str, kind: str, rate: float, name: str | None, desc: str):
        """Calibrates `kind` to `rate` on the validation problems and decodes the test split; `name` records a row of
        the table (with its per-request time). Returns the accuracy, the statistics and the calibrated processor's
        config."""
        model = selector.base_model if selector is not None else student
        kwargs = dict(teacher=teacher) if kind == "kl" or selection != "local" else {}
        local = dict(selector=selector, adapter_mode=config.local_adapter_mode) if selector is not None else {}
        with S2TLogitsProcessor(
            model, selector.config if selector is not None else None, selection=selection, trigger=kind,
            top_k=config.top_k, **local, **kwargs, **common,
        ) as s2t:
            threshold = s2t.calibrate(
                calibration_prompts, target_rate=rate, batch_size=config.batch_size,
                **runner.generate_kwargs(model),
            )
            completions, seconds = runner.run(model, test_prompts, s2t, desc=desc)
            stats, local_path = s2t.total_stats, s2t.stats["local_path"]  # every batch of the test set
            accuracy = _accuracy(completions, test)
            if name is not None:
                # per-request time at the demo's rate; a half-rate row decodes the same way, only less often
                timed = latency(model, s2t) if rate == config.trigger_rate else None
                record(name, completions, seconds, stats, accuracy=accuracy, latency_s=timed)
                methods[name]["trigger_threshold"] = threshold
                if selection == "local":
                    methods[name]["local_path"] = local_path
            return accuracy, stats, s2t.config

    # the saved selectors decode with the learned trigger (its row is in the adapter) when there is one
    saved_trigger = "learned" if learned else "entropy"
    for form, selector in selectors.items():
        for kind in triggers:
            rates = [config.trigger_rate] + ([config.trigger_rate / 2] if kind == "learned" else [])
            for rate in rates:
                name = f"S2T-Local {form} ({kind}{', half rate' if rate != config.trigger_rate else ''})"
                _, _, processor_config = evaluate(selector, "local", kind, rate, name, name)
                results.setdefault("local_thresholds", {})[f"{form}/{kind}@{rate:g}"] = (
                    processor_config.trigger_threshold
                )
                if kind == saved_trigger and rate == config.trigger_rate:
                    selector.config = dataclasses.replace(processor_config, selection="local")
                    selector.save_pretrained(
                        os.path.join(config.output_dir, f"selector-{form}"),
                        metrics={"test accuracy": methods[name]["accuracy"]},
                    )
        completions, seconds = runner.run(selector.base_model, test_prompts, desc=f"greedy with {form} adapter")
        record(f"Greedy with {form} adapter (LoRA on)", completions, seconds, latency_s=latency(selector.base_model))
    if learned and selectors:
        # collaborative S2T with the learned trigger: the teacher selects, the selector's row only says when (with
        # `adapter_mode="scoring"` the student generates as itself, so any form's selector serves)
        selector = next(iter(selectors.values()))
        for rate in (config.trigger_rate, config.trigger_rate / 2):
            name = f"S2T (learned{', half rate' if rate != config.trigger_rate else ''})"
            evaluate(selector, "teacher", "learned", rate, name, name)
    stages.update()

    # 8. accuracy against trigger rate, for S2T and the best S2T-Local form, with the entropy and learned triggers
    if config.sweep_rates and selectors:
        stage("accuracy against trigger rate")
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
                    accuracy, stats, _ = evaluate(
                        selector if kind == "learned" or selection == "local" else None, selection, kind, rate, None,
                        f"{method} {kind} @ {rate:g}",
                    )
                    points.append(dict(target_rate=rate, accuracy=accuracy, trigger_rate=stats["trigger_rate"],
                                       teacher_calls=stats["teacher_calls"]))
                sweep.setdefault(method, {})[kind] = points
        results["rate_sweep"] = sweep
    stages.update()
    stages.close()

    results["methods"] = _ordered(methods)
    results["targets"] = learned_trigger_targets(results)
    results["timings"]["total_s"] = time.perf_counter() - demo_started
    with open(os.path.join(config.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if config.plots:
        write_plots(results, config.output_dir)
    return results


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


_ROW_GROUPS = ("Greedy", "Teacher greedy", "Maj@", "S2T (", "Takeover (", "S2T-Local ")


def _ordered(methods: dict[str, Any]) -> dict[str, Any]:
    """The table's rows grouped by method (the learned-trigger rows next to the entropy and KL ones), else in the
    order they were decoded."""

    def group(name: str) -> int:
        for index, prefix in reversed(list(enumerate(_ROW_GROUPS))):
            if name == prefix or (prefix.endswith(("(", "@", " ")) and name.startswith(prefix)):
                return index
        return len(_ROW_GROUPS)

    def form(name: str) -> str:
        # S2T-Local rows and their adapter's greedy row: by form
        for part in ("pure", "residual"):
            if f" {part} " in f" {name} ":
                return part
        return ""

    order = {name: i for i, name in enumerate(methods)}
    names = sorted(methods, key=lambda n: (group(n) if not n.startswith("Greedy with") else group("S2T-Local "),
                                           form(n), order[n]))
    return {name: methods[name] for name in names}


def learned_trigger_targets(results: dict[str, Any]) -> dict[str, Any]:
    """
    The learned trigger's targets (docs/benchmarks.md), measured on one demo run: its held-out AUROC against the
    entropy's (margin >= 0.05), S2T at half the rate with it against S2T with the entropy trigger at the full rate
    (>= -1 point), and the best teacher-free S2T-Local row against Greedy (>= 1.30x) and the best Maj@N.
    """
    methods = results["methods"]
    greedy = methods["Greedy"]["accuracy"]
    # teacher-free rows only (the `kl` trigger asks the teacher at every step)
    local = {n: r["accuracy"] for n, r in methods.items() if n.startswith("S2T-Local ") and "(kl" not in n}
    majority = [r["accuracy"] for n, r in methods.items() if n.startswith("Maj@")]
    out: dict[str, Any] = {}
    if local:
        best = max(local, key=local.get)
        out["best_local"] = {
            "row": best, "accuracy": local[best], "x_greedy": local[best] / greedy if greedy else float("nan"),
            "minus_best_maj": local[best] - max(majority) if majority else float("nan"),
        }
        out["best_local"]["met"] = out["best_local"]["x_greedy"] >= 1.30 and out["best_local"]["minus_best_maj"] > 0
    reports = results.get("learned_trigger") or {}
    if reports:
        auroc = next(iter(reports.values()))["auroc"]
        out["auroc"] = {**auroc, "margin_over_entropy": auroc["learned"] - auroc["entropy"]}
        out["auroc"]["met"] = out["auroc"]["margin_over_entropy"] >= 0.05
    if "S2T (learned, half rate)" in methods and "S2T (entropy)" in methods:
        half, full = methods["S2T (learned, half rate)"], methods["S2T (entropy)"]
        out["s2t_half_rate"] = {
            "learned_half_rate": half["accuracy"], "entropy_full_rate": full["accuracy"],
            "difference": half["accuracy"] - full["accuracy"],
            "teacher_calls": {"learned_half_rate": half["teacher_calls"], "entropy_full_rate": full["teacher_calls"]},
        }
        out["s2t_half_rate"]["met"] = out["s2t_half_rate"]["difference"] >= -0.01
    return out


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
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(output_dir)
    return selector, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def format_table(results: dict[str, Any]) -> str:
    """
    The results as a Markdown table, like the paper's. Batched time: the whole test split at `batch_size` problems per
    `generate` call. Per-request time: `num_latency` problems one at a time; its ratio is to the student's greedy
    decoding of the same problems timed just before each method (paired, as the machine's speed drifts), in total and
    per generated token (methods write solutions of different lengths).
    """
    methods = results["methods"]
    greedy = methods["Greedy"]
    lines = [
        "| method | accuracy | vs greedy | batched time (s) | x greedy | per-request time (s) | x greedy, paired | "
        "per token, x greedy | trigger rate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in methods.items():
        gain = row["accuracy"] / greedy["accuracy"] - 1 if greedy["accuracy"] else float("nan")
        rate = f"{row['trigger_rate']:.3f}" if "trigger_rate" in row else "–"
        if "latency_seconds" in row and "latency_seconds" in greedy:
            ratio = row.get("latency_ratio", row["latency_seconds"] / greedy["latency_seconds"])
            per_token = f"{row['latency_per_token_ratio']:.2f}" if "latency_per_token_ratio" in row else "–"
            request = f"{row['latency_seconds']:.1f} | {ratio:.2f} | {per_token}"
        else:
            request = "– | – | –"
        lines.append(
            f"| {name} | {row['accuracy']:.1%} | {gain:+.1%} | {row['seconds']:.1f} | "
            f"{row['seconds'] / greedy['seconds']:.2f} | {request} | {rate} |"
        )
    return "\n".join(lines)


def write_plots(results: dict[str, Any], output_dir: str) -> list[str]:
    """hit@K curve, accuracy/time per method and accuracy against trigger rate as PNG files; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots. `pip install s2t-hf[plots]`.")
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, values in results["hit_at_k"].items():
        ks = sorted(int(k.split("@")[1]) for k in values if k.startswith("hit@"))
        ax.plot(ks, [values[f"hit@{k}"] for k in ks], marker="o", label=f"{kind} trigger")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (student's top-K)")
    ax.set_ylabel("teacher's top-1 in top-K")
    ax.set_title("Local sufficiency at trigger steps")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(output_dir, "hit_at_k.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    methods = results["methods"]
    names = list(methods)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.5), sharey=True)
    left.barh(names, [methods[n]["accuracy"] for n in names], color="tab:blue")
    left.set_xlabel("test accuracy")
    left.invert_yaxis()
    greedy = methods["Greedy"]
    key = "latency_seconds" if "latency_seconds" in greedy else "seconds"
    ratios = [
        methods[n].get("latency_ratio", methods[n][key] / greedy[key]) if key in methods[n] else float("nan")
        for n in names
    ]
    right.barh(names, ratios, color="tab:orange")
    right.axvline(1.0, color="gray", lw=0.8)
    right.set_xlabel("decode time, x greedy" + (" (one request at a time)" if key == "latency_seconds" else ""))
    fig.tight_layout()
    paths.append(os.path.join(output_dir, "methods.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    sweep = results.get("rate_sweep")
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, by_trigger in sweep.items():
            for kind, points in by_trigger.items():
                ax.plot(
                    [p["trigger_rate"] for p in points], [p["accuracy"] for p in points], marker="o",
                    linestyle="-" if kind == "learned" else "--", label=f"{method}, {kind} trigger",
                )
        ax.axhline(greedy["accuracy"], color="gray", lw=0.8, label="Greedy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("trigger rate (measured on the test split)")
        ax.set_ylabel("test accuracy")
        ax.set_title("Accuracy against trigger rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(output_dir, "trigger_rates.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
