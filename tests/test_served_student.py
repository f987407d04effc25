"""The student served by a real vLLM server (marker `engine`): S2T's trigger in the engine, selection by stop-and-resume
from `ServedS2T`, token for token against `S2TLogitsProcessor` in transformers.

One server serves the exported student (the selector's bin rows baked in, its LoRA as a vLLM adapter, the processor
loaded with `--logits-processors`); the teacher tests reuse the remote-teacher tests' server. See
tests/test_remote_teacher.py for how the engine is found (`S2T_ENGINE_PYTHON`).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import entropy_gap_threshold, left_padded_batch, randomize_trainable, rows_until_eos
from test_remote_teacher import REPO, Server, engine_python, save_teacher, teacher_server
from transformers import AutoModelForCausalLM, AutoTokenizer

from s2t_hf import S2TConfig, S2TLogitsProcessor, S2TSelector
from s2t_hf.serving import ServedS2T, ServedS2TError, ServingManifest, export_for_vllm
from s2t_hf.teachers import RemoteTeacher


pytestmark = pytest.mark.engine

NEW_TOKENS = 16
PROMPTS = ([5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16])


def trained_like_selector(model, tokenizer, seed=0):
    """A selector with random LoRA (the last layer's query, output and MLP) and bin rows, as if trained."""
    selector = S2TSelector.create(model, tokenizer=tokenizer, num_bins=16, lora_r=8, preserve_cache=True)
    return randomize_trainable(selector, seed)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    python = engine_python()
    directory = tmp_path_factory.mktemp("served")
    save_teacher(directory / "student")  # the same small Llama, saved with the word-level tokenizer
    tokenizer = AutoTokenizer.from_pretrained(directory / "student")
    student = AutoModelForCausalLM.from_pretrained(directory / "student", dtype=torch.float32).eval()
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(student.config).eval()  # other weights than the teacher's
    selector = trained_like_selector(student, tokenizer)
    export = export_for_vllm(directory / "export", selector=selector, tokenizer=tokenizer)
    server = Server(python, Path(export.model_dir), directory / "server.log", extra_args=export.serve_args(),
                    extra_env={"PYTHONPATH": str(REPO / "src")})
    yield server, export, selector, student, tokenizer
    server.stop()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A plain teacher server of its own (the remote-teacher tests kill theirs at the end)."""
    yield from teacher_server(tmp_path_factory)


def decode_batch(student, tokenizer, s2t, **generate_kwargs):
    """`generate` with `s2t` on the left-padded batch of `PROMPTS`: each row's tokens up to its end token."""
    prompts, input_ids, attention_mask = left_padded_batch()
    assert [list(p) for p in PROMPTS] == prompts and tokenizer.pad_token_id == 0  # the batch's padding
    out = student.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t],
                           do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id,
                           **generate_kwargs)
    return out, input_ids.shape[1]


def reference(student, selector, tokenizer, **settings):
    """`S2TLogitsProcessor` with the selector on the left-padded batch, and its stats."""
    with S2TLogitsProcessor(student, selector.config, selector=selector, tokenizer=tokenizer, **settings) as s2t:
        out, width = decode_batch(student, tokenizer, s2t)
        return rows_until_eos(out, width, eos=tokenizer.eos_token_id), s2t.stats


def client(served, teacher=None, **overrides) -> ServedS2T:
    server, export, *_ = served
    return ServedS2T.from_export(Path(export.model_dir).parent, server.url, config_overrides=overrides, timeout=60,
                                 teacher=teacher)


@pytest.mark.parametrize("scoring,adapter_logprobs", [("residual", 20), ("residual", 1), ("pure", 20)])
def test_always_trigger_equals_transformers_token_for_token(served, scoring, adapter_logprobs, monkeypatch):
    # with 1 top log-probability of the selector on the context, the residual term mostly comes from the request that
    # keeps only the candidates
    monkeypatch.setattr("s2t_hf.serving.client.ADAPTER_LOGPROBS", adapter_logprobs)
    _, _, selector, student, tokenizer = served
    settings = dict(selection="local", trigger="always", warmup_tokens=0, top_k=4, scoring=scoring,
                    adapter_mode="scoring")
    expected, stats = reference(student, selector, tokenizer, **settings)
    assert stats["flips"] > 0  # the selector changes the path
    s2t = client(served, **settings)
    completions = s2t.generate([list(p) for p in PROMPTS], max_new_tokens=NEW_TOKENS)
    assert [c.token_ids for c in completions] == expected
    assert sum(c.triggers for c in completions) == stats["triggers"]
    assert sum(c.flips for c in completions) == stats["flips"]
    reserved = set(selector.reserved_token_ids)
    assert not any(reserved.intersection(c.token_ids) for c in completions)


