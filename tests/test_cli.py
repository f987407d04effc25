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
    """The command's JSON summary: its whole output, or its last line where the trainer logged before it."""
    main([str(a) for a in argv])
    out = capsys.readouterr().out
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        return json.loads(out.strip().splitlines()[-1])


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
    # the entropy trigger needs no teacher: the same threshold without one; the KL trigger refuses to go without
    alone = run(
        capsys, "calibrate", "--model", model_dirs / "student", "--prompts", tmp_path / "prompts.json", "--rate", 0.3,
        "--max-new-tokens", 6, "--output-dir", tmp_path / "alone",
    )  # fmt: skip
    assert alone["threshold"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(SystemExit, match="`--trigger kl` needs `--teacher`"):
        main(["calibrate", "--model", str(model_dirs / "student"), "--prompts", str(tmp_path / "prompts.json"),
              "--trigger", "kl", "--output-dir", "x"])


def test_evaluate_greedy_and_s2t_local(model_dirs, capsys, monkeypatch):
    from s2t_hf.tasks import solutions

    # half of the completions replaced by right solutions: the reported accuracy counts exactly the right answers
    real = solutions.generate_solutions
    seen = {}

    def half_right(model, tokenizer, problems, **kwargs):
        completions = real(model, tokenizer, problems, **kwargs)
        completions = [p.solution if i % 2 == 0 else c for i, (c, p) in enumerate(zip(completions, problems))]
        seen["correct"] = sum(check_answer(c, p.answer) for c, p in zip(completions, problems))
        return completions

    monkeypatch.setattr(solutions, "generate_solutions", half_right)
    rows = run(capsys, "evaluate", "--model", model_dirs / "student", "--num-problems", 6, "--batch-size", 4,
               "--max-new-tokens", 12)
    assert list(rows) == ["Greedy"] and rows["Greedy"]["accuracy"] == seen["correct"] / 6 >= 0.5
    assert rows["Greedy"]["seconds"] > 0
    monkeypatch.setattr(solutions, "generate_solutions", real)

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


def test_collect_train_and_evaluate_with_a_learned_trigger(model_dirs, capsys, tmp_path):
    """`collect --trajectories` -> `train --learned-trigger --trigger-rate` -> the saved selector decodes with the
    learned trigger at its fitted threshold, which `evaluate` uses as saved."""
    from datasets import load_from_disk

    from s2t_hf.learned_trigger import trigger_signals
    from s2t_hf.tasks import generate_problems

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(p.text for p in generate_problems(24, "train", seed=0)))
    data, out = tmp_path / "data", tmp_path / "selector"
    collected = run(
        capsys, "collect", "--model", model_dirs / "student", "--teacher", model_dirs / "teacher", "--prompts",
        prompts, "--top-k", 8, "--max-new-tokens", 10, "--fraction", 0.5, "--output-dir", data, "--trajectories",
    )  # fmt: skip
    assert collected["trajectories"] == 24 and collected["groups"] > 0
    trained = run(
        capsys, "train", "--model", model_dirs / "student", "--data", data, "--num-bins", 4, "--epochs", 1,
        "--output-dir", out, "--learned-trigger", "--trigger-rate", 0.2,
    )  # fmt: skip
    assert set(trained["trigger_auroc"]) == {"learned", "entropy", "kl"}
    config = S2TConfig.from_pretrained(out)
    assert config.trigger == "learned" and config.trigger_threshold == pytest.approx(trained["trigger_threshold"])
    # the saved row fires on ~20% of the trajectories' positions, as fitted
    student = AutoModelForCausalLM.from_pretrained(model_dirs / "student")
    selector = S2TSelector.from_pretrained(student, out)
    signals = trigger_signals(selector, load_from_disk(str(data / "trajectories")))
    assert abs(float((signals["learned"] > config.trigger_threshold).double().mean()) - 0.2) < 0.05
    rows = run(capsys, "evaluate", "--model", model_dirs / "student", "--selector", out, "--num-problems", 6,
               "--max-new-tokens", 12, "--batch-size", 4)
    local = rows["S2T-Local"]
    assert local["trigger_threshold"] == pytest.approx(config.trigger_threshold) and local["triggers"] > 0


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
    with pytest.raises(SystemExit, match="`--trigger kl` needs `--teacher`"):
        cli.main(["calibrate", "--model", str(checkpoint), "--prompts", str(prompts), "--trigger", "kl",
                  "--output-dir", out])
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
    with pytest.raises(SystemExit, match="`--trajectories` needs `--mode teacher_forced`"):
        cli.main(["collect", "--model", str(checkpoint), "--teacher", str(checkpoint), "--prompts", str(prompts),
                  "--mode", "on_policy", "--trajectories", "--output-dir", out])
    with pytest.raises(SystemExit, match="holds none; collect with `s2t-hf collect --trajectories`"):
        cli.main(["train", "--model", str(checkpoint), "--data", str(data), "--output-dir", out, "--learned-trigger"])
    with pytest.raises(SystemExit, match="`--trigger-rate` sets the learned trigger's threshold; add"):
        cli.main(["train", "--model", str(checkpoint), "--data", str(data), "--output-dir", out, "--trigger-rate", "0.1"])
    narrow = tmp_path / "narrow"  # trajectories collected with `--top-k 4`, for a selector of K=8
    Dataset.from_dict({"context_ids": [[3]], "cand_ids": [[4, 5]], "teacher_probs": [[0.5, 0.5]]}).save_to_disk(
        str(narrow)
    )
    Dataset.from_dict({"cand_ids": [[[4, 5, 6, 7]]]}).save_to_disk(str(narrow / "trajectories"))
    with pytest.raises(SystemExit, match="collected with `--top-k 4`, but the learned trigger is fit for the selector's K=8"):
        cli.main(["train", "--model", str(checkpoint), "--data", str(narrow), "--output-dir", out, "--learned-trigger"])


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


