"""GPU check of S2T decoding: bf16 correctness and decode-time ratios on a Qwen2.5-1.5B-shaped model.

Random weights (no download), one CUDA device. For batch 1 and 32 and trigger rates 1% and 10% (the `random` trigger
at that rate: with random weights an entropy threshold means nothing), it times per generated token, as a ratio to
plain greedy `generate` in the same process with alternating runs:

- `never`: the processor attached, never triggering;
- `processor`: S2T-Local through `model.generate(..., logits_processor=[s2t])` (scoring forward of the triggered rows);
- `fused`: S2T-Local through `s2t_hf.generate` (candidates scored in the decoding forward).

S2T-Local uses a residual selector with `adapter_mode="generate"` (LoRA on every projection, active while the student
generates, the only mode the loop fuses); greedy is timed on the same adapted model.

Correctness, in bf16 and fp32: trigger `never` equals greedy, and the fused tokens equal the processor's.

    bash benchmarks/gpu_check.sh            # on the GPU machine, under 8 minutes
    python benchmarks/gpu_check.py --tiny   # a CPU smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import s2t_hf  # noqa: E402
from s2t_hf import S2TLogitsProcessor, S2TSelector  # noqa: E402


def build(tiny: bool, dtype: torch.dtype, device: str):
    torch.manual_seed(0)
    if tiny:
        shape = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    else:  # Qwen2.5-1.5B-Instruct
        shape = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                     num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
    config = Qwen2Config(**shape, max_position_embeddings=4096, pad_token_id=0, eos_token_id=None,
                         initializer_range=0.02)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval()


def randomise(selector, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in selector.model.named_parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator) * (0.05 if "lora" in name else 2.0)
                parameter.copy_(noise.to(parameter.dtype))


def local_selector(model):
    vocab = model.get_output_embeddings().weight.shape[0]
    selector = S2TSelector.create(model, bin_token_ids=list(range(vocab - 16, vocab)), use_lora=True)
    randomise(selector)
    return selector


def processors(model, selector, rate, top_k=8):
    """The timed methods; greedy is timed on the same adapted model (the adapter generates, `adapter_mode="generate"`)."""
    common = dict(trigger="random", trigger_rate=rate, seed=0, top_k=top_k, warmup_tokens=0)
    local = S2TLogitsProcessor(model, selector=selector, selection="local", scoring="residual", **common)
    return [("never", S2TLogitsProcessor(model, trigger="never")), ("processor", local), ("fused", local)]


def inputs(batch, prompt_length, vocab, device):
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab - 32, (batch, prompt_length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(1, batch, 2):  # left padding on every other row
        mask[row, : prompt_length // 4] = 0
        ids[row, : prompt_length // 4] = 0
    return ids.to(device), mask.to(device)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def correctness(args, device) -> dict:
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build(args.tiny, dtype, device)
        vocab = model.config.vocab_size
        ids, mask = inputs(4, 32, vocab, device)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
        greedy = model.generate(**kw)
        with S2TLogitsProcessor(model, trigger="never") as never:
            never_out = model.generate(**kw, logits_processor=[never])
        selector = local_selector(model)
        with S2TLogitsProcessor(model, selector=selector, selection="local", scoring="residual", trigger="random",
                                trigger_rate=0.3, seed=0, top_k=8) as s2t:
            plain = model.generate(**kw, logits_processor=[s2t])
            fused = s2t_hf.generate(model, s2t, **kw)
            flips = s2t.stats["flips"]
        name = str(dtype).replace("torch.", "")
        results[name] = {
            "never_equals_greedy": bool(torch.equal(greedy, never_out)),
            "fused_equals_processor": bool(torch.equal(plain, fused)),
            "fused_vs_processor_token_agreement": float((plain == fused).float().mean()),
            "flips": flips,
        }
        del model, selector
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def speed(args, device) -> list[dict]:
    rows = []
    model = build(args.tiny, torch.bfloat16 if device.startswith("cuda") else torch.float32, device)
    vocab = model.config.vocab_size
    selector = local_selector(model)
    for batch in args.batch_sizes:
        ids, mask = inputs(batch, args.prompt_length, vocab, device)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  do_sample=False, pad_token_id=0)
        for rate in args.rates:
            methods = processors(model, selector, rate)
            runs = {"greedy": []} | {name: [] for name, _ in methods}
            stats = {}
            model.generate(**kw)  # warm-up
            for _ in range(args.repeats):
                _, seconds = timed(lambda: model.generate(**kw), device)
                runs["greedy"].append(seconds)
                for name, processor in methods:
                    with processor:
                        if name == "fused":
                            _, seconds = timed(lambda: s2t_hf.generate(model, processor, **kw), device)
                        else:
                            _, seconds = timed(lambda: model.generate(**kw, logits_processor=[processor]), device)
                        stats[name] = processor.stats
                    runs[name].append(seconds)
            base = statistics.median(runs["greedy"])
            for name, seconds in runs.items():
                rows.append({
                    "batch": batch, "target_rate": rate, "method": name,
                    "ratio": statistics.median(seconds) / base,
                    "ms_per_token": 1000 * statistics.median(seconds) / args.new_tokens,
                    "trigger_rate": stats.get(name, {}).get("trigger_rate", 0.0),
                    "local_path": stats.get(name, {}).get("local_path"),
                })
                print(f"batch {batch:3d}  rate {rate:.0%}  {name:10s}  {rows[-1]['ratio']:.3f}x  "
                      f"{rows[-1]['ms_per_token']:.2f} ms/token  measured rate {rows[-1]['trigger_rate']:.1%}",
                      flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (smoke run)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.01, 0.10])
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "args": vars(args)}
    report["correctness"] = correctness(args, device)
    print(json.dumps(report["correctness"], indent=2), flush=True)
    report["speed"] = speed(args, device)
    with open(args.output, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
