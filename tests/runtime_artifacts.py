"""Test helpers: a small random ESP-MedSAM checkpoint exported to ONNX and OpenVINO IR.

Prefers the export teammate's `espmed.export.export` when it exists; otherwise exports here with
`torch.onnx.export` and embeds the same `ArtifactMetadata` the exporter embeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from espmed import __version__
from espmed.model import ESPMedSAM, get_preset, save_checkpoint
from espmed.model.checkpoint import file_sha256
from espmed.runtimes.metadata import INPUT_NAME, METADATA_KEY, OUTPUT_NAMES, ArtifactMetadata


def random_model(modalities=("brain", "nuclei"), seed: int = 0) -> ESPMedSAM:
    """Tiny preset with random weights strong enough that masks are not all-empty."""
    cfg = get_preset(
        "esp-medsam-tiny", modalities=tuple(modalities), controller_map=tuple(range(len(modalities))),
        num_queries=max(3, len(modalities)),
    )
    model = ESPMedSAM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return model.eval()


def write_checkpoint(path: Path, modalities=("brain", "nuclei"), seed: int = 0) -> Path:
    return save_checkpoint(random_model(modalities, seed), path)


def metadata_for(model: ESPMedSAM, modality: str, target: str, backend: str, checkpoint: Path, batch: int) -> ArtifactMetadata:
    cfg = model.config
    return ArtifactMetadata(
        target=target, backend=backend, precision="fp32", modality=modality,
        modality_index=cfg.modality_index(modality), modalities=list(cfg.modalities),
        input_size=cfg.image_size, batch=batch, preprocessing=cfg.preprocessing.to_dict(),
        preset=cfg.preset, espmed_version=__version__, source_checkpoint_sha256=file_sha256(checkpoint),
        exporter="torch.onnx dynamo (test helper)", opset=18,
    )


def export_onnx(checkpoint: Path, out: Path, modality: str, batch: int = 0) -> Path:
    """ONNX file with espmed metadata; `batch=0` exports a dynamic batch axis."""
    import onnx
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from espmed.model import load_checkpoint

    model = load_checkpoint(checkpoint)
    special = model.specialize(modality)
    idx = model.config.modality_index(modality)
    example = torch.zeros(batch or 2, 3, model.config.image_size, model.config.image_size)
    graph = _IndexedGraph(special, idx)
    dynamic = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=64)},)} if batch == 0 else {}
    # The math SDPA kernel: the fused CPU kernel's output layout breaks the ONNX decomposition.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        torch.onnx.export(
            graph, (example,), str(out), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            opset_version=18, dynamo=True, external_data=False, verbose=False, **dynamic,
        )
    proto = onnx.load(str(out))
    meta = metadata_for(model, modality, "onnx", "onnxruntime", checkpoint, batch)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta.to_json()
    onnx.save(proto, str(out))
    return out


class _IndexedGraph(torch.nn.Module):
    def __init__(self, model: ESPMedSAM, index: int) -> None:
        super().__init__()
        self.model, self.index = model, index

    def forward(self, images):
        out = self.model(images, self.index)
        return out.lowres_masks, out.patch_logits


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
    out.write_text(json.dumps({"metadata": json.loads(metadata.to_json()), "files": {f.name: file_sha256(f) for f in files}}))
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)
