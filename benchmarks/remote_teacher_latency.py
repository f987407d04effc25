"""Per-trigger latency of the remote teacher (a vLLM server) against the same teacher in transformers.

Start a server first, e.g. the small teacher the engine tests build (random weights, word-level tokenizer):

    VLLM_CPU_KVCACHE_SPACE=1 .venv-engine/bin/python -m vllm.entrypoints.openai.api_server --model DIR \\
        --host 127.0.0.1 --port 8765 --dtype float32 --max-model-len 1024 --enforce-eager
    python benchmarks/remote_teacher_latency.py --url http://127.0.0.1:8765 --model-dir DIR

For each batch size it times `generate` with `trigger="always"` (every step is a trigger step) with the remote and
the local teacher, and with `trigger="never"`; the difference to `never`, divided by the trigger steps, is the cost of
one trigger step (all rows of the step together). Results go to `benchmarks/results/remote_teacher_latency.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from s2t_hf import S2TLogitsProcessor
from s2t_hf.teachers import RemoteTeacher


def timed(student, teacher, input_ids, attention_mask, tokenizer, new_tokens, repeats, **kwargs):
    best, stats = float("inf"), None
    for _ in range(repeats):
        with S2TLogitsProcessor(student, teacher=teacher, tokenizer=tokenizer, warmup_tokens=0, **kwargs) as s2t:
            start = time.perf_counter()
            student.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t],
                             do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
            best = min(best, time.perf_counter() - start)
            stats = s2t.stats
    return best, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results",
                                                         "remote_teacher_latency.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    teacher = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(teacher.config).eval()
    remote = RemoteTeacher(args.url, tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        input_ids = torch.randint(5, len(tokenizer), (batch_size, args.prompt_length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        common = (student, None, input_ids, attention_mask, tokenizer, args.new_tokens, args.repeats)
        never, _ = timed(*common, trigger="never")
        for name, t in (("local", teacher), ("remote", remote)):
            for selection in ("teacher", "takeover"):
                seconds, stats = timed(student, t, *common[2:], trigger="always", selection=selection, top_k=8)
                steps = stats["teacher_calls"]
                rows.append({
                    "batch_size": batch_size, "teacher": name, "selection": selection, "trigger_steps": steps,
                    "generate_s": round(seconds, 4), "never_s": round(never, 4),
                    "per_trigger_step_ms": round(1000 * (seconds - never) / steps, 2),
                })
                print(json.dumps(rows[-1]))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"prompt_length": args.prompt_length, "new_tokens": args.new_tokens, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
