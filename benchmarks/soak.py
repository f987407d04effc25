"""Soak: many consecutive `generate` calls with one `S2TLogitsProcessor`, resident memory and per-call state.

For every configuration (each trigger with teacher selection, takeover, S2T-Local in both adapter modes, the fused
loop, the learned trigger), one processor serves `--calls` consecutive `generate` calls on a left-padded batch of a tiny model. Resident
memory (VmRSS) is read after the warm-up calls and at the end; the processor's per-call state (records, statistics,
the teacher's cache, the hook's record, the model's hooks) is checked to stay the same size.

    python benchmarks/soak.py --calls 1000            # table + benchmarks/results/soak.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig


BINS = list(range(88, 96))


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=0, eos_token_id=1, initializer_range=0.2)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def processor_for(name: str):
    """`name` = `<trigger>-<selection>`; returns `(model, processor, fused)`."""
    from s2t_hf import S2TLogitsProcessor, S2TSelector

    model, teacher = tiny(0), tiny(1)
    trigger, selection = name.split("-", 1)
    kwargs = dict(trigger=trigger, top_k=4, warmup_tokens=0, seed=0)
    if trigger == "random":
        kwargs["trigger_rate"] = 0.3
    if trigger in ("entropy", "kl"):
        kwargs["trigger_threshold"] = 0.5 if trigger == "kl" else 3.0
    fused = selection.endswith("fused")
    selection = selection.removesuffix("-fused")
    if selection.startswith("local"):
        if trigger == "learned":  # a random trigger row (as if fit), read from the model's output by a forward hook
            selector = S2TSelector.create(
                model, bin_token_ids=BINS[:-1], trigger_token_id=BINS[-1], preserve_cache=True
            )
            selector.write_reserved_row(BINS[-1], torch.randn(32, generator=torch.Generator().manual_seed(0)))
            selector.config.trigger_adapter_mode = "generate"
            kwargs["trigger_threshold"] = 0.0
        else:
            selector = S2TSelector.create(model, bin_token_ids=BINS, preserve_cache=True)
        mode = "scoring" if selection == "local-scoring" else "generate"
        scoring = "residual" if mode == "scoring" else "pure"
        processor = S2TLogitsProcessor(model, selector=selector, selection="local", adapter_mode=mode,
                                       scoring=scoring, **kwargs)
    else:
        processor = S2TLogitsProcessor(model, teacher=teacher, selection=selection, **kwargs)
    return model, processor, fused


CONFIGS = [
    "never-teacher", "always-teacher", "random-teacher", "entropy-teacher", "kl-teacher", "always-takeover",
    "entropy-local", "entropy-local-scoring", "entropy-local-fused", "learned-local-fused",
]


def state_size(processor, model) -> dict[str, int]:
    teacher = processor.teacher_interface
    return {
        "records": len(processor.trigger_records),
        "row_stats": sum(v.numel() for v in processor.call_stats.rows.values()),
        "teacher_cache_tokens": teacher.cached_tokens if teacher is not None else 0,
        "model_hooks": len(model._forward_pre_hooks) + len(model._forward_hooks),
        # signals held by a calibration recorder left in place of the trigger (none once `calibrate` returns)
        "signals": len(getattr(processor.trigger_policy, "signals", [])),
    }


def soak(name: str, calls: int, warmup: int = 20, max_new_tokens: int = 8) -> dict:
    import s2t_hf

    model, processor, fused = processor_for(name)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention_mask = (input_ids != 0).long()
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, pad_token_id=0,
                  max_new_tokens=max_new_tokens)
    sizes, triggers = [], 0
    start = time.perf_counter()
    rss_after_warmup = None
    with processor:
        for call in range(calls):
            if fused:
                s2t_hf.generate(model, processor, **kwargs)
            else:
                model.generate(**kwargs, logits_processor=[processor])
            triggers += processor.stats["triggers"]
            if call == warmup - 1:
                gc.collect()
                rss_after_warmup = rss_mib()
                objects_after_warmup = len(gc.get_objects())
            if call >= warmup:
                sizes.append(state_size(processor, model))
        gc.collect()
        rss_end = rss_mib()
        objects_end = len(gc.get_objects())
    hooks_after = len(model._forward_pre_hooks) + len(model._forward_hooks)
    return {
        "config": name,
        "calls": calls,
        "seconds": round(time.perf_counter() - start, 1),
        "triggers": triggers,
        "rss_after_warmup_mib": round(rss_after_warmup, 1),
        "rss_end_mib": round(rss_end, 1),
        "rss_growth_pct": round(100 * (rss_end - rss_after_warmup) / rss_after_warmup, 2),
        "gc_objects_growth": objects_end - objects_after_warmup,
        "state_max": {k: max(s[k] for s in sizes) for k in sizes[0]},
        "state_min": {k: min(s[k] for s in sizes) for k in sizes[0]},
        "model_hooks_after_with": hooks_after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--configs", nargs="*", default=CONFIGS)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "soak.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    header = f"{'config':24} {'calls':>6} {'s':>6} {'triggers':>8} {'RSS warm MiB':>12} {'RSS end MiB':>11} {'growth':>7} {'objects':>8}"
    sys.stdout.write(header + "\n")
    for name in args.configs:
        result = soak(name, args.calls)
        results.append(result)
        sys.stdout.write(
            f"{name:24} {result['calls']:>6} {result['seconds']:>6} {result['triggers']:>8} "
            f"{result['rss_after_warmup_mib']:>12} {result['rss_end_mib']:>11} {result['rss_growth_pct']:>6}% "
            f"{result['gc_objects_growth']:>8}\n"
        )
        sys.stdout.flush()
    with open(args.out, "w") as handle:
        json.dump({"torch_threads": 1, "results": results}, handle, indent=2)
    sys.stdout.write(f"wrote {args.out}\n")


if __name__ == "__main__":
    main()
