"""The pieces of dptorch.fsdp that need no process group: shard layout and noise seeds."""

from __future__ import annotations

import math

import pytest
import torch

from dptorch.fsdp import _ShardLayout, shard_seed


@pytest.mark.parametrize(
    ("shape", "dim", "world_size"),
    [
        ((7, 6), 0, 2),
        ((7, 6), 0, 3),
        ((1, 3), 0, 2),
        ((5,), 0, 4),
        ((4, 6), 1, 2),
        ((2, 3, 4), 2, 2),
    ],
)
def test_each_row_holds_the_chunk_fsdp_gives_that_rank(
    shape: tuple[int, ...], dim: int, world_size: int
) -> None:
    full = torch.randn(shape)
    layout = _ShardLayout(torch.Size(shape), dim, math.ceil(shape[dim] / world_size), world_size)
    rows = layout.rows_per_rank(full)
    assert rows.shape == (world_size, layout.padded_numel)
    chunks = list(torch.chunk(full, world_size, dim=dim))  # FSDP2's split, empty ones missing
    for rank in range(world_size):
        expected = chunks[rank].flatten() if rank < len(chunks) else torch.empty(0)
        assert torch.equal(rows[rank, : expected.numel()], expected)
        assert not rows[rank, expected.numel() :].any()  # padding is zero


def test_noise_seeds_differ_between_streams_for_any_common_draw() -> None:
    streams = 6  # e.g. 3 ranks x 2 (device, dtype) groups
    for base in (0, 1, 12345, (2**63 - 1) // streams - 1):
        seeds = [shard_seed(base, stream, streams) for stream in range(streams)]
        assert len(set(seeds)) == streams
        assert max(seeds) < 2**63
    # Ranks whose common draws differ (no shared noise_generator) cannot collide either:
    # a seed's stream is the seed mod streams.
    for base0, base1 in [(5, 4), (4, 5), (0, 0), (7, 3)]:
        assert shard_seed(base0, 0, 2) != shard_seed(base1, 1, 2)
