"""s2t_hf: Select to Think (S2T) for Hugging Face causal language models.

`import s2t_hf` stays light: the public classes load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__


_LAZY_ATTRIBUTES = {
    "S2TConfig": "config",
    "S2TLogitsProcessor": "processor",
    "S2TSelector": "selector",
    "S2TTrainer": "trainer",
    "S2TTrainingArguments": "trainer",
    "collect_selection_data": "data",
    "SelectionGroupCollator": "collator",
    "encode_prompts": "prompts",
    "generate_batched": "generation",
    "generate": "generation",
    "LocalTeacher": "teachers",
    "RemoteTeacher": "teachers",
    "Teacher": "teachers",
}

__all__ = sorted([*_LAZY_ATTRIBUTES, "__version__"])

if TYPE_CHECKING:
    from .config import S2TConfig
    from .collator import SelectionGroupCollator
    from .data import collect_selection_data
    from .generation import generate, generate_batched
    from .processor import S2TLogitsProcessor
    from .prompts import encode_prompts
    from .selector import S2TSelector
    from .teachers import LocalTeacher, RemoteTeacher, Teacher
    from .trainer import S2TTrainer, S2TTrainingArguments


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRIBUTES:
        module = importlib.import_module(f".{_LAZY_ATTRIBUTES[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY_ATTRIBUTES])
