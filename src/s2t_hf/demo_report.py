"""What `s2t-hf demo` reports from its results: the table's row order, the learned trigger's targets, the Markdown
table and the PNG plots. [`~s2t_hf.demo.run_demo`] produces the results these read.
"""

from __future__ import annotations

import os
from typing import Any

from transformers.utils import logging


__all__ = ["format_table", "learned_trigger_targets", "ordered_rows", "write_plots"]

logger = logging.get_logger(__name__)


_ROW_GROUPS = ("Greedy", "Teacher greedy", "Maj@", "S2T (", "Takeover (", "S2T-Local ")


def ordered_rows(methods: dict[str, Any]) -> dict[str, Any]:
    """The table's rows grouped by method (the learned-trigger rows next to the entropy and KL ones), else in the
    order they were decoded."""

    def group(name: str) -> int:
        for index, prefix in reversed(list(enumerate(_ROW_GROUPS))):
            if name == prefix or (prefix.endswith(("(", "@", " ")) and name.startswith(prefix)):
                return index
        return len(_ROW_GROUPS)

    def form(name: str) -> str:
        # S2T-Local rows and their adapter's greedy row: by form
        for part in ("pure", "residual"):
            if f" {part} " in f" {name} ":
                return part
        return ""

    order = {name: i for i, name in enumerate(methods)}
    names = sorted(methods, key=lambda n: (group(n) if not n.startswith("Greedy with") else group("S2T-Local "),
                                           form(n), order[n]))
    return {name: methods[name] for name in names}


def learned_trigger_targets(results: dict[str, Any]) -> dict[str, Any]:
    """
    The learned trigger's targets (docs/benchmarks.md), measured on one demo run: its held-out AUROC against the
    entropy's (margin >= 0.05), S2T at half the rate with it against S2T with the entropy trigger at the full rate
    (>= -1 point), and the best teacher-free S2T-Local row against Greedy (>= 1.30x) and the best Maj@N.
    """
    methods = results["methods"]
    greedy = methods["Greedy"]["accuracy"]
    # teacher-free rows only (the `kl` trigger asks the teacher at every step)
    local = {n: r["accuracy"] for n, r in methods.items() if n.startswith("S2T-Local ") and "(kl" not in n}
    majority = [r["accuracy"] for n, r in methods.items() if n.startswith("Maj@")]
    out: dict[str, Any] = {}
    if local:
        best = max(local, key=local.get)
        out["best_local"] = {
            "row": best, "accuracy": local[best], "x_greedy": local[best] / greedy if greedy else float("nan"),
            "minus_best_maj": local[best] - max(majority) if majority else float("nan"),
        }
        out["best_local"]["met"] = out["best_local"]["x_greedy"] >= 1.30 and out["best_local"]["minus_best_maj"] > 0
    reports = results.get("learned_trigger") or {}
    if reports:
        auroc = next(iter(reports.values()))["auroc"]
        out["auroc"] = {**auroc, "margin_over_entropy": auroc["learned"] - auroc["entropy"]}
        out["auroc"]["met"] = out["auroc"]["margin_over_entropy"] >= 0.05
    if "S2T (learned, half rate)" in methods and "S2T (entropy)" in methods:
        half, full = methods["S2T (learned, half rate)"], methods["S2T (entropy)"]
        out["s2t_half_rate"] = {
            "learned_half_rate": half["accuracy"], "entropy_full_rate": full["accuracy"],
            "difference": half["accuracy"] - full["accuracy"],
            "teacher_calls": {"learned_half_rate": half["teacher_calls"], "entropy_full_rate": full["teacher_calls"]},
        }
        out["s2t_half_rate"]["met"] = out["s2t_half_rate"]["difference"] >= -0.01
    return out


def format_table(results: dict[str, Any]) -> str:
    """
    The results as a Markdown table, like the paper's. Batched time: the whole test split at `batch_size` problems per
    `generate` call. Per-request time: `num_latency` problems one at a time; its ratio is to the student's greedy
    decoding of the same problems timed just before each method (paired, as the machine's speed drifts), in total and
    per generated token (methods write solutions of different lengths).
    """
    methods = results["methods"]
    greedy = methods["Greedy"]
    lines = [
        "| method | accuracy | vs greedy | batched time (s) | x greedy | per-request time (s) | x greedy, paired | "
        "per token, x greedy | trigger rate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in methods.items():
        gain = row["accuracy"] / greedy["accuracy"] - 1 if greedy["accuracy"] else float("nan")
        rate = f"{row['trigger_rate']:.3f}" if "trigger_rate" in row else "–"
        if "latency_seconds" in row and "latency_seconds" in greedy:
            ratio = row.get("latency_ratio", row["latency_seconds"] / greedy["latency_seconds"])
            per_token = f"{row['latency_per_token_ratio']:.2f}" if "latency_per_token_ratio" in row else "–"
            request = f"{row['latency_seconds']:.1f} | {ratio:.2f} | {per_token}"
        else:
            request = "– | – | –"
        lines.append(
            f"| {name} | {row['accuracy']:.1%} | {gain:+.1%} | {row['seconds']:.1f} | "
            f"{row['seconds'] / greedy['seconds']:.2f} | {request} | {rate} |"
        )
    return "\n".join(lines)


def write_plots(results: dict[str, Any], output_dir: str) -> list[str]:
    """hit@K curve, accuracy/time per method and accuracy against trigger rate as PNG files; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots. `pip install s2t-hf[plots]`.")
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, values in results["hit_at_k"].items():
        ks = sorted(int(k.split("@")[1]) for k in values if k.startswith("hit@"))
        ax.plot(ks, [values[f"hit@{k}"] for k in ks], marker="o", label=f"{kind} trigger")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (student's top-K)")
    ax.set_ylabel("teacher's top-1 in top-K")
    ax.set_title("Local sufficiency at trigger steps")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(output_dir, "hit_at_k.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    methods = results["methods"]
    names = list(methods)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.5), sharey=True)
    left.barh(names, [methods[n]["accuracy"] for n in names], color="tab:blue")
    left.set_xlabel("test accuracy")
    left.invert_yaxis()
    greedy = methods["Greedy"]
    key = "latency_seconds" if "latency_seconds" in greedy else "seconds"
    ratios = [
        methods[n].get("latency_ratio", methods[n][key] / greedy[key]) if key in methods[n] else float("nan")
        for n in names
    ]
    right.barh(names, ratios, color="tab:orange")
    right.axvline(1.0, color="gray", lw=0.8)
    right.set_xlabel("decode time, x greedy" + (" (one request at a time)" if key == "latency_seconds" else ""))
    fig.tight_layout()
    paths.append(os.path.join(output_dir, "methods.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    sweep = results.get("rate_sweep")
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, by_trigger in sweep.items():
            for kind, points in by_trigger.items():
                ax.plot(
                    [p["trigger_rate"] for p in points], [p["accuracy"] for p in points], marker="o",
                    linestyle="-" if kind == "learned" else "--", label=f"{method}, {kind} trigger",
                )
        ax.axhline(greedy["accuracy"], color="gray", lw=0.8, label="Greedy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("trigger rate (measured on the test split)")
        ax.set_ylabel("test accuracy")
        ax.set_title("Accuracy against trigger rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(output_dir, "trigger_rates.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
