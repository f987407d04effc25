"""Decode-time overhead of S2T inside `generate`, as a ratio to plain greedy `generate` in the same process.

Methods (each at trigger rates calibrated to ~1% and ~10% with the entropy trigger):
- `never`: the processor attached but never triggering (the cost of the hook and the signal);
- `teacher`: collaborative S2T (teacher selection, lazy teacher);
- `local-cache`: S2T-Local, candidates scored in one extra forward on the live KV cache (fast path);
- `local-recompute`: S2T-Local, K copies of prefix + candidate re-encoded (fallback path);
- `published`: a re-implementation of the authors' approach: a token-by-token loop at batch size 1 outside `generate`,
  every trigger re-encoding K copies of the 512-token-truncated prefix without a cache.

Runs alternate between methods (round-robin) and the median of `--repeats` timings is reported. With `--memory`,
peak resident memory of plain `generate` and of the fast path is measured in separate subprocesses (batch 8).

    python benchmarks/decode_overhead.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config


BINS = list(range(2032, 2048))  # spare rows used as the selector's bins


def build(seed: int):
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=int(os.environ.get("S2T_BENCH_KV_HEADS", 2)),
        max_position_embeddings=2048,
        pad_token_id=0,
        eos_token_id=None,
        initializer_range=0.1,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def published_loop(model, selector, input_ids, max_new_tokens, threshold, top_k=8, max_context=512):
    """The authors' loop, re-implemented: batch 1, cache for normal steps, K uncached re-encodes per trigger."""
    from s2t_hf.selection import expected_bin_value
    from s2t_hf.triggers import entropy_signal

    bins = torch.tensor(BINS)
    values = selector.bin_values
    sequence = input_ids
    cache = None
    next_input = input_ids
    with torch.no_grad():
        for step in range(max_new_tokens):
            out = model(input_ids=next_input, cache=cache, use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            logits = out.logits[:, -1].float()
            logits[:, bins] = float("-inf")
            token = logits.argmax(-1)
            if step >= 3 and float(entropy_signal(logits)[0]) > threshold:
                candidates = logits.topk(top_k, dim=-1).indices[0]
                prefix = sequence[0, -(max_context - 1) :]
                batch = torch.cat([prefix.expand(top_k, -1), candidates[:, None]], dim=1)
                bin_logits = model(input_ids=batch, use_cache=False).logits[:, -1][:, bins]
                token = candidates[expected_bin_value(bin_logits, values).argmax()][None]
            sequence = torch.cat([sequence, token[:, None]], dim=1)
            next_input = token[:, None]
    return sequence


def run_speed(args) -> dict:
    from s2t_hf import S2TConfig, S2TLogitsProcessor, S2TSelector

    torch.set_num_threads(args.threads)
    student, teacher = build(0), build(1)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 2000, (args.batch_size, args.prompt_length), generator=generator)
    calibration = torch.randint(3, 2000, (32, args.prompt_length), generator=generator).tolist()
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, min_new_tokens=args.new_tokens)

    selector = S2TSelector.create(student, bin_token_ids=BINS, use_lora=True)
    model = selector.base_model  # LoRA injected in place: generation runs through the adapter, as in the paper

    thresholds = {}
    with S2TLogitsProcessor(model, selector=selector, selection="local", trigger="entropy") as p:
        for rate in (0.01, 0.10):
            thresholds[rate] = p.calibrate(calibration, target_rate=rate, max_new_tokens=args.new_tokens)

    plain_model = build(0)  # the same weights without the adapter
    # the demo's S2T-Local: residual form, LoRA only where it leaves the KV cache alone, active only while scoring, so
    # the student generates as itself (baseline: plain greedy) and candidates are scored on its live cache
    scoring_model = build(0)
    scoring_selector = S2TSelector.create(
        scoring_model, bin_token_ids=BINS, preserve_cache=True,
        config=S2TConfig(selection="local", scoring="residual", adapter_mode="scoring"),
    )
    # name -> (model, processor factory or None, baseline name); processors are built per run and their hooks removed
    # afterwards, so baseline runs see a model without hooks.
    methods = {
        "greedy": (plain_model, None, "greedy"),
        "greedy-adapter": (model, None, "greedy-adapter"),
        "never": (plain_model, lambda: S2TLogitsProcessor(plain_model, trigger="never"), "greedy"),
    }
    for rate, threshold in thresholds.items():
        tag = f"{rate:.0%}"
        methods[f"teacher@{tag}"] = (
            plain_model,
            lambda t=threshold: S2TLogitsProcessor(
                plain_model, trigger="entropy", trigger_threshold=t, selection="teacher", teacher=teacher
            ),
            "greedy",
        )
        for path in ("cache", "recompute"):
            methods[f"local-{path}@{tag}"] = (
                model,
                lambda t=threshold, path=path: S2TLogitsProcessor(
                    model, selector=selector, selection="local", trigger="entropy", trigger_threshold=t,
                    local_path=path, max_context=512,
                ),
                "greedy-adapter",
            )
        methods[f"local-scoring@{tag}"] = (
            scoring_model,
            lambda t=threshold: S2TLogitsProcessor(
                scoring_model, scoring_selector.config, selector=scoring_selector, trigger="entropy",
                trigger_threshold=t,
            ),
            "greedy",
        )
        if args.batch_size == 1:
            methods[f"published@{tag}"] = (threshold, "published", "greedy-adapter")

    last_stats = {}

    def run(name):
        target, factory, _ = methods[name]
        if factory == "published":
            return published_loop(model, selector, prompts, args.new_tokens, target)
        if factory is None:
            return target.generate(prompts, **gen)
        with factory() as processor:
            out = target.generate(prompts, logits_processor=[processor], **gen)
            last_stats[name] = processor.stats
        return out

    timings = {name: [] for name in methods}
    for name in methods:  # warm-up
        run(name)
    for _ in range(args.repeats):
        for name in methods:
            start = time.perf_counter()
            run(name)
            timings[name].append(time.perf_counter() - start)
    rows = {}
    for name, values in timings.items():
        baseline = methods[name][2]
        rows[name] = {
            "median_s": statistics.median(values),
            "baseline": baseline,
            "ratio": statistics.median(values) / statistics.median(timings[baseline]),
        }
        if name in last_stats:
            rows[name]["trigger_rate"] = last_stats[name]["trigger_rate"]
            rows[name]["teacher_calls"] = last_stats[name]["teacher_calls"]
            if "local_path" in last_stats[name]:
                rows[name]["local_path"] = last_stats[name]["local_path"]
    return {"thresholds": {str(k): v for k, v in thresholds.items()}, "methods": rows}


