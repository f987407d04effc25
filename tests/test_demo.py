"""`s2t-hf demo` end to end at toy sizes (a 4-step pair, a dozen problems): every stage runs and writes its outputs."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from s2t_hf import S2TLogitsProcessor
from s2t_hf.demo import DemoConfig, _split_by_prompt, format_table, run_demo


TINY_PAIR = dict(
    teacher_max_steps=4, student_max_steps=4, eval_steps=2, student_eval_steps=2, eval_problems=4, test_problems=4,
    batch_size=4, warmup_steps=1, parallel=False,
)  # fmt: skip


def test_split_by_prompt_keeps_prompts_on_one_side():
    from datasets import Dataset

    dataset = Dataset.from_dict({"prompt_index": [i // 3 for i in range(60)], "step": list(range(60))})
    split = _split_by_prompt(dataset, num_dev_groups=9, seed=0)
    train, dev = set(split["train"]["prompt_index"]), set(split["test"]["prompt_index"])
    assert not train & dev and len(split["train"]) + len(split["test"]) == 60
    assert len(dev) == 3  # 9 groups at 3 per prompt
    with pytest.raises(ValueError, match="more training problems"):
        _split_by_prompt(Dataset.from_dict({"prompt_index": [0]}), 1, 0)


def test_format_table_reports_gains_and_ratios():
    results = {
        "methods": {
            "Greedy": {"accuracy": 0.5, "seconds": 2.0, "latency_seconds": 4.0},
            "S2T (entropy)": {
                "accuracy": 0.75, "seconds": 3.0, "latency_seconds": 5.0, "latency_ratio": 1.3,
                "latency_per_token_ratio": 1.1, "trigger_rate": 0.1,
            },
            "Teacher greedy": {"accuracy": 0.9, "seconds": 2.5},
        }
    }
    lines = format_table(results).splitlines()
    assert lines[3] == "| S2T (entropy) | 75.0% | +50.0% | 3.0 | 1.50 | 5.0 | 1.30 | 1.10 | 0.100 |"
    assert lines[4] == "| Teacher greedy | 90.0% | +80.0% | 2.5 | 1.25 | – | – | – | – |"


def disagreeing_toy_pair(pair_dir):
    """The toy pair (4 training steps each) with its teacher's matrices redrawn at random: two near-initial models rank
    tokens alike (both emit the most frequent token), which would leave the learned trigger nothing to fit on."""
    from s2t_hf.tasks import PairTrainingConfig, load_pair, train_pair

    train_pair(pair_dir, config=PairTrainingConfig.from_dict(TINY_PAIR))
    teacher, _, _ = load_pair(pair_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in teacher.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    teacher.save_pretrained(pair_dir / "teacher")


def test_demo_runs_every_stage_at_toy_size(tmp_path):
    disagreeing_toy_pair(tmp_path / "pair")
    config = DemoConfig(
        output_dir=str(tmp_path / "out"), pair_dir=str(tmp_path / "pair"), pair_settings=TINY_PAIR, num_test=12,
        num_calibration=8, num_train_problems=24, num_dev_groups=8, maj_samples=2, num_latency=2, batch_size=8,
        selector_epochs=1, forms=("residual",), trigger_label="flip", sweep_rates=(0.05, 0.1),
    )  # fmt: skip
    results = run_demo(config)

    names = list(results["methods"])
    expected = ["Greedy", "Teacher greedy", "Maj@2 (T=0.7)", "Maj@2 (T=0.3)", "S2T (entropy)", "S2T (kl)",
                "S2T (learned)", "S2T (learned, half rate)", "Takeover (entropy)", "Takeover (kl)",
                "S2T-Local residual (entropy)", "S2T-Local residual (kl)", "S2T-Local residual (learned)",
                "S2T-Local residual (learned, half rate)", "Greedy with residual adapter (LoRA on)"]  # fmt: skip
    assert names == expected  # the learned rows sit next to their method's other triggers
    report = results["learned_trigger"]["residual"]
    assert report["label"] == "flip" and report["positions"]["fit"] > 0
    assert set(results["targets"]) == {"best_local", "auroc", "s2t_half_rate"}
    sweep = results["rate_sweep"]
    assert set(sweep) == {"S2T", "S2T-Local residual"} and set(sweep["S2T"]) == {"entropy", "learned"}
    for points in (p for by_trigger in sweep.values() for p in by_trigger.values()):
        assert [p["target_rate"] for p in points] == [0.05, 0.1]
    # the sweep reuses the table's rows at the demo's rate (and half of it for the learned trigger)
    assert sweep["S2T"]["learned"][0]["accuracy"] == results["methods"]["S2T (learned, half rate)"]["accuracy"]
    assert sweep["S2T"]["entropy"][1]["accuracy"] == results["methods"]["S2T (entropy)"]["accuracy"]
    for name, row in results["methods"].items():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["seconds"] > 0
        if "half rate" in name:  # timed per request at the demo's rate only
            assert "latency_seconds" not in row
        else:
            assert row["latency_seconds"] > 0 and row["latency_ratio"] > 0 and row["latency_per_token_ratio"] > 0
    for name in ("S2T (entropy)", "S2T-Local residual (entropy)"):
        assert 0.0 < results["methods"][name]["trigger_rate"] < 1.0
    # the demo's selector scores on the student's live cache (cache-preserving LoRA, adapter active only to score)
    assert results["methods"]["S2T-Local residual (entropy)"]["local_path"] == "cache"
    for kind in ("entropy", "kl"):
        hits = [results["hit_at_k"][kind][f"hit@{k}"] for k in (1, 2, 4, 8, 16)]
        assert hits == sorted(hits) and results["hit_at_k"][kind]["steps"] > 0

    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text())["methods"].keys() == results["methods"].keys()
    if importlib.util.find_spec("matplotlib") is not None:
        for plot in ("hit_at_k.png", "methods.png", "trigger_rates.png"):
            assert (out / plot).stat().st_size > 0

    # the saved selector loads in two lines and generates
    from s2t_hf.tasks import load_pair

    _, student, tokenizer = load_pair(tmp_path / "pair")
    with S2TLogitsProcessor.from_pretrained(out / "selector-residual", model=student) as s2t:
        assert s2t.config.adapter_mode == "scoring" and s2t.config.trigger_threshold is not None
        assert s2t.config.trigger == "learned"
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "tom has 3 apples ."}], add_generation_prompt=True, return_tensors="pt"
        )
        prompt = prompt["input_ids"] if not isinstance(prompt, torch.Tensor) else prompt
        student.generate(prompt, logits_processor=[s2t], max_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
