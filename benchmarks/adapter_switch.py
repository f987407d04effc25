"""The cost of switching a selector's LoRA on and off, against one decoding forward of a small model.

With `adapter_mode="scoring"` the student generates with LoRA off and the processor switches it on for every scoring
call and off again: two switches per triggered step. PEFT's public switch, `enable_adapters(enabled)` on every LoRA
layer (`AdapterState.set_lora`), also redoes the adapter's requires-grad bookkeeping (`set_adapter`). The processor
uses `AdapterState.lora(True)` instead, which flips only PEFT's flag (the one place s2t_hf writes a PEFT private; see
`s2t_hf.adapter_state`). This script measures why.

Methods, timed as one on + off round trip (a triggered step's worth):
- `set_lora`: `state.set_lora(True)` then `state.set_lora(False)` (PEFT's public path);
- `lora-flag`: entering and leaving `with state.lora(True):` (the flag only);
- `forward`: one decoding forward (one new token on a 64-token KV cache, batch 1) of the model with the adapter.

Model: a Llama config of hidden size 64, 2 layers, vocabulary 256, with a selector of LoRA on every projection
(`all-projections`) or on the last layer's cache-preserving projections (`preserve-cache`, what `adapter_mode="scoring"`
is used with). Runs alternate between methods (round-robin); the median of `--repeats` runs of `--iterations` each is
reported, on one CPU thread.

    python benchmarks/adapter_switch.py            # table + benchmarks/results/adapter_switch.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig


def build(preserve_cache: bool):
    from s2t_hf import S2TSelector

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    selector = S2TSelector.create(model, bin_token_ids=list(range(240, 256)), preserve_cache=preserve_cache)
    return selector


def methods_for(selector) -> dict:
    """name -> a callable doing one round trip; the selector's LoRA is off between calls, as under `"scoring"`."""
    state = selector.adapter_state
    state.set_lora(False)
    state.merge_rows(True)  # as inside an open processor
    model = selector.base_model
    from s2t_hf.kv import cache_argument

    prompt = torch.randint(3, 240, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = model(prompt, use_cache=True)
    cache = getattr(output, "cache", None) or output.past_key_values
    cache_kwargs = {cache_argument(model): cache}
    token = torch.tensor([[5]])
    positions = torch.tensor([[64]])

    def public():
        state.set_lora(True)
        state.set_lora(False)

    def flag():
        with state.lora(True):
            pass

    def forward():
        with torch.no_grad():
            model(token, position_ids=positions, use_cache=True, **cache_kwargs)
            cache.crop(-1)  # drop the new token: the cache stays at 64 tokens

    return {"set_lora": public, "lora-flag": flag, "forward": forward}


def time_once(function, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        function()
    return (time.perf_counter() - start) / iterations


def run(args) -> dict:
    import peft
    import transformers

    torch.set_num_threads(args.threads)
    variants = {}
    for name, preserve_cache in (("all-projections", False), ("preserve-cache", True)):
        selector = build(preserve_cache)
        methods = methods_for(selector)
        for function in methods.values():  # warm-up
            time_once(function, max(1, args.iterations // 10))
        timings = {method: [] for method in methods}
        for _ in range(args.repeats):  # round-robin: every method once per repeat
            for method, function in methods.items():
                timings[method].append(time_once(function, args.iterations))
        forward = statistics.median(timings["forward"])
        variants[name] = {
            "lora_layers": len(selector.adapter_state.lora_layers),
            "methods": {
                method: {
                    "median_us": statistics.median(values) * 1e6,
                    "runs_us": [value * 1e6 for value in values],
                    "ratio_to_forward": statistics.median(values) / forward,
                }
                for method, values in timings.items()
            },
        }
        selector.adapter_state.merge_rows(False)
        selector.adapter_state.set_lora(True)
    return {
        "settings": {"repeats": args.repeats, "iterations": args.iterations, "threads": args.threads},
        "environment": {
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        },  # fmt: skip
        "variants": variants,
    }


def table(result: dict) -> str:
    lines = [f"{'variant':<16} {'LoRA layers':>11} {'method':<10} {'median (us)':>12} {'x forward':>10}"]
    for name, variant in result["variants"].items():
        for method, numbers in variant["methods"].items():
            lines.append(
                f"{name:<16} {variant['lora_layers']:>11} {method:<10} {numbers['median_us']:>12.1f} "
                f"{numbers['ratio_to_forward']:>10.3f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--output", default=os.path.join(os.path.dirname(__file__), "results", "adapter_switch.json")
    )
    args = parser.parse_args()
    result = run(args)
    print(table(result))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
