#!/usr/bin/env bash
# The cp312 wheels bench/gpu_suite.sh needs on a GPU machine that has torch and transformers but not these
# (the device machine: Python 3.12, no package registry). Run here, where pip works; the suite installs
# them from .whl/ into /tmp/site. Versions: those this checkout is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl diffusers==0.42.1 importlib_metadata==10.2.0 zipp==4.1.2 pydantic==2.14.4 pydantic_core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 shapely==2.2.0 jsonschema==4.26.0 \
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 typer==0.29.2 annotated-doc==0.0.7 \
  rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 shellingham==1.5.4 torchao==0.18.0
ls -la .whl
