"""Side by side: two runs of `benchmarks/decode_smollm2.py` (e.g. before and after a refactor), per method.

Each run reports every method as a per-token time ratio to plain greedy `generate` measured in the same process
(alternating rounds). Runs made at different times see different machine load, so compare the ratios, never the
seconds, and read them against the noise floor: `greedy-b`, a second greedy run timed like any method, whose ratio
would be exactly 1.0 on a quiet machine. The calibrated thresholds must agree exactly when the processor's behaviour
is unchanged (same triggers on the same prompts).

    python benchmarks/compare_decode_runs.py BEFORE.json AFTER.json --labels before after \
        --output benchmarks/results/decode_smollm2_refactor.json
"""

from __future__ import annotations

import argparse
import json
import os


def _row(entry: dict) -> dict:
    return {
        "ratio_median": entry["ratio_median"],
        "ratio_min": entry["ratio_min"],
        "ratio_max": entry["ratio_max"],
        "cpu_ratio_median": entry.get("cpu_ratio_median"),
        "per_token_ms": entry["per_token_ms"],
    }


def compare(runs: list[dict], labels: list[str]) -> dict:
    methods = [name for name in runs[0]["speed"] if all(name in run["speed"] for run in runs)]
    return {
        "labels": labels,
        "commits": {label: run["versions"].get("git_commit") for label, run in zip(labels, runs)},
        "dates": {label: run["date"] for label, run in zip(labels, runs)},
        "load_average": {label: run["loadavg"].get("rounds") for label, run in zip(labels, runs)},
        "settings": {k: v for k, v in runs[0]["settings"].items() if k != "calibration_prompts"},
        "thresholds": {label: run["thresholds"] for label, run in zip(labels, runs)},
        "thresholds_equal": all(run["thresholds"] == runs[0]["thresholds"] for run in runs),
        "methods": {name: {label: _row(run["speed"][name]) for label, run in zip(labels, runs)} for name in methods},
    }


def format_table(result: dict) -> str:
    labels = result["labels"]
    header = "| method | " + " | ".join(f"{label} ratio (min-max) | {label} CPU ratio" for label in labels) + " |"
    lines = [header, "|---" * (1 + 2 * len(labels)) + "|"]
    for name, rows in result["methods"].items():
        cells = []
        for label in labels:
            row = rows[label]
            cpu = row["cpu_ratio_median"]
            cells.append(f"{row['ratio_median']:.3f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})")
            cells.append(f"{cpu:.3f}" if cpu is not None else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"calibrated thresholds equal across runs: {result['thresholds_equal']}")
    for label in labels:
        lines.append(f"{label}: commit {result['commits'][label]}, {result['dates'][label]}, "
                     f"load average per round {result['load_average'][label]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="JSON files written by benchmarks/decode_smollm2.py")
    parser.add_argument("--labels", nargs="+", help="one label per run (defaults to the file names)")
    parser.add_argument("--output", help="write the comparison here (JSON) and the table next to it (.txt)")
    args = parser.parse_args()
    labels = args.labels or [os.path.splitext(os.path.basename(path))[0] for path in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"give one label per run: {len(args.runs)} runs, {len(labels)} labels")
    runs = []
    for path in args.runs:
        with open(path) as handle:
            runs.append(json.load(handle))
    result = compare(runs, labels)
    table = format_table(result)
    print(table)
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=1)
        with open(os.path.splitext(args.output)[0] + ".txt", "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