def _rss_mb() -> float:
    """Current resident memory of this process in MB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(args) -> None:
    """Prints the peak RSS increase (MB) of one generate call (plain or fast path) at batch 8."""
    from s2t_hf import S2TConfig, S2TLogitsProcessor, S2TSelector

    torch.set_num_threads(args.threads)
    student = build(0)
    selector = S2TSelector.create(student, bin_token_ids=BINS, use_lora=True)
    model = selector.base_model
    prompts = torch.randint(3, 2000, (8, args.prompt_length), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(prompts)
    for row in range(8):  # left padding of 0, 4, 8, ... tokens
        attention_mask[row, : 4 * row] = 0
    prompts = prompts.masked_fill(attention_mask == 0, 0)
    gen = dict(max_new_tokens=512, min_new_tokens=512, do_sample=False, pad_token_id=0, attention_mask=attention_mask)
    processor = None
    if args.memory_child == "s2t":
        processor = S2TLogitsProcessor(
            model, selector=selector, selection="local", trigger="random", trigger_rate=0.1, seed=0,
            local_path="cache",
        )
    model.generate(prompts[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)  # allocate the basics
    before = _rss_mb()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model.generate(prompts, logits_processor=[processor] if processor else None, **gen)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_mb())
    print(json.dumps({"peak_increase_mb": peak[0] - before}))


def run_memory(args) -> dict:
    """Peak RSS increase during generate, plain vs fast path, for a GQA model (2 KV heads) and one without GQA."""
    out = {}
    for kv_heads in (2, 4):
        # large allocations through mmap, so freed memory leaves the resident set at once and RSS tracks live tensors
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "S2T_BENCH_KV_HEADS": str(kv_heads)}
        row = {}
        for kind in ("plain", "s2t"):
            result = subprocess.run(
                [sys.executable, __file__, "--memory-child", kind, "--threads", str(args.threads)],
                capture_output=True, text=True, check=True, env=env,
            )
            row[kind] = json.loads(result.stdout.strip().splitlines()[-1])["peak_increase_mb"]
        row["ratio"] = row["s2t"] / row["plain"] if row["plain"] else None
        out[f"kv_heads={kv_heads}"] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory", action="store_true", help="also measure peak memory at batch 8, 512 new tokens")
    parser.add_argument("--memory-child", choices=["plain", "s2t"], help=argparse.SUPPRESS)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "decode_overhead.json"))
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    result = {"settings": vars(args), "speed": run_speed(args)}
    if args.memory:
        result["memory"] = run_memory(args)
    print(f"{'method':<22}{'median s':>10}{'ratio':>8}  {'to baseline':<16}{'trig rate':>10}{'teacher calls':>15}")
    for name, row in result["speed"]["methods"].items():
        rate = f"{row['trigger_rate']:.3f}" if "trigger_rate" in row else "-"
        calls = str(row.get("teacher_calls", "-"))
        print(f"{name:<22}{row['median_s']:>10.3f}{row['ratio']:>8.3f}  {row['baseline']:<16}{rate:>10}{calls:>15}")
    if args.memory:
        for name, m in result["memory"].items():
            print(
                f"peak memory increase during generate ({name}, batch 8, 512 new tokens): plain {m['plain']:.1f} MB, "
                f"fast path {m['s2t']:.1f} MB, ratio {m['ratio']:.3f}"
            )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
