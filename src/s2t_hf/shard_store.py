"""Resumable collection on disk: [`ShardStore`] keeps the finished shards of a selection-group collection and the
final dataset, under a [`collection_fingerprint`] of the settings, prompts and models.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from transformers.utils import logging

from .collection import CollectionSettings
from .teachers import Teacher
from .version import __version__


__all__ = ["METADATA_NAME", "SHARDS_DIR", "TRAJECTORIES_DIR", "ShardStore", "collection_fingerprint"]

logger = logging.get_logger(__name__)

METADATA_NAME = "collection.json"
SHARDS_DIR = "shards"
TRAJECTORIES_DIR = "trajectories"
_FORMAT_VERSION = 1


def collection_fingerprint(
    settings: CollectionSettings, encoded: Sequence[Sequence[int]], student: torch.nn.Module, teacher: Any
) -> str:
    """
    What identifies a collection: its settings, its prompts (token ids) and its models (their vocabulary
    fingerprints; for a served teacher, the server's address and model name). A collection in `save_to` resumes only
    under the same fingerprint.

    Returns:
        `str`: 32 hexadecimal digits.
    """
    from .selector import vocab_fingerprint

    digest = hashlib.sha256()
    values = asdict(settings)
    if not values["trajectories"]:
        del values["trajectories"]  # collections made before trajectories existed keep their fingerprint
    digest.update(json.dumps(values, sort_keys=True).encode())
    for role, model in (("student", student), ("teacher", teacher)):
        if isinstance(model, Teacher):  # a `Teacher`: its model, or the server and model name of a remote one
            model = getattr(model, "model", None)
        if not isinstance(model, torch.nn.Module):
            digest.update(f"{role}:{getattr(teacher, 'base_url', '')}:{model}".encode())
            continue
        digest.update(f"{role}:{vocab_fingerprint(model)}".encode())
    for ids in encoded:
        digest.update(json.dumps(ids).encode())
        digest.update(b";")
    return digest.hexdigest()[:32]


class ShardStore:
    """
    The finished shards of a collection under `root/shards` (one `datasets` folder each, written atomically), its
    metadata in `root/collection.json`, and the final dataset in `root`: what makes `collect_selection_data(...,
    save_to=root)` resumable.

    Args:
        root (`str`):
            The directory (`save_to`).
        fingerprint (`str`):
            The collection's [`collection_fingerprint`]; a directory holding another one is refused.
        resume (`bool`):
            Keep the shards already in `root`; `False` clears them.
        trajectories (`bool`, *optional*, defaults to `False`):
            Whether each shard also has its trajectory dataset (`kind=TRAJECTORIES_DIR`).
    """

    def __init__(self, root: str, fingerprint: str, resume: bool, trajectories: bool = False):
        self.root = root
        self.trajectories = trajectories
        self.fingerprint = fingerprint
        self.metadata_path = os.path.join(root, METADATA_NAME)
        metadata = None
        if os.path.isfile(self.metadata_path):
            with open(self.metadata_path, encoding="utf-8") as f:
                metadata = json.load(f)
        elif resume and os.path.isdir(root) and os.listdir(root):
            raise ValueError(
                f"`save_to` ({root}) is not empty and holds no `{METADATA_NAME}`: it was not written by "
                "`collect_selection_data`. Choose an empty or new directory."
            )
        if metadata is not None and not resume:
            self._clear()
            metadata = None
        if metadata is not None and metadata.get("fingerprint") != fingerprint:
            raise ValueError(
                f"`save_to` ({root}) holds a collection made with other settings, prompts or models (fingerprint "
                f"{metadata.get('fingerprint')} vs {fingerprint} now). Pass `resume=False` to overwrite it, or choose "
                "another `save_to`."
            )
        self.metadata = metadata or {
            "format": _FORMAT_VERSION,
            "s2t_hf_version": __version__,
            "fingerprint": fingerprint,
            "complete": False,
        }
        os.makedirs(os.path.join(root, SHARDS_DIR), exist_ok=True)
        self._write_metadata()
        if metadata is not None and not self.complete:
            logger.info(f"Resuming the collection in `{root}`.")

    @property
    def complete(self) -> bool:
        """Whether the final dataset is in `root` (nothing left to collect)."""
        return bool(self.metadata.get("complete"))

    def _clear(self) -> None:
        shutil.rmtree(os.path.join(self.root, SHARDS_DIR), ignore_errors=True)
        shutil.rmtree(os.path.join(self.root, TRAJECTORIES_DIR), ignore_errors=True)
        for name in os.listdir(self.root):
            if name in (METADATA_NAME, "state.json", "dataset_info.json") or (
                name.startswith("data-") and name.endswith(".arrow")
            ):
                os.remove(os.path.join(self.root, name))

    def _write_metadata(self) -> None:
        temporary = self.metadata_path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(self.metadata, f, indent=2, sort_keys=True)
        os.replace(temporary, self.metadata_path)

    def update(self, **values: Any) -> None:
        """Records `values` in the metadata (e.g. the calibrated `trigger_threshold`) and writes it."""
        self.metadata.update(values)
        self._write_metadata()

    def _shard_path(self, index: int, kind: str = "shard") -> str:
        return os.path.join(self.root, SHARDS_DIR, f"{kind}-{index:05d}")

    def has(self, index: int) -> bool:
        """Whether shard `index` is finished (with its trajectories, when the collection keeps them)."""
        kinds = ("shard", TRAJECTORIES_DIR) if self.trajectories else ("shard",)
        return all(os.path.isfile(os.path.join(self._shard_path(index, kind), "state.json")) for kind in kinds)

    def load(self, index: int, kind: str = "shard"):
        """Shard `index` (`kind="shard"`: its groups, `TRAJECTORIES_DIR`: its trajectories) as a `datasets.Dataset`."""
        import datasets

        return datasets.load_from_disk(self._shard_path(index, kind))

    def save(self, index: int, shard, kind: str = "shard"):
        """Writes shard `index` atomically and returns it read back from disk."""
        path = self._shard_path(index, kind)
        temporary = path + ".tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        # `datasets` writes an empty dataset as no file at all and cannot read that back: one empty file instead (a
        # shard of on-policy prompts where the trigger never fired holds no group)
        shard.save_to_disk(temporary, num_shards=1 if len(shard) == 0 else None)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(temporary, path)
        return self.load(index, kind)

    def finish(self, dataset, trajectories=None):
        """Writes the final dataset (and trajectories) to `root`, marks the collection complete and drops the shards;
        returns them read back from disk."""
        import datasets

        dataset.save_to_disk(self.root)
        if trajectories is not None:
            trajectories.save_to_disk(os.path.join(self.root, TRAJECTORIES_DIR))
        self.update(complete=True, num_groups=len(dataset))
        dataset = datasets.load_from_disk(self.root)
        if trajectories is not None:
            trajectories = datasets.load_from_disk(os.path.join(self.root, TRAJECTORIES_DIR))
        shutil.rmtree(os.path.join(self.root, SHARDS_DIR), ignore_errors=True)
        return dataset, trajectories
