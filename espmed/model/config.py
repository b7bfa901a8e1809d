"""Model configuration and named presets (timm style: one dataclass, a table of presets)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import ModalityError

#: The release's modality names, in the index order its queries use.
RELEASE_MODALITIES: tuple[str, ...] = (
    "dermoscopy",
    "xray",
    "ultrasound",
    "fundus",
    "microscopy",
    "colonoscopy",
)

#: The release normalises with `(x - mean) / mean` (its weights are trained with that bug).
RELEASE_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB uint8-range image becomes the network input (numpy, shared by every backend)."""

    mean: tuple[float, float, float] = RELEASE_MEAN
    std: tuple[float, float, float] = RELEASE_MEAN
    pad: str = "bottom-right"  # zero padding after longest-side resize
    resize: str = "longest-side"
    mask_threshold: float = 0.0  # on logits: sigmoid >= 0.5

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            pad=d.get("pad", "bottom-right"),
            resize=d.get("resize", "longest-side"),
            mask_threshold=float(d.get("mask_threshold", 0.0)),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build an ESP-MedSAM network; saved as JSON beside the weights.

    `modalities` names the decoder queries in index order. `controller_map[i]` is the index of the
    modality controller used for modality i, or -1 when the model has none for it. A release file
    holds one controller and does not record its modality: loaded without a modality, that one
    controller serves every query, exactly as the release code runs it.
    """

    preset: str = "esp-medsam"
    image_size: int = 1024
    in_chans: int = 3
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    # Stride of the patch merging after each stage but the last; the release keeps the 64x64
    # resolution through its last merge (MobileSAM's "stride 1 when out_dim == 320").
    merge_strides: tuple[int, ...] = (2, 2, 1)
    prompt_dim: int = 256  # neck output = decoder width
    sppg_hidden: int = 64
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    upscale_dims: tuple[int, int] = (64, 32)
    num_queries: int = 7
    modalities: tuple[str, ...] = RELEASE_MODALITIES
    controller_map: tuple[int, ...] = (0, 0, 0, 0, 0, 0)
    shared_hypernetwork: bool = True
    # The box-prompted path beside the self-prompted one: SAM's prompt encoder and mask decoder
    # (LiteMedSAM's), reading the same image embedding. `box_frame_stride`: pixels per embedding cell
    # of the frame its prompt encoder was trained in (LiteMedSAM: 256 / 64 = 4).
    box_prompts: bool = False
    box_frame_stride: int = 4
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def __post_init__(self) -> None:
        if self.image_size % 32 != 0 or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive multiple of 32, got {self.image_size}")
        n = len(self.embed_dims)
        for name in ("depths", "num_heads", "window_sizes"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} needs {n} entries (one per stage)")
        if len(self.merge_strides) != n - 1:
            raise ValueError(f"merge_strides needs {n - 1} entries")
        if 4 * _prod(self.merge_strides) != 16:
            raise ValueError("the trunk must downsample by 16 in total (patch embed 4 x merges)")
        if len(self.controller_map) != len(self.modalities):
            raise ValueError("controller_map needs one entry per modality")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"duplicate modality names in {self.modalities}")
        if self.num_queries < len(self.modalities):
            raise ValueError("num_queries must be at least the number of modalities")
        used = sorted({c for c in self.controller_map if c >= 0})
        if not used or used != list(range(len(used))):
            raise ValueError(f"controller_map {self.controller_map} must use controllers 0..K-1")

    @property
    def num_controllers(self) -> int:
        return max(self.controller_map) + 1

    def modality_index(self, modality: int | str) -> int:
        """Index of a modality given by name or index; raises ModalityError naming the choices."""
        if isinstance(modality, str):
            key = modality.strip().lower()
            if key in self.modalities:
                return self.modalities.index(key)
            if key.isdigit():
                modality = int(key)
            else:
                raise ModalityError(
                    f"unknown modality {modality!r}; this model knows {', '.join(self.modalities)}"
                )
        idx = int(modality)
        if not 0 <= idx < len(self.modalities):
            raise ModalityError(
                f"modality index {idx} out of range 0..{len(self.modalities) - 1} "
                f"({', '.join(self.modalities)})"
            )
        return idx

    def with_(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            if f.name == "preprocessing":
                v = Preprocessing.from_dict(v)
            elif isinstance(v, list):
                v = tuple(v)
            kwargs[f.name] = v
        return cls(**kwargs)


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


#: Named presets. `esp-medsam` is the release architecture; `esp-medsam-tiny` is a narrow model
#: with the same topology for tests and laptop-scale training.
PRESETS: dict[str, ModelConfig] = {
    "esp-medsam": ModelConfig(),
    "esp-medsam-tiny": ModelConfig(
        preset="esp-medsam-tiny",
        image_size=256,
        embed_dims=(16, 32, 48, 64),
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 3, 4),
        window_sizes=(7, 7, 7, 7),
        prompt_dim=64,
        sppg_hidden=16,
        decoder_heads=4,
        decoder_mlp_dim=128,
        upscale_dims=(16, 8),
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name, with field overrides (e.g. `image_size=512`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name].with_(**overrides) if overrides else PRESETS[name]