def test_calibrated_entropy_trigger_left_padded_batch_sent_concurrently(served):
    _, _, selector, student, tokenizer = served
    with S2TLogitsProcessor(student, selector.config, selector=selector, trigger="never") as s2t:
        plain, _ = decode_batch(student, tokenizer, s2t, output_scores=True, return_dict_in_generate=True)
    threshold = entropy_gap_threshold(plain.scores)
    settings = dict(selection="local", trigger="entropy", trigger_threshold=threshold, warmup_tokens=2, top_k=4,
                    scoring="residual", adapter_mode="scoring")
    expected, stats = reference(student, selector, tokenizer, **settings)
    assert 0 < stats["triggers"] < stats["eligible_steps"]
    s2t = client(served, **settings)
    completions = s2t.generate([list(p) for p in PROMPTS], max_new_tokens=NEW_TOKENS)
    assert [c.token_ids for c in completions] == expected
    assert s2t.stats["triggers"] == stats["triggers"]
    # the asyncio driver gives the same tokens
    import asyncio

    again = asyncio.run(s2t.agenerate([list(p) for p in PROMPTS], max_new_tokens=NEW_TOKENS))
    assert [c.token_ids for c in again] == expected


def test_teacher_selection_with_a_served_teacher(served, engine):
    _, _, selector, student, tokenizer = served
    teacher_model = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32).eval()
    settings = dict(selection="teacher", trigger="always", warmup_tokens=1, top_k=4)
    expected, stats = reference_teacher(student, teacher_model, selector, tokenizer, **settings)
    remote = RemoteTeacher(engine.url, tokenizer=tokenizer, timeout=60)
    s2t = client(served, teacher=remote, **settings)
    completions = s2t.generate([list(p) for p in PROMPTS], max_new_tokens=NEW_TOKENS)
    assert [c.token_ids for c in completions] == expected
    assert sum(c.flips for c in completions) == stats["flips"] > 0


def reference_teacher(student, teacher, selector, tokenizer, **settings):
    """`S2TLogitsProcessor` with the teacher on the left-padded batch: the student generates without the selector's
    LoRA, the reserved rows masked."""
    with S2TLogitsProcessor(student, teacher=teacher, tokenizer=tokenizer, **settings,
                            bin_token_ids=selector.config.bin_token_ids) as s2t, selector.lora_disabled():
        out, width = decode_batch(student, tokenizer, s2t)
        return rows_until_eos(out, width, eos=tokenizer.eos_token_id), s2t.stats


def test_bins_are_never_emitted_even_when_pushed(served):
    server, export, selector, _, tokenizer = served
    s2t = client(served, trigger="never")
    bias = {str(b): 100.0 for b in selector.bin_token_ids}
    answer = s2t.client.request("POST", "/v1/completions", {
        "model": s2t._served_models()[0], "prompt": list(PROMPTS[0]), "max_tokens": 8, "temperature": 0,
        "logit_bias": bias, "logprobs": 1, "return_tokens_as_token_ids": True,
    })
    tokens = [int(t.split(":")[1]) for t in answer["choices"][0]["logprobs"]["tokens"]]
    assert tokens and not set(tokens) & set(selector.reserved_token_ids)


def test_a_server_without_the_processor_is_refused(served, engine):
    _, export, _, _, tokenizer = served
    # the remote-teacher tests' server serves a plain checkpoint, without the processor
    manifest = ServingManifest.from_pretrained(export.model_dir)
    config = S2TConfig.from_dict({**export.config.to_dict(), "trigger": "always"})
    s2t = ServedS2T(engine.url, config, manifest, tokenizer)
    with pytest.raises(ServedS2TError, match="--logits-processors"):
        s2t.generate([list(PROMPTS[0])], max_new_tokens=4)


def test_zz_killed_server_mid_request_raises_a_clear_error(served):
    server, *_ = served
    s2t = client(served, trigger="always", warmup_tokens=0, top_k=4, selection="local")
    s2t.client.max_retries = 0
    s2t.generate([list(PROMPTS[0])], max_new_tokens=2)  # checked and connected
    killer = threading.Timer(0.3, server.stop)
    killer.start()
    with pytest.raises(ServedS2TError, match="did not answer|rejected"):
        for _ in range(200):
            s2t.generate([list(p) for p in PROMPTS], max_new_tokens=64)
            time.sleep(0.05)
    killer.join()
