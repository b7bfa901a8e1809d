"""Training tensors from samples: MONAI augmentation on image and mask together, then the shared
numpy preprocessing (`espmed.runtimes.preprocess`) so training sees exactly what runtimes feed.

Randomness is a pure function of (seed, epoch, position): the sampler hands each item its own
seed, so a resumed run, a DataLoader worker and every DDP rank reproduce the same augmented batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..runtimes.preprocess import RESIZE_MODES, Letterbox, preprocess, to_rgb_uint8
from .sources import Sample


@dataclass(frozen=True)
class TrainItem:
    """A sample as the trainer uses it: with its augmentation settings."""

    sample: Sample
    augment: bool = True
    crop: tuple[int, int] | None = None  # random square crop side in [min, max] before resizing
    affine: bool = True  # the small rotation/scale affine; off keeps every pixel exact (flips, 90° turns)


def build_augmentation(crop: tuple[int, int] | None, affine: bool = True):
    """MONAI dictionary transforms on {"image": (3,H,W) 0..255, "mask": (1,H,W)}: flips, 90-degree
    rotations, a small rotation/scale affine (bilinear for the image, nearest for the mask; `affine`
    False leaves it out, so no pixel is interpolated), intensity scale and shift on the image only;
    optionally a random-size crop first."""
    from monai.transforms import (
        Compose,
        RandAffined,
        RandFlipd,
        RandRotate90d,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSpatialCropd,
    )

    keys = ("image", "mask")
    transforms = []
    if crop is not None:
        transforms.append(RandSpatialCropd(keys, roi_size=crop[0], max_roi_size=crop[1], random_size=True))
    transforms += [
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.2, spatial_axis=0),
        RandRotate90d(keys, prob=0.2, max_k=3),
    ]
    if affine:
        transforms.append(RandAffined(
            keys,
            prob=0.7,
            rotate_range=math.pi / 12,
            scale_range=0.15,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        ))
    transforms += [
        RandScaleIntensityd("image", factors=0.2, prob=0.5),
        RandShiftIntensityd("image", offsets=20.0, prob=0.5),
    ]
    return Compose(transforms)


def letterbox_mask(mask: np.ndarray, box: Letterbox) -> np.ndarray:
    """The mask resized (nearest) and zero-padded exactly as `preprocess` places its image."""
    from PIL import Image

    m = np.asarray(mask, dtype=np.uint8) * 255
    rh, rw = box.resized_hw
    if (rh, rw) != m.shape:
        m = np.asarray(Image.fromarray(m).resize((rw, rh), Image.NEAREST))
    out = np.zeros((box.input_size, box.input_size), np.float32)
    out[:rh, :rw] = m > 127
    return out


class SegmentationDataset(Dataset):
    """Items indexed by `(index, seed)` pairs (see `EpochSampler`)."""

    def __init__(
        self,
        items: Sequence[TrainItem],
        modalities: Sequence[str],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        resize: str = RESIZE_MODES[0],
    ) -> None:
        self.items = list(items)
        self.modalities = tuple(modalities)
        self.image_size = image_size
        self.mean, self.std, self.resize = tuple(mean), tuple(std), resize
        self._augmenters: dict[tuple[tuple[int, int] | None, bool], object] = {}
        for item in self.items:
            if item.sample.modality not in self.modalities:
                from ..errors import ModalityError

                raise ModalityError(
                    f"sample {item.sample.name}: modality {item.sample.modality!r} is not one of the model's "
                    f"({', '.join(self.modalities)})"
                )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        item = self.items[index]
        image = to_rgb_uint8(item.sample.image)
        mask = item.sample.mask
        if item.augment:
            image, mask = self._augment(item, image, mask, seed)
        x, box = preprocess(image, self.image_size, self.mean, self.std, self.resize)
        return {
            "image": torch.from_numpy(x),
            "mask": torch.from_numpy(letterbox_mask(mask, box))[None],
            "modality": torch.tensor(self.modalities.index(item.sample.modality)),
        }

    def _augment(
        self, item: TrainItem, image: np.ndarray, mask: np.ndarray, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        key = (item.crop, item.affine)
        if key not in self._augmenters:
            self._augmenters[key] = build_augmentation(item.crop, item.affine)
        transform = self._augmenters[key]
        transform.set_random_state(seed=seed)
        out = transform({
            "image": image.transpose(2, 0, 1).astype(np.float32),
            "mask": mask[None].astype(np.float32),
        })
        img = np.clip(np.rint(np.asarray(out["image"])), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        return np.ascontiguousarray(img), np.asarray(out["mask"])[0] > 0.5


def item_seed(seed: int, epoch: int, position: int) -> int:
    """A 32-bit seed for one item draw, independent of process, worker and resume point."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


class EpochSampler(Sampler):
    """Shuffled `(index, seed)` pairs for one rank, in micro-batch order, resumable mid-epoch.

    The epoch's permutation is cut into optimizer steps of `micro * accum * world` items; step s,
    accumulation a, rank r takes the `micro` items at offset `s*G + (a*world + r)*micro`. So one
    process with `accum = k` sees, micro-batch by micro-batch, what k DDP ranks see in one step:
    identical batches (and BatchNorm statistics) for the same global batch.
    """

    def __init__(self, size: int, micro: int, accum: int = 1, world: int = 1, rank: int = 0, seed: int = 0) -> None:
        self.size, self.micro, self.accum, self.world, self.rank, self.seed = size, micro, accum, world, rank, seed
        self.epoch, self.start_step = 0, 0
        if self.steps_per_epoch < 1:
            raise ValueError(f"{size} training items cannot fill one global batch of {self.global_batch}")

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum * self.micro

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.size, generator=g).tolist()
        for step in range(self.start_step, self.steps_per_epoch):
            for a in range(self.accum):
                offset = step * self.global_batch + (a * self.world + self.rank) * self.micro
                for pos in range(offset, offset + self.micro):
                    yield perm[pos], item_seed(self.seed, self.epoch, pos)
