"""Training throughput of the local selector: packed encoding vs K copies, and peak memory with / without LM-KL.

Each selection group is a context of `--context` tokens and K = `--k` candidates. *Packed* encodes every context once
with its K candidates appended under a 4-D attention mask (what `S2TTrainer` does); *K copies* re-encodes the context
once per candidate (what the authors' scripts do). A training step is the trainer's `compute_loss` + backward + an
AdamW step on the selector's LoRA and bin rows, on a Qwen2-shaped model (4 layers, hidden 256, vocab 2048) built from
a config. Every measurement runs in its own subprocess, so the peak memory of each run is its own: resident memory
(`ru_maxrss`) on the CPU, `torch.cuda.max_memory_allocated` on a GPU. Before the runs, a check computes the loss and
its gradients both ways on the same batch (float32, and bfloat16 under autocast) and reports how far they differ.

    python benchmarks/train_throughput.py [--context 512] [--k 16] [--batch 4] [--steps 6] [--threads 2]
    python benchmarks/train_throughput.py --device cuda --dtype bfloat16 --batch 16 --copies-batch 4

Prints a table and writes `benchmarks/results/train_throughput.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_throughput.json")


def build(args: argparse.Namespace, dtype, lm_kl: float, packing: bool):
    """The selector (on `args.device`, in `dtype`), a trainer around it, and a batch of `args.batch` random groups."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    from transformers.utils import logging

    from s2t_hf import S2TConfig, S2TSelector, S2TTrainer, S2TTrainingArguments, SelectionGroupCollator

    logging.set_verbosity_error()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    selector = S2TSelector.create(model, config=S2TConfig(selection="local", scoring="residual"))  # r 16, B 16
    selector.model.to(device=args.device, dtype=dtype)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = S2TTrainingArguments(
            output_dir=output_dir, report_to="none", use_cpu=args.device == "cpu", lm_kl_weight=lm_kl,
            packing=packing,
        )
        trainer = S2TTrainer(selector=selector, args=training_args)
    generator = torch.Generator().manual_seed(1)
    features = [
        {
            "context_ids": torch.randint(3, 2048, (args.context,), generator=generator).tolist(),
            "cand_ids": torch.randperm(2045, generator=generator)[: args.k].add(3).tolist(),
            "teacher_probs": torch.rand(args.k, generator=generator).tolist(),
            "student_probs": torch.rand(args.k, generator=generator).tolist(),
        }
        for _ in range(args.batch)
    ]
    batch = {k: v.to(args.device) for k, v in SelectionGroupCollator()(features).items()}
    return selector, trainer, batch


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    selector, trainer, batch = build(args, getattr(torch, args.dtype), args.lm_kl, args.mode == "packed")
    model = selector.model
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    cuda = args.device.startswith("cuda")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        memory_before = torch.cuda.memory_allocated() / 2**20
    times, first_loss = [], None
    for step in range(args.warmup + args.steps):
        _synchronize(args.device)
        start = time.perf_counter()
        loss = trainer.compute_loss(model, batch, num_items_in_batch=args.batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(args.device)
        first_loss = float(loss) if first_loss is None else first_loss
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    result = {
        "mode": args.mode,
        "lm_kl_weight": args.lm_kl,
        "batch_groups": args.batch,
        "step_seconds": step_time,
        "groups_per_second": args.batch / step_time,
        "first_loss": first_loss,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_training_mib": rss_before,
    }
    if cuda:
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["memory_before_training_mib"] = memory_before
    else:
        result["peak_memory_mib"] = result["peak_rss_mib"]
        result["memory_before_training_mib"] = rss_before
    return result


def equivalence(args: argparse.Namespace) -> dict:
    """Packed vs K copies on one batch of 2 groups: relative difference of the loss and of the gradients."""
    import torch

    args = argparse.Namespace(**{**vars(args), "batch": 2})
    results = {}
    for name, dtype, autocast in (("float32", torch.float32, False), ("bfloat16_autocast", torch.float32, True)):
        selector, trainer, batch = build(args, dtype, 0.1, True)
        model = selector.model.eval()  # no LoRA dropout: both encodings must see the same function
        with torch.no_grad():  # non-zero LoRA B and bin rows, so that every parameter gets a gradient
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn_like(parameter) * 0.02)
        outputs = {}
        for pack in (True, False):
            trainer._pack = pack
            model.zero_grad()
            with torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
                loss = trainer.compute_loss(model, batch)
            loss.backward()
            grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad])
            outputs[pack] = (float(loss), grads)
        (loss_p, grad_p), (loss_c, grad_c) = outputs[True], outputs[False]
        results[name] = {
            "loss_packed": loss_p,
            "loss_copies": loss_c,
            "loss_relative_difference": abs(loss_p - loss_c) / abs(loss_c),
            "gradient_relative_difference": float((grad_p - grad_c).norm() / grad_c.norm()),
        }
    return results


