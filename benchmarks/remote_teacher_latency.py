"""Per-trigger latency of the remote teacher (a vLLM server) against the same teacher in transformers.

Start a server first, e.g. the small teacher the engine tests build (random weights, word-level tokenizer):

    VLLM_CPU_KVCACHE_SPACE=1 .venv-engine/bin/python -m vllm.entrypoints.openai.api_server --model DIR \\
        --host 127.0.0.1 --port 8765 --dtype float32 --max-model-len 1024 --enforce-eager
    python benchmarks/remote_teacher_latency.py --url http://127.0.0.1:8765 --model-dir DIR

For each batch size it decodes with `trigger="always"` (every step is a trigger step, every row triggered) and times
the teacher's answers inside `generate`: the time per trigger step covers all rows of the step (for the remote
teacher: the concurrent HTTP requests and the server's work; for the local one: the catch-up forward). Best of
`--repeats`. Results go to `benchmarks/results/remote_teacher_latency.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from s2t_hf import S2TLogitsProcessor
from s2t_hf.teachers import LocalTeacher, RemoteTeacher


def timed_teacher(teacher):
    """Wraps the teacher's `select` / `takeover` so the seconds spent in them add up in `teacher.seconds`."""
    teacher.seconds = 0.0
    for name in ("select", "takeover"):
        method = getattr(teacher, name)

        def wrapper(*args, _method=method, **kwargs):
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                teacher.seconds += time.perf_counter() - start

        setattr(teacher, name, wrapper)
    return teacher


def timed(student, teacher, input_ids, attention_mask, tokenizer, new_tokens, repeats, **kwargs):
    best = None
    for _ in range(repeats):
        with S2TLogitsProcessor(student, teacher=teacher, tokenizer=tokenizer, warmup_tokens=0, **kwargs) as s2t:
            teacher.seconds = 0.0
            student.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t],
                             do_sample=False, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
            per_step = teacher.seconds / max(1, s2t.stats["teacher_calls"])
            if best is None or per_step < best[0]:
                best = (per_step, s2t.stats)
    return best


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
    remote = timed_teacher(RemoteTeacher(args.url, tokenizer=tokenizer))
    local = timed_teacher(LocalTeacher(teacher))
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        input_ids = torch.randint(5, len(tokenizer), (batch_size, args.prompt_length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        common = (input_ids, attention_mask, tokenizer, args.new_tokens, args.repeats)
        for name, t in (("local", local), ("remote", remote)):
            for selection in ("teacher", "takeover"):
                per_step, stats = timed(student, t, *common, trigger="always", selection=selection, top_k=8)
                rows.append({
                    "batch_size": batch_size, "teacher": name, "selection": selection,
                    "trigger_steps": stats["teacher_calls"], "rows_per_step": batch_size,
                    "per_trigger_step_ms": round(1000 * per_step, 2),
                })
                print(json.dumps(rows[-1]))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"prompt_length": args.prompt_length, "new_tokens": args.new_tokens, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
