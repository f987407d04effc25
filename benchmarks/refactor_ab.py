"""Same-process A/B of two versions of s2t_hf on the real SmolLM2-135M-Instruct checkpoint (CPU): decode time and
tokens of the S2T methods of `benchmarks/decode_smollm2.py`, old against new, alternating run by run.

Two runs of `decode_smollm2.py` made at different times see different machine load; this script removes that
noise from a before/after comparison. The older version's package (the `src/s2t_hf` folder of another checkout,
e.g. `git worktree add /tmp/before <rev>`) is copied under the name `s2t_hf_old` (its imports are relative) and
imported beside the installed `s2t_hf`. Both build the same selectors (same seeds) on their own copies of the
checkpoint; every round runs each method once with each version, in shuffled order. Reported per method: the median
over rounds of new/old per-token time (wall clock and the process's CPU time), and whether the two versions emitted
the same tokens and the same trigger statistics (they must, for a refactor that preserves behaviour).

    HF_HUB_OFFLINE=1 python benchmarks/refactor_ab.py --old-src /tmp/before/src --repeats 3 \
        --output benchmarks/results/refactor_ab.json
"""

from __future__ import annotations

import os


os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see decode_smollm2.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_smollm2, versions  # noqa: E402
from decode_smollm2 import (  # noqa: E402
    TIMED,
    encode,
    generate_kwargs,
    randomise_selector,
    write_results,
)

from s2t_hf.prompts import left_pad  # noqa: E402


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STAT_KEYS = ("steps", "triggers", "flips", "teacher_calls", "local_calls", "local_path")


def import_old(old_src: str):
    """The package in `old_src/s2t_hf`, imported as `s2t_hf_old` from a temporary copy."""
    folder = tempfile.mkdtemp(prefix="s2t_hf_old_")
    shutil.copytree(os.path.join(old_src, "s2t_hf"), os.path.join(folder, "s2t_hf_old"))
    sys.path.insert(0, folder)
    return importlib.import_module("s2t_hf_old")


def build(package, base, tokenizer, lora_scale: float) -> dict:
    """The selectors and teacher of one version, each on its own copy of the checkpoint (same seeds in both)."""
    scoring_model, generate_model = copy.deepcopy(base), copy.deepcopy(base)
    scoring = package.S2TSelector.create(scoring_model, tokenizer, num_bins=16, use_lora=True, preserve_cache=True)
    randomise_selector(scoring, seed=1, lora_scale=0.5)
    generating = package.S2TSelector.create(generate_model, tokenizer, num_bins=16, use_lora=True)
    randomise_selector(generating, seed=2, lora_scale=lora_scale)
    return {"scoring": scoring, "generate": generating}


def methods(package, base, teacher, selectors: dict, thresholds: dict) -> dict:
    """name -> (model, processor factory, fused)."""
    processor = package.S2TLogitsProcessor
    scoring, generating = selectors["scoring"], selectors["generate"]
    local = dict(selection="local", scoring="residual", trigger="entropy", top_k=8)

    def adapted():
        return processor(generating.base_model, selector=generating, adapter_mode="generate",
                         trigger_threshold=thresholds["generate"], **local)

    return {
        "never": (base, lambda: processor(base, trigger="never"), False),
        "local-processor-scoring": (
            scoring.base_model,
            lambda: processor(scoring.base_model, selector=scoring, adapter_mode="scoring",
                              trigger_threshold=thresholds["base"], **local),
            False,
        ),
        "local-processor-generate": (generating.base_model, adapted, False),
        "local-fused-generate": (generating.base_model, adapted, True),
        "teacher-processor": (
            base,
            lambda: processor(base, teacher=teacher, selection="teacher", trigger="entropy",
                              trigger_threshold=thresholds["base"], top_k=8),
            False,
        ),
    }


