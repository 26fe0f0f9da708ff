#!/usr/bin/env bash
# The GPU suite in one command (bench/gpu_suite.py): installs the carried wheels when scenec's
# dependencies are missing (a device machine: run bench/fetch_wheels.sh here first and carry .whl and
# bench/anchor), then runs every step within the budget. Arguments go to gpu_suite.py (--cpu-smoke, ...).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import diffusers, pydantic, shapely" 2>/dev/null; then
  if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gpu_suite.sh: diffusers/pydantic/shapely missing and no .whl/ (run bench/fetch_wheels.sh)" >&2
    exit 2
  fi
fi
exec $PY bench/gpu_suite.py "$@"
