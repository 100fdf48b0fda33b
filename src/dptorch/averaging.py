"""Exponential moving average of the weights (De et al. 2022, arXiv 2204.13650, section 3.3).

Averaging the iterates of private training smooths out the injected noise at no privacy
cost: the average is computed from the released (noised) parameters only.

Privacy: post-processing. The average is a function of the sequence of private models, so
it has the same (epsilon, delta) guarantee as the run; nothing here touches data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from dptorch.errors import DPValueError
from dptorch.validation import check_number


class ParameterEMA:
    """Shadow copies of a model's floating-point parameters and buffers, averaged each update.

    ``shadow <- d * shadow + (1 - d) * current`` with ``d = min(decay, (1 + n) / (10 + n))``
    after ``n`` updates, the usual warm-up so the first iterates are not over-weighted.

    Args:
        model: the model being trained (the user's own module; no copy of it is made).
        decay: the long-run averaging factor, in ``[0, 1)``.

    Call :meth:`update` after each ``optimizer.step()``; evaluate with the averaged weights
    inside ``with ema.applied():`` (the trained weights are restored on exit).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        value = check_number("decay", decay)
        if not 0.0 <= value < 1.0:
            raise DPValueError(f"decay={decay!r} must be in [0, 1); 0.999 is typical.")
        self.model = model
        self.decay = value
        self.updates = 0
        self.shadow: dict[str, Tensor] = {
            name: tensor.detach().clone() for name, tensor in self._tracked().items()
        }

    def _tracked(self) -> dict[str, Tensor]:
        state = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        return {name: t for name, t in state.items() if t.is_floating_point()}

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, tensor in self._tracked().items():
            self.shadow[name].lerp_(tensor.detach(), 1.0 - decay)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """Swap the averaged weights into the model for the block, then restore the trained ones."""
        tracked = self._tracked()
        saved = {name: t.detach().clone() for name, t in tracked.items()}
        with torch.no_grad():
            for name, tensor in tracked.items():
                tensor.copy_(self.shadow[name])
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for name, tensor in tracked.items():
                    tensor.copy_(saved[name])

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        assert isinstance(shadow, dict)
        missing = set(self.shadow) ^ set(shadow)
        if missing:
            raise DPValueError(
                f"EMA state does not match the model: differing entries {sorted(missing)}. "
                "Load the EMA state saved for this model."
            )
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        self.updates = int(state["updates"])  # type: ignore[call-overload]
        for name, value in shadow.items():
            self.shadow[name].copy_(value)
