"""Contrastive pretraining on dead leaves: the loss against a row-by-row oracle, that the
pretraining learns, that it is reproducible, and its refusals."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dptorch import DPTypeError, DPValueError
from dptorch.priors import nt_xent_loss, pretrain_on_dead_leaves


def _nt_xent_by_rows(first: torch.Tensor, second: torch.Tensor, temperature: float) -> float:
    """The loss written out one row at a time, in float64."""
    rows = torch.cat([first, second]).double()
    rows = rows / rows.norm(dim=1, keepdim=True)
    pairs, total = first.shape[0], 0.0
    for i in range(2 * pairs):
        partner = (i + pairs) % (2 * pairs)
        others = [j for j in range(2 * pairs) if j != i]
        logits = torch.stack([rows[i] @ rows[j] / temperature for j in others])
        chosen = rows[i] @ rows[partner] / temperature
        total += float(torch.logsumexp(logits, 0) - chosen)
    return total / (2 * pairs)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
def test_loss_matches_the_row_by_row_oracle(temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    expected = _nt_xent_by_rows(first, second, temperature)
    assert float(nt_xent_loss(first, second, temperature)) == pytest.approx(expected, rel=1e-5)


def test_identical_views_far_apart_give_a_loss_near_zero() -> None:
    # Orthogonal pairs, views equal: every row finds its partner with certainty.
    embeddings = torch.eye(4) * 10
    assert float(nt_xent_loss(embeddings, embeddings, temperature=0.05)) < 1e-6


def test_loss_refuses_mismatched_embeddings() -> None:
    with pytest.raises(DPValueError, match=r"\(3, 4\) and \(3, 5\)"):
        nt_xent_loss(torch.zeros(3, 4), torch.zeros(3, 5))


def _tiny_encoder() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
    )  # [N, 1, 16, 16] -> [N, 8, 6, 6] -> [N, 8, 2, 2] -> [N, 32]


def _pretrain(seed: int, steps: int) -> tuple[nn.Module, float, float]:
    torch.manual_seed(seed)
    encoder = _tiny_encoder()
    report = pretrain_on_dead_leaves(
        encoder,
        embedding_dim=32,
        steps=steps,
        batch_size=32,
        pool_size=128,
        image_size=16,
        lr=0.1,
        generator=torch.Generator().manual_seed(seed),
    )
    assert report.steps == steps and report.seconds > 0
    return encoder, report.first_loss, report.final_loss


def test_pretraining_lowers_the_contrastive_loss() -> None:
    _, first, final = _pretrain(seed=0, steps=300)
    assert first == pytest.approx(math.log(63), abs=0.5)  # chance level at the start
    assert final < first - 0.5  # 4.10 -> 3.01 when written


def test_pretraining_is_a_function_of_the_seeds_alone() -> None:
    one, _, _ = _pretrain(seed=3, steps=5)
    two, _, _ = _pretrain(seed=3, steps=5)
    for a, b in zip(one.parameters(), two.parameters(), strict=True):
        assert torch.equal(a, b)


def test_pretraining_keeps_the_encoders_mode() -> None:
    encoder = _tiny_encoder().eval()
    pretrain_on_dead_leaves(
        encoder, embedding_dim=32, steps=1, batch_size=4, pool_size=4, image_size=16
    )
    assert not encoder.training


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"steps": 0}, DPValueError, "steps=0"),
        ({"batch_size": 1}, DPValueError, "batch_size=1"),
        ({"lr": -1.0}, DPValueError, "lr=-1.0"),
        ({"embedding_dim": "32"}, DPTypeError, "embedding_dim='32'"),
        ({"normalize": (0.0, 0.0)}, DPValueError, "normalize std"),
        ({"normalize": 0.5}, DPTypeError, "normalize=0.5"),
        ({"normalize": ("a", 1.0)}, DPTypeError, "normalize mean='a'"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], error: type, names: str) -> None:
    arguments: dict[str, object] = {"embedding_dim": 32, "image_size": 16, "pool_size": 4}
    with pytest.raises(error, match=names):
        pretrain_on_dead_leaves(_tiny_encoder(), **{**arguments, **kwargs})  # type: ignore[arg-type]


def test_a_wrong_embedding_width_names_the_right_one_and_changes_nothing() -> None:
    encoder = _tiny_encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(DPValueError, match=r"embedding_dim=8 .* pass embedding_dim=32"):
        pretrain_on_dead_leaves(encoder, embedding_dim=8, image_size=16, pool_size=4)
    assert encoder.training
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, before[name])


def test_an_encoder_that_is_no_module_is_refused() -> None:
    with pytest.raises(DPTypeError, match=r"encoder must be an nn\.Module"):
        pretrain_on_dead_leaves(lambda x: x, embedding_dim=4)  # type: ignore[arg-type]
