"""A teacher/student pair of tiny Llama models trained from scratch on the arithmetic task, cached on disk.

[`train_pair`] trains a ~150K-parameter teacher and a ~62K-parameter student with `transformers.Trainer` on a fresh
stream of training problems, evaluates greedy accuracy on validation problems as it goes, keeps the teacher's best
checkpoint and the student checkpoint whose accuracy sits in a target window well below the teacher (so that
selection has something to fix), and saves both with the tokenizer. A second call with the same settings loads the
cache instead ([`load_pair`]). By default the two models train in two processes at once, one CPU thread each.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging

from ..version import __version__
from .pair_config import PAIR_INFO_NAME, ROLES, PairTrainingConfig, default_pair_dir
from .pair_training import train_one
from .tokenizer import build_tokenizer, padded_vocab_size


__all__ = ["load_pair", "train_pair"]

logger = logging.get_logger(__name__)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run_workers(settings: PairTrainingConfig, output_dir: Path) -> dict[str, dict[str, Any]]:
    """Train teacher and student in two worker processes, showing one progress bar."""
    settings_file = output_dir / ".settings.json"
    settings_file.write_text(json.dumps(settings.to_dict()))
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", str(settings.num_threads or 1))
    processes, logs = {}, {}
    for role in ROLES:
        logs[role] = open(output_dir / f"train_{role}.log", "w")
        processes[role] = subprocess.Popen(
            [
                sys.executable, "-m", "s2t_hf.tasks._pair_worker", role, str(settings_file), str(output_dir),
                "--parent-pid", str(os.getpid()),
            ],
            stdout=logs[role],
            stderr=subprocess.STDOUT,
            env=env,
        )
    total = settings.teacher_max_steps + settings.student_max_steps
    bar = logging.tqdm(total=total, desc="training arithmetic pair", unit="step")
    try:
        while any(p.poll() is None for p in processes.values()):
            time.sleep(2.0)
            progress = {r: _read_json(output_dir / f".progress_{r}.json") or {} for r in ROLES}
            done = sum(
                p.get("max_steps", 0) if p.get("done") else p.get("step", 0) for p in progress.values()
            )
            bar.update(max(0, min(total, done) - bar.n))
            bar.set_postfix(
                {f"{r}_acc": f"{p['accuracy']:.2f}" for r, p in progress.items() if p.get("accuracy") is not None},
                refresh=False,
            )
        bar.update(total - bar.n)
    finally:
        bar.close()
        for process in processes.values():
            if process.poll() is None:
                process.kill()
        for log in logs.values():
            log.close()
    records = {}
    for role, process in processes.items():
        record = _read_json(output_dir / f".{role}_record.json")
        if process.returncode != 0 or record is None:
            tail = (output_dir / f"train_{role}.log").read_text()[-3000:]
            raise RuntimeError(f"Training the {role} failed (exit code {process.returncode}). Log tail:\n{tail}")
        records[role] = record
    return records


def _cut_short(info: dict[str, Any]) -> list[str]:
    """The roles of a pair's info (or records) whose training the opt-in `max_minutes` stopped."""
    return [role for role in ROLES if (info.get(role) or {}).get("stop_reason") == "max_minutes"]


def _warn_cut_short(info: dict[str, Any], settings: PairTrainingConfig, output_dir: Path) -> None:
    """Warn that the pair of `info` (trained with `settings`) was stopped by `max_minutes`, if it was."""
    roles = _cut_short(info)
    if roles:
        steps = ", ".join(
            f"the {r} at step {info[r]['steps_trained']} of {getattr(settings, f'{r}_max_steps')}" for r in roles
        )
        logger.warning(
            f"`max_minutes` ({settings.max_minutes}) stopped the training of the pair in {output_dir} before its "
            f"step and accuracy criteria: {steps}. This pair depends on the machine's speed; leave "
            "`max_minutes=None` (the default) to train the same pair on any machine."
        )


