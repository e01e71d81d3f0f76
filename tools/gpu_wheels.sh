#!/usr/bin/env bash
# Fill a wheels folder, where there is internet, for tests/gpu/run_gpu_checks.sh on a GPU machine that has
# Python 3.12 and PyTorch but no internet: tools/gpu_requirements.txt and all their dependencies, as binary
# wheels for CPython 3.12 on x86-64 Linux, except torch and what torch itself brings (triton, the nvidia-*
# CUDA libraries, sympy, ...), which that machine has. run_gpu_checks.sh installs from it with --no-index.
#
#   bash tools/gpu_wheels.sh [DIR] [--have FILE]     # DIR defaults to .whl (git-ignored)
#
# --have FILE: packages the GPU machine already has, not downloaded (its `python3 -m pip list --format
# freeze`, or one name a line; versions are ignored). Everything else comes to about 73 MB; a machine with
# numpy, pillow, pytest and the usual PyTorch image's packages needs less than half of that.
#
# pip resolves the set for the target (pip install --dry-run --report), then downloads it without torch
# (pip download --no-deps). megatron-core 0.19.2's cp312 wheel is tagged manylinux_2_24/2_28, so the
# GPU machine needs glibc 2.28 or newer. PYTHON_VERSION (3.12) and PYTHON (any python3 with pip) may be set.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.whl have=/dev/null
while [ $# -gt 0 ]; do
    case $1 in
        --have) have=$2; shift 2 ;;
        -*) echo "gpu_wheels.sh: unknown flag $1 (usage: bash tools/gpu_wheels.sh [DIR] [--have FILE])" >&2; exit 2 ;;
        *) dir=$1; shift ;;
    esac
done
python=${PYTHON:-python3}
target=(--python-version "${PYTHON_VERSION:-3.12}" --only-binary=:all: --platform manylinux2014_x86_64
        --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64)
skip='^(torch|triton|nvidia-.*|sympy|mpmath|networkx|jinja2|markupsafe|setuptools)$'  # torch and its own deps

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m pip install --dry-run --ignore-installed --quiet --report "$tmp/report.json" --target "$tmp/target" \
    "${target[@]}" -r tools/gpu_requirements.txt
"$python" - "$tmp/report.json" "$skip" "$have" > "$tmp/pins.txt" <<'PY'
import json, re, sys

def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()

report, skip = json.load(open(sys.argv[1])), re.compile(sys.argv[2])
have = {canonical(re.split(r"[=<>~ @]", line.strip())[0]) for line in open(sys.argv[3]) if line.strip()}
for item in report["install"]:
    name = canonical(item["metadata"]["name"])
    if not skip.match(name) and name not in have:
        print(f"{name}=={item['metadata']['version']}")
PY
mkdir -p "$dir"
rm -f "$dir"/*.whl
"$python" -m pip download --quiet --no-deps -d "$dir" "${target[@]}" -r "$tmp/pins.txt"
echo "gpu_wheels.sh: $(ls "$dir"/*.whl | wc -l) wheels in $dir ($(du -sh "$dir" | cut -f1)); left out: torch, its own" \
     "dependencies and $(grep -c . "$have" || true) packages of --have"
