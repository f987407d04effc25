"""Training speed of `S2TTrainer` with the groups of one prompt sharing one encoding of their context
(`S2TTrainingArguments(group_by_prompt=True)`), against one context row per group, on real selection groups of the
Qwen2.5-Coder 0.5B student (collected by `benchmarks/qwen_pair.py`).

Both ways run the same groups in the same order, in one process, alternating, each step a forward and backward of the
selection loss (no optimiser step, so both see the same weights); the loss must agree. Reported: seconds per group of
each, and their ratio.

    python scripts/install_qwen_pair.py
    python benchmarks/qwen_pair.py --quick --stages collect      # or the cpu size's collection
    python benchmarks/shared_contexts.py --collection ~/.cache/s2t_hf/qwen_pair/quick_collect_reference_kl_train

Writes `benchmarks/results/shared_contexts.json` and prints a table.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_gguf_model, qwen_pair_file, versions, write_json  # noqa: E402


logger = logging.getLogger("shared_contexts")
HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collection", required=True, help="a folder written by collect_selection_data(save_to=)")
    parser.add_argument("--groups", type=int, default=48, help="groups to time (from the start of the collection)")
    parser.add_argument("--batch", type=int, default=16, help="groups per step")
    parser.add_argument("--form", choices=("cache", "paper"), default="cache")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "shared_contexts.json"))
    args = parser.parse_args(argv)

    import datasets

    from s2t_hf import S2TConfig, S2TSelector, S2TTrainer, S2TTrainingArguments, SelectionGroupCollator

    groups = datasets.load_from_disk(args.collection)  # a complete collection is a saved dataset
    groups = groups.select(range(min(args.groups, len(groups))))
    converted = os.path.join(os.path.expanduser("~"), ".cache", "s2t_hf", "qwen_pair", "student-dequantised")
    tokenizer, student, _ = load_gguf_model(qwen_pair_file("student"), converted_dir=converted)
    preserve = args.form == "cache"
    config = S2TConfig(selection="local", scoring="residual", residual_tau=0.1, top_k=8,
                       adapter_mode="scoring" if preserve else "generate")
    selector = S2TSelector.create(student, tokenizer, num_bins=16, lora_r=16, lora_alpha=32, preserve_cache=preserve,
                                  config=config)
    training_args = S2TTrainingArguments(output_dir=os.path.join("/tmp", "shared_contexts"), report_to="none",
                                         use_cpu=True, lm_kl_weight=0.0 if preserve else 0.1)
    trainer = S2TTrainer(selector=selector, args=training_args)
    features = [groups[i] for i in range(len(groups))]  # collection order: a prompt's groups together
    batches = [features[i: i + args.batch] for i in range(0, len(features), args.batch)]
    collators = {"one row per group": SelectionGroupCollator(pad_token_id=tokenizer.pad_token_id),
                 "shared contexts": SelectionGroupCollator(pad_token_id=tokenizer.pad_token_id, share_contexts=True)}
    seconds = {name: [] for name in collators}
    losses = {name: [] for name in collators}
    rows = {name: 0 for name in collators}
    for repeat in range(args.repeats):
        for batch in batches:
            for name in (list(collators) if repeat % 2 == 0 else list(reversed(collators))):
                inputs = collators[name](batch)
                rows[name] += inputs["input_ids"].shape[0] if repeat == 0 else 0
                selector.model.zero_grad()
                start = time.perf_counter()
                loss = trainer.compute_loss(selector.model, inputs)
                loss.backward()
                seconds[name].append(time.perf_counter() - start)
                if repeat == 0:
                    losses[name].append(loss.item())
    difference = max(abs(a - b) for a, b in zip(*losses.values()))
    per_group = {name: sum(values) / args.repeats / len(features) for name, values in seconds.items()}
    ratio = per_group["one row per group"] / per_group["shared contexts"]
    results = {
        "collection": os.path.basename(os.path.normpath(args.collection)), "groups": len(features),
        "prompts": len(set(groups["prompt_index"])), "batch": args.batch, "form": args.form,
        "repeats": args.repeats, "context_rows": rows, "seconds_per_group": per_group,
        "median_step_seconds": {name: statistics.median(values) for name, values in seconds.items()},
        "speedup": ratio, "largest_loss_difference": difference, "threads": torch.get_num_threads(),
        "versions": versions(),
    }
    write_json(args.out, results)
    logger.info("wrote %s", args.out)
    print(f"{'':22}{'s/group':>9}{'rows':>7}")
    for name in collators:
        print(f"{name:22}{per_group[name]:9.3f}{rows[name]:7d}")
    print(f"speedup {ratio:.2f}x on {len(features)} groups of {results['prompts']} prompts, batch {args.batch}, "
          f"{args.form} form; largest loss difference {difference:.2e}")


if __name__ == "__main__":
    main()
