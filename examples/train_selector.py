"""Train an S2T-Local selector end to end on the built-in arithmetic task, then decode with it.

1. Load (or train, ~15 min on 2 CPU cores, cached afterwards) the tiny teacher/student pair of `s2t_hf.tasks`.
2. Collect selection groups on training problems: the student's greedy solutions scored by the teacher, the 10% of
   positions where the student's entropy is highest (where the entropy trigger will fire), K = 16 candidates each
   (`collect_selection_data`).
3. Train the selector (16 reserved output rows + LoRA on the last layer's query, output and MLP projections, residual
   scoring, active only while scoring) with `S2TTrainer`, evaluating agreement with the teacher's choice on held-out
   problems, early stopping and keeping the best checkpoint. This is the recipe of `s2t-hf demo`.
4. Fit the learned trigger's row on the student's labelled trajectories from step 2 (`fit_trigger_row`): held-out
   AUROC of the learned row, the entropy and the KL for "the teacher's top-1 is a lower candidate".
5. Decode test problems greedily, with S2T-Local (entropy and learned triggers calibrated to a 10% rate, K = 8) and
   with collaborative S2T asking the teacher only where the learned trigger fires, at 5%; compare accuracies.

    python examples/train_selector.py --output-dir runs/arithmetic-selector [--problems 3000] [--max-steps 3000]

Any pair of Hugging Face causal LMs works the same way: replace step 1 with `AutoModelForCausalLM.from_pretrained(...)`
and the prompts with your own (a teacher of another model family as `LocalTeacher(model, tokenizer=teacher_tokenizer)`
with `signal="entropy"`).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import EarlyStoppingCallback

from s2t_hf import (
    S2TConfig,
    S2TLogitsProcessor,
    S2TSelector,
    S2TTrainer,
    S2TTrainingArguments,
    collect_selection_data,
)
from s2t_hf.learned_trigger import fit_trigger_row
from s2t_hf.tasks import evaluate_greedy, generate_problems, train_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/arithmetic-selector")
    parser.add_argument("--pair-dir", default=None, help="cache of the pair (default: ~/.cache/s2t_hf/...)")
    parser.add_argument("--problems", type=int, default=3000, help="training problems to collect groups on")
    parser.add_argument("--dev-problems", type=int, default=300)
    parser.add_argument("--test-problems", type=int, default=500)
    parser.add_argument("--mode", default="teacher_forced", choices=["teacher_forced", "on_policy"])
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    # 1. the pair
    teacher, student, tokenizer = train_pair(args.pair_dir, seed=args.seed)

    # 2. selection groups (saved and resumable)
    def prompts(split: str, count: int) -> list[str]:
        return [p.text for p in generate_problems(count, split=split, seed=args.seed)]

    collect = dict(mode=args.mode, top_k=16, fraction=0.1, trigger_rate=0.1, max_new_tokens=64, batch_size=64)
    if args.mode == "teacher_forced":
        collect["signal"] = "entropy"
    # teacher-forced collection also returns the trajectories the learned trigger is fit on (same pass)
    trajectories = None
    train_groups = collect_selection_data(
        student, teacher, tokenizer, prompts("train", args.problems),
        save_to=os.path.join(args.output_dir, "groups-train"), return_trajectories=args.mode == "teacher_forced",
        **collect,
    )
    if args.mode == "teacher_forced":
        train_groups, trajectories = train_groups
    dev_groups = collect_selection_data(
        student, teacher, tokenizer, prompts("validation", args.dev_problems),
        save_to=os.path.join(args.output_dir, "groups-dev"), **collect,
    )
    print(f"{len(train_groups)} training groups, {len(dev_groups)} held-out groups")

    # 3. the selector and its training
    config = S2TConfig(
        selection="local", trigger="entropy", top_k=8, scoring="residual", residual_tau=0.1, adapter_mode="scoring"
    )
    # the student generates as itself; the selector's LoRA leaves the KV cache alone, so it scores on the live cache
    # (one more reserved row for the learned trigger)
    selector = S2TSelector.create(
        student, tokenizer, preserve_cache=True, learned_trigger=trajectories is not None, config=config
    )
    training_args = S2TTrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        eval_strategy="steps",
        eval_steps=100,
        save_strategy="steps",
        save_steps=100,
        save_total_limit=2,
        logging_steps=50,
        metric_for_best_model="eval_agreement",
        greater_is_better=True,
        load_best_model_at_end=True,
        report_to="none",
        seed=args.seed,
        teacher_kl_weight=1.0,  # learn the teacher's whole distribution over the candidates, not only its choice
        lm_kl_weight=0.0,  # the adapter never writes tokens itself (adapter_mode="scoring")
    )
    trainer = S2TTrainer(
        selector=selector,
        args=training_args,
        train_dataset=train_groups,
        eval_dataset=dev_groups,
        processing_class=tokenizer,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=5)],
    )
    trainer.train()
    metrics = trainer.evaluate()
    print(json.dumps({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}, indent=2))

    # 4. the learned trigger: a probe on the base model's final hidden state (the student generates as itself)
    if trajectories is not None:
        report = fit_trigger_row(selector, trajectories, label="fixable", adapter_mode="scoring", seed=args.seed)
        print("held-out AUROC:", json.dumps({k: round(v, 3) for k, v in report["auroc"].items()}))

    # 5. decoding: greedy vs S2T-Local with the entropy (and learned) trigger calibrated to 10% of the steps
    test = generate_problems(args.test_problems, split="test", seed=args.seed)
    with selector.adapter_disabled():
        greedy = evaluate_greedy(selector.base_model, tokenizer, test)
    # chat messages: `calibrate` formats them with the chat template, as the test problems are decoded
    calibration = [p.messages for p in generate_problems(100, split="validation", seed=args.seed + 1)]
    accuracies = {"greedy": greedy}
    for trigger in ("entropy", "learned") if trajectories is not None else ("entropy",):
        with S2TLogitsProcessor(
            selector.base_model, selector.config, selector=selector, tokenizer=tokenizer, trigger=trigger
        ) as s2t:
            s2t.calibrate(calibration, target_rate=0.1, max_new_tokens=64)
            accuracies[f"S2T-Local ({trigger})"] = evaluate_greedy(
                selector.base_model, tokenizer, test, logits_processor=[s2t]
            )
            calibrated = s2t.config
    selector.config = calibrated  # save the (last) calibrated trigger with the selector
    if trajectories is not None:
        # collaborative S2T: the teacher selects, at the half of the steps where the learned row is highest
        with S2TLogitsProcessor(
            selector.base_model, selector.config, selector=selector, tokenizer=tokenizer, teacher=teacher,
            selection="teacher",
        ) as s2t:
            s2t.calibrate(calibration, target_rate=0.05, max_new_tokens=64)
            accuracies["S2T (learned, 5%)"] = evaluate_greedy(
                selector.base_model, tokenizer, test, logits_processor=[s2t]
            )
    trainer.save_model()  # the final directory loads with S2TLogitsProcessor.from_pretrained(dir, model=student)
    print(f"test accuracy ({args.test_problems} problems): " + ", ".join(f"{k} {v:.1%}" for k, v in accuracies.items()))


if __name__ == "__main__":
    main()
