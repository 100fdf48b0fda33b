"""Augmentation multiplicity against a one-example-at-a-time oracle.

With ``K`` rows per example, the applied gradient (noise 0) must be
``sum_i clip_C(mean_k g_{i,k}) / (q N)``, where ``g_{i,k}`` is the gradient of row ``(i, k)``'s
own loss, computed by plain autograd one example (all its rows) at a time.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dptorch import PrivacyEngine
from dptorch.data.augmentation import AugmentationMultiplicity, flatten_views
from dptorch.data.empty_batch import empty_batch_like
from dptorch.errors import DPValueError
from tests.per_sample.layer_cases import CASES, LayerCase

pytestmark = pytest.mark.filterwarnings("ignore::dptorch.DPWarning")

EXAMPLES = 4
VIEWS = 3
DATASET = 40
LOADER_BATCH = 8  # q N = 8, not the realised 4 examples

# Batch-first cases only: the oracle below slices rows along dimension 0.
GROUPED_CASES = [c for c in CASES if c.batch_first and c.output_batch_dim == 0]


def _row_losses(out: Tensor, target: Tensor) -> Tensor:
    diff = out - target
    return (diff**2).reshape(diff.shape[0], -1).sum(dim=1)


def _oracle(model: nn.Module, x: Tensor, target: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads: dict[str, list[Tensor]] = {n: [] for n, _ in named}
    for i in range(EXAMPLES):
        model.zero_grad(set_to_none=True)
        rows = slice(i * VIEWS, (i + 1) * VIEWS)
        _row_losses(model(x[rows]), target[rows]).mean().backward()  # mean over its views
        for n, p in named:
            grads[n].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    stacked = {n: torch.stack(g) for n, g in grads.items()}
    norms = torch.sqrt(sum(g.reshape(EXAMPLES, -1).pow(2).sum(dim=1) for g in stacked.values()))
    return stacked, norms


@pytest.mark.parametrize("route", ["auto", "ghost", "instantiate"])
@pytest.mark.parametrize("case", GROUPED_CASES, ids=str)
def test_views_of_one_example_are_averaged_then_clipped_once(case: LayerCase, route: str) -> None:
    torch.manual_seed(0)
    model = case.make_model().to(case.dtype)
    x = case.make_input(EXAMPLES * VIEWS)
    x = x.to(case.dtype) if x.is_floating_point() else x
    with torch.no_grad():
        target = torch.randn_like(model(x))
    per_example, norms = _oracle(model, x, target)
    max_grad_norm = float(norms.median())  # about half the examples are clipped
    factors = torch.clamp(max_grad_norm / norms, max=1.0)
    expected = {
        n: (g * factors.reshape(-1, *[1] * (g.dim() - 1))).sum(dim=0) / LOADER_BATCH
        for n, g in per_example.items()
    }

    model.zero_grad(set_to_none=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loader = DataLoader(TensorDataset(torch.zeros(DATASET, 1)), batch_size=LOADER_BATCH)
    model, optimizer, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        norm_route=route,
        augmentation_multiplicity=VIEWS,
    )
    _row_losses(model(x), target).mean().backward()
    optimizer.step()

    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(
                param.grad,
                expected[name],
                rtol=1e-5 if case.dtype == torch.float64 else 1e-4,
                atol=1e-10 if case.dtype == torch.float64 else 1e-6,
                msg=lambda m, n=name: f"{case.name}: {n}: {m}",
            )
    stats = optimizer.last_step_stats
    assert stats is not None and stats.batch_size == EXAMPLES


@pytest.mark.parametrize("case", [c for c in GROUPED_CASES if c.name.startswith("conv")], ids=str)
def test_recomputed_conv_terms_are_grouped_exactly(
    case: LayerCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conv term that kept only its rows' norms is formed again to average its rows."""
    from dptorch.per_sample.rules import conv

    monkeypatch.setattr(conv, "_recompute_saves_memory", lambda module, x, grad: True)
    test_views_of_one_example_are_averaged_then_clipped_once(case, "instantiate")


# A layer called twice forms its calls' gradients again in any case: the norm of their sum
# needs them (as without multiplicity).
ONE_CALL_CONV_CASES = [
    c for c in GROUPED_CASES if c.name.startswith("conv") and "twice" not in c.name
]


