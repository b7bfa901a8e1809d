"""Test helpers: a small random ESP-MedSAM checkpoint exported to ONNX and OpenVINO IR."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from espmed.atomic import file_sha256
from espmed.model import ESPMedSAM, get_preset, save_checkpoint
from espmed.runtimes.metadata import INPUT_NAME, METADATA_KEY, ArtifactMetadata

from .test_model import _randomise


def random_model(modalities=("brain", "nuclei"), seed: int = 0) -> ESPMedSAM:
    """Tiny preset with random weights strong enough that masks are not all-empty."""
    cfg = get_preset(
        "esp-medsam-tiny", modalities=tuple(modalities), controller_map=tuple(range(len(modalities))),
        num_queries=max(3, len(modalities)),
    )
    return _randomise(ESPMedSAM(cfg), seed)


def write_checkpoint(path: Path, modalities=("brain", "nuclei"), seed: int = 0) -> Path:
    return save_checkpoint(random_model(modalities, seed), path)


def convert_openvino(onnx_path: Path, out_xml: Path) -> Path:
    """OpenVINO IR from the ONNX file, carrying the metadata in rt_info."""
    import onnxruntime as ort
    import openvino as ov

    props = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    meta = ArtifactMetadata.from_json(props[METADATA_KEY])
    meta.target, meta.backend = "openvino", "openvino"
    model = ov.convert_model(str(onnx_path))
    model.set_rt_info(meta.to_json(), METADATA_KEY)
    ov.save_model(model, str(out_xml), compress_to_fp16=False)
    return out_xml


def write_manifest(artifact: Path, metadata: ArtifactMetadata, files: list[Path]) -> Path:
    out = artifact.with_name(artifact.name + ".manifest.json")
    hashes = {f.name: file_sha256(f) for f in files}
    out.write_text(json.dumps({"metadata": json.loads(metadata.to_json()), "files": hashes}))
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def build_artifacts(root: Path) -> dict[str, Path]:
    """Checkpoint (controllers for brain and nuclei), and for "brain": a dynamic-batch ONNX and
    OpenVINO IR (the ONNX by `espmed.export.export`, with its manifest), plus a fixed batch-2 IR.
    Built once per folder, reused across test modules."""
    import openvino as ov

    from espmed.export import export

    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "checkpoint": root / "tiny.safetensors",
        "onnx": root / "onnx" / "tiny.onnx",
        "openvino": root / "openvino" / "tiny.xml",
        "openvino_b2": root / "b2" / "tiny_b2.xml",
    }
    if all(p.is_file() for p in paths.values()):
        return paths
    write_checkpoint(paths["checkpoint"])
    export(paths["checkpoint"], "onnx", paths["onnx"], modality="brain", dynamic=True, simplify="none")
    paths["openvino"].parent.mkdir(exist_ok=True)
    convert_openvino(paths["onnx"], paths["openvino"])  # the OpenVINO target is tested by export's tests
    paths["openvino_b2"].parent.mkdir(exist_ok=True)
    model = ov.Core().read_model(str(paths["openvino"]))
    meta = ArtifactMetadata.from_json(model.get_rt_info(METADATA_KEY).astype(str))
    meta.batch = 2
    model.reshape({INPUT_NAME: [2, 3, meta.input_size, meta.input_size]})
    model.set_rt_info(meta.to_json(), METADATA_KEY)
    ov.save_model(model, str(paths["openvino_b2"]), compress_to_fp16=False)
    return paths


def fundus_crop() -> np.ndarray:
    """A real, non-square RGB image: a 300 x 451 crop of the bundled fundus photograph."""
    from PIL import Image

    from espmed.runtimes.preprocess import to_rgb_uint8

    here = Path(__file__).resolve().parents[1] / "espmed" / "assets" / "samples"
    return to_rgb_uint8(np.asarray(Image.open(here / "fundus_retina.png")))[60:360, 30:481]
