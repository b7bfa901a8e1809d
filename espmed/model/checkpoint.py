"""Checkpoints: the authors' release `.pth` (read-only input) and the native safetensors format.

Native format: one `.safetensors` file; the model config JSON lives in its header metadata under
`espmed.config`, so no pickle is ever involved. Release files are read with
`torch.load(weights_only=True)`; every one of their keys is either mapped onto the model or on the
explicit `RELEASE_UNUSED_KEYS` list, and anything else is an error naming the keys.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path

import torch

from .. import __version__
from ..atomic import atomic_path
from ..errors import CheckpointError, first_line
from .config import PRESETS, ModelConfig
from .esp_medsam import ESPMedSAM

CONFIG_METADATA_KEY = "espmed.config"
FORMAT_METADATA_KEY = "espmed.format"
NATIVE_FORMAT = "espmed-checkpoint/1"
#: Set when floating-point tensors are stored in a narrower type than the model computes in (float32).
STORED_DTYPE_METADATA_KEY = "espmed.stored_dtype"

#: Release keys that the release's forward never reads: the SAM prompt encoder (all but its
#: positional-encoding matrix) and TinyViT's ImageNet classification head.
RELEASE_UNUSED_KEYS: frozenset[str] = frozenset(
    ["SemiTViT.norm_head.weight", "SemiTViT.norm_head.bias", "SemiTViT.head.weight", "SemiTViT.head.bias"]
    + [f"prompt_encoder.point_embeddings.{i}.weight" for i in range(4)]
    + ["prompt_encoder.not_a_point_embed.weight", "prompt_encoder.no_mask_embed.weight"]
    + [f"prompt_encoder.mask_downscaling.{i}.{p}" for i in (0, 1, 3, 4, 6) for p in ("weight", "bias")]
)

# Release key -> native key. Order matters: the first matching rule wins.
_RELEASE_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^SemiTViT\.layers\.(\d+)\.blocks\.(\d+)\.attn\.deep_QKV_embeddings_med$"),
     r"trunk.layers.\1.blocks.\2.controllers.slots.{c}.kv_token"),
    (re.compile(r"^SemiTViT\.layers\.(\d+)\.blocks\.(\d+)\.attn\.med_attention_biases$"),
     r"trunk.layers.\1.blocks.\2.controllers.slots.{c}.kv_logit_bias"),
    (re.compile(r"^SemiTViT\.layers\.(\d+)\.blocks\.(\d+)\.med_dah\.(.+)$"),
     r"trunk.layers.\1.blocks.\2.controllers.slots.{c}.expert.\3"),
    (re.compile(r"^SemiTViT\.neck\.(.+)$"), r"neck.\1"),
    (re.compile(r"^SemiTViT\.(patch_embed|layers)\.(.+)$"), r"trunk.\1.\2"),
    (re.compile(r"^prompt_encoder\.pe_layer\.(.+)$"), r"decoder.pe_layer.\1"),
    (re.compile(r"^mask_decoder\.transformer\.(.+)$"), r"decoder.transformer.\1"),
    (re.compile(r"^mask_decoder\.output_upscaling\.(.+)$"), r"decoder.output_upscaling.\1"),
    (re.compile(r"^mask_decoder\.output_hypernetworks_mlps\.0\.(.+)$"), r"decoder.hypernetworks.0.\1"),
    (re.compile(r"^patch_decoder\.(.+)$"), r"sppg.patch_head.\1"),
    (re.compile(r"^dense_prompter\.(.+)$"), r"sppg.prompt_embed.\1"),
    (re.compile(r"^mask_query\.weight$"), r"decoder.queries.weight"),
]
_CONTROLLER_KEY = re.compile(r"\.controllers\.slots\.\d+\.")


def release_to_native_key(key: str, controller: int = 0) -> str | None:
    """Native key for a release key, or None when no rule maps it."""
    for pattern, template in _RELEASE_RULES:
        if pattern.match(key):
            return pattern.sub(template, key).replace("{c}", str(controller))
    return None


def is_native_checkpoint(path: str | Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(16)
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(head) >= 9 and head[8:9] == b"{"


# -- release files -------------------------------------------------------------------------------
def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A PyTorch `.pth` state_dict (release, SAM or MobileSAM file), loaded without executing
    pickled code; `{"state_dict"|"model": ...}` wrappers and a DataParallel `module.` prefix are
    removed. `what` names the file in errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {what} file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a PyTorch {what} (expected a zip-format .pth)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code; torch raises assorted types
        # Name the blocked global rather than torch's first line, which suggests weights_only=False.
        blocked = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), None)
        detail = f"it holds pickled code or objects ({blocked})" if blocked else first_line(exc)
        raise CheckpointError(f"{path}: refused to load {what} safely: {detail}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: {what} does not hold a state_dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _map_release(sd: Mapping[str, torch.Tensor], source: str, controller: int = 0) -> dict[str, torch.Tensor]:
    mapped: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in sd.items():
        if key in RELEASE_UNUSED_KEYS:
            continue
        native = release_to_native_key(key, controller)
        if native is None:
            unexpected.append(key)
        else:
            mapped[native] = value
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys for an ESP-MedSAM release checkpoint: {_names(unexpected)}")
    return mapped


def _names(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _load_into(model: ESPMedSAM, state: Mapping[str, torch.Tensor], source: str) -> ESPMedSAM:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        raise CheckpointError(f"{source}: does not match the model ({'; '.join(parts)})")
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise CheckpointError(f"{source}: wrong tensor shapes: {_names(wrong, 4)}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source}: non-finite values in {_names(bad)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_release_checkpoint(
    path: str | Path, modality: str | int | None = None, image_size: int | None = None
) -> ESPMedSAM:
    """A release `.pth` as a one-controller model.

    The release does not record which modality its controller was trained for. With `modality`
    given, only that modality is available; without it, the controller serves every query as in
    the release code.
    """
    base = PRESETS["esp-medsam"]
    if image_size is not None:
        base = base.with_(image_size=image_size)
    if modality is None:
        cfg = base
    else:
        idx = base.modality_index(modality)
        cfg = base.with_(controller_map=tuple(0 if i == idx else -1 for i in range(len(base.modalities))))
    sd = read_state_dict(path)
    return _load_into(ESPMedSAM(cfg), _map_release(sd, str(path)), str(path))


def merge_release_checkpoints(
    files: Mapping[str, str | Path], image_size: int | None = None
) -> ESPMedSAM:
    """One model with a controller per modality from release files `{modality: path}`.

    The shared weights (everything but the controllers) must be identical across the files;
    otherwise the error lists the tensors that differ and by how much.
    """
    if not files:
        raise CheckpointError("no release checkpoints to merge")
    base = PRESETS["esp-medsam"]
    if image_size is not None:
        base = base.with_(image_size=image_size)
    order = [base.modality_index(m) for m in files]
    if len(set(order)) != len(order):
        raise CheckpointError("each modality may be given only once")
    controller_map = [-1] * len(base.modalities)
    for ctrl, idx in enumerate(order):
        controller_map[idx] = ctrl
    cfg = base.with_(controller_map=tuple(controller_map))
    merged: dict[str, torch.Tensor] = {}
    first_source = None
    differ: list[str] = []
    for ctrl, (modality, path) in enumerate(files.items()):
        state = _map_release(read_state_dict(path), str(path), controller=ctrl)
        for key, value in state.items():
            if _CONTROLLER_KEY.search(key):
                merged[key] = value
            elif key not in merged:
                merged[key] = value
                first_source = first_source or str(path)
            elif not torch.equal(merged[key], value):
                same_shape = merged[key].shape == value.shape
                diff = (merged[key].double() - value.double()).abs().max().item() if same_shape else float("nan")
                differ.append(f"{key} ({modality}: max |diff| {diff:.3g})")
    if differ:
        raise CheckpointError(
            f"cannot merge: {len(differ)} shared tensors differ from {first_source}: {_names(differ, 6)}"
        )
    return _load_into(ESPMedSAM(cfg), merged, "merged release checkpoints")


# -- native files --------------------------------------------------------------------------------
def save_checkpoint(
    model: ESPMedSAM,
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
    *,
    dtype: torch.dtype | None = None,
    float32_keys: Collection[str] = (),
) -> Path:
    """Write `model` as a native safetensors checkpoint (atomic). `dtype` (e.g. torch.float16, to
    halve a shipped file) stores its floating-point tensors in that type, but for `float32_keys`;
    `load_checkpoint` upcasts them to float32 again."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {
        FORMAT_METADATA_KEY: NATIVE_FORMAT,
        CONFIG_METADATA_KEY: json.dumps(model.config.to_dict(), sort_keys=True),
        "espmed.version": __version__,
    }
    if metadata:
        meta.update({str(k): str(v) for k, v in metadata.items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if dtype is not None:
        if not dtype.is_floating_point:
            raise ValueError(f"a checkpoint stores floating-point tensors, not {dtype}")
        meta[STORED_DTYPE_METADATA_KEY] = str(dtype).removeprefix("torch.")
        keep = set(float32_keys)
        tensors = {k: v.to(dtype) if v.is_floating_point() and k not in keep else v for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_native_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, str]]:
    """(config, tensors, header metadata) of a native checkpoint; never unpickles."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise CheckpointError(f"{path}: corrupt safetensors checkpoint ({first_line(exc)})") from None
    if meta.get(FORMAT_METADATA_KEY) != NATIVE_FORMAT or CONFIG_METADATA_KEY not in meta:
        raise CheckpointError(f"{path}: safetensors file without an espmed model config")
    try:
        cfg = ModelConfig.from_dict(json.loads(meta[CONFIG_METADATA_KEY]))
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path}: invalid model config in checkpoint: {exc}") from None
    # fp16/bf16-stored files compute in float32, as they were measured.
    tensors = {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in tensors.items()}
    return cfg, tensors, meta


def load_checkpoint(
    path: str | Path, modality: str | int | None = None, image_size: int | None = None
) -> ESPMedSAM:
    """Load a release `.pth` or a native `.safetensors` checkpoint as an eval-mode model.

    `modality` restricts a release file's controller to that modality (see
    `load_release_checkpoint`); for a native checkpoint it must be one the model has a controller
    for, and the model is specialised to it. `image_size` overrides the input size the model is
    described with (the weights run at any multiple of 32).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not is_native_checkpoint(path):
        return load_release_checkpoint(path, modality, image_size)
    cfg, tensors, _ = read_native_checkpoint(path)
    if image_size is not None:
        cfg = cfg.with_(image_size=image_size)
    model = _load_into(ESPMedSAM(cfg), tensors, str(path))
    return model.specialize(modality) if modality is not None else model


# -- the shipped model ---------------------------------------------------------------------------
#: The real ESP-MedSAM shipped with the package (model card beside it).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "models" / "esp-medsam-real.safetensors"


def default_checkpoint(*, required: bool = True) -> Path:
    """Path of the shipped model (`espmed/assets/models/`): what `espmed bench`, `export` and `info`
    use when no checkpoint is given. `required=False` returns the path even when the file is absent."""
    if required and not DEFAULT_CHECKPOINT.is_file():
        raise CheckpointError(
            f"{DEFAULT_CHECKPOINT}: the shipped model is missing from this install; give a checkpoint "
            "(or --random-weights)"
        )
    return DEFAULT_CHECKPOINT
