"""Adversarial and valid per-request S2T arguments (`vllm_xargs`) of the served student's engine processor, each with
the argument a correct check must name, shared by the unit test of the checks (tests/test_serving.py) and the fuzz
test against a real vLLM server (tests/test_served_fuzz.py)."""

from __future__ import annotations

import random
from typing import Any


INF, NAN = float("inf"), float("nan")


def bad_cases(vocab: int) -> list[tuple[dict[str, Any], str]]:
    """`(vllm_xargs, the argument the refusal names)`: every one must be refused at admission (HTTP 4xx)."""
    entropy = {"s2t_trigger": "entropy"}
    return [
        ({"s2t_keep": []}, "s2t_keep"),
        ({"s2t_keep": [-1]}, "s2t_keep"),
        ({"s2t_keep": [3, -2**31]}, "s2t_keep"),
        ({"s2t_keep": [2**40]}, "s2t_keep"),
        ({"s2t_keep": list(range(1025))}, "s2t_keep"),
        ({"s2t_keep": list(range(100_000))}, "s2t_keep"),
        ({"s2t_keep": "5"}, "s2t_keep"),
        ({"s2t_keep": 7}, "s2t_keep"),
        ({"s2t_keep": [1.5]}, "s2t_keep"),
        ({"s2t_keep": ["a"]}, "s2t_keep"),
        ({"s2t_keep": [vocab, "x"]}, "s2t_keep"),
        ({"s2t_trigger": "bogus"}, "s2t_trigger"),
        ({"s2t_trigger": 1}, "s2t_trigger"),
        ({"s2t_trigger": ["always"]}, "s2t_trigger"),
        ({"s2t_trigger": ""}, "s2t_trigger"),
        (entropy, "s2t_threshold"),
        ({**entropy, "s2t_threshold": INF}, "s2t_threshold"),
        ({**entropy, "s2t_threshold": -INF}, "s2t_threshold"),
        ({**entropy, "s2t_threshold": NAN}, "s2t_threshold"),
        ({**entropy, "s2t_threshold": "1.0"}, "s2t_threshold"),
        ({"s2t_trigger": "learned", "s2t_threshold": 1.0, "s2t_entropy_weight": INF}, "s2t_entropy_weight"),
        ({"s2t_entropy_weight": "a"}, "s2t_entropy_weight"),
        ({"s2t_trigger": "random", "s2t_rate": -0.1}, "s2t_rate"),
        ({"s2t_trigger": "random", "s2t_rate": 1.5}, "s2t_rate"),
        ({"s2t_trigger": "random", "s2t_rate": NAN}, "s2t_rate"),
        ({"s2t_trigger": "random", "s2t_rate": "0.5"}, "s2t_rate"),
        ({"s2t_trigger": "always", "s2t_warmup": -1}, "s2t_warmup"),
        ({"s2t_trigger": "always", "s2t_warmup": 2.5}, "s2t_warmup"),
        ({"s2t_trigger": "always", "s2t_warmup": "3"}, "s2t_warmup"),
        ({"s2t_trigger": "always", "s2t_warmup": 2**40}, "s2t_warmup"),
        ({"s2t_trigger": "always", "s2t_offset": -5}, "s2t_offset"),
        ({"s2t_trigger": "always", "s2t_offset": 2**40}, "s2t_offset"),
        ({**entropy, "s2t_threshold": 1.0, "s2t_signal_top_k": 0}, "s2t_signal_top_k"),
        ({**entropy, "s2t_threshold": 1.0, "s2t_signal_top_k": -3}, "s2t_signal_top_k"),
        ({**entropy, "s2t_threshold": 1.0, "s2t_signal_top_k": 3.5}, "s2t_signal_top_k"),
        ({**entropy, "s2t_threshold": 1.0, "s2t_signal_top_k": 2**40}, "s2t_signal_top_k"),
        ({"s2t_trigger": "random", "s2t_rate": 0.5, "s2t_seed": 2**70}, "s2t_seed"),
        ({"s2t_trigger": "random", "s2t_rate": 0.5, "s2t_seed": "x"}, "s2t_seed"),
        ({"s2t_trigger": "random", "s2t_rate": 0.5, "s2t_seed": 0.5}, "s2t_seed"),
        ({"s2t_bogus": 1}, "s2t_bogus"),
        ({"s2t_trigger": "always", "s2t_Warmup": 0}, "s2t_Warmup"),
    ]


def python_only_bad_cases() -> list[tuple[dict[str, Any], str]]:
    """Bad arguments a JSON request cannot carry as such (a server may coerce booleans): for the unit test only."""
    return [
        ({"s2t_keep": [True]}, "s2t_keep"),
        ({"s2t_trigger": "always", "s2t_warmup": True}, "s2t_warmup"),
        ({"s2t_trigger": "random", "s2t_rate": False}, "s2t_rate"),
        ({"s2t_keep": (1, 2)}, "s2t_keep"),
    ]


def valid_cases(vocab: int, sentinel: int) -> list[dict[str, Any]]:
    """Arguments that must be accepted (including ids beyond the vocabulary, which the engine drops)."""
    return [
        {},
        {"other_processor_arg": 3},
        {"s2t_trigger": "never"},
        {"s2t_trigger": "always", "s2t_warmup": 0},
        {"s2t_trigger": "always", "s2t_warmup": 2, "s2t_offset": 5},
        {"s2t_trigger": "entropy", "s2t_threshold": 0.5, "s2t_signal_top_k": 10**6},
        {"s2t_trigger": "entropy", "s2t_threshold": -1, "s2t_signal_top_k": 1},
        {"s2t_trigger": "random", "s2t_rate": 1.0, "s2t_seed": -3},
        {"s2t_trigger": "random", "s2t_rate": 0, "s2t_seed": 2**62},
        {"s2t_keep": [3, 4, sentinel]},
        {"s2t_keep": [3] * 1024},
        {"s2t_keep": [3, vocab + 1]},
        {"s2t_keep": [vocab, 10**9]},
    ]


def random_case(rng: random.Random, vocab: int, sentinel: int) -> tuple[dict[str, Any], str | None]:
    """One request's arguments: a bad case (with the argument to name), a valid one (`None`), or a random mix of
    argument names and values (classified by the caller's check)."""
    draw = rng.random()
    if draw < 0.45:
        return rng.choice(bad_cases(vocab))
    if draw < 0.8:
        return rng.choice(valid_cases(vocab, sentinel)), None
    values = [0, 1, -1, 3, 0.5, 1e308, INF, NAN, "", "always", [], [1, 2], [-1], [vocab], 2**33, 10**30]
    names = ["s2t_trigger", "s2t_threshold", "s2t_warmup", "s2t_offset", "s2t_signal_top_k", "s2t_rate", "s2t_seed",
             "s2t_entropy_weight", "s2t_keep"]
    return {name: rng.choice(values) for name in rng.sample(names, rng.randint(1, 4))}, "?"
