"""Resumable collection on disk: [`ShardStore`] keeps the finished shards of a selection-group collection and the
final dataset, under a [`collection_fingerprint`] of the settings, prompts and models.

A collection's identity ([`collection_identity`]) is versioned (`IDENTITY_VERSION`): a store written under an older
version of it is not refused silently but says how to resume it (`resume="upgrade"`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields, is_dataclass
from typing import Any

import torch
from transformers.utils import logging

from .atomic_files import fsync_directory, fsync_tree
from .collection import CollectionSettings
from .teachers import Teacher
from .version import __version__


__all__ = [
    "IDENTITY_VERSION",
    "METADATA_NAME",
    "SHARDS_DIR",
    "TRAJECTORIES_DIR",
    "ShardStore",
    "collection_fingerprint",
    "collection_fingerprint_of",
    "collection_identity",
    "legacy_fingerprint",
    "model_identity",
    "stable_repr",
]

logger = logging.get_logger(__name__)

METADATA_NAME = "collection.json"
SHARDS_DIR = "shards"
TRAJECTORIES_DIR = "trajectories"
_FORMAT_VERSION = 1
#: The version of [`collection_identity`]. 1: settings, prompts and each local model's vocabulary fingerprint (a sample
#: of its input embeddings); 2: also every parameter tensor, the configuration and `name_or_path` of each local model,
#: the served model's name, root and maximum length, an optional `collection_id`, and `generation_kwargs` without
#: object addresses.
IDENTITY_VERSION = 2
# values sampled from each parameter tensor for the weights digest (evenly spaced over the flattened tensor)
_SAMPLES_PER_TENSOR = 4096
# configuration keys that say how a model was loaded, not which model it is
_VOLATILE_CONFIG_KEYS = ("transformers_version", "dtype", "torch_dtype", "attn_implementation")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


# --------------------------------------------------------------------------------------------------------------------
# The identity


def stable_repr(value: Any, _depth: int = 0) -> Any:
    """
    A JSON-serialisable form of `value` that is the same in every process: plain JSON values as they are, tensors by
    dtype, shape and values, functions and classes by qualified name, dataclasses and objects by class and
    attributes, and anything else by its `repr` with object addresses (`at 0x...`) removed.

    Args:
        value (`Any`):
            E.g. one value of `generation_kwargs`.

    Returns:
        `Any`: JSON-serialisable (`json.dumps(..., sort_keys=True)` gives a stable string).

    Examples:

    ```python
    >>> from s2t_hf.shard_store import stable_repr
    >>> stable_repr({"temperature": 0.7, "stop": ["\\n"]})
    {'stop': ['\\n'], 'temperature': 0.7}
    >>> stable_repr(object()) == stable_repr(object())  # no object address
    True

    ```
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if _depth > 8:
        return f"<{type(value).__qualname__}>"
    if isinstance(value, Mapping):
        return {str(k): stable_repr(v, _depth + 1) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [stable_repr(v, _depth + 1) for v in items]
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype), "shape": list(value.shape), "values": value.detach().cpu().tolist()}
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if inspect.isfunction(value) or inspect.ismethod(value) or inspect.isclass(value) or inspect.isbuiltin(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"
    to_dict = getattr(value, "to_dict", None)  # e.g. a `GenerationConfig`
    if callable(to_dict):
        try:
            return {"class": type(value).__qualname__, "values": stable_repr(to_dict(), _depth + 1)}
        except Exception:  # noqa: BLE001 - an object whose `to_dict` needs arguments: described below instead
            pass
    if is_dataclass(value):
        values = {f.name: getattr(value, f.name) for f in fields(value)}
        return {"class": type(value).__qualname__, "values": stable_repr(values, _depth + 1)}
    attributes = getattr(value, "__dict__", None)
    if isinstance(attributes, dict) and not isinstance(value, torch.nn.Module):
        public = {k: v for k, v in attributes.items() if not k.startswith("_")}
        return {"class": type(value).__qualname__, "values": stable_repr(public, _depth + 1)}
    return _ADDRESS.sub("", repr(value))


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


def sample_index(numel: int, samples: int | None = None) -> torch.Tensor:
    """`samples` evenly spaced indices into `numel` elements, first and last included, in integer arithmetic (a
    float32 `linspace` rounds past the end for tensors of more than 2**24 elements)."""
    samples = samples or _SAMPLES_PER_TENSOR
    return torch.arange(samples, dtype=torch.long) * (numel - 1) // (samples - 1)


def _weights_digest(model: torch.nn.Module) -> str:
    """A SHA-256 of every parameter tensor's name, dtype, shape and an evenly spaced sample of its values."""
    digest = hashlib.sha256()
    skipped = []
    for name, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
        tensor = parameter.detach()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        if tensor.is_meta:
            skipped.append(name)
            continue
        flat = tensor.reshape(-1)
        if flat.numel() > _SAMPLES_PER_TENSOR:
            flat = flat[sample_index(flat.numel()).to(flat.device)]
        digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    if skipped:
        logger.warning(
            f"{len(skipped)} parameters of {type(model).__name__} are on the `meta` device (e.g. offloaded); the "
            "collection's identity records their names and shapes but not their values."
        )
    return digest.hexdigest()[:32]


def _config_digest(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return None
    values = {k: v for k, v in to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return _digest(stable_repr(values))


def _name_or_path(model: Any) -> str | None:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def model_identity(model: Any) -> dict[str, Any]:
    """
    What identifies one model of a collection. A local model (a `torch.nn.Module`, or a `Teacher` around one): its
    class, `name_or_path`, configuration and a digest of every parameter tensor. A served teacher: the served model's
    name, its root (the path or repository the server loaded) and its maximum length, as the server lists them.
    """
    teacher = model if isinstance(model, Teacher) else None
    module = getattr(model, "model", None) if teacher is not None else model
    if isinstance(module, torch.nn.Module):
        identity = {
            "kind": "local",
            "class": type(module).__name__,
            "name_or_path": _name_or_path(module),
            "config": _config_digest(module),
            "weights": _weights_digest(module),
        }
    else:
        identity = {
            "kind": "served",
            "model": None if module is None else str(module),
            "root": getattr(teacher, "model_root", None),
            "max_model_len": getattr(teacher, "max_model_len", None),
        }
    if teacher is not None:
        identity["teacher"] = type(teacher).__name__
        tokenizer = getattr(teacher, "tokenizer", None)
        if tokenizer is not None:
            identity["tokenizer"] = [_name_or_path(tokenizer), len(tokenizer)]
    return identity


def collection_identity(
    settings: CollectionSettings,
    encoded: Sequence[Sequence[int]],
    student: torch.nn.Module,
    teacher: Any,
    collection_id: str | None = None,
) -> dict[str, Any]:
    """
    What identifies a collection (version `IDENTITY_VERSION`), part by part: its settings, its prompts (token ids),
    its models ([`model_identity`]) and the caller's `collection_id`. Stable across processes: the same arguments
    give the same identity in every run.

    Args:
        settings (`CollectionSettings`):
            The collection's settings.
        encoded (`Sequence[Sequence[int]]`):
            The prompts' token ids.
        student (`torch.nn.Module`):
            The student.
        teacher (`torch.nn.Module` or `Teacher`):
            The teacher.
        collection_id (`str`, *optional*):
            A name the caller gives the collection, for what the models cannot tell (e.g. a served teacher whose
            weights changed under the same path).

    Returns:
        `dict`: the parts, JSON-serialisable (`version`, `settings`, `prompts`, `student`, `teacher`,
        `collection_id`).
    """
    values = asdict(settings)
    values["generation_kwargs"] = stable_repr(values["generation_kwargs"])
    prompts = hashlib.sha256()
    for ids in encoded:
        prompts.update(json.dumps([int(i) for i in ids]).encode())
        prompts.update(b";")
    return {
        "version": IDENTITY_VERSION,
        "settings": _digest(values),
        "prompts": f"{len(encoded)}:{prompts.hexdigest()[:32]}",
        "student": model_identity(student),
        "teacher": model_identity(teacher),
        "collection_id": collection_id,
    }


def collection_fingerprint(
    settings: CollectionSettings,
    encoded: Sequence[Sequence[int]],
    student: torch.nn.Module,
    teacher: Any,
    collection_id: str | None = None,
) -> str:
    """
    The digest of a collection's [`collection_identity`]: a collection in `save_to` resumes only under the same one.

    Returns:
        `str`: 32 hexadecimal digits.
    """
    return collection_fingerprint_of(collection_identity(settings, encoded, student, teacher, collection_id))


def collection_fingerprint_of(identity: dict[str, Any]) -> str:
    """The fingerprint (32 hexadecimal digits) of an identity given by [`collection_identity`]."""
    return _digest(identity)


def legacy_fingerprint(
    settings: CollectionSettings,
    encoded: Sequence[Sequence[int]],
    student: torch.nn.Module,
    teacher: Any,
    generation_kwargs: Mapping[str, Any],
) -> str:
    """The fingerprint of identity version 1 (s2t_hf 0.1.0), to recognise a collection written under it: the
    settings with `generation_kwargs` as written then (`repr` of each value), the prompts and each local model's
    vocabulary fingerprint."""
    from .bin_rows import vocab_fingerprint

    digest = hashlib.sha256()
    values = asdict(settings)
    values["generation_kwargs"] = {k: repr(v) for k, v in sorted(generation_kwargs.items())}
    if not values["trajectories"]:
        del values["trajectories"]
    digest.update(json.dumps(values, sort_keys=True).encode())
    for role, model in (("student", student), ("teacher", teacher)):
        if isinstance(model, Teacher):
            model = getattr(model, "model", None)
        if not isinstance(model, torch.nn.Module):
            digest.update(f"{role}:{getattr(teacher, 'base_url', '')}:{model}".encode())
            continue
        digest.update(f"{role}:{vocab_fingerprint(model)}".encode())
    for ids in encoded:
        digest.update(json.dumps(ids).encode())
        digest.update(b";")
    return digest.hexdigest()[:32]


def _differences(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """The parts of two identities that differ, as dotted names."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        names = []
        for key in sorted(set(recorded) | set(current)):
            names += _differences(recorded.get(key), current.get(key), f"{prefix}{key}.")
        return names
    return [] if recorded == current else [prefix.rstrip(".")]


# --------------------------------------------------------------------------------------------------------------------
# The store


class ShardStore:
    """
    The finished shards of a collection under `root/shards` (one `datasets` folder each, written atomically and
    fsync'd), its metadata in `root/collection.json`, and the final dataset in `root`: what makes
    `collect_selection_data(..., save_to=root)` resumable.

    Args:
        root (`str`):
            The directory (`save_to`).
        fingerprint (`str`):
            The collection's [`collection_fingerprint`]; a directory holding another one is refused.
        resume (`bool` or `"upgrade"`):
            Keep the shards already in `root`; `False` clears them. `"upgrade"` also resumes a collection recorded
            under an older identity version when it matches under that version (`legacy_fingerprint`), and records
            the current identity.
        trajectories (`bool`, *optional*, defaults to `False`):
            Whether each shard also has its trajectory dataset (`kind=TRAJECTORIES_DIR`).
        identity (`dict`, *optional*):
            The parts of the collection's identity ([`collection_identity`]), recorded to explain a mismatch.
        legacy_fingerprint (`str`, *optional*):
            The collection's fingerprint under identity version 1, to recognise a collection written then.
    """

    def __init__(
        self,
        root: str,
        fingerprint: str,
        resume: bool | str,
        trajectories: bool = False,
        *,
        identity: dict[str, Any] | None = None,
        legacy_fingerprint: str | None = None,
    ):
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
        if metadata is not None:
            metadata = self._check_identity(metadata, resume, identity, legacy_fingerprint)
        self.metadata = metadata or {
            "format": _FORMAT_VERSION,
            "s2t_hf_version": __version__,
            "identity_version": IDENTITY_VERSION,
            "fingerprint": fingerprint,
            "identity": identity,
            "complete": False,
        }
        os.makedirs(os.path.join(root, SHARDS_DIR), exist_ok=True)
        self._write_metadata()
        if metadata is not None and not self.complete:
            logger.info(f"Resuming the collection in `{root}`.")

    def _check_identity(
        self, metadata: dict, resume: bool | str, identity: dict | None, legacy: str | None
    ) -> dict:
        """The metadata of the collection in `root` if it may resume under this identity (upgraded when asked)."""
        root, recorded = self.root, metadata.get("fingerprint")
        version = metadata.get("identity_version", 1)
        written_by = metadata.get("s2t_hf_version", "an older version")
        if not isinstance(version, int) or version > IDENTITY_VERSION:
            raise ValueError(
                f"`save_to` ({root}) holds a collection written by s2t_hf {written_by} under identity version "
                f"{version}, newer than this s2t_hf's ({__version__}, identity version {IDENTITY_VERSION}). Resume it "
                "with that version (`pip install -U s2t_hf`), or pass `resume=False` to overwrite it."
            )
        if version < IDENTITY_VERSION:
            matches = legacy is not None and recorded == legacy
            if resume == "upgrade" and matches:
                warnings.warn(
                    f"Resuming the collection in `{root}`, recorded by s2t_hf {written_by} under identity version "
                    f"{version}, which identified local models only by a sample of their input embeddings. It matches "
                    f"under that version; its identity is now recorded under version {IDENTITY_VERSION}.",
                    stacklevel=4,
                )
                return {
                    **metadata, "identity_version": IDENTITY_VERSION, "fingerprint": self.fingerprint,
                    "identity": identity, "upgraded_from": {"identity_version": version, "fingerprint": recorded},
                }
            if matches:
                how = (
                    "It matches these settings, prompts and models under that version, which identified local "
                    "models only by a sample of their input embeddings (two checkpoints of one model look alike "
                    "there). If it was collected with these same models, resume it with `resume='upgrade'`; "
                    f"otherwise finish it with s2t_hf {written_by}, or pass `resume=False` to overwrite it."
                )
            else:
                how = (
                    "It does not match these settings, prompts or models even under that version. Finish it with "
                    f"s2t_hf {written_by} and the arguments it was started with, pass `resume=False` to overwrite "
                    "it, or choose another `save_to`."
                )
            raise ValueError(
                f"`save_to` ({root}) holds a collection written by s2t_hf {written_by} under identity version "
                f"{version}; this s2t_hf ({__version__}) records identity version {IDENTITY_VERSION}. {how}"
            )
        if recorded != self.fingerprint:
            parts = _differences(metadata.get("identity") or {}, identity or {})
            which = f" (differing: {', '.join(parts)})" if parts else ""
            raise ValueError(
                f"`save_to` ({root}) holds a collection made with other settings, prompts or models{which}: "
                f"fingerprint {recorded} vs {self.fingerprint} now. Pass `resume=False` to overwrite it, or choose "
                "another `save_to`."
            )
        return metadata

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
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.metadata_path)
        fsync_directory(self.root)

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
        """Writes shard `index` atomically (written beside its place, flushed to disk, renamed) and returns it read
        back from disk."""
        path = self._shard_path(index, kind)
        temporary = path + ".tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        # `datasets` writes an empty dataset as no file at all and cannot read that back: one empty file instead (a
        # shard of on-policy prompts where the trigger never fired holds no group)
        shard.save_to_disk(temporary, num_shards=1 if len(shard) == 0 else None)
        fsync_tree(temporary)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(temporary, path)
        fsync_directory(os.path.dirname(path))
        return self.load(index, kind)

    def finish(self, dataset, trajectories=None):
        """Writes the final dataset (and trajectories) to `root`, marks the collection complete and drops the shards;
        returns them read back from disk."""
        import datasets

        dataset.save_to_disk(self.root)
        if trajectories is not None:
            trajectories.save_to_disk(os.path.join(self.root, TRAJECTORIES_DIR))
            fsync_tree(os.path.join(self.root, TRAJECTORIES_DIR))
        for name in os.listdir(self.root):  # the dataset's files, flushed before the metadata says it is complete
            if os.path.isfile(os.path.join(self.root, name)) and name != METADATA_NAME:
                fsync_tree(os.path.join(self.root, name))
        self.update(complete=True, num_groups=len(dataset))
        dataset = datasets.load_from_disk(self.root)
        if trajectories is not None:
            trajectories = datasets.load_from_disk(os.path.join(self.root, TRAJECTORIES_DIR))
        shutil.rmtree(os.path.join(self.root, SHARDS_DIR), ignore_errors=True)
        return dataset, trajectories