@pytest.mark.parametrize("case", ONE_CALL_CONV_CASES, ids=str)
def test_recomputed_conv_rows_are_formed_once_under_multiplicity(
    case: LayerCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backward pass takes the norms of each example's mean over its rows, so the step
    never forms the rows' per-example gradients again to group them."""
    from dptorch.per_sample.rules import conv

    formed: list[int] = []
    original = conv.per_example_weight_grads

    def counting(x: Tensor, grad: Tensor, module: nn.Module) -> Tensor:
        formed.append(x.shape[0])
        return original(x, grad, module)

    monkeypatch.setattr(conv, "per_example_weight_grads", counting)
    test_recomputed_conv_terms_are_grouped_exactly(case, monkeypatch)
    assert sum(formed) == EXAMPLES * VIEWS  # each row once (the oracle runs plain autograd)


def test_a_recomputed_term_over_single_rows_is_still_grouped_exactly() -> None:
    """A term whose norms are of single rows (a registered rule's) is formed and averaged."""
    from dptorch.per_sample.grouping import group_rows
    from dptorch.per_sample.terms import RecomputedTerm

    param = nn.Parameter(torch.zeros(2, 3))
    rows = torch.randn(EXAMPLES * VIEWS, 2, 3, dtype=torch.float64)
    term = RecomputedTerm(
        param,
        rows.flatten(1).pow(2).sum(dim=1),
        form=lambda: rows,
        contract=lambda f, sanitize: (rows * f[:, None, None]).sum(dim=0),
    )
    grouped = group_rows(term, VIEWS)
    means = rows.reshape(EXAMPLES, VIEWS, 2, 3).mean(dim=1)
    assert grouped.batch_size == EXAMPLES
    torch.testing.assert_close(grouped.norm_sq(), means.flatten(1).pow(2).sum(dim=1))
    factors = torch.rand(EXAMPLES, dtype=torch.float64)
    torch.testing.assert_close(
        grouped.weighted_sum(factors), (means * factors[:, None, None]).sum(dim=0)
    )


def _private_linear(views: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(3, 2)
    loader = DataLoader(TensorDataset(torch.zeros(DATASET, 1)), batch_size=LOADER_BATCH)
    model, optimizer, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        augmentation_multiplicity=views,
    )
    return model, optimizer


def test_a_batch_that_is_not_a_multiple_of_the_views_is_refused() -> None:
    model, optimizer = _private_linear(3)
    model(torch.randn(7, 3)).sum().backward()
    with pytest.raises(DPValueError, match=r"7 rows.*augmentation_multiplicity=3"):
        optimizer.step()


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_a_bad_multiplicity_is_refused_before_anything_is_attached(bad: object) -> None:
    model = nn.Linear(3, 2)
    loader = DataLoader(TensorDataset(torch.zeros(DATASET, 1)), batch_size=LOADER_BATCH)
    with pytest.raises(DPValueError, match="augmentation_multiplicity"):
        PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            augmentation_multiplicity=bad,  # type: ignore[arg-type]
        )
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_dataset_wrapper_gives_adjacent_views_and_empty_batches_work() -> None:
    base = TensorDataset(torch.arange(10.0).reshape(10, 1), torch.arange(10) % 2)
    wrapped = AugmentationMultiplicity(base, lambda x: x + 0.5 * torch.rand(()), multiplicity=3)
    views, labels = wrapped[4]
    assert views.shape == (3, 1) and labels.tolist() == [0, 0, 0]
    assert bool(((views >= 4) & (views <= 4.5)).all())
    x, y = flatten_views([wrapped[1], wrapped[2]])
    assert x.shape == (6, 1) and y.tolist() == [1, 1, 1, 0, 0, 0]

    model = nn.Linear(1, 2)
    loader = DataLoader(wrapped, batch_size=4, collate_fn=flatten_views)
    engine = PrivacyEngine()
    model, optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        augmentation_multiplicity=3,
        noise_generator=torch.Generator().manual_seed(0),
    )
    for xb, yb in private_loader:
        assert xb.shape[0] == yb.shape[0] and xb.shape[0] % 3 == 0
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    empty_x, empty_y = empty_batch_like(wrapped[0], flatten_views)
    assert empty_x.shape == (0, 1) and empty_y.shape == (0,)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(empty_x), empty_y).backward()
    optimizer.step()  # an empty Poisson batch: noise only, one accounting step
    assert optimizer.last_step_stats is not None
    assert optimizer.last_step_stats.batch_size == 0
    assert engine.get_epsilon(1e-5) > 0
