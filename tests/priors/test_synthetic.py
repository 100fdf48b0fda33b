"""Dead-leaves images and random views: shapes, ranges, determinism, and refusals."""

from __future__ import annotations

import pytest
import torch

from dptorch import DPTypeError, DPValueError
from dptorch.priors import dead_leaves, random_views


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (1, 5)])
def test_images_have_the_asked_shape_and_lie_in_the_unit_interval(channels: int, size: int) -> None:
    images = dead_leaves(7, size=size, channels=channels, generator=_gen(0))
    assert images.shape == (7, channels, size, size)
    assert images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_the_same_generator_state_gives_the_same_images() -> None:
    assert torch.equal(dead_leaves(4, generator=_gen(3)), dead_leaves(4, generator=_gen(3)))
    assert not torch.equal(dead_leaves(4, generator=_gen(3)), dead_leaves(4, generator=_gen(4)))


def test_each_pixel_shows_one_shape_or_the_background() -> None:
    # With 3 shapes an image has at most 4 grey levels: 3 shape colours and black.
    images = dead_leaves(50, shapes=3, generator=_gen(1))
    for image in images:
        assert len(torch.unique(image)) <= 4


def test_later_shapes_cover_earlier_ones() -> None:
    """Many shapes of sizes up to half the image leave little background, and the images
    are not flat: occlusion produces edges (a check that painting happened at all)."""
    images = dead_leaves(20, shapes=40, generator=_gen(2))
    background = (images == 0).float().mean()
    assert background < 0.1
    assert images.flatten(1).std(dim=1).min() > 0.05


def test_images_past_the_first_painting_chunk_are_painted_too() -> None:
    """dead_leaves paints 256 images at a time into an uninitialised buffer: every image of a
    batch of 300 must be a painting (at most 6 grey levels for 5 shapes, all in [0, 1]), and
    the second chunk no copy of the first."""
    images = dead_leaves(300, shapes=5, generator=_gen(7))
    assert images.shape == (300, 1, 28, 28)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert all(len(torch.unique(image)) <= 6 for image in images)
    assert not torch.equal(images[:44], images[256:])


def test_zero_images_is_an_empty_batch() -> None:
    assert dead_leaves(0, generator=_gen(0)).shape == (0, 1, 28, 28)


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"count": -1}, DPValueError, "count=-1"),
        ({"count": 2.5}, DPTypeError, "count=2.5"),
        ({"count": 2, "size": 3}, DPValueError, "size=3"),
        ({"count": 2, "channels": 0}, DPValueError, "channels=0"),
        ({"count": 2, "shapes": True}, DPTypeError, "shapes=True"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], error: type, names: str) -> None:
    with pytest.raises(error, match=names):
        dead_leaves(**kwargs)  # type: ignore[arg-type]


def test_views_keep_the_shape_differ_from_the_image_and_repeat_with_the_generator() -> None:
    images = dead_leaves(16, generator=_gen(0))
    views = random_views(images, generator=_gen(5))
    assert views.shape == images.shape
    assert not torch.allclose(views, images)
    assert torch.equal(views, random_views(images, generator=_gen(5)))


def test_views_refuse_what_is_not_a_float_image_batch() -> None:
    with pytest.raises(DPTypeError, match=r"\[N, C, H, W\]"):
        random_views(torch.zeros(3, 28, 28))
    with pytest.raises(DPTypeError, match=r"\[N, C, H, W\], got torch\.uint8"):
        random_views(torch.zeros(3, 1, 28, 28, dtype=torch.uint8))
