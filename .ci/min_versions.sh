#!/usr/bin/env bash
# The declared minimum versions are the ones the code runs with: every dependency of pyproject.toml (the extras too)
# is installed at exactly its ">=" bound (pip --constraint NAME==MIN) into a side virtualenv, and a smoke run goes
# there: the import graph, a whole synthetic search.py run with each searcher (latency table, supernet, search,
# retraining, export to ONNX, report) and the export tests. Run from anywhere: bash .ci/min_versions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${MIN_VENV:-.venv-min}  # kept between runs; rebuilt when the minimums change

constraints=$("$PYTHON" - <<'PY'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = [v for k, v in project["optional-dependencies"].items() if k != "gpu"]  # gpu: a CUDA machine's, not CI's
for requirement in project["dependencies"] + sum(extras, []):
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?>=([0-9][^,;\s]*)", requirement.replace(" ", ""))
    if match is None:
        raise SystemExit(f"pyproject.toml: {requirement!r} declares no plain '>=' minimum")
    print(f"{match[1]}=={match[3]}")
PY
)
requirements=$("$PYTHON" -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + sum((v for k, v in p["optional-dependencies"].items() if k != "gpu"), [])))')

pip_install() {  # pip warns of every package that a local index of this machine lacks: only those lines are left out
    { "$VENV/bin/python" -m pip install -q "$@" 2>&1 1>&3 | { grep -v "^WARNING: Location 'file://.*' is ignored" || true; } >&2; } 3>&1
}

if [ ! -f "$VENV/.constraints" ] || [ "$(cat "$VENV/.constraints")" != "$constraints" ]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    printf '%s\n' "$constraints" > "$VENV/constraints.txt"
    printf '%s\n' "$requirements" > "$VENV/requirements.txt"
    pip_install --upgrade pip
    pip_install --constraint "$VENV/constraints.txt" --requirement "$VENV/requirements.txt"
    printf '%s\n' "$constraints" > "$VENV/.constraints"
fi
echo "minimum versions: $(tr '\n' ' ' < "$VENV/.constraints")"
"$VENV/bin/python" -m pip check
# -p no:cacheprovider: the side run leaves the checkout's pytest cache alone.
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_imports.py tests/experiments/test_export.py \
    tests/test_search.py::test_whole_run_produces_every_artifact \
    tests/test_search.py::test_ray_searcher_end_to_end_with_its_progress_line
