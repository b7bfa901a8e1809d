"""Classical baselines: what a plain image-processing recipe scores on the same images and masks.

A learned query is only worth shipping where it beats the recipe a user could write in three lines,
so every evaluation table shows the recipe's row beside the model's (`espmed eval`, the model card,
the README). One recipe per modality where a standard one exists; the others have no row.

- microscopy (fluorescence nuclei, bright on dark): Gaussian blur, Otsu threshold, holes filled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlurOtsuFill:
    """Gaussian blur (sigma px, at the image's own size), Otsu's threshold on the blurred image
    (foreground above it), then holes filled. Colour images are averaged over channels first."""

    sigma: float = 1.5

    @property
    def name(self) -> str:
        return f"blur σ{self.sigma:g} + Otsu + fill"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        from scipy.ndimage import binary_fill_holes
        from skimage.filters import gaussian, threshold_otsu

        pixels = np.asarray(image, dtype=np.float64)
        if pixels.ndim == 3:
            pixels = pixels.mean(axis=-1)
        if pixels.ndim != 2:
            raise ValueError(f"expected a 2-D image, got shape {np.shape(image)}")
        if not np.isfinite(pixels).all() or pixels.min() == pixels.max():
            return np.zeros(pixels.shape, dtype=bool)  # nothing to separate
        blurred = gaussian(pixels, sigma=self.sigma, preserve_range=True)
        return binary_fill_holes(blurred > threshold_otsu(blurred))


#: The baseline of each modality that has one.
BASELINES = {"microscopy": BlurOtsuFill()}
