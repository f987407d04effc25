#!/usr/bin/env bash
# The package as downstream users get it. Builds the sdist and, from it, the wheel (`python -m build`); checks that
# both hold every file of src/s2t_hf (package data included: the metrics, the custom_generate folder, py.typed) and the
# two commands; installs the wheel (not editable) into a fresh venv, .venv-wheel (torch==2.13.0 first, as
# scripts/setup.sh does, then the wheel with its dependencies); and there, from a folder outside the repository (so
# `src/` is not importable) and offline, runs `s2t-hf --help` and scripts/wheel_smoke.py (the README's examples on tiny
# models, the fused loop, the metrics). BUILD_PYTHON: the interpreter that has `build` (default .venv/bin/python, where
# the dev extra installs it); PYTHON: the one that makes the venv (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
PYTHON="${PYTHON:-python3}"
BUILD_PYTHON="${BUILD_PYTHON:-.venv/bin/python}"
VENV=.venv-wheel
started=$SECONDS
DIST="$(mktemp -d)"
WORK="$(mktemp -d)"
trap 'rm -rf "$DIST" "$WORK"' EXIT

echo "--- wheel check: build the sdist and the wheel"
"$BUILD_PYTHON" -m build --outdir "$DIST" . >"$DIST/build.log" 2>&1 || { cat "$DIST/build.log"; exit 1; }
wheel=$(ls "$DIST"/*.whl)
sdist=$(ls "$DIST"/*.tar.gz)
git ls-files src/s2t_hf >"$DIST/tracked.txt"
"$BUILD_PYTHON" - "$wheel" "$sdist" "$DIST/tracked.txt" <<'EOF'
import sys
import tarfile
import zipfile

wheel, sdist, tracked = sys.argv[1:]
sources = [line.strip()[len("src/"):] for line in open(tracked) if line.strip()]
in_wheel = set(zipfile.ZipFile(wheel).namelist())
with tarfile.open(sdist) as archive:
    root = archive.getnames()[0].split("/")[0]
    in_sdist = {name[len(root) + 1 :] for name in archive.getnames()}
missing = [f for f in sources if f not in in_wheel]
assert not missing, f"the wheel lacks {missing}"
missing = [f for f in ["pyproject.toml", "README.md", *("src/" + f for f in sources)] if f not in in_sdist]
assert not missing, f"the sdist lacks {missing}"
package_data = [
    "py.typed", "metrics/hit_at_k/hit_at_k.py", "metrics/answer_accuracy/answer_accuracy.py",
    "generation/hub/custom_generate/generate.py", "generation/hub/custom_generate/requirements.txt",
]
for data in package_data:
    assert f"s2t_hf/{data}" in in_wheel, f"the wheel lacks the package data s2t_hf/{data}"
strays = sorted({n.split("/")[0] for n in in_wheel if not n.split("/")[0].endswith(".dist-info")} - {"s2t_hf"})
assert not strays, f"the wheel installs more than s2t_hf: {strays}"
entry_points = next(zipfile.Path(wheel, n).read_text() for n in in_wheel if n.endswith(".dist-info/entry_points.txt"))
for command in ("s2t-hf = s2t_hf.cli:main", "s2t-lm-eval = s2t_hf.integrations.lm_eval:main"):
    assert command in entry_points, f"the wheel lacks the command `{command}`"
print(f"{wheel.rsplit('/', 1)[1]}: {len(in_wheel)} files; {sdist.rsplit('/', 1)[1]}: {len(in_sdist)} files; "
      f"all {len(sources)} files of src/s2t_hf in both")
EOF

echo "--- wheel check: install the wheel into a fresh $VENV"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# The CPU build of torch (an unpinned torch may pull a multi-GB CUDA build).
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "$wheel"
"$VENV/bin/python" -m pip check

echo "--- wheel check: the installed package, outside the repository, offline"
cp scripts/wheel_smoke.py "$WORK/"
(
  cd "$WORK"
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  usage=$("$REPO/$VENV/bin/s2t-hf" --help)
  grep -q "evaluate" <<<"$usage" || { echo "s2t-hf --help lists no commands: $usage" >&2; exit 1; }
  # -I: neither PYTHONPATH nor the script's folder nor the user's site-packages on the path
  "$REPO/$VENV/bin/python" -I wheel_smoke.py
)
echo "--- wheel check passed in $((SECONDS - started)) s"
