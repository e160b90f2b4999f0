#!/usr/bin/env bash
# Wheels of the server's packages that the GPU image lacks (it has httpx, anyio, h11, click, pyyaml, rich, jinja2;
# not fastapi, starlette, pydantic, uvicorn, opentelemetry-api), for its Python 3.12, into .wheels/ (git-ignored). Carry them with the
# run: run(..., carry=[".wheels"]); scripts/h100_session.sh installs them into .wheels/site with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .wheels
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .wheels fastapi starlette pydantic pydantic-core annotated-types typing-inspection typing-extensions uvicorn \
  opentelemetry-api
ls .wheels
