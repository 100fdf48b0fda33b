"""An embedding's per-example gradients are never formed densely: no ``[B, vocab, dim]`` tensor.

A private step of a model with a large vocabulary must cost memory of the order of the
embedding weight (its noise and its released gradient), not ``B`` times it. Each case below
runs a private step under the profiler and checks the largest single tensor allocated against
the same model's non-private step: ``[B, vocab, dim]`` is 16 times the weight, so a dense
per-example gradient (or any ``B``-fold copy of the weight) could not go unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset

from dptorch import BatchMemoryManager, PrivacyEngine

BATCH, VOCAB, DIM, LENGTH = 16, 4000, 64, 8
WEIGHT_BYTES = VOCAB * DIM * 4
DENSE_PER_EXAMPLE_BYTES = BATCH * WEIGHT_BYTES  # the allocation that must never happen


class BagOfTokens(nn.Module):
    """Embedding, mean over positions, linear head; ``tied``: a language-model head over the
    vocabulary that shares the embedding's weight (two terms of one parameter: index rows and
    a dense outer product), read out as 3 class scores."""

    def __init__(self, tied: bool = False, padding_idx: int | None = None) -> None:
        super().__init__()
        self.tied = tied
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=padding_idx)
        if tied:
            self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
            self.lm_head.weight = self.embed.weight
        self.head = nn.Linear(DIM, 3) if not tied else nn.Linear(VOCAB, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = torch.tanh(self.embed(tokens))  # [B, T, dim]
        if self.tied:
            return self.head(self.lm_head(hidden).mean(dim=1))  # [B, T, vocab] -> [B, 3]
        return self.head(hidden.mean(dim=1))


def _data(rows: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (rows, LENGTH), generator=generator)
    return TensorDataset(tokens, torch.randint(0, 3, (rows,), generator=generator))


def _largest_allocation(run: Callable[[], None]) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    largest = 0
    pending = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while pending:
        node = pending.pop()
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            largest = max(largest, int(node.extra_fields.alloc_size))
        pending.extend(node.children)
    return largest


def _plain_step(model: nn.Module) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens, labels = _data(BATCH).tensors

    def run() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens), labels).backward()
        optimizer.step()

    return run


def _private_steps(
    model: nn.Module, *, norm_route: str, multiplicity: int = 1, physical: int | None = None
) -> Callable[[], None]:
    rows = BATCH * multiplicity
    model, optimizer, loader = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(rows * 4), batch_size=rows),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        norm_route=norm_route,  # type: ignore[arg-type]
        augmentation_multiplicity=multiplicity,
        poisson_sampling=False,  # fixed batches: the sizes are exact (epsilon is not read)
    )
    criterion = nn.CrossEntropyLoss()

    def one_step(tokens: Tensor, labels: Tensor) -> None:
        optimizer.zero_grad()
        criterion(model(tokens), labels).backward()
        optimizer.step()

    def run() -> None:
        if physical is None:
            tokens, labels = next(iter(loader))
            one_step(tokens, labels)
            return
        with BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=physical, optimizer=optimizer
        ) as batches:
            for tokens, labels in batches:
                one_step(tokens, labels)

    return run


@pytest.mark.filterwarnings("ignore:poisson_sampling=False")
@pytest.mark.parametrize(
    ("case", "build"),
    [
        ("auto", lambda: _private_steps(BagOfTokens(), norm_route="auto")),
        ("ghost", lambda: _private_steps(BagOfTokens(), norm_route="ghost")),
        ("instantiate", lambda: _private_steps(BagOfTokens(), norm_route="instantiate")),
        ("padding_idx", lambda: _private_steps(BagOfTokens(padding_idx=0), norm_route="auto")),
        ("tied head", lambda: _private_steps(BagOfTokens(tied=True), norm_route="auto")),
        (
            "augmentation multiplicity",
            lambda: _private_steps(BagOfTokens(), norm_route="auto", multiplicity=2),
        ),
        (
            "physical batches",
            lambda: _private_steps(BagOfTokens(), norm_route="auto", physical=BATCH // 4),
        ),
    ],
)
def test_a_private_step_never_allocates_a_dense_per_example_embedding_gradient(
    case: str, build: Callable[[], Callable[[], None]]
) -> None:
    torch.manual_seed(0)
    largest = _largest_allocation(build())
    plain = _largest_allocation(_plain_step(BagOfTokens(tied=case == "tied head")))
    # Weight-sized tensors (the noise, the released gradient) and whatever the non-private
    # step allocates (the tied head's [B, T, vocab] logits) are expected; B times the weight
    # is not.
    allowed = max(2 * WEIGHT_BYTES, plain)
    assert allowed * 4 <= DENSE_PER_EXAMPLE_BYTES  # the check can tell the two apart
    assert largest <= allowed, (
        f"{case}: a {largest / 2**20:.2f} MB allocation in a private step (the weight is "
        f"{WEIGHT_BYTES / 2**20:.2f} MB, the plain step's largest {plain / 2**20:.2f} MB, a "
        f"dense [B, vocab, dim] {DENSE_PER_EXAMPLE_BYTES / 2**20:.2f} MB)"
    )
