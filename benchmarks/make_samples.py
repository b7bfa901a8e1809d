"""Regenerate the bundled real sample images in `espmed/assets/samples/` (run once, committed).

Every source ships inside a package the project installs (or, for the DSB-2018 nuclei, inside the
stardist wheel, CC0): see espmed/assets/samples/PROVENANCE.md. Usage:
    python benchmarks/make_samples.py --stardist-dir DIR_WITH_img2d.tif_AND_mask2d.tif
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parents[1] / "espmed" / "assets" / "samples"


def _u8(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((a.astype(np.float64) - lo) / max(hi - lo, 1e-12), 0, 1) * 255).round().astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stardist-dir", type=Path, required=True)
    args = ap.parse_args()
    import nibabel as nib
    import pydicom
    import skimage.data
    import tifffile
    from nilearn import datasets
    from pydicom.data import get_testdata_file

    (OUT / "masks").mkdir(parents=True, exist_ok=True)
    index = []

    retina = Image.fromarray(skimage.data.retina()).resize((512, 512), Image.BILINEAR)
    retina.save(OUT / "fundus_retina.png", optimize=True)
    index.append({"file": "fundus_retina.png", "modality": "fundus", "mask": None,
                  "source": "scikit-image data.retina() resized to 512x512"})
    Image.fromarray(skimage.data.microaneurysms()).save(OUT / "fundus_microaneurysms.png", optimize=True)
    index.append({"file": "fundus_microaneurysms.png", "modality": "fundus", "mask": None,
                  "source": "scikit-image data.microaneurysms()"})

    img = tifffile.imread(args.stardist_dir / "img2d.tif")
    lab = tifffile.imread(args.stardist_dir / "mask2d.tif")
    lo, hi = np.percentile(img, (1, 99.8))
    for name, (ys, xs) in {"nuclei_dsb2018_a": (slice(0, 256), slice(0, 256)),
                           "nuclei_dsb2018_b": (slice(256, 512), slice(256, 512))}.items():
        Image.fromarray(_u8(img[ys, xs], lo, hi)).save(OUT / f"{name}.png", optimize=True)
        Image.fromarray(((lab[ys, xs] > 0) * 255).astype(np.uint8)).save(OUT / "masks" / f"{name}.png", optimize=True)
        index.append({"file": f"{name}.png", "modality": "microscopy", "mask": f"masks/{name}.png",
                      "source": "stardist 0.9.2 data/images/img2d.tif + mask2d.tif (DSB 2018, CC0), "
                                "256x256 crop, percentile 1-99.8 to 8 bit"})

    tpl = nib.as_closest_canonical(datasets.load_mni152_template(resolution=1))
    brain = nib.as_closest_canonical(datasets.load_mni152_brain_mask(resolution=1))
    t, b = tpl.get_fdata(), brain.get_fdata()
    for name, z in {"brain_mni152_axial_z90": 90, "brain_mni152_axial_z60": 60}.items():
        sl = np.rot90(t[:, :, z])
        ms = np.rot90(b[:, :, z] > 0.5)
        Image.fromarray(_u8(sl, 0, t.max())).save(OUT / f"{name}.png", optimize=True)
        Image.fromarray((ms * 255).astype(np.uint8)).save(OUT / "masks" / f"{name}.png", optimize=True)
        index.append({"file": f"{name}.png", "modality": "brain-mri", "mask": f"masks/{name}.png",
                      "source": f"nilearn load_mni152_template(resolution=1) axial slice z={z}; "
                                "mask: load_mni152_brain_mask"})

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    Image.fromarray(_u8(hu, 40 - 200, 40 + 200)).save(OUT / "ct_small.png", optimize=True)
    index.append({"file": "ct_small.png", "modality": "ct", "mask": None,
                  "source": "pydicom test file CT_small.dcm, HU window centre 40 width 400"})
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    a = ds.pixel_array
    Image.fromarray(_u8(a, a.min(), np.percentile(a, 99.5))).save(OUT / "mr_small.png", optimize=True)
    index.append({"file": "mr_small.png", "modality": "mri", "mask": None,
                  "source": "pydicom test file MR_small.dcm, min to 99.5th percentile"})

    (OUT / "samples.json").write_text(json.dumps(index, indent=2) + "\n")


if __name__ == "__main__":
    main()
