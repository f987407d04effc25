"""The `Examples:` blocks of the library's docstrings run (tiny models built from configs, offline)."""

import doctest
import importlib

import pytest


MODULES = [
    "s2t_hf.config",
    "s2t_hf.processor",
    "s2t_hf.selection",
    "s2t_hf.selector",
    "s2t_hf.adapter_state",
    "s2t_hf.bin_rows",
    "s2t_hf.data",
    "s2t_hf.shard_store",
    "s2t_hf.collator",
    "s2t_hf.prompts",
    "s2t_hf.generation.batched",
    "s2t_hf.losses",
    "s2t_hf.trainer",
    "s2t_hf.metrics",
    "s2t_hf.serving.manifest",
    "s2t_hf.serving.export",
    # the built-in task checks its own docstrings in tests/tasks
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
