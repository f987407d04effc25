"""A load test of the served student (not in CI; loopback only; bounded in count and time).

It exports the tiny Llama student with a trained-like selector exactly as `tests/test_served_student.py` does, serves
it with a real vLLM server (the engine venv: `bash scripts/engine_venv.sh`), and sends requests at a fixed rate for a
fixed time: most are S2T decodings through `ServedS2T` (one prompt each, the random trigger), and a fraction are raw
completion requests with bad S2T arguments (`tests/serving_fuzz.py`). It reports p50/p95/p99 latency, throughput,
errors, and the server's resident memory (every process of its group) at the start and at the end, as JSON and text.

Goal: zero failed valid requests, every bad request refused with a 4xx, no server restart, RSS growth at
most 5%. The memory is sampled every 10 s: the growth is reported from the start and from the end of the first third
(vLLM's CPU KV cache is allocated at start but its pages become resident as the load first fills it, which is not a
leak); the exit status checks the latter.

    .venv/bin/python scripts/served_load_test.py --rate 4 --seconds 180 --output /tmp/served_load

The numbers depend on the machine; say which one gave them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

logger = logging.getLogger("served_load_test")


def group_rss_bytes(pid: int) -> int:
    """The resident memory of every process in `pid`'s process group (the API server and vLLM's engine core)."""
    total = 0
    group = os.getpgid(pid)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != group:
                continue
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except (OSError, ProcessLookupError):
            continue
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _growth_after(timeline: list[tuple[float, float]], start: float, end_mib: float) -> float:
    """The relative memory growth from the first sample at or after `start` seconds to the end."""
    later = [mib for t, mib in timeline if t >= start]
    return end_mib / later[0] - 1 if later else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=180.0, help="how long requests are sent")
    parser.add_argument("--bad_fraction", type=float, default=0.1, help="fraction of bad requests")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--output", default="/tmp/served_load", help="path prefix of the .json and .txt results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch
    from serving_fuzz import bad_cases
    from test_remote_teacher import Server, engine_python, save_teacher
    from test_served_fuzz import post
    from test_served_student import trained_like_selector
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from s2t_hf.serving import ServedS2T, export_for_vllm

    directory = Path(tempfile.mkdtemp(prefix="s2t_load_"))
    save_teacher(directory / "student")
    tokenizer = AutoTokenizer.from_pretrained(directory / "student")
    config = AutoModelForCausalLM.from_pretrained(directory / "student").config
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(config).eval()
    export = export_for_vllm(directory / "export", selector=trained_like_selector(student, tokenizer),
                             tokenizer=tokenizer)
    server = Server(engine_python(), Path(export.model_dir), directory / "server.log",
                    extra_args=export.serve_args(), extra_env={"PYTHONPATH": str(REPO / "src")})
    try:
        s2t = ServedS2T.from_export(directory / "export", server.url, timeout=60, config_overrides={
            "trigger": "random", "trigger_rate": 0.2, "seed": None, "warmup_tokens": 2, "top_k": 4,
            "selection": "local", "adapter_mode": "scoring"})
        s2t.generate([[5, 6, 7]], max_new_tokens=4)  # checked and warm
        model = s2t.model
        bad = bad_cases(config.vocab_size)
        rng = random.Random(0)
        rss_start = group_rss_bytes(server.process.pid)
        results: list[dict] = []
        lock = threading.Lock()

        def valid(prompt: list[int]) -> dict:
            start = time.monotonic()
            try:
                completion = s2t.generate([prompt], max_new_tokens=args.max_new_tokens)[0]
                ok, detail = len(completion.token_ids) > 0, (len(completion.token_ids), completion.triggers)
            except Exception as error:  # noqa: BLE001 - a failed valid request is what this test counts
                ok, detail = False, f"{type(error).__name__}: {error}"
            return {"kind": "valid", "ok": ok, "seconds": time.monotonic() - start, "detail": detail}

        def invalid(xargs: dict) -> dict:
            start = time.monotonic()
            body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0, "vllm_xargs": xargs}
            status, _ = post(server.url, body)
            return {"kind": "bad", "ok": 400 <= status < 500, "seconds": time.monotonic() - start, "detail": status}

        def run(job):
            result = job[0](job[1])
            with lock:
                results.append(result)

        count = int(args.rate * args.seconds)
        jobs = []
        for _ in range(count):
            if rng.random() < args.bad_fraction:
                jobs.append((invalid, rng.choice(bad)[0]))
            else:
                jobs.append((valid, [rng.randrange(3, 90) for _ in range(rng.randint(3, 12))]))
        timeline: list[tuple[float, float]] = []  # (seconds since the start, MiB): the server's memory over time
        done = threading.Event()

        def sample_rss():
            while not done.wait(10.0):
                timeline.append((time.monotonic() - begin, group_rss_bytes(server.process.pid) / 2**20))

        begin = time.monotonic()
        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        with ThreadPoolExecutor(max_workers=64) as pool:
            for n, job in enumerate(jobs):  # open loop: a fixed arrival rate, whatever the latency
                delay = begin + n / args.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(run, job)
        elapsed = time.monotonic() - begin
        done.set()
        rss_end = group_rss_bytes(server.process.pid)
        alive = server.process.poll() is None
    finally:
        server.stop()

    valid_results = [r for r in results if r["kind"] == "valid"]
    latencies = [r["seconds"] for r in valid_results if r["ok"]]
    report = {
        "rate_per_second": args.rate, "seconds": args.seconds, "requests": len(results),
        "valid": len(valid_results), "valid_failed": sum(not r["ok"] for r in valid_results),
        "bad": len(results) - len(valid_results), "bad_not_refused": sum(not r["ok"] for r in results
                                                                         if r["kind"] == "bad"),
        "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
        "latency_p99_s": percentile(latencies, 99),
        "latency_mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "throughput_per_second": len(results) / elapsed, "wall_seconds": elapsed,
        "generated_tokens": sum(r["detail"][0] for r in valid_results if r["ok"]),
        "triggers": sum(r["detail"][1] for r in valid_results if r["ok"]),
        "server_alive": alive, "rss_start_mib": rss_start / 2**20, "rss_end_mib": rss_end / 2**20,
        "rss_growth": rss_end / rss_start - 1 if rss_start else float("nan"),
        # after the first third (the KV cache's pages and the allocator's pools are touched as the load starts): a
        # leak keeps growing, a warm-up does not
        "rss_growth_after_first_third": _growth_after(timeline, args.seconds / 3, rss_end / 2**20),
        "rss_timeline_mib": [(round(t), round(m)) for t, m in timeline],
        "failures": [r["detail"] for r in results if not r["ok"]][:10],
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.output}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}" for key, value in report.items()]
    Path(f"{args.output}.txt").write_text("\n".join(lines) + "\n")
    logger.info("\n".join(lines))
    goal = (report["valid_failed"] == 0 and report["bad_not_refused"] == 0 and alive
            and report["rss_growth_after_first_third"] <= 0.05)
    sys.exit(0 if goal else 1)


if __name__ == "__main__":
    main()