def test_train_defaults_follow_the_recipe(model_dirs, capsys, tmp_path, monkeypatch):
    """`s2t-hf train` defaults to the residual form and a cache-preserving selector active only while it scores (the
    recipe of docs/settings.md), holds out whole prompts, and still offers the paper's form."""
    from s2t_hf import trainer as trainer_module
    from s2t_hf.tasks import generate_problems

    seen = {}

    class Trainer(trainer_module.S2TTrainer):
        def __init__(self, **kwargs):
            seen["args"], seen["split"] = kwargs["args"], (kwargs["train_dataset"], kwargs["eval_dataset"])
            super().__init__(**kwargs)

    monkeypatch.setattr(trainer_module, "S2TTrainer", Trainer)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(p.text for p in generate_problems(20, "train", seed=1)))
    data = tmp_path / "data"
    run(capsys, "collect", "--model", model_dirs / "student", "--teacher", model_dirs / "teacher", "--prompts", prompts,
        "--top-k", 8, "--max-new-tokens", 8, "--fraction", 0.5, "--output-dir", data)
    student = AutoModelForCausalLM.from_pretrained(model_dirs / "student")
    common = ["train", "--model", model_dirs / "student", "--data", data, "--num-bins", 4, "--epochs", 1]

    run(capsys, *common, "--output-dir", tmp_path / "recipe")
    config = S2TConfig.from_pretrained(tmp_path / "recipe")
    assert (config.scoring, config.adapter_mode) == ("residual", "scoring")
    assert S2TSelector.from_pretrained(student, tmp_path / "recipe").preserves_cache
    assert (tmp_path / "recipe" / "trainer_log.jsonl").is_file()  # the trainer's logs, not on the console
    assert seen["args"].learning_rate == 1e-3 and seen["args"].per_device_train_batch_size == 8
    assert seen["args"].teacher_kl_weight == 1.0 and seen["args"].lm_kl_weight == 0.0
    assert not seen["args"].group_by_prompt
    train, held_out = seen["split"]
    assert len(held_out) > 0 and not set(train["prompt_index"]) & set(held_out["prompt_index"])
    assert len(set(held_out["prompt_index"])) == 2  # 10% of the 20 prompts

    student = AutoModelForCausalLM.from_pretrained(model_dirs / "student")
    run(capsys, *common, "--output-dir", tmp_path / "paper", "--scoring", "pure", "--no-preserve-cache",
        "--group-by-prompt")
    assert seen["args"].group_by_prompt
    config = S2TConfig.from_pretrained(tmp_path / "paper")
    assert (config.scoring, config.adapter_mode) == ("pure", "generate")
    assert not S2TSelector.from_pretrained(student, tmp_path / "paper").preserves_cache
    assert seen["args"].learning_rate == 5e-5 and seen["args"].lm_kl_weight == 0.1

    # the residual form on the student's own log-probabilities: only with the adapter off while generating
    with pytest.raises(SystemExit, match=r"`residual_log_probs='student'` needs `adapter_mode='scoring'`"):
        main([str(a) for a in [*common, "--output-dir", tmp_path / "refused", "--residual-log-probs", "student",
                               "--no-preserve-cache"]])
    run(capsys, *common, "--output-dir", tmp_path / "anchored", "--residual-log-probs", "student")
    config = S2TConfig.from_pretrained(tmp_path / "anchored")
    assert (config.residual_log_probs, config.adapter_mode) == ("student", "scoring")


