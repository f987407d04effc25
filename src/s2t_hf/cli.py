"""The `s2t-hf` command line: demo, calibrate, collect, train, evaluate, push, export.

Models are loaded with `AutoModelForCausalLM.from_pretrained` from local directories or the Hugging Face cache
(`trust_remote_code` stays off). Run `s2t-hf COMMAND --help` for the options of each command.
"""

from __future__ import annotations

import argparse
import json
import logging as std_logging
import os
import sys
import time
from typing import Any

from transformers.utils import logging


def _load_model(path: str, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=False).eval()


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def _read_prompts(path: str) -> list[Any]:
    """
    One prompt per line (plain text), or a JSON list of strings / chat message lists; the commands format them with
    the tokenizer's chat template when it has one.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        prompts = json.loads(text)
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"error: `{path}` holds no prompts.")
    return prompts


def cmd_demo(args) -> None:
    from .demo import DemoConfig, format_table, run_demo

    config = DemoConfig(
        seed=args.seed,
        output_dir=args.output_dir,
        pair_dir=args.pair_dir,
        num_test=args.num_test,
        plots=not args.no_plots,
    )
    results = run_demo(config)
    print(format_table(results))
    hit = results["hit_at_k"]["entropy"]
    print("\nLocal sufficiency (entropy trigger): " + ", ".join(f"{k} {v:.1%}" for k, v in hit.items() if "@" in k))
    print(f"\nResults: {args.output_dir}/results.json, plots: {args.output_dir}/*.png")


def cmd_calibrate(args) -> None:
    from .processor import S2TLogitsProcessor
    from .prompts import prompt_token_ids
    from .teachers.base import UnusedTeacher

    if args.trigger == "kl" and not args.teacher:
        raise SystemExit("error: `--trigger kl` needs `--teacher` (the KL signal compares the student with it).")
    prompts = _read_prompts(args.prompts)
    student, tokenizer = _load_model(args.model), _load_tokenizer(args.tokenizer or args.model)
    # calibration decodes without triggers: the entropy trigger never consults a teacher
    teacher = _load_model(args.teacher) if args.teacher else UnusedTeacher()
    # formatted as `collect` formats them: the chat template applied when the tokenizer has one
    prompts = prompt_token_ids(prompts, tokenizer, name="--prompts")
    with S2TLogitsProcessor(
        student, teacher=teacher, trigger=args.trigger, selection="teacher", top_k=args.top_k, tokenizer=tokenizer
    ) as s2t:
        threshold = s2t.calibrate(
            prompts, target_rate=args.rate, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens
        )
        s2t.config.save_pretrained(args.output_dir)
    print(json.dumps({"trigger": args.trigger, "threshold": threshold, "rate": args.rate, "saved": args.output_dir}))


def cmd_collect(args) -> None:
    from .data import collect_selection_data

    if args.trajectories and args.mode != "teacher_forced":
        raise SystemExit(
            "error: `--trajectories` needs `--mode teacher_forced` (on-policy trajectories follow the teacher's "
            "choices, not the student's own decoding)."
        )
    if args.signal == "kl" and args.teacher_tokenizer:
        raise SystemExit(
            "error: `--signal kl` compares the two models token by token, which a teacher with its own tokenizer "
            "(`--teacher-tokenizer`) cannot do; use `--signal entropy`."
        )
    prompts = _read_prompts(args.prompts)
    student, tokenizer = _load_model(args.model), _load_tokenizer(args.tokenizer or args.model)
    teacher = _load_model(args.teacher)
    if args.teacher_tokenizer:
        from .teachers import LocalTeacher

        # a teacher of another family: it scores the student's candidates as text under its own tokenizer
        teacher = LocalTeacher(teacher, tokenizer=_load_tokenizer(args.teacher_tokenizer))
    collected = collect_selection_data(
        student, teacher, tokenizer, prompts, mode=args.mode, top_k=args.top_k, fraction=args.fraction,
        signal=args.signal, trigger_rate=args.fraction if args.mode == "on_policy" else None,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, save_to=args.output_dir,
        return_trajectories=args.trajectories, collection_id=args.collection_id,
        resume={"yes": True, "no": False, "upgrade": "upgrade"}[args.resume],
    )
    dataset, trajectories = collected if args.trajectories else (collected, None)
    summary = {"groups": len(dataset), "saved": args.output_dir}
    if trajectories is not None:
        summary["trajectories"] = len(trajectories)
    print(json.dumps(summary))


def cmd_train(args) -> None:
    from datasets import load_from_disk

    from .config import S2TConfig
    from .data import METADATA_NAME, TRAJECTORIES_DIR
    from .learned_trigger import fit_trigger_row
    from .selector import S2TSelector
    from .trainer import S2TTrainer, S2TTrainingArguments

    if args.trigger_rate is not None and not args.learned_trigger:
        raise SystemExit("error: `--trigger-rate` sets the learned trigger's threshold; add `--learned-trigger`.")
    if args.trigger_rate is not None and not 0.0 < args.trigger_rate < 1.0:
        raise SystemExit(f"error: `--trigger-rate` must lie in (0, 1), got {args.trigger_rate}.")
    metadata = os.path.join(args.data, METADATA_NAME)
    if os.path.isfile(metadata):
        with open(metadata, encoding="utf-8") as f:
            if not json.load(f).get("complete"):
                raise SystemExit(
                    f"error: `{args.data}` holds an unfinished collection; run `s2t-hf collect` again with the same "
                    "arguments to finish it."
                )
    trajectories_path = os.path.join(args.data, TRAJECTORIES_DIR)
    if args.learned_trigger and not os.path.isdir(trajectories_path):
        raise SystemExit(
            f"error: `--learned-trigger` fits the trigger row on the student's trajectories, but `{args.data}` holds "
            "none; collect with `s2t-hf collect --trajectories`."
        )
    try:
        dataset = load_from_disk(args.data)
    except IndexError:  # `datasets` cannot read back a saved dataset of zero rows
        dataset = []
    if len(dataset) == 0:
        raise SystemExit(f"error: `{args.data}` holds no selection groups; collect some with `s2t-hf collect`.")
    adapter_mode = args.adapter_mode or ("scoring" if args.preserve_cache else "generate")
    learning_rate = args.learning_rate or (1e-3 if args.preserve_cache else 5e-5)
    lm_kl_weight = args.lm_kl_weight if args.lm_kl_weight is not None else (0.0 if adapter_mode == "scoring" else 0.1)
    try:
        config = S2TConfig(
            selection="local", scoring=args.scoring, residual_tau=args.residual_tau, adapter_mode=adapter_mode,
            residual_log_probs=args.residual_log_probs,
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    trajectories = load_from_disk(trajectories_path) if args.learned_trigger else None
    candidates = trajectories[0]["cand_ids"] if trajectories is not None and len(trajectories) else []
    if candidates:  # the first trajectory's positions, each with the collected K candidates
        collected_k = len(candidates[0])
        if collected_k < config.top_k:
            raise SystemExit(
                f"error: the trajectories were collected with `--top-k {collected_k}`, but the learned trigger is fit "
                f"for the selector's K={config.top_k}; collect again with `--top-k {config.top_k}` or more."
            )
    model, tokenizer = _load_model(args.model), _load_tokenizer(args.tokenizer or args.model)
    try:
        selector = S2TSelector.create(
            model, tokenizer, num_bins=args.num_bins, use_lora=not args.head_only, preserve_cache=args.preserve_cache,
            config=config, learned_trigger=args.learned_trigger,
        )
    except ValueError as error:
        if args.preserve_cache and "preserve_cache" in str(error):  # e.g. GPT-2's fused c_attn makes keys and values
            raise SystemExit(f"error: {error} On the command line: `--no-preserve-cache` or `--head-only`.") from error
        raise
    split = _split_by_prompt(dataset, fraction=0.1, seed=0)
    training_args = S2TTrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, learning_rate=learning_rate,
        per_device_train_batch_size=args.batch_size, eval_strategy="epoch", save_strategy="epoch",
        load_best_model_at_end=True, metric_for_best_model="eval_agreement", report_to="none",
        teacher_kl_weight=args.teacher_kl_weight, lm_kl_weight=lm_kl_weight, group_by_prompt=args.group_by_prompt,
    )
    trainer = S2TTrainer(
        selector=selector, args=training_args, train_dataset=split["train"], eval_dataset=split["test"]
    )
    trainer.log_to_file(os.path.join(args.output_dir, "trainer_log.jsonl"))  # the console: progress, then the metrics
    trainer.train()
    metrics = trainer.evaluate()
    if trajectories is not None:
        # after training: the trainer's weight decay would shrink a row fit before it
        report = fit_trigger_row(selector, trajectories, adapter_mode=adapter_mode, target_rate=args.trigger_rate)
        metrics["trigger_auroc"] = report["auroc"]
        metrics["trigger_threshold"] = report["threshold"]
    trainer.save_model(args.output_dir)
    print(json.dumps(metrics))


def _split_by_prompt(dataset, fraction: float, seed: int):
    """
    Train and held-out groups from different prompts (`prompt_index`, as `collect` writes it), about `fraction` of the
    prompts held out: groups of one prompt share its context, so a split by group would score the selector on contexts
    it trained on. Data without `prompt_index`, or from a single prompt, is split by group.
    """
    import random

    indices = dataset["prompt_index"] if "prompt_index" in dataset.column_names else []
    prompts = sorted(set(indices))
    if len(prompts) < 2:
        return dataset.train_test_split(test_size=max(1, len(dataset) // 10), seed=seed)
    held_out = set(random.Random(seed).sample(prompts, max(1, round(fraction * len(prompts)))))
    return {
        "train": dataset.select([i for i, p in enumerate(indices) if p not in held_out]),
        "test": dataset.select([i for i, p in enumerate(indices) if p in held_out]),
    }


def cmd_evaluate(args) -> None:
    from .processor import S2TLogitsProcessor
    from .prompts import prompt_token_ids
    from .tasks import ArithmeticTaskConfig, check_answer, generate_problems, generate_solutions

    if args.num_problems < 1:
        raise SystemExit(f"error: `--num-problems` must be at least 1, got {args.num_problems}.")
    model, tokenizer = _load_model(args.model), _load_tokenizer(args.tokenizer or args.model)
    problems = generate_problems(args.num_problems, "test", seed=args.seed)
    max_new_tokens = args.max_new_tokens or ArithmeticTaskConfig().max_solution_words + 1

    def evaluate(name: str, s2t: S2TLogitsProcessor | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        completions = generate_solutions(
            model, tokenizer, problems, batch_size=args.batch_size, max_new_tokens=max_new_tokens, s2t=s2t,
            show_progress=True, desc=name,
        )
        correct = sum(check_answer(c, p.answer) for c, p in zip(completions, problems))
        return {"accuracy": correct / len(problems), "seconds": time.perf_counter() - started}

    rows = {"Greedy": evaluate("Greedy")}
    if args.selector:
        with S2TLogitsProcessor.from_pretrained(args.selector, model=model, eos_token_id=tokenizer.eos_token_id) as s2t:
            config = s2t.config
            if config.trigger_has_threshold and (args.trigger_rate or config.trigger_threshold is None):
                rate = args.trigger_rate or config.trigger_rate
                if rate is None:
                    raise SystemExit(
                        f"error: the selector's `{config.trigger}` trigger has no threshold; pass `--trigger-rate` "
                        "(e.g. 0.1) to calibrate one on validation problems."
                    )
                # calibrated on validation problems as the test problems are decoded: same prompts, lengths, rows
                calibration = generate_problems(args.num_calibration, "validation", seed=args.seed)
                rows_above = range(len(tokenizer), model.get_output_embeddings().weight.shape[0])
                s2t.calibrate(
                    prompt_token_ids([p.messages for p in calibration], tokenizer), target_rate=rate,
                    batch_size=args.batch_size, max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    suppress_tokens=list(rows_above) or None,
                )
            rows["S2T-Local"] = evaluate("S2T-Local", s2t)
            rows["S2T-Local"]["trigger_threshold"] = s2t.config.trigger_threshold
            rows["S2T-Local"].update(s2t.total_stats)  # every batch
    print(json.dumps(rows, indent=2))


def cmd_push(args) -> None:
    from .selector import S2TSelector

    model = _load_model(args.model)
    selector = S2TSelector.from_pretrained(model, args.selector)
    url = selector.push_to_hub(args.repo_id, private=args.private)
    print(url)


def cmd_export(args) -> None:
    from .selector import S2TSelector
    from .serving import export_for_vllm

    model = _load_model(args.model)
    tokenizer = _load_tokenizer(args.tokenizer or args.model)
    if args.selector:
        selector = S2TSelector.from_pretrained(model, args.selector)
        export = export_for_vllm(args.output, selector=selector, tokenizer=tokenizer, adapter_name=args.adapter_name)
    else:
        export = export_for_vllm(args.output, model=model, tokenizer=tokenizer)
    command = " ".join(["python -m vllm.entrypoints.openai.api_server", *export.serve_args()])
    print(json.dumps({"model_dir": export.model_dir, "adapter_dir": export.adapter_dir, "serve": command}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    from .demo import DemoConfig

    parser = argparse.ArgumentParser(prog="s2t-hf", description="Select to Think (S2T) for Hugging Face models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole pipeline on the built-in arithmetic task (CPU, ~30 min)")
    defaults = DemoConfig()
    demo.add_argument("--seed", type=int, default=defaults.seed)
    demo.add_argument("--output-dir", default=defaults.output_dir)
    demo.add_argument("--pair-dir", default=None, help="cache of the trained pair (default ~/.cache/s2t_hf)")
    demo.add_argument("--num-test", type=int, default=defaults.num_test)
    demo.add_argument("--no-plots", action="store_true")
    demo.set_defaults(func=cmd_demo)

    calibrate = sub.add_parser("calibrate", help="calibrate a trigger threshold to a target rate")
    calibrate.add_argument("--model", required=True)
    calibrate.add_argument(
        "--teacher", help="needed for `--trigger kl` only: the entropy signal is the student's own, and calibration "
        "decodes without triggers, so no teacher is consulted",
    )
    calibrate.add_argument("--tokenizer")
    calibrate.add_argument("--prompts", required=True, help="text file (one prompt per line) or JSON list")
    calibrate.add_argument("--trigger", choices=["entropy", "kl"], default="entropy")
    calibrate.add_argument("--rate", type=float, default=0.01)
    calibrate.add_argument("--top-k", type=int, default=8)
    calibrate.add_argument("--max-new-tokens", type=int, default=256)
    calibrate.add_argument("--output-dir", required=True, help="where s2t_config.json is written")
    calibrate.set_defaults(func=cmd_calibrate)

    collect = sub.add_parser("collect", help="collect selection groups from a student and a teacher")
    collect.add_argument("--model", required=True)
    collect.add_argument("--teacher", required=True)
    collect.add_argument("--tokenizer")
    collect.add_argument("--prompts", required=True)
    collect.add_argument(
        "--teacher-tokenizer",
        help="the teacher's own tokenizer, for a teacher of another model family: it then scores the student's "
        "candidates as text (needs `--signal entropy`)",
    )
    collect.add_argument("--mode", choices=["teacher_forced", "on_policy"], default="teacher_forced")
    collect.add_argument(
        "--signal", choices=["entropy", "kl"], default="entropy",
        help="which positions become groups (teacher-forced) or trigger (on-policy): `entropy` (default), where "
        "S2T-Local's entropy trigger fires at inference; `kl`, where the teacher disagrees with the student (the "
        "paper's; needs a teacher of the student's tokenizer)",
    )
    collect.add_argument("--top-k", type=int, default=16)
    collect.add_argument("--fraction", type=float, default=0.1)
    collect.add_argument("--max-new-tokens", type=int, default=256)
    collect.add_argument("--batch-size", type=int, default=8)
    collect.add_argument("--output-dir", required=True)
    collect.add_argument(
        "--resume", choices=["yes", "no", "upgrade"], default="yes",
        help="`yes` (default): go on with a stopped collection in OUTPUT_DIR if it was started with the same models, "
        "prompts and settings; `no`: start over; `upgrade`: go on with a collection recorded under the previous "
        "identity version when it still matches under it",
    )
    collect.add_argument(
        "--collection-id",
        help="a name of your own for the collection, part of what must match to resume (e.g. a run or data version)",
    )
    collect.add_argument(
        "--trajectories", action="store_true",
        help="also keep every position of the student's trajectories (in OUTPUT_DIR/trajectories), to fit a learned "
        "trigger with `s2t-hf train --learned-trigger`",
    )
    collect.set_defaults(func=cmd_collect)

    train = sub.add_parser("train", help="train a local selector on collected groups")
    train.add_argument("--model", required=True)
    train.add_argument("--tokenizer")
    train.add_argument("--data", required=True, help="a dataset saved by `s2t-hf collect`")
    train.add_argument(
        "--scoring", choices=["residual", "pure"], default="residual",
        help="`residual` (default): the student's log-probability of each candidate + score / residual_tau; `pure`: "
        "the score alone (the paper's form, which lost to greedy at small scale: see docs/settings.md)",
    )
    train.add_argument("--residual-tau", type=float, default=0.1)
    train.add_argument(
        "--residual-log-probs", choices=["selector", "student"], default="selector",
        help="whose log-probabilities the residual form adds the score to: `selector` (default; the student with the "
        "adapter on) or `student` (the student as collected, adapter off, so only the bins move the choice; needs "
        "`--adapter-mode scoring`)",
    )
    train.add_argument("--num-bins", type=int, default=16)
    train.add_argument("--head-only", action="store_true", help="train only the bin rows (no LoRA)")
    train.add_argument(
        "--preserve-cache", action=argparse.BooleanOptionalAction, default=True,
        help="LoRA only on the last layer's query, output and MLP projections, so candidates are scored on the "
        "student's live KV cache (default); `--no-preserve-cache` puts LoRA on every projection (the paper's)",
    )
    train.add_argument(
        "--adapter-mode", choices=["scoring", "generate"],
        help="when the selector's adapter is on: `scoring`, only while it scores candidates, so the student writes "
        "every other token itself; `generate`, while generating (the paper's). Default: `scoring` with "
        "--preserve-cache, `generate` without",
    )
    train.add_argument("--epochs", type=float, default=3.0)
    train.add_argument(
        "--learning-rate", type=float,
        help="default: 1e-3 with --preserve-cache (LoRA on one layer), 5e-5 without (the paper's, LoRA everywhere)",
    )
    train.add_argument("--batch-size", type=int, default=8, help="selection groups per step")
    train.add_argument(
        "--group-by-prompt", action="store_true",
        help="batch the groups prompt by prompt so a prompt's groups share one encoding of their context (the same "
        "loss, several times faster; batches are less mixed)",
    )
    train.add_argument(
        "--teacher-kl-weight", type=float, default=1.0,
        help="weight of KL(teacher || selector) over the candidates (1.0 beat the paper's 0.1 on the demo)",
    )
    train.add_argument(
        "--lm-kl-weight", type=float,
        help="weight of KL(base || adapted) on the next-token distributions; default 0 with --adapter-mode scoring "
        "(the student generates as itself), 0.1 with generate",
    )
    train.add_argument("--output-dir", required=True)
    train.add_argument(
        "--learned-trigger", action="store_true",
        help="reserve a trigger row and fit it after training on the trajectories of `s2t-hf collect --trajectories`",
    )
    train.add_argument(
        "--trigger-rate", type=float,
        help="with --learned-trigger: save the selector with trigger='learned' at this rate on the trajectories",
    )
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="accuracy of greedy and S2T-Local on the built-in task")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--tokenizer")
    evaluate.add_argument("--selector", help="a trained selector directory or repo id")
    evaluate.add_argument("--num-problems", type=int, default=500)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--max-new-tokens", type=int, help="default: the longest solution of the task, plus one")
    evaluate.add_argument(
        "--trigger-rate", type=float,
        help="calibrate the selector's trigger to this rate on validation problems (needed if it has no threshold)",
    )
    evaluate.add_argument("--num-calibration", type=int, default=100, help="validation problems for --trigger-rate")
    evaluate.set_defaults(func=cmd_evaluate)

    push = sub.add_parser("push", help="push a trained selector to the Hugging Face Hub")
    push.add_argument("--model", required=True, help="its base model")
    push.add_argument("--selector", required=True)
    push.add_argument("--repo-id", required=True)
    push.add_argument("--private", action="store_true")
    push.set_defaults(func=cmd_push)

    export = sub.add_parser(
        "export", help="export a student (and its selector) for a vLLM server that runs S2T in the engine"
    )
    export.add_argument("--model", required=True, help="the student (a local folder or a Hub id in the cache)")
    export.add_argument("--selector", help="the trained selector (S2T-Local); without it, the student alone "
                        "(S2T with a served teacher)")
    export.add_argument("--tokenizer", help="defaults to --model")
    export.add_argument("--output", required=True, help="the folder to write (model/, adapter/, s2t_config.json)")
    export.add_argument("--adapter-name", default="s2t-selector", help="the name the LoRA is served under")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.verbose or args.command == "demo":
        logging.set_verbosity_info()
        std_logging.basicConfig(level=std_logging.INFO, stream=sys.stderr)
    args.func(args)


if __name__ == "__main__":
    main()