def run(args: argparse.Namespace, mode: str, lm_kl: float, batch: int) -> dict:
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", "--mode", mode, "--lm-kl", str(lm_kl),
        "--batch", str(batch), "--context", str(args.context), "--k", str(args.k), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--threads", str(args.threads),
    ]
    command += ["--device", args.device, "--dtype", args.dtype]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{process.stderr[-4000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4, help="groups per step (packed; K copies uses --copies-batch)")
    parser.add_argument("--copies-batch", type=int, default=1, help="groups per step on the K-copies path")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="`cpu` or `cuda`")
    parser.add_argument("--dtype", default="float32", help="model dtype: float32 or bfloat16")
    parser.add_argument("--output", default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="packed", choices=["packed", "copies"], help=argparse.SUPPRESS)
    parser.add_argument("--lm-kl", type=float, default=0.1, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(equivalence(args) if args.check else worker(args)))
        return

    check_command = [sys.executable, os.path.abspath(__file__), "--worker", "--check", "--device", args.device,
                     "--context", str(args.context), "--k", str(args.k), "--threads", str(args.threads)]
    process = subprocess.run(check_command, capture_output=True, text=True)
    if process.returncode != 0:
        raise RuntimeError(f"the equivalence check failed:\n{process.stderr[-4000:]}")
    check = json.loads(process.stdout.strip().splitlines()[-1])

    runs = {
        "packed": run(args, "packed", 0.1, args.batch),
        "packed_batch_1": run(args, "packed", 0.1, args.copies_batch),
        "copies": run(args, "copies", 0.1, args.copies_batch),
        "packed_no_lm_kl": run(args, "packed", 0.0, args.batch),
    }
    speedup = runs["packed"]["groups_per_second"] / runs["copies"]["groups_per_second"]
    speedup_same_batch = runs["packed_batch_1"]["groups_per_second"] / runs["copies"]["groups_per_second"]
    memory_ratio = runs["packed"]["peak_memory_mib"] / runs["packed_no_lm_kl"]["peak_memory_mib"]
    training_memory = {
        name: runs[name]["peak_memory_mib"] - runs[name]["memory_before_training_mib"]
        for name in ("packed", "packed_no_lm_kl")
    }
    import torch

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine()
    summary = {
        "setup": {
            "model": f"Qwen2, 4 layers, hidden 256, intermediate 1024, vocab 2048 (+16 bin rows), sdpa, {args.dtype}",
            "device": f"{args.device} ({device})",
            "selector": "LoRA r 16 on all projections + 16 bin rows, residual scoring",
            "context": args.context,
            "k": args.k,
            "threads": args.threads,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        },
        "equivalence": check,
        "runs": runs,
        "packed_speedup": speedup,
        "packed_speedup_same_batch": speedup_same_batch,
        "lm_kl_peak_memory_ratio": memory_ratio,
        "lm_kl_training_memory_mib": training_memory,
    }
    print(f"{summary['setup']['device']}, {args.dtype}, context {args.context}, K {args.k}, {args.threads} threads")
    for name, values in check.items():
        print(
            f"packed vs K copies, same batch ({name}): loss rel. diff {values['loss_relative_difference']:.1e}, "
            f"gradient rel. diff {values['gradient_relative_difference']:.1e}"
        )
    print(f"{'run':<17} {'groups/step':>11} {'s/step':>8} {'groups/s':>9} {'peak MiB':>9} {'train MiB':>10}")
    for name, result in runs.items():
        print(
            f"{name:<17} {result['batch_groups']:>11} {result['step_seconds']:>8.3f} "
            f"{result['groups_per_second']:>9.2f} {result['peak_memory_mib']:>9.0f} "
            f"{result['peak_memory_mib'] - result['memory_before_training_mib']:>10.0f}"
        )
    print(f"packed vs K copies: {speedup:.1f}x ({speedup_same_batch:.1f}x at the same batch of {args.copies_batch})")
    print(f"peak memory with LM-KL / without: {memory_ratio:.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
