"""Train (or load from the cache) the arithmetic teacher/student pair and report how much room it leaves for S2T.

Reports parameter counts, training time, validation/test greedy accuracy, a few problems, and *local sufficiency*:
at the student's most uncertain decoding steps (highest KL(student || teacher), teacher-forced on the student's own
greedy output, both restricted to the student's top-64 and renormalised, the first 3 generated tokens excluded), how
often the teacher's argmax is the student's top-1 or within its top-8, and how many of those steps are word choices
rather than digits.

    python benchmarks/train_pair.py [--seed 0] [--output-dir DIR] [--problems 100] [--overwrite | --load]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from s2t_hf.tasks import default_pair_dir, generate_problems, generate_solutions, load_pair, train_pair


def step_statistics(teacher, student, tokenizer, problems, support: int = 64, skip: int = 3):
    """Per generated step of the student's greedy solutions: KL, teacher argmax rank in the student, token kind."""
    completions = generate_solutions(student, tokenizer, problems, batch_size=len(problems))
    rows = []
    rows_in_vocab = len(tokenizer)
    for problem, completion in zip(problems, completions):
        prompt = tokenizer.apply_chat_template(problem.messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        gen_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt_ids + gen_ids])
        with torch.no_grad():
            s_logits = student(ids).logits[0, len(prompt_ids) - 1 : -1, :rows_in_vocab].float()
            t_logits = teacher(ids).logits[0, len(prompt_ids) - 1 : -1, :rows_in_vocab].float()
        top = s_logits.topk(support, dim=-1).indices
        s_log = torch.log_softmax(s_logits.gather(-1, top), -1)
        t_log = torch.log_softmax(t_logits.gather(-1, top), -1)
        kl = (s_log.exp() * (s_log - t_log)).sum(-1)
        teacher_choice = t_logits.argmax(-1)
        rank = (s_logits > s_logits.gather(-1, teacher_choice[:, None])).sum(-1)  # 0 = student's top-1
        for i in range(skip, len(gen_ids)):
            token = tokenizer.convert_ids_to_tokens(int(teacher_choice[i]))
            rows.append({"kl": float(kl[i]), "rank": int(rank[i]), "digit": token.isdigit(), "token": token})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--problems", type=int, default=100, help="validation problems for the KL analysis")
    parser.add_argument("--overwrite", action="store_true", help="retrain even if the cache holds another pair")
    parser.add_argument("--load", action="store_true", help="load the pair in the directory whatever its settings")
    args = parser.parse_args()

    started = time.monotonic()
    output_dir = Path(args.output_dir or default_pair_dir(args.seed))
    if args.load:
        teacher, student, tokenizer = load_pair(output_dir)
    else:
        teacher, student, tokenizer = train_pair(output_dir, seed=args.seed, overwrite=args.overwrite)
    elapsed = time.monotonic() - started
    info = json.loads((output_dir / "pair_info.json").read_text())
    print(f"pair in {output_dir} (this call {elapsed:.0f} s; training wall time {info['wall_seconds']:.0f} s)")
    print(f"tokenizer {info['tokenizer_size']} tokens, embedding rows {info['vocab_size']}")
    for role in ("teacher", "student"):
        r = info[role]
        print(
            f"{role}: {r['parameters']:,} params, step {r['selected_step']}/{r['steps_trained']} ({r['stop_reason']}),"
            f" train {r['train_seconds']:.0f} s, validation {r['validation_accuracy']:.3f},"
            f" test {r.get('test_accuracy', float('nan')):.3f}"
        )
    for problem in generate_problems(3, "validation", seed=args.seed):
        print(f"\nQ: {problem.text}\nA: {problem.solution}")

    problems = generate_problems(args.problems, "validation", seed=args.seed + 1000)
    rows = step_statistics(teacher, student, tokenizer, problems)
    rows.sort(key=lambda r: -r["kl"])
    print(f"\n{len(rows)} student decoding steps on {len(problems)} validation problems")
    for share in (0.10, 0.01):
        top = rows[: max(1, round(share * len(rows)))]
        n = len(top)
        hit1 = sum(r["rank"] < 1 for r in top) / n
        hit8 = sum(r["rank"] < 8 for r in top) / n
        words = sum(not r["digit"] for r in top) / n
        print(
            f"top {share:.0%} KL steps (n={n}): teacher argmax = student top-1 {hit1:.1%}, in top-8 {hit8:.1%};"
            f" teacher's choice is a word (not a digit) at {words:.1%}"
        )
    print(f"teacher argmax = student top-1 over all steps: {sum(r['rank'] < 1 for r in rows) / len(rows):.1%}")


if __name__ == "__main__":
    main()
