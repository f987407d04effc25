"""Built-in reasoning tasks for demos, tests and benchmarks.

`arithmetic`: GSM-like multi-step word problems with LSD-first numbers ([`generate_problems`], [`check_answer`]), a
word-level tokenizer ([`build_tokenizer`]) and a cached teacher/student pair of tiny Llama models trained from scratch
([`train_pair`], [`load_pair`]: `pair`; its settings [`PairTrainingConfig`]: `pair_config`; training one model:
`pair_training`), and the model's solutions and their accuracy ([`generate_solutions`], [`evaluate_greedy`]:
`solutions`).

`import s2t_hf.tasks` stays light: the problem generator is pure Python, and the tokenizer and the pair (which need
`tokenizers`, `torch` and `transformers`) load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


_LAZY_ATTRIBUTES = {
    "ArithmeticProblem": "arithmetic",
    "ArithmeticTaskConfig": "arithmetic",
    "check_answer": "arithmetic",
    "decode_number": "arithmetic",
    "encode_number": "arithmetic",
    "extract_answer": "arithmetic",
    "generate_problems": "arithmetic",
    "iter_problems": "arithmetic",
    "problem_split": "arithmetic",
    "build_tokenizer": "tokenizer",
    "padded_vocab_size": "tokenizer",
    "PairTrainingConfig": "pair_config",
    "default_pair_dir": "pair_config",
    "evaluate_greedy": "solutions",
    "generate_solutions": "solutions",
    "load_pair": "pair",
    "train_pair": "pair",
}

__all__ = sorted(_LAZY_ATTRIBUTES)

if TYPE_CHECKING:
    from .arithmetic import (
        ArithmeticProblem,
        ArithmeticTaskConfig,
        check_answer,
        decode_number,
        encode_number,
        extract_answer,
        generate_problems,
        iter_problems,
        problem_split,
    )
    from .pair import load_pair, train_pair
    from .pair_config import PairTrainingConfig, default_pair_dir
    from .solutions import evaluate_greedy, generate_solutions
    from .tokenizer import build_tokenizer, padded_vocab_size


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRIBUTES:
        module = importlib.import_module(f".{_LAZY_ATTRIBUTES[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY_ATTRIBUTES])
