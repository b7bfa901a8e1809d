"""Stratified calibration and held-out folders per modality of the shipped model, from real sources.

    python benchmarks/quantization/make_calibration.py [--data runs/data] [--out runs/calib]

Writes `OUT/<modality>/calibration/*.npy` and `OUT/<modality>/held_out/*.npy` (the stored pixel
values, 2-D, exactly what training read) plus `held_out/masks/<name>.png` (ground truth, where there
is one) and `OUT/<modality>/sources.json`. `espmed export --calib OUT/<modality>` then calibrates on
`calibration/` and gates on `held_out/`. Calibration images are distinct: slices of different
volumes and different files, spread evenly over each volume; never flips or crops of one image —
except for microscopy, whose only real source with masks here is one DSB-2018 image (nine
overlapping 256² windows of its training half, and the report says so). Held-out images are never calibrated on,
and come from volumes / image halves the model was not trained on (see the model card).

Needs the installed real data: `bash benchmarks/real_model/fetch_data.sh` (pyradiomics sdist under
`--data`, stardist and pydicom-data wheels). Derived images stay under `runs/` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from espmed.data.real import stardist_file, stardist_nuclei, unlabelled_image
from espmed.data.sources import Sample, volume_slices
from espmed.io import read_mask, read_pixels, read_volume

#: modality -> (calibration volumes, held-out volume, extra calibration files from pydicom-data).
#: The held-out volumes are the model's own stage-3 hold-outs (model card).
RADIOMICS = {
    "ct-lesion": (("lung2",), "lung1", ("CT_small.dcm", "693_UNCI.dcm", "eCT_Supplemental.dcm")),
    "mr-lesion": (("brain1", "breast1"), "brain2", ("MR_small.dcm", "MR2_UNCI.dcm", "emri_small.dcm")),
}
PER_MODALITY = 30  # calibration images wanted per modality (the floor)
HELD_OUT_SLICES = 12  # held-out slices per volume: evenly spread, plus every labelled one


def evenly(items: list, count: int) -> list:
    """`count` of `items` spread evenly over them, in order (all of them when there are fewer), so
    a small set still covers every volume."""
    if len(items) <= count:
        return list(items)
    picks = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in sorted(set(picks.tolist()))]


def _volume(root: Path, name: str, modality: str, count: int, *, labelled: bool) -> list[Sample]:
    """`count` axial slices spread over volume `name` (plus, if `labelled`, every slice with a label)."""
    image, label = read_volume(root / f"{name}_image.nrrd", 2), read_volume(root / f"{name}_label.nrrd", 2)
    slices = list(range(image.shape[2]))
    picks = set(evenly(slices, count))
    if labelled:
        picks |= {int(i) for i in np.flatnonzero((label > 0).sum(axis=(0, 1)))}
    return volume_slices(image, label, 2, sorted(picks), modality=modality, name=name)


def _write(samples: list[Sample], folder: Path, *, masks: bool) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in samples:
        np.save(folder / f"{s.name}.npy", np.ascontiguousarray(s.image))
        if masks and s.mask.any():
            (folder / "masks").mkdir(exist_ok=True)
            Image.fromarray(s.mask.astype(np.uint8) * 255).save(folder / "masks" / f"{s.name}.png")
        rows.append({"name": s.name, "shape": list(s.image.shape), "foreground_px": int(s.mask.sum())})
    return rows


def radiomics_sets(root: Path, modality: str) -> tuple[list[Sample], list[Sample], list[str]]:
    volumes, held_volume, dicoms = RADIOMICS[modality]
    per_volume = -(-(PER_MODALITY - len(dicoms)) // len(volumes))
    calibration = [s for v in volumes for s in _volume(root, v, modality, per_volume, labelled=False)]
    for name in dicoms:
        image = unlabelled_image(f"pydicom:{name}")
        calibration.append(Sample(name.split(".")[0], image, np.zeros(image.shape[:2], bool), modality))
    held_out = _volume(root, held_volume, modality, HELD_OUT_SLICES, labelled=True)
    distinct = [f"pyradiomics {v}" for v in volumes] + [f"pydicom-data {d}" for d in dicoms]
    return calibration, held_out, distinct


#: Row offsets of the 256² calibration windows in the DSB image's 512×256 training half.
MICROSCOPY_WINDOW_ROWS = tuple(range(0, 257, 32))


def microscopy_sets() -> tuple[list[Sample], list[Sample], list[str]]:
    """Calibration: 256² windows of the training half, the held-out tiles' shape (a 256×128 piece would
    be half padding at the model's input), overlapping since one image is all there is."""
    image, mask = read_pixels(stardist_file("img2d.tif")), read_mask(stardist_file("mask2d.tif"))
    left = [
        Sample(f"stardist_nuclei_left_r{r}", image[r : r + 256, :256].copy(), mask[r : r + 256, :256].copy(),
               "microscopy")
        for r in MICROSCOPY_WINDOW_ROWS
    ]
    source = f"stardist DSB-2018 img2d.tif (left half, {len(left)} overlapping 256² windows)"
    return left, stardist_nuclei("test", "microscopy"), [source]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("runs/data"), help="fetch_data.sh's DEST")
    ap.add_argument("--out", type=Path, default=Path("runs/calib"))
    args = ap.parse_args(argv)
    root = args.data / "pyradiomics-3.0.1" / "data"
    sets = {"microscopy": microscopy_sets()} | {m: radiomics_sets(root, m) for m in RADIOMICS}
    for modality, (calibration, held_out, distinct) in sets.items():
        dest = args.out / modality
        report = {
            "modality": modality,
            "distinct_sources": distinct,
            "calibration": _write(calibration, dest / "calibration", masks=False),
            "held_out": _write(held_out, dest / "held_out", masks=True),
        }
        (dest / "sources.json").write_text(json.dumps(report, indent=1) + "\n")
        with_gt = sum(r["foreground_px"] > 0 for r in report["held_out"])
        print(f"{modality}: {len(calibration)} calibration images ({len(distinct)} sources), "
              f"{len(held_out)} held out ({with_gt} with a ground-truth mask) -> {dest}")


if __name__ == "__main__":
    main()
