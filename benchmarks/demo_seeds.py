"""Repeats `s2t-hf demo` over several seeds and reports the spread of every method's accuracy and time.

Each seed trains (or loads from the cache) its own teacher/student pair, so the first run costs about 30 minutes per
seed on 2 CPU cores. Besides every method's spread, it reports per seed the learned trigger's targets (held-out AUROC
against entropy and KL, S2T at half the rate against S2T with the entropy trigger, the best teacher-free S2T-Local row
against Greedy and Maj@N) and the accuracy-against-rate sweep.

    python benchmarks/demo_seeds.py --seeds 0 1 2
    python benchmarks/demo_seeds.py --seeds 0 1 2 --reuse   # keep the seeds whose results.json is already there
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
    parser.add_argument(
        "--reuse", action="store_true",
        help="load a seed's results.json from --output-dir instead of running it again, where there is one",
    )
    args = parser.parse_args()

    runs = {}
    for seed in args.seeds:
        output_dir = os.path.join(args.output_dir, f"seed{seed}")
        finished = os.path.join(output_dir, "results.json")
        if args.reuse and os.path.isfile(finished):
            with open(finished) as f:
                runs[seed] = json.load(f)
            continue
        config = DemoConfig(seed=seed, num_test=args.num_test, output_dir=output_dir)
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
    targets = {s: runs[s].get("targets", {}) for s in args.seeds}
    sweeps = {s: runs[s].get("rate_sweep", {}) for s in args.seeds}
    learned = {s: runs[s].get("learned_trigger", {}) for s in args.seeds}
    print(
        f"\n{'seed':<6}{'AUROC learned':>14}{'entropy':>9}{'kl':>7}{'S2T learned/2':>15}{'S2T entropy':>13}"
        f"{'best Local':>12}{'x greedy':>10}{'- best Maj':>12}"
    )
    for seed in args.seeds:
        t = targets[seed]
        auroc, half, local = t.get("auroc", {}), t.get("s2t_half_rate", {}), t.get("best_local", {})
        print(
            f"{seed:<6}{auroc.get('learned', float('nan')):>14.3f}{auroc.get('entropy', float('nan')):>9.3f}"
            f"{auroc.get('kl', float('nan')):>7.3f}{half.get('learned_half_rate', float('nan')):>15.1%}"
            f"{half.get('entropy_full_rate', float('nan')):>13.1%}{local.get('accuracy', float('nan')):>12.1%}"
            f"{local.get('x_greedy', float('nan')):>10.3f}{local.get('minus_best_maj', float('nan')):>+12.1%}"
        )
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(
            {"seeds": args.seeds, "summary": summary, "hit_at_k": hits, "timings": timings, "pairs": pairs,
             "targets": targets, "rate_sweep": sweeps, "learned_trigger": learned},
            f, indent=2,
        )


if __name__ == "__main__":
    main()