def train_pair(
    output_dir: str | os.PathLike | None = None,
    seed: int = 0,
    config: PairTrainingConfig | None = None,
    overwrite: bool = False,
) -> tuple[PreTrainedModel, PreTrainedModel, Any]:
    """
    Train (or load from the cache) the arithmetic teacher/student pair.

    The teacher (~150K parameters) trains until its validation greedy accuracy reaches `teacher_stop_accuracy` and
    keeps its best checkpoint; the student (~62K parameters) keeps, among its checkpoints whose accuracy lies in
    `[student_min_accuracy, student_max_accuracy]`, the one closest to `student_target_accuracy`. Both are evaluated
    often on validation problems, saved in safetensors with the tokenizer under `output_dir/teacher` and
    `output_dir/student`, and described in `output_dir/pair_info.json` (settings, parameter counts, validation and
    test accuracy, each model's `stop_reason`, timings). With the default settings both train at once in two
    processes (one thread each), about 12 minutes on an idle 2-core CPU. Training stops on steps and validation
    accuracy only, never on the wall clock, so a seed gives the same pair on a quiet or a loaded machine;
    `max_minutes` is an opt-in time limit that warns when it fires, and a pair it cut short is loaded from the cache
    only by a call with the same `max_minutes`.

    Args:
        output_dir (`str` or `os.PathLike`, *optional*):
            The cache directory; defaults to [`default_pair_dir`] of `seed`.
        seed (`int`, *optional*, defaults to `0`):
            Seed of everything; overrides `config.seed`.
        config (`PairTrainingConfig`, *optional*):
            Sizes and budget; defaults to `PairTrainingConfig()`.
        overwrite (`bool`, *optional*, defaults to `False`):
            Retrain even if `output_dir` holds a pair trained with other settings (a pair with the same settings is
            loaded, unless `overwrite` is set or `max_minutes` cut it short; see above).

    Returns:
        `tuple`: `(teacher, student, tokenizer)`, the models in eval mode.
    """
    settings = copy.deepcopy(config) if config is not None else PairTrainingConfig()
    settings.seed = seed
    output_dir = Path(output_dir) if output_dir is not None else default_pair_dir(seed)
    info = _read_json(output_dir / PAIR_INFO_NAME)
    if info is not None and not overwrite:
        stored = PairTrainingConfig.from_dict(info.get("settings", {}))
        if stored.cache_key() != settings.cache_key():
            raise ValueError(
                f"`output_dir` ({output_dir}) holds a pair trained with other settings. Pass `overwrite=True` to "
                "retrain it, or choose another `output_dir`."
            )
        if not _cut_short(info) or stored.max_minutes == settings.max_minutes:
            logger.info(f"Loading the cached arithmetic pair from {output_dir}.")
            _warn_cut_short(info, stored, output_dir)
            return load_pair(output_dir)
        logger.warning(
            f"The pair cached in {output_dir} was cut short by `max_minutes={stored.max_minutes}` "
            f"({', '.join(_cut_short(info))}), so it is not the run these settings ask for "
            f"(`max_minutes={settings.max_minutes}`); training it again."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / PAIR_INFO_NAME).unlink(missing_ok=True)
    started = time.monotonic()
    if settings.parallel:
        records = _run_workers(settings, output_dir)
    else:
        records = {role: train_one(role, settings, output_dir) for role in ROLES}
    _warn_cut_short(records, settings, output_dir)
    tokenizer = build_tokenizer()
    info = {
        "library_version": __version__,
        "task": "arithmetic",
        "seed": seed,
        "tokenizer_size": len(tokenizer),
        "vocab_size": padded_vocab_size(len(tokenizer), settings.spare_vocab_rows),
        "wall_seconds": round(time.monotonic() - started, 1),
        "settings": settings.to_dict(),
        **records,
    }
    tmp = output_dir / (PAIR_INFO_NAME + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, output_dir / PAIR_INFO_NAME)
    for leftover in [".settings.json", *(f".{r}_record.json" for r in ROLES), *(f".progress_{r}.json" for r in ROLES)]:
        (output_dir / leftover).unlink(missing_ok=True)
    return load_pair(output_dir)


def load_pair(path: str | os.PathLike) -> tuple[PreTrainedModel, PreTrainedModel, Any]:
    """
    Load a pair saved by [`train_pair`].

    Args:
        path (`str` or `os.PathLike`):
            The pair's directory (holding `teacher/`, `student/` and `pair_info.json`).

    Returns:
        `tuple`: `(teacher, student, tokenizer)`, the models in eval mode.
    """
    path = Path(path)
    missing = [name for name in ("teacher", "student", PAIR_INFO_NAME) if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"`path` ({path}) is not a trained arithmetic pair: {missing} missing. Train one with `train_pair`."
        )
    teacher = AutoModelForCausalLM.from_pretrained(path / "teacher", trust_remote_code=False).eval()
    student = AutoModelForCausalLM.from_pretrained(path / "student", trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(path / "student", trust_remote_code=False)
    return teacher, student, tokenizer
