"""`S2TConfig`: every validation error names its field, JSON round trips, and damaged or foreign files are refused."""

from __future__ import annotations

import json

import pytest

from s2t_hf import S2TConfig
from s2t_hf.config import CONFIG_NAME


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(trigger="sometimes"), "`trigger` must be one of"),
        (dict(selection="vote"), "`selection` must be one of"),
        (dict(scoring="mixed"), "`scoring` must be one of"),
        (dict(local_path="fast"), "`local_path` must be one of"),
        (dict(adapter_mode="always"), "`adapter_mode` must be one of"),
        (dict(top_k=0), "`top_k` must be a positive integer, got 0"),
        (dict(top_k=2.5), "`top_k` must be a positive integer, got 2.5"),
        (dict(signal_top_k=0), "`signal_top_k` must be a positive integer"),
        (dict(num_bins=0), "`num_bins` must be a positive integer"),
        (dict(top_k=1), "`top_k` must be at least 2 to leave a choice, got 1"),
        (dict(warmup_tokens=-1), "`warmup_tokens` must be a non-negative integer, got -1"),
        (dict(trigger_rate=1.5), r"`trigger_rate` must lie in \[0, 1\], got 1.5"),
        (dict(trigger="random"), "The `random` trigger needs `trigger_rate`"),
        (dict(candidate_ratio=0.0), r"`candidate_ratio` must lie in \(0, 1\], got 0.0"),
        (dict(residual_tau=0.0), "`residual_tau` must be positive, got 0.0"),
        (dict(residual_log_probs="teacher"), "`residual_log_probs` must be one of"),
        (dict(residual_log_probs="student"), r"`residual_log_probs='student'` needs `adapter_mode='scoring'`"),
        (dict(max_context=0), "`max_context` must be a positive integer or None, got 0"),
        (dict(num_bins=3, bin_token_ids=[1, 2]), "`bin_token_ids` has 2 ids but `num_bins` is 3"),
        (dict(num_bins=2, bin_token_ids=[5, 5]), r"`bin_token_ids` must be distinct, got \[5, 5\]"),
        (dict(num_bins=2, bin_values=[0.0, 0.5, 1.0]), "`bin_values` has 3 values but `num_bins` is 2"),
    ],
)
def test_every_invalid_field_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        S2TConfig(**kwargs)
    # the same value read from a saved file is refused alike
    with pytest.raises(ValueError, match=message):
        S2TConfig.from_dict({**S2TConfig().to_dict(), **kwargs})


def test_damaged_or_foreign_config_files(tmp_path):
    path = tmp_path / CONFIG_NAME
    path.write_text('{"trigger": "entropy",')  # truncated
    with pytest.raises(ValueError, match=rf"`{path}` is not valid JSON .* re-save"):
        S2TConfig.from_pretrained(tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        S2TConfig.from_pretrained(tmp_path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=f"No `{CONFIG_NAME}` in .* written by `save_pretrained`"):
        S2TConfig.from_pretrained(tmp_path)


def test_paths_that_are_no_saved_directory(tmp_path):
    S2TConfig().save_pretrained(tmp_path)
    with pytest.raises(NotADirectoryError, match="is a file; pass the directory"):
        S2TConfig.from_pretrained(tmp_path / CONFIG_NAME)
    with pytest.raises(FileNotFoundError, match="does not exist: no such local directory"):
        S2TConfig.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        S2TConfig.from_pretrained("./not/here")


def test_unknown_keys_warn_and_are_ignored(tmp_path):
    config = S2TConfig(trigger="kl", trigger_threshold=0.5)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config.to_dict(), "future_field": 3, "s2t_hf_version": "9.0"}))
    with pytest.warns(UserWarning, match=r"Ignoring unknown keys \['future_field'\] .*\(written by s2t_hf 9.0"):
        loaded = S2TConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()  # to_dict stamps the running version
