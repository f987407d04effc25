"""The `s2t-hf` command line: what `calibrate` and `evaluate` compute, what it refuses before any work, and that it
never runs a checkpoint's custom code."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import custom_code_checkpoint, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from s2t_hf import S2TConfig, S2TLogitsProcessor, S2TSelector
from s2t_hf import cli
from s2t_hf.cli import main
from s2t_hf.tasks import build_tokenizer, check_answer, padded_vocab_size


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A student and a teacher (tiny Llamas over the task's tokenizer) and a selector without a trigger threshold."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = build_tokenizer()
    for seed, name in ((0, "student"), (1, "teacher")):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=padded_vocab_size(len(tokenizer)), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        )  # fmt: skip
        AutoModelForCausalLM.from_config(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    student = AutoModelForCausalLM.from_pretrained(root / "student")
    selector = S2TSelector.create(
        student, tokenizer, num_bins=8, use_lora=False, config=S2TConfig(selection="local", trigger="entropy")
    )
    selector.save_pretrained(root / "selector")  # as `s2t-hf train` saves it: no threshold
    return root


def run(capsys, *argv) -> dict:
    main([str(a) for a in argv])
    return json.loads(capsys.readouterr().out)


def test_calibrate_formats_chat_prompts_with_the_template(model_dirs, capsys, tmp_path):
    texts = ["tom has 5 apples .", "ann has 3 pens and 2 cups .", "bob has 7 cups ."]
    prompts = [[{"role": "user", "content": texts[0]}], texts[1], [{"role": "user", "content": texts[2]}]]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = run(
        capsys, "calibrate", "--model", model_dirs / "student", "--teacher", model_dirs / "teacher", "--prompts",
        tmp_path / "prompts.json", "--rate", 0.3, "--max-new-tokens", 6, "--output-dir", tmp_path / "config",
    )  # fmt: skip
    # reference: the processor calibrated on the templated prompts directly
    tokenizer = AutoTokenizer.from_pretrained(model_dirs / "student")
    student = AutoModelForCausalLM.from_pretrained(model_dirs / "student")
    teacher = AutoModelForCausalLM.from_pretrained(model_dirs / "teacher")
    ids = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, return_dict=False)
        for t in texts
    ]
    with S2TLogitsProcessor(student, teacher=teacher, trigger="entropy", selection="teacher", tokenizer=tokenizer) as s2t:
        expected = s2t.calibrate(ids, target_rate=0.3, tokenizer=tokenizer, max_new_tokens=6)
    assert out["threshold"] == pytest.approx(expected, abs=1e-6)
    assert S2TConfig.from_pretrained(tmp_path / "config").trigger_threshold == pytest.approx(expected, abs=1e-6)
    with pytest.raises(SystemExit):  # the teacher is required (argparse's usage error)
        main(["calibrate", "--model", str(model_dirs / "student"), "--prompts", "p.txt", "--output-dir", "x"])


def test_evaluate_greedy_and_s2t_local(model_dirs, capsys, monkeypatch):
    from s2t_hf.tasks import pair

    # half of the completions replaced by right solutions: the reported accuracy counts exactly the right answers
    real = pair.generate_solutions
    seen = {}

    def half_right(model, tokenizer, problems, **kwargs):
        completions = real(model, tokenizer, problems, **kwargs)
        completions = [p.solution if i % 2 == 0 else c for i, (c, p) in enumerate(zip(completions, problems))]
        seen["correct"] = sum(check_answer(c, p.answer) for c, p in zip(completions, problems))
        return completions

    monkeypatch.setattr(pair, "generate_solutions", half_right)
    rows = run(capsys, "evaluate", "--model", model_dirs / "student", "--num-problems", 6, "--batch-size", 4,
               "--max-new-tokens", 12)
    assert list(rows) == ["Greedy"] and rows["Greedy"]["accuracy"] == seen["correct"] / 6 >= 0.5
    assert rows["Greedy"]["seconds"] > 0
    monkeypatch.setattr(pair, "generate_solutions", real)

    common = ("evaluate", "--model", model_dirs / "student", "--selector", model_dirs / "selector", "--num-problems", 6,
              "--max-new-tokens", 12)
    with pytest.raises(SystemExit, match="has no threshold; pass `--trigger-rate`"):
        run(capsys, *common)
    rows = run(capsys, *common, "--trigger-rate", 0.3, "--num-calibration", 8, "--batch-size", 4)
    local = rows["S2T-Local"]
    assert 0.0 <= local["accuracy"] <= 1.0 and local["trigger_threshold"] is not None and local["triggers"] > 0
    assert not any(key.endswith("_per_row") for key in local)
    with pytest.raises(SystemExit, match="`--num-problems` must be at least 1"):
        main(["evaluate", "--model", str(model_dirs / "student"), "--num-problems", "0"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny student with the arithmetic task's tokenizer, saved like a Hub checkpoint."""
    path = tmp_path_factory.mktemp("student")
    tokenizer = build_tokenizer()
    tiny_model("llama", seed=0, vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_refused_before_any_work(checkpoint, tmp_path):
    from datasets import Dataset

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tom has 5 apples .\n")
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as refused:  # argparse: "the following arguments are required: --teacher"
        cli.main(["calibrate", "--model", str(checkpoint), "--prompts", str(prompts), "--trigger", "kl",
                  "--output-dir", out])
    assert refused.value.code == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SystemExit, match="`.*empty.txt` holds no prompts"):
        cli.main(["calibrate", "--model", str(checkpoint), "--teacher", str(checkpoint), "--prompts", str(empty),
                  "--output-dir", out])
    data = tmp_path / "groups"
    Dataset.from_dict({"context_ids": [], "cand_ids": [], "teacher_probs": []}).save_to_disk(str(data))
    with pytest.raises(SystemExit, match="holds no selection groups; collect some with `s2t-hf collect`"):
        cli.main(["train", "--model", str(checkpoint), "--data", str(data), "--output-dir", out])
    unfinished = tmp_path / "unfinished"  # an interrupted `s2t-hf collect`: finished shards, no dataset yet
    unfinished.mkdir()
    (unfinished / "collection.json").write_text('{"format": 1, "complete": false}')
    with pytest.raises(SystemExit, match="holds an unfinished collection; run `s2t-hf collect` again"):
        cli.main(["train", "--model", str(checkpoint), "--data", str(unfinished), "--output-dir", out])


def test_custom_code_of_a_checkpoint_never_runs(checkpoint, tmp_path, monkeypatch):
    custom = custom_code_checkpoint(tmp_path / "custom")
    monkeypatch.setattr("builtins.input", lambda *args: "y")  # no prompt asks for it (the user would say yes)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tom has 5 apples .\n")
    common = ["--prompts", str(prompts), "--teacher", str(checkpoint), "--output-dir", str(tmp_path / "out")]
    for arguments in (["--model", str(custom)], ["--model", str(checkpoint), "--tokenizer", str(custom)]):
        with pytest.raises(ValueError, match="(?s)contains custom code.*trust_remote_code"):
            cli.main(["calibrate", *arguments, *common])
    assert not (custom / "RAN").exists()