def run(package, method: tuple, inputs: dict, gen: dict) -> tuple[float, float, dict, torch.Tensor]:
    model, factory, fused = method
    with factory() as processor:
        start, start_cpu = time.perf_counter(), time.process_time()
        if fused:
            out = package.generate(model, processor, **inputs, **gen)
        else:
            out = model.generate(**inputs, **gen, logits_processor=[processor])
        seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        stats = {k: processor.stats.get(k) for k in STAT_KEYS}
    return seconds, cpu, stats, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old-src", required=True, help="the `src` folder of the older checkout")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--threshold-base", type=float, default=2.4654,
                        help="entropy threshold of the base model (decode_smollm2.py's calibration for ~10%%)")
    parser.add_argument("--threshold-generate", type=float, default=2.5314,
                        help="entropy threshold of the adapted model (~10%%)")
    parser.add_argument("--generate-lora-scale", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join(RESULTS, "refactor_ab.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()

    import s2t_hf

    old = import_old(args.old_src)
    tokenizer, base, _ = load_smollm2()
    teacher = copy.deepcopy(base)
    thresholds = {"base": args.threshold_base, "generate": args.threshold_generate}
    packages = {"old": old, "new": s2t_hf}
    built = {name: methods(p, base, teacher, build(p, base, tokenizer, args.generate_lora_scale), thresholds)
             for name, p in packages.items()}
    timed = encode(tokenizer, TIMED)
    gen = generate_kwargs(args.new_tokens, tokenizer.pad_token_id)
    order = random.Random(args.seed)
    names = list(built["new"])
    records = {b: {n: {"old": [], "new": [], "same_tokens": True, "same_stats": True} for n in names}
               for b in args.batch_sizes}
    for batch in args.batch_sizes:  # warm-up
        inputs = left_pad(timed[:batch], tokenizer.pad_token_id)
        for version, package in packages.items():
            for name in names:
                run(package, built[version][name], inputs, generate_kwargs(3, tokenizer.pad_token_id))
    for round_index in range(args.repeats):
        for batch in args.batch_sizes:
            inputs = left_pad(timed[:batch], tokenizer.pad_token_id)
            for name in order.sample(names, len(names)):
                outputs = {}
                for version in order.sample(["old", "new"], 2):
                    seconds, cpu, stats, out = run(packages[version], built[version][name], inputs, gen)
                    records[batch][name][version].append({"seconds": seconds, "cpu": cpu, "stats": stats})
                    outputs[version] = out
                record = records[batch][name]
                record["same_tokens"] &= torch.equal(outputs["old"], outputs["new"])
                record["same_stats"] &= record["old"][-1]["stats"] == record["new"][-1]["stats"]
        print(f"round {round_index + 1}/{args.repeats}: {time.time() - started:.0f} s, load {os.getloadavg()[0]:.1f}",
              flush=True)

    summary = {}
    lines = ["| method | batch | new/old time (min-max) | new/old CPU time | same tokens | same stats | triggers |",
             "|---|---|---|---|---|---|---|"]
    for batch, by_name in records.items():
        for name, record in by_name.items():
            ratios = [n["seconds"] / o["seconds"] for o, n in zip(record["old"], record["new"])]
            cpu = [n["cpu"] / o["cpu"] for o, n in zip(record["old"], record["new"])]
            row = {
                "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                "cpu_ratio_median": statistics.median(cpu), "same_tokens": bool(record["same_tokens"]),
                "same_stats": bool(record["same_stats"]), "stats": record["new"][-1]["stats"], "runs": record,
            }
            summary[f"{name} (batch {batch})"] = row
            lines.append(
                f"| {name} | {batch} | {row['ratio_median']:.3f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f}) | "
                f"{row['cpu_ratio_median']:.3f} | {row['same_tokens']} | {row['same_stats']} | "
                f"{row['stats']['triggers']}/{row['stats']['steps']} |"
            )
    table = "\n".join(lines)
    print(table)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "versions": versions(),
        "methods": summary,
        "total_s": time.time() - started,
    }
    write_results(args.output, result, table)
    print(f"wrote {args.output} ({(time.time() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