def test_collect_with_a_teacher_of_another_tokenizer(model_dirs, capsys, tmp_path):
    """`collect --teacher-tokenizer` scores the student's candidates as text under the teacher's own tokenizer, as
    `collect_selection_data` does with `LocalTeacher(model, tokenizer=...)`; `--signal kl` is refused for it."""
    from datasets import load_from_disk
    from tokenizer_pair import sentencepiece_unigram

    from s2t_hf import collect_selection_data
    from s2t_hf.teachers import LocalTeacher

    teacher_tokenizer = sentencepiece_unigram()
    teacher_dir = tmp_path / "gemma_like"
    tiny_model("llama", seed=3, vocab_size=len(teacher_tokenizer)).save_pretrained(teacher_dir)
    teacher_tokenizer.save_pretrained(teacher_dir)
    texts = ["tom has 5 apples .", "ann has 3 pens and 2 cups .", "bob has 7 cups ."]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(texts))
    common = ["collect", "--model", model_dirs / "student", "--teacher", teacher_dir, "--prompts", prompts,
              "--top-k", 4, "--max-new-tokens", 8, "--fraction", 0.5]
    with pytest.raises(SystemExit, match="`--signal kl` compares the two models token by token"):
        main([str(a) for a in [*common, "--teacher-tokenizer", teacher_dir, "--signal", "kl", "--output-dir",
                               tmp_path / "kl"]])
    out = run(capsys, *common, "--teacher-tokenizer", teacher_dir, "--output-dir", tmp_path / "groups")
    assert out["groups"] > 0
    student = AutoModelForCausalLM.from_pretrained(model_dirs / "student")
    tokenizer = AutoTokenizer.from_pretrained(model_dirs / "student")
    teacher = LocalTeacher(AutoModelForCausalLM.from_pretrained(teacher_dir), tokenizer=teacher_tokenizer)
    expected = collect_selection_data(
        student, teacher, tokenizer, texts, top_k=4, fraction=0.5, signal="entropy", max_new_tokens=8
    )
    got = load_from_disk(str(tmp_path / "groups"))
    assert got["cand_ids"] == expected["cand_ids"]
    assert torch.allclose(torch.tensor(got["teacher_probs"]), torch.tensor(expected["teacher_probs"]), atol=1e-6)


def test_collect_names_its_collection_and_resumes_or_starts_over(model_dirs, capsys, tmp_path):
    """`--collection-id` is part of what must match to resume: another id is refused naming it, `--resume no`
    starts over under the new id, and `--resume yes` (the default) with the same id goes on (the same groups)."""
    from s2t_hf.tasks import generate_problems

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(p.text for p in generate_problems(6, "train", seed=2)))
    common = ["collect", "--model", model_dirs / "student", "--teacher", model_dirs / "teacher", "--prompts", prompts,
              "--top-k", 4, "--max-new-tokens", 6, "--fraction", 0.5, "--output-dir", tmp_path / "data"]
    first = run(capsys, *common, "--collection-id", "run-1")
    with pytest.raises(ValueError, match="collection_id"):
        run(capsys, *common, "--collection-id", "run-2")
    again = run(capsys, *common, "--collection-id", "run-2", "--resume", "no")
    assert again == first
    assert json.loads((tmp_path / "data" / "collection.json").read_text())["identity"]["collection_id"] == "run-2"
    assert run(capsys, *common, "--collection-id", "run-2") == first
