"""Images from a random process ("dead leaves"): data with nothing private in it.

A dead-leaves image is a stack of random opaque shapes (ellipses and rectangles of random
position, orientation, aspect and grey level, sizes log-uniform) painted one over another. Such
images have the edges, occlusions and scale mix of natural images, and a network trained on
them learns edge and texture detectors without seeing any real data (Baradad et al. 2021,
arXiv 2106.05963). Tang et al. (arXiv 2306.06076) use such priors to initialise DP-SGD.

Privacy: every function here draws from its ``generator`` alone and reads no data, so its
output, and any weights learned from it, are independent of every training set: using them
costs no privacy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dptorch.errors import DPTypeError
from dptorch.validation import check_int

__all__ = ["dead_leaves", "random_views"]

# Images painted at once: 256 x 40 shapes x 28 x 28 is ~32 MB per temporary.
_PAINT_CHUNK = 256


def dead_leaves(
    count: int,
    *,
    size: int = 28,
    channels: int = 1,
    shapes: int = 40,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``[count, channels, size, size]`` dead-leaves images with values in [0, 1].

    Each image paints ``shapes`` shapes in order, later ones on top, over a black background.
    A shape is an ellipse or a rectangle (even odds) with a uniform random centre, a
    log-uniform half-length between 1.5 pixels and half the image, an aspect ratio in [0.25, 1],
    a uniform orientation and, per channel, a uniform grey level.

    Args:
        count: number of images.
        size: height and width in pixels (>= 4).
        channels: 1 for grey images, 3 for colour.
        shapes: shapes painted per image.
        generator: the source of all randomness (the global one when ``None``); the same
            generator state gives the same images.
    """
    count = check_int("count", count, 0)
    size = check_int("size", size, 4)
    channels = check_int("channels", channels, 1)
    shapes = check_int("shapes", shapes, 1)
    g = generator

    def uniform(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g)

    grid = torch.arange(size, dtype=torch.float32)
    rows, cols = grid.view(1, 1, size, 1), grid.view(1, 1, 1, size)
    centre_x, centre_y = uniform(count, shapes, 1, 1) * size, uniform(count, shapes, 1, 1) * size
    smallest, largest = 1.5, size / 2
    half_length = smallest * (largest / smallest) ** uniform(count, shapes, 1, 1)
    half_width = half_length * (0.25 + 0.75 * uniform(count, shapes, 1, 1))
    angle = uniform(count, shapes, 1, 1) * math.pi
    is_ellipse = uniform(count, shapes, 1, 1) < 0.5
    colours = uniform(count, shapes + 1, channels)
    colours[:, 0] = 0.0  # index 0: the background

    # Every random number is drawn above, so painting in chunks (which bounds the
    # [images, shapes, size, size] temporaries) gives the same images as one pass.
    order = torch.arange(1, shapes + 1).view(1, shapes, 1, 1)
    images = torch.empty(count, channels, size, size)
    for start in range(0, count, _PAINT_CHUNK):
        part = slice(start, start + _PAINT_CHUNK)
        dx, dy = cols - centre_x[part], rows - centre_y[part]  # [n, shapes, size, size]
        cos, sin = torch.cos(angle[part]), torch.sin(angle[part])
        along, across = dx * cos + dy * sin, dy * cos - dx * sin
        inside = torch.where(
            is_ellipse[part],
            (along / half_length[part]) ** 2 + (across / half_width[part]) ** 2 <= 1,
            (along.abs() <= half_length[part]) & (across.abs() <= half_width[part]),
        )
        # The visible shape at a pixel is the last one painted there: the largest 1-based
        # index (0: none, the background).
        visible = (inside * order).amax(dim=1).flatten(1)  # [n, H*W]
        pixels = torch.gather(colours[part], 1, visible.unsqueeze(-1).expand(-1, -1, channels))
        images[part] = pixels.view(-1, size, size, channels).permute(0, 3, 1, 2)
    return images


def random_views(images: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """A random view of each image, for contrastive learning: the same geometry and
    photometry changes a real image could undergo.

    Per image: scale in [0.7, 1.2], rotation within +-0.3 rad, a horizontal flip with odds 1/2,
    a shift within +-10% of the size (all as one affine resampling, zeros outside), contrast
    in [0.6, 1.4] and brightness within +-0.2 around mid-grey, and inversion with odds 1/5.

    Args:
        images: ``[N, C, H, W]`` floats in about [0, 1].
        generator: the source of randomness.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = (
            f"{images.dtype} {tuple(images.shape)}"
            if isinstance(images, Tensor)
            else type(images).__name__
        )
        raise DPTypeError(f"images must be a float tensor [N, C, H, W], got {got}.")
    count, g = images.shape[0], generator

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(count, generator=g)

    scale, angle = uniform(0.7, 1.2), uniform(-0.3, 0.3)
    flip = torch.where(torch.rand(count, generator=g) < 0.5, -1.0, 1.0)
    shift_x, shift_y = uniform(-0.2, 0.2), uniform(-0.2, 0.2)  # affine_grid spans [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift_x], 1), torch.stack([sin * flip, cos, shift_y], 1)],
        dim=1,
    )  # [N, 2, 3]
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)
    contrast = uniform(0.6, 1.4).view(count, 1, 1, 1).to(images.dtype)
    brightness = uniform(-0.2, 0.2).view(count, 1, 1, 1).to(images.dtype)
    views = (views - 0.5) * contrast + 0.5 + brightness
    invert = (torch.rand(count, generator=g) < 0.2).view(count, 1, 1, 1)
    return torch.where(invert, 1.0 - views, views)
