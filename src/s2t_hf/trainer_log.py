"""Where a trainer's logs go: a file of JSON lines instead of the console ([`~s2t_hf.S2TTrainer.log_to_file`])."""

from __future__ import annotations

import json
import os

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


__all__ = ["LogFileCallback", "ProgressWithoutLogs"]


class ProgressWithoutLogs(ProgressCallback):
    """transformers' progress bars, without the log dictionaries that `ProgressCallback` writes between them."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None


class LogFileCallback(TrainerCallback):
    """
    Appends each log of the trainer (loss, learning rate, evaluation metrics) to `path` as one JSON line, with its
    step.

    Args:
        path (`str` or `os.PathLike`):
            The file to append to; its folder is created.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        record = {"step": state.global_step, **{k: v for k, v in logs.items() if k != "total_flos"}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
