"""The installed package as a downstream user gets it (run by `scripts/wheel_check.sh` in a fresh venv holding only
the wheel and its dependencies, from a folder outside the repository, offline): the README's examples on tiny models
built from configs, the fused loop and its `custom_generate` folder, and the metrics shipped as package data.

Exits non-zero (an `AssertionError` or the exception) when anything fails.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig


def main() -> None:
    import s2t_hf
    from s2t_hf import S2TConfig, S2TLogitsProcessor, S2TSelector, encode_prompts
    from s2t_hf.generation import CUSTOM_GENERATE_PATH, generate_batched
    from s2t_hf.metrics import load_metric, metric_path
    from s2t_hf.tasks import build_tokenizer, padded_vocab_size

    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    where = os.path.realpath(s2t_hf.__file__)
    assert where.startswith(site + os.sep), f"s2t_hf imported from {where}, not from the venv's {site}"
    assert os.environ.get("HF_HUB_OFFLINE") == "1", "run offline: HF_HUB_OFFLINE=1"
    print(f"s2t_hf {s2t_hf.__version__} from {os.path.dirname(where)}")

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=padded_vocab_size(len(tokenizer)), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(config).eval()
    teacher = AutoModelForCausalLM.from_config(config).eval()
    inputs = encode_prompts(["tom has 5 apples .", "ann has 3 pens and 2 cups ."], tokenizer)
    unused = list(range(len(tokenizer), config.vocab_size))
    gen = dict(max_new_tokens=8, do_sample=False, suppress_tokens=unused, pad_token_id=tokenizer.pad_token_id)

    with tempfile.TemporaryDirectory() as tmp:
        # a selector saved as training saves one (PEFT adapter files + s2t_config.json), loaded onto a fresh student
        student.save_pretrained(os.path.join(tmp, "student"))
        trained = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "student"))
        selector = S2TSelector.create(
            trained, tokenizer, num_bins=8, use_lora=True, lora_r=4,
            config=S2TConfig(selection="local", trigger="entropy", trigger_threshold=0.0),
        )  # fmt: skip
        selector.save_pretrained(os.path.join(tmp, "selector"))
        model = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "student")).eval()

        # the README's two lines
        s2t = S2TLogitsProcessor.from_pretrained(os.path.join(tmp, "selector"), model=model)
        out = model.generate(**inputs, logits_processor=[s2t], **gen)
        assert out.shape[0] == 2 and out.shape[1] > inputs["input_ids"].shape[1]
        assert s2t.stats["triggers"] > 0, s2t.stats
        # the fused loop and the shipped `custom_generate` folder give the same tokens
        assert torch.equal(s2t_hf.generate(model, s2t, **inputs, **gen), out)
        recipe = model.generate(
            **inputs, custom_generate=CUSTOM_GENERATE_PATH, trust_remote_code=True, s2t=s2t, **gen
        )
        assert torch.equal(recipe, out)
        s2t.remove_hooks()
        triggers = s2t.stats["triggers"]
        print(f"S2T-Local from a saved selector: {triggers} triggers; the fused loop and custom_generate agree")

    # the README's teacher example
    s2t = S2TLogitsProcessor(student, teacher=teacher, trigger="entropy", selection="teacher", top_k=8)
    threshold = s2t.calibrate(
        ["tom has 5 apples .", "bob has 2 cups ."], target_rate=0.2, tokenizer=tokenizer, max_new_tokens=8
    )
    texts = generate_batched(
        student, ["ann has 3 pens ."], tokenizer, logits_processor=[s2t], show_progress=False, **gen
    )
    assert len(texts) == 1 and s2t.stats["eligible_steps"] > 0, s2t.stats
    s2t.remove_hooks()
    print(f"S2T with a teacher: threshold {threshold:.3f}, {s2t.stats['triggers']} triggers in {texts[0]!r}")

    # the metrics: `evaluate` modules shipped in the wheel, loaded from site-packages offline
    for name in ("hit_at_k", "answer_accuracy"):
        assert os.path.realpath(metric_path(name)).startswith(site + os.sep), metric_path(name)
    hit = load_metric("hit_at_k").compute(predictions=[[5, 3, 9], [1, 2, 4]], references=[3, 7], ks=[1, 2])
    assert hit == {"hit@1": 0.0, "hit@2": 0.5}, hit
    accuracy = load_metric("answer_accuracy").compute(predictions=["7", "3"], references=["7", "4"])
    assert accuracy["accuracy"] == 0.5, accuracy
    print(f"metrics offline: {hit}, {accuracy}")
    print("wheel smoke test passed")


if __name__ == "__main__":
    sys.exit(main())
