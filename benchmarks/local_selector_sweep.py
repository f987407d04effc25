"""Why S2T-Local does not beat greedy on SmolLM2-135M: the shipped selector decoded with other inference
settings, on problems neither its training nor the committed test used.

The shipped selector (`examples/smollm2_chain_sum_selector`, from `benchmarks/real_pipeline.py`) decodes the pipeline's
**hit@K split** of the reasoning-gym task (100 problems, drawn like the test split; used there only for hit@K, never
for training or decoding), with the residual form's temperature `residual_tau` (trained at 0.1) and the trigger rate
varied (threshold calibrated on the pipeline's calibration split). Greedy is the baseline; accuracy with a 95% Wilson
interval, flips per trigger.

    HF_HUB_OFFLINE=1 python benchmarks/local_selector_sweep.py     # ~10 min on 2 cores
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from s2t_hf import S2TLogitsProcessor  # noqa: E402
from s2t_hf.generation import generate_batched  # noqa: E402
from s2t_hf.prompts import prompt_token_ids  # noqa: E402


logger = logging.getLogger("local_selector_sweep")


def pipeline_module():
    spec = importlib.util.spec_from_file_location("real_pipeline_benchmark", HERE / "real_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    pipeline = pipeline_module()
    sizes = pipeline.SIZES["full"]
    problems = pipeline.task_problems(sizes["task_train"] + sizes["task_hit"] + sizes["task_calibration"]
                                      + sizes["task_test"], seed=0)
    a = sizes["task_train"]
    hit, calibration = problems[a:a + sizes["task_hit"]], problems[a + sizes["task_hit"]:a + sizes["task_hit"]
                                                                   + sizes["task_calibration"]]
    from common import last_number, load_smollm2, same_number, wilson

    tokenizer, model, _ = load_smollm2()
    messages = [p.messages for p in hit]
    kwargs = dict(max_new_tokens=sizes["task_new_tokens"], do_sample=False, batch_size=16, show_progress=False)

    def accuracy(texts):
        correct = sum(same_number(last_number(t), p.answer) for t, p in zip(texts, hit))
        low, high = wilson(correct, len(hit))
        return correct / len(hit), [low, high]

    rows = []
    start = time.perf_counter()
    texts = generate_batched(model, messages, tokenizer, **kwargs)
    acc, ci = accuracy(texts)
    rows.append({"method": "greedy", "accuracy": acc, "ci95": ci, "seconds": time.perf_counter() - start})
    logger.info(rows[-1])
    selector_dir = HERE.parent / "examples" / "smollm2_chain_sum_selector"
    s2t = S2TLogitsProcessor.from_pretrained(selector_dir, model=model)
    for rate in (0.1, 0.3):
        for tau in (0.1, 0.05, 0.02):
            s2t.config.residual_tau = tau
            # `calibrate` takes strings or token ids (no chat messages): encode them as the pipeline does
            s2t.calibrate(prompt_token_ids([p.messages for p in calibration], tokenizer, chat_template=True),
                          target_rate=rate, batch_size=16,
                          max_new_tokens=sizes["task_new_tokens"], do_sample=False)
            s2t.reset_total_stats()
            start = time.perf_counter()
            texts = generate_batched(model, messages, tokenizer, s2t=s2t, **kwargs)
            acc, ci = accuracy(texts)
            stats = s2t.total_stats
            rows.append({"method": f"S2T-Local rate {rate:.0%} tau {tau}", "accuracy": acc, "ci95": ci,
                         "trigger_rate": stats["trigger_rate"], "triggers": stats["triggers"],
                         "flips": stats["flips"], "seconds": time.perf_counter() - start})
            logger.info(rows[-1])
    s2t.remove_hooks()
    result = {"date": time.strftime("%Y-%m-%d"), "split": "the pipeline's hit@K split of chain_sum (100 problems)",
              "selector": str(selector_dir.relative_to(HERE.parent)), "rows": rows}
    out = HERE / "results" / "local_selector_sweep.json"
    out.write_text(json.dumps(result, indent=2))
    lines = ["| method | accuracy | 95% CI | trigger rate | flips / triggers |", "|---|---|---|---|---|"]
    for row in rows:
        trig = f"{row['trigger_rate']:.1%}" if "trigger_rate" in row else "–"
        flips = f"{row['flips']} / {row['triggers']}" if "flips" in row else "–"
        lines.append(f"| {row['method']} | {row['accuracy']:.1%} | {row['ci95'][0]:.1%}-{row['ci95'][1]:.1%} | "
                     f"{trig} | {flips} |")
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
