"""Weight averaging: the recurrence, warm-up, evaluation swap and state round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dptorch.averaging import ParameterEMA
from dptorch.errors import DPValueError


def test_average_follows_the_warmed_up_recurrence_and_restores_the_trained_weights() -> None:
    model = nn.Linear(2, 1)
    ema = ParameterEMA(model, decay=0.9)
    expected = model.weight.detach().clone()
    for n in range(30):
        with torch.no_grad():
            model.weight.add_(1.0)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * model.weight.detach()
        ema.update()
    torch.testing.assert_close(ema.shadow["weight"], expected)
    trained = model.weight.detach().clone()
    with ema.applied() as averaged:
        torch.testing.assert_close(averaged.weight.detach(), expected)
    torch.testing.assert_close(model.weight.detach(), trained)


def test_state_round_trip_and_mismatch() -> None:
    model = nn.Linear(2, 1)
    ema = ParameterEMA(model, decay=0.5)
    ema.update()
    other = ParameterEMA(nn.Linear(2, 1), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and other.decay == 0.5
    torch.testing.assert_close(other.shadow["bias"], ema.shadow["bias"])
    with pytest.raises(DPValueError, match="does not match"):
        ParameterEMA(nn.Sequential(nn.Linear(2, 1))).load_state_dict(ema.state_dict())


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_bad_decay_is_refused(decay: float) -> None:
    with pytest.raises(DPValueError, match="decay"):
        ParameterEMA(nn.Linear(1, 1), decay=decay)
