"""The release's per-parameter views of its flat buffer: the same views ``split`` + ``view``
give, writes land in the buffer, also for empty, scalar and offset buffers."""

from __future__ import annotations

import torch
from torch import nn

from dptorch.optimizers.dp_optimizer import _contiguous_strides, _param_views

SHAPES = [(3, 4), (), (0, 5), (5, 0), (2, 3, 4), (7,)]


def _members() -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(shape)) for shape in SHAPES]


def test_strides_are_those_of_a_contiguous_tensor() -> None:
    for shape in SHAPES:
        assert _contiguous_strides(torch.Size(shape)) == torch.empty(shape).stride()


def test_views_equal_split_and_view_and_write_into_the_buffer() -> None:
    members = _members()
    sizes = [p.numel() for p in members]
    storage = torch.arange(sum(sizes) + 3, dtype=torch.float32)
    flat = storage[3:]  # a buffer that starts inside its storage
    views = _param_views(members, sizes, flat)
    expected = [c.view(p.shape) for p, c in zip(members, flat.split(sizes), strict=True)]
    for view, reference, param in zip(views, expected, members, strict=True):
        assert view.shape == param.shape
        assert view.stride() == reference.stride()
        torch.testing.assert_close(view, reference)
    views[0].fill_(-1.0)  # writes go to the buffer
    assert (flat[: sizes[0]] == -1.0).all()
    assert flat[sizes[0]] == float(sizes[0] + 3)  # and nowhere else


def test_a_non_contiguous_buffer_takes_split_and_view() -> None:
    members = [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(3))]
    flat = torch.arange(14, dtype=torch.float32)[::2]  # 7 values, stride 2
    views = _param_views(members, [4, 3], flat)
    torch.testing.assert_close(views[0], torch.tensor([[0.0, 2.0], [4.0, 6.0]]))
    torch.testing.assert_close(views[1], torch.tensor([8.0, 10.0, 12.0]))
