"""Can the self-prompted microscopy query tell when an image is not microscopy? A measurement for the
out-of-scope check (issue: self-prompting that holds up): the shipped checkpoint's image embedding
(trunk under the microscopy controller, then the neck), mean-pooled over the unpadded grid, and its
Mahalanobis distance (covariance shrunk towards its mean variance) to the embeddings of training crops.

    nice python benchmarks/scope_probe.py     # ~15 min on 2 cores: 120 + 100 crops + 24 other images

Data. In-domain: random square crops (96-256 px, seeded) of stardist's DSB-2018 image, the left half
(what the query trained on) split into 80 crops to fit and 40 to set the threshold, and 100 crops
of the right half (held out) for false alarms. Out of scope: every unlabelled real image of another
modality the project installs (the distillation sources of configs/real-distill.toml, axial MNI152
slices, the middle labelled slice of each pyradiomics volume, pydicom's MR overlay image), for the
detection rate. Writes benchmarks/results/scope_probe.{json,md}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
OTHER_SOURCES = (
    "skimage:retina", "skimage:immunohistochemistry", "skimage:microaneurysms", "stardist:histo.jpg",
    "pydicom:RG1_UNCI.dcm", "pydicom:RG3_UNCI.dcm", "pydicom:US1_UNCI.dcm", "pydicom:OBXXXX1A.dcm",
    "pydicom:MR_small.dcm", "pydicom:emri_small.dcm", "pydicom:MR2_UNCI.dcm", "pydicom:CT_small.dcm",
    "pydicom:eCT_Supplemental.dcm", "pydicom:693_UNCI.dcm",
)
SHRINK = 0.1


def crops(image: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    h, w = image.shape[:2]
    out = []
    for _ in range(n):
        s = int(rng.integers(96, min(h, w, 256) + 1))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        out.append(image[y:y + s, x:x + s])
    return out


def other_images() -> list[tuple[str, np.ndarray]]:
    from espmed.data.real import dicom_overlay, pydicom_test_file, pyradiomics_volume, unlabelled_image
    from espmed.data.reference import mni152_slices

    out = [(s, unlabelled_image(s)) for s in OTHER_SOURCES]
    out += [(s.name, s.image) for s in mni152_slices("test")[::4]]
    for volume in ("lung1", "lung2", "brain1", "brain2", "breast1"):
        slices = pyradiomics_volume(REPO / "runs/data/pyradiomics-3.0.1/data", volume, "other")
        out.append((f"pyradiomics_{volume}", slices[len(slices) // 2].image))
    out.append(("pydicom_examples_overlay", dicom_overlay(pydicom_test_file("examples_overlay.dcm"), "other")[0].image))
    return out


@torch.no_grad()
def pooled_embedding(model, image: np.ndarray) -> np.ndarray:
    from espmed.runtimes.preprocess import preprocess

    pre = model.config.preprocessing
    x, box = preprocess(image, model.config.image_size, pre.mean, pre.std, pre.resize)
    emb = model.embed(torch.from_numpy(x)[None], "microscopy")[0]
    rh, rw = box.resized_hw
    return emb[:, : -(-rh // 16), : -(-rw // 16)].mean((1, 2)).numpy()


def main() -> int:
    from espmed.atomic import write_text
    from espmed.data.real import stardist_file
    from espmed.io import read_pixels
    from espmed.model import load_checkpoint

    torch.set_num_threads(2)
    model = load_checkpoint(REPO / "espmed/assets/models/esp-medsam-real.safetensors").eval()
    dsb = read_pixels(stardist_file("img2d.tif"))
    rng = np.random.default_rng(0)
    sets = {"fit": crops(dsb[:, :256], 80, rng), "calibrate": crops(dsb[:, :256], 40, rng),
            "held_out": crops(dsb[:, 256:], 100, rng)}
    others = other_images()
    t0 = time.monotonic()
    feats = {k: np.stack([pooled_embedding(model, im) for im in v]) for k, v in sets.items()}
    other = np.stack([pooled_embedding(model, im) for _, im in others])
    seconds = time.monotonic() - t0
    mu = feats["fit"].mean(0)
    cov = np.cov(feats["fit"], rowvar=False)
    cov = (1 - SHRINK) * cov + SHRINK * np.trace(cov) / len(cov) * np.eye(len(cov))
    precision = np.linalg.inv(cov)

    def distance(x: np.ndarray) -> np.ndarray:
        z = x - mu
        return np.sqrt(np.einsum("ij,jk,ik->i", z, precision, z))

    d = {k: distance(v) for k, v in feats.items()}
    d_other = distance(other)
    rules = {"max of calibration crops": float(d["calibrate"].max()),
             "1.25 x max of calibration crops": float(1.25 * d["calibrate"].max())}
    rows = [{"rule": name, "threshold": thr, "false_alarms_held_out": float(np.mean(d["held_out"] > thr)),
             "detection_other": float(np.mean(d_other > thr))} for name, thr in rules.items()]
    result = {
        "what": __doc__.splitlines()[0], "feature": "mean-pooled 256-d embedding, microscopy controller, 1024²",
        "shrink": SHRINK, "seconds": round(seconds), "torch_threads": 2,
        "distance": {k: {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}
                     for k, v in {**d, "other": d_other}.items()},
        "rules": rows, "other_images": {n: float(v) for (n, _), v in zip(others, d_other, strict=True)},
    }
    write_text(RESULTS / "scope_probe.json", json.dumps(result, indent=1))
    lines = ["# Out-of-scope probe: the microscopy query's embedding distance", "", __doc__.split("\n\n")[2], "",
             "| set | images | min | median | max |", "|---|--:|--:|--:|--:|"]
    sizes = {**{k: len(v) for k, v in sets.items()}, "other": len(others)}
    lines += [f"| {k} | {sizes[k]} | {v['min']:.1f} | {v['median']:.1f} | {v['max']:.1f} |"
              for k, v in result["distance"].items()]
    lines += ["", "| threshold rule | threshold | false alarms (100 held-out crops) | detection (other modalities) |",
              "|---|--:|--:|--:|"]
    lines += [f"| {r['rule']} | {r['threshold']:.1f} | {r['false_alarms_held_out']:.0%} | {r['detection_other']:.0%} |"
              for r in rows]
    lines += ["", "Per other image: " + ", ".join(f"{n} {v:.1f}" for n, v in result["other_images"].items()), ""]
    write_text(RESULTS / "scope_probe.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
