"""The `s2t-hf` command line: what it refuses before any work, and that it never runs a checkpoint's custom code."""

from __future__ import annotations

import pytest
from conftest import custom_code_checkpoint, tiny_model

from s2t_hf import cli


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny student with the arithmetic task's tokenizer, saved like a Hub checkpoint."""
    from s2t_hf.tasks import build_tokenizer

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
        cli.main(["calibrate", "--model", str(checkpoint), "--prompts", str(empty), "--output-dir", out])
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
    common = ["--prompts", str(prompts), "--output-dir", str(tmp_path / "out")]
    for arguments in (["--model", str(custom)], ["--model", str(checkpoint), "--tokenizer", str(custom)]):
        with pytest.raises(ValueError, match="(?s)contains custom code.*trust_remote_code"):
            cli.main(["calibrate", *arguments, *common])
    assert not (custom / "RAN").exists()
