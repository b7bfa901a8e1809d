"""ESP-MedSAM: TinyViT trunk with modality controllers -> neck -> SPPG -> QDMD."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModalityError, PromptError
from .config import ModelConfig
from .controller import ControllerBank
from .decoder import QueryDecoupledModalityDecoder
from .mask_decoder import MaskDecoder
from .neck import Neck
from .prompt_encoder import BoxPromptEncoder
from .sppg import SelfPatchPromptGenerator
from .tiny_vit import PointwisePatchEmbed, TinyViTTrunk

Modality = int | str | Sequence[int | str] | torch.Tensor


class SegmentationOutput(NamedTuple):
    masks: torch.Tensor  # (B, 1, H, W) mask logits at the input size
    patch_logits: torch.Tensor  # (B, 1, H/32, W/32) SPPG patch logits
    embeddings: torch.Tensor  # (B, D, H/16, W/16) image embedding (neck output)
    lowres_masks: torch.Tensor  # (B, 1, H/4, W/4) decoder mask logits before upsampling


class BoxOutput(NamedTuple):
    lowres_masks: torch.Tensor  # (N, 1, H/4, W/4) mask logits, one per box
    iou: torch.Tensor  # (N, 1) the decoder's IoU estimate of each mask

#: SAM's mask decoder: 1 + 3 multimask tokens; an IoU head of 3 layers as wide as the decoder.
SAM_MASK_TOKENS = 4
SAM_IOU_HEAD_DEPTH = 3
#: Input pixels per embedding cell (patch embed 4 x merges); boxes arrive in the input frame.
TRUNK_STRIDE = 16
#: Input pixels per patch-embed output cell.
PATCH_STRIDE = 4


class ESPMedSAM(nn.Module):
    """The whole network. `forward(images, modality)` takes normalised B x 3 x H x W images."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.trunk = TinyViTTrunk(
            in_chans=c.in_chans,
            embed_dims=c.embed_dims,
            depths=c.depths,
            num_heads=c.num_heads,
            window_sizes=c.window_sizes,
            mlp_ratio=c.mlp_ratio,
            mbconv_expand_ratio=c.mbconv_expand_ratio,
            merge_strides=c.merge_strides,
            num_controllers=c.num_controllers,
        )
        self.neck = Neck(c.embed_dims[-1], c.prompt_dim)
        self.sppg = SelfPatchPromptGenerator(c.prompt_dim, c.sppg_hidden)
        self.decoder = QueryDecoupledModalityDecoder(
            dim=c.prompt_dim,
            depth=c.decoder_depth,
            num_heads=c.decoder_heads,
            mlp_dim=c.decoder_mlp_dim,
            attention_downsample_rate=c.attention_downsample_rate,
            num_queries=c.num_queries,
            upscale_dims=c.upscale_dims,
            num_hypernetworks=1 if c.shared_hypernetwork else len(c.modalities),
        )
        if c.box_prompts:
            self.box_patch_embed = PointwisePatchEmbed(c.in_chans, c.embed_dims[0], block=PATCH_STRIDE)
            self.prompt_encoder = BoxPromptEncoder(dim=c.prompt_dim, frame_stride=c.box_frame_stride)
            self.box_decoder = MaskDecoder(
                dim=c.prompt_dim, depth=c.decoder_depth, num_heads=c.decoder_heads, mlp_dim=c.decoder_mlp_dim,
                attention_downsample_rate=c.attention_downsample_rate, upscale_dims=c.upscale_dims,
                num_mask_tokens=SAM_MASK_TOKENS, iou_head_depth=SAM_IOU_HEAD_DEPTH, iou_head_hidden_dim=c.prompt_dim,
            )

    # -- modality handling -------------------------------------------------------------------
    def _resolve(
        self, modality: Modality, batch: int
    ) -> tuple[int | torch.Tensor, int | torch.Tensor, int | torch.Tensor]:
        """(controller, query, hypernetwork) indices: ints for a one-modality batch, else (B,) tensors."""
        cfg = self.config
        if isinstance(modality, (int, str)):
            idx = cfg.modality_index(modality)
            return self._controller_of(idx), idx, 0 if cfg.shared_hypernetwork else idx
        if isinstance(modality, torch.Tensor):
            if modality.dim() != 1 or modality.dtype not in (torch.int32, torch.int64):
                raise ValueError("a modality tensor must be a 1-D integer tensor with one entry per image")
            indices = [cfg.modality_index(int(m)) for m in modality.tolist()]
        else:
            indices = [cfg.modality_index(m) for m in modality]
        if len(indices) != batch:
            raise ValueError(f"got {len(indices)} modalities for a batch of {batch} images")
        ctrl = [self._controller_of(i) for i in indices]
        if len(set(indices)) == 1:
            return ctrl[0], indices[0], 0 if cfg.shared_hypernetwork else indices[0]
        dev = self.decoder.queries.weight.device
        q = torch.tensor(indices, dtype=torch.long, device=dev)
        hyper = 0 if cfg.shared_hypernetwork else q
        return torch.tensor(ctrl, dtype=torch.long, device=dev), q, hyper

    def _trunk_controller(self, modality: Modality | None, batch: int) -> int | torch.Tensor | None:
        """The trunk's controller argument: None (no controller) for no modality."""
        return None if modality is None else self._resolve(modality, batch)[0]

    def _controller_of(self, idx: int) -> int:
        ctrl = self.config.controller_map[idx]
        if ctrl < 0:
            have = [m for m, k in zip(self.config.modalities, self.config.controller_map, strict=True) if k >= 0]
            raise ModalityError(
                f"this model has no modality controller for {self.config.modalities[idx]!r}; "
                f"it has controllers for {', '.join(have)}"
            )
        return ctrl

    @property
    def available_modalities(self) -> tuple[str, ...]:
        return tuple(m for m, k in zip(self.config.modalities, self.config.controller_map, strict=True) if k >= 0)

    @property
    def default_modality(self) -> str:
        """What runs when no modality is named: the first modality with a controller, in query order
        (the model's only one, or e.g. `microscopy` for the shipped model)."""
        return self.available_modalities[0]

    # -- forward -----------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.config.in_chans:
            raise ValueError(f"images must be B x {self.config.in_chans} x H x W, got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"image height and width must be multiples of 32, got {h} x {w}")

    def embed(self, images: torch.Tensor, modality: Modality | None) -> torch.Tensor:
        """Image embedding (B, D, H/16, W/16) of normalised images (B, 3, H, W): the trunk under each
        image's modality controller (None: no controller, the shared trunk alone), then the neck.
        What distillation trains; no SPPG, no decoder."""
        self._check_images(images)
        ctrl = self._trunk_controller(modality, images.shape[0])
        return self.neck(self.trunk(images, ctrl))

    def embed_for_boxes(self, images: torch.Tensor, modality: Modality | None = None) -> torch.Tensor:
        """The box-prompted path's image embedding (B, D, H/16, W/16): as `embed`, but through the box
        path's own patch embed (LiteMedSAM's 1x1 convs on each 4x4 block's mean, which the
        `longest-side-block-exact` resize makes exactly LiteMedSAM's 256² input)."""
        self._require_boxes()
        self._check_images(images)
        ctrl = self._trunk_controller(modality, images.shape[0])
        return self.neck(self.trunk(images, ctrl, self.box_patch_embed))

    @property
    def has_box_prompts(self) -> bool:
        return self.config.box_prompts

    def decode_boxes(self, embedding: torch.Tensor, boxes: torch.Tensor) -> BoxOutput:
        """One mask per box from one image's embedding (1, D, h, w) (or one embedding per box,
        (N, D, h, w)); boxes (N, 4) = x0, y0, x1, y1 in input pixels (the letterboxed model input)."""
        self._require_boxes()
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be N x 4 (x0, y0, x1, y1), got {tuple(boxes.shape)}")
        h, w = embedding.shape[-2:]
        to_frame = self.config.box_frame_stride / TRUNK_STRIDE
        sparse, dense = self.prompt_encoder(boxes.to(embedding.dtype) * to_frame, (h, w))
        image_pe = self.prompt_encoder.pe_layer(h, w).unsqueeze(0)
        return BoxOutput(*self.box_decoder(embedding, image_pe, sparse, dense))

    def segment_boxes(self, images: torch.Tensor, boxes: torch.Tensor, modality: Modality | None = None) -> BoxOutput:
        """`embed_for_boxes` one normalised image (1, 3, H, W), then `decode_boxes`."""
        return self.decode_boxes(self.embed_for_boxes(images, modality), boxes)

    def _require_boxes(self) -> None:
        if not self.has_box_prompts:
            raise PromptError("this model has no box-prompted path (a checkpoint made before it, or without "
                              "box_prompts); it segments self-prompted only")

    def forward(self, images: torch.Tensor, modality: Modality) -> SegmentationOutput:
        self._check_images(images)
        h, w = images.shape[-2:]
        ctrl, query, hyper = self._resolve(modality, images.shape[0])
        embeddings = self.neck(self.trunk(images, ctrl))
        patch_logits, dense_prompt = self.sppg(embeddings)
        lowres = self.decoder(embeddings, dense_prompt, query, hyper)
        masks = F.interpolate(lowres, size=(h, w), mode="bilinear", align_corners=False)
        return SegmentationOutput(masks, patch_logits, embeddings, lowres)

    # -- structure ---------------------------------------------------------------------------
    def specialize(self, modality: int | str) -> ESPMedSAM:
        """A copy that keeps only `modality`'s controller: what an exported graph bakes in."""
        cfg = self.config
        idx = cfg.modality_index(modality)
        keep = self._controller_of(idx)
        new_map = tuple(0 if i == idx else -1 for i in range(len(cfg.modalities)))
        model = copy.deepcopy(self)
        model.config = cfg.with_(controller_map=new_map)
        for bank in model.controller_banks():
            bank.slots = nn.ModuleList([bank.slots[keep]])
        return model

    def controller_banks(self) -> list[ControllerBank]:
        return [m for m in self.trunk.modules() if isinstance(m, ControllerBank)]

    def controller_parameters(self, controller: int) -> list[nn.Parameter]:
        """Parameters of one modality controller across all blocks."""
        return [p for bank in self.controller_banks() for p in bank.slots[controller].parameters()]

    def float32_keys(self) -> list[str]:
        """state_dict keys a float16 file keeps in float32: the modality-independent encoder (the trunk
        without its controllers, the neck) and the box-prompted path. In float16 they move box masks
        of small structures off LiteMedSAM's (parity measured in the model card)."""
        return [k for k in self.state_dict()
                if k.startswith(("trunk.", "neck.", "box_patch_embed.", "prompt_encoder.", "box_decoder."))
                and ".controllers." not in k]

    def trunk_shared_parameters(self) -> list[nn.Parameter]:
        """Trunk parameters shared by every modality (controllers excluded)."""
        ctrl = {id(p) for bank in self.controller_banks() for p in bank.parameters()}
        return [p for p in self.trunk.parameters() if id(p) not in ctrl]
