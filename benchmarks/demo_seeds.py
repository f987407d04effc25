"""Repeats `s2t-hf demo` over several seeds and reports the spread of every method's accuracy and time.

Each seed trains (or loads from the cache) its own teacher/student pair, so the first run costs about 30 minutes per
seed on 2 CPU cores.

    python benchmarks/demo_seeds.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from s2t_hf.demo import DemoConfig, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-test", type=int, default=500)
    parser.add_argument("--output-dir", default="runs/demo_seeds")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "demo_seeds.json"))
    args = parser.parse_args()

    runs = {}
    for seed in args.seeds:
        config = DemoConfig(seed=seed, num_test=args.num_test, output_dir=os.path.join(args.output_dir, f"seed{seed}"))
        runs[seed] = run_demo(config)

    def ratio(seed: int, name: str, key: str) -> float:
        methods = runs[seed]["methods"]
        return methods[name][key] / methods["Greedy"][key]

    methods = list(runs[args.seeds[0]]["methods"])
    summary = {}
    print(
        f"{'method':<40}{'accuracy mean':>14}{'min':>8}{'max':>8}{'x greedy acc':>14}{'batched time':>14}"
        f"{'per request':>13}"
    )
    for name in methods:
        accuracies = [runs[s]["methods"][name]["accuracy"] for s in args.seeds]
        summary[name] = {
            "accuracy": accuracies,
            "accuracy_mean": statistics.mean(accuracies),
            "accuracy_min": min(accuracies),
            "accuracy_max": max(accuracies),
            "accuracy_stdev": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "accuracy_ratio_mean": statistics.mean(ratio(s, name, "accuracy") for s in args.seeds),
            "time_ratio_mean": statistics.mean(ratio(s, name, "seconds") for s in args.seeds),
        }
        if all("latency_seconds" in runs[s]["methods"][name] for s in args.seeds):
            summary[name]["latency_ratio_mean"] = statistics.mean(
                runs[s]["methods"][name].get("latency_ratio", ratio(s, name, "latency_seconds")) for s in args.seeds
            )
        row = summary[name]
        latency = f"{row['latency_ratio_mean']:.2f}" if "latency_ratio_mean" in row else "-"
        print(
            f"{name:<40}{row['accuracy_mean']:>14.1%}{row['accuracy_min']:>8.1%}{row['accuracy_max']:>8.1%}"
            f"{row['accuracy_ratio_mean']:>14.3f}{row['time_ratio_mean']:>14.2f}{latency:>13}"
        )
    hits = {s: runs[s]["hit_at_k"] for s in args.seeds}
    pairs = {
        s: {
            role: {k: v for k, v in runs[s]["pair"][role].items() if not isinstance(v, (list, dict))}
            for role in ("teacher", "student")
        }
        for s in args.seeds
    }
    timings = {s: runs[s]["timings"] for s in args.seeds}
    for seed in args.seeds:
        entropy = hits[seed]["entropy"]
        print(
            f"seed {seed}: hit@8 (entropy) {entropy['hit@8']:.1%}, demo wall time {timings[seed]['total_s'] / 60:.1f} min "
            f"(pair {timings[seed]['pair_s'] / 60:.1f} min)"
        )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(
            {"seeds": args.seeds, "summary": summary, "hit_at_k": hits, "timings": timings, "pairs": pairs}, f, indent=2
        )


if __name__ == "__main__":
    main()
