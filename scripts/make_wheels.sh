#!/usr/bin/env bash
# Wheels of the server's packages for the GPU image (Python 3.12, no registry there), into .wheels/ (git-ignored),
# carried to the device with the run: run(..., carry=[".wheels"]); scripts/h100_session.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip download -q fastapi uvicorn httpx pyyaml rich jinja2 -d .wheels --python-version 3.12 \
  --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --implementation cp
ls .wheels | wc -l
