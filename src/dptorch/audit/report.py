"""``AuditReport``: what an audit found, as numbers, text, JSON and (optionally) a plot."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dptorch.errors import MissingDependencyError

__all__ = ["AuditReport"]


@dataclass(frozen=True)
class AuditReport:
    """The result of an audit: an empirical lower bound against the accountant's epsilon.

    Attributes:
        epsilon_lower_bound: with probability at least ``confidence``, training is not
            (eps, delta)-DP for any eps below this.
        epsilon_upper_bound: the accountant's epsilon at ``delta`` for the same run.
        delta: the delta both bounds are measured at.
        confidence: the confidence of the lower bound, e.g. 0.95.
        method: ``"one-run"`` or ``"many-run"``.
        canary: ``"gradient"`` or ``"input"``.
        scores: one score per canary (one-run) or per training run (many-run).
        included: whether that canary was trained on, aligned with ``scores``.
        settings: the audited run (noise multiplier, clipping norm, sample rate, ...).
        details: how the bound was reached (guesses made and correct, or the threshold).

    Privacy: ``violated`` (lower bound above upper bound) shows, at the stated confidence,
    that the run did not have the privacy its accountant reported. ``not violated`` proves
    nothing: an audit only ever gives a lower bound.
    """

    epsilon_lower_bound: float
    epsilon_upper_bound: float
    delta: float
    confidence: float
    method: str
    canary: str
    scores: np.ndarray = field(repr=False)
    included: np.ndarray = field(repr=False)
    settings: Mapping[str, Any] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def violated(self) -> bool:
        """Whether the lower bound exceeds the accountant's epsilon (a privacy bug)."""
        return self.epsilon_lower_bound > self.epsilon_upper_bound

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready types (scores and memberships as lists)."""
        return {
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "epsilon_upper_bound": _json_number(self.epsilon_upper_bound),
            "violated": self.violated,
            "delta": self.delta,
            "confidence": self.confidence,
            "method": self.method,
            "canary": self.canary,
            "settings": dict(self.settings),
            "details": {k: _json_number(v) for k, v in self.details.items()},
            "scores": [float(s) for s in self.scores],
            "included": [bool(i) for i in self.included],
        }

    def summary(self) -> str:
        """A few lines for people: the two bounds and the verdict."""
        verdict = (
            "VIOLATION: the lower bound exceeds the accountant's epsilon; this run is less "
            "private than reported."
            if self.violated
            else "consistent: no evidence against the accountant's epsilon (an audit cannot "
            "prove privacy, only find its absence)."
        )
        found = ", ".join(f"{k}={_short(v)}" for k, v in self.details.items())
        ran = ", ".join(f"{k}={_short(v)}" for k, v in self.settings.items())
        return "\n".join(
            [
                f"{self.method} audit, {self.canary} canaries, {len(self.scores)} scores",
                f"  run:           {ran}",
                f"  lower bound:   epsilon >= {self.epsilon_lower_bound:.3f} "
                f"({self.confidence:.0%} confidence; {found})",
                f"  upper bound:   epsilon <= {self.epsilon_upper_bound:.3f} "
                f"(accountant, delta = {self.delta:g})",
                f"  verdict:       {verdict}",
            ]
        )

    def plot(self, path: str | None = None, *, bins: int = 40, ax: Any = None) -> Any:
        """Histograms of the scores of included and excluded canaries.

        Args:
            path: save the figure here (PNG, SVG, ... by extension) when given.
            bins: histogram bins.
            ax: a matplotlib Axes to draw on; a new figure when ``None``.

        Returns:
            The matplotlib Axes (``ax.figure`` is its figure).

        Raises:
            MissingDependencyError: matplotlib is not installed
                (``pip install matplotlib``).
        """
        try:
            # The object API: no pyplot state, no backend switched behind the user's back.
            from matplotlib.figure import Figure
        except ImportError as error:
            raise MissingDependencyError(
                "AuditReport.plot needs matplotlib, which is not installed; run "
                "`pip install matplotlib` (or `pip install 'dptorch[demo]'`)."
            ) from error
        if ax is None:
            ax = Figure(figsize=(6, 3.5)).subplots()
        member = np.asarray(self.included, dtype=bool)
        edges = np.histogram_bin_edges(self.scores, bins=bins)
        ax.hist(self.scores[member], bins=edges, alpha=0.6, label="included")
        ax.hist(self.scores[~member], bins=edges, alpha=0.6, label="excluded")
        ax.set_xlabel("canary score")
        ax.set_ylabel("count")
        ax.set_title(
            f"eps >= {self.epsilon_lower_bound:.2f} (audit) vs "
            f"eps <= {self.epsilon_upper_bound:.2f} (accountant)"
        )
        ax.legend()
        if path is not None:
            ax.figure.savefig(path, bbox_inches="tight")
        return ax


def _json_number(value: Any) -> Any:
    """JSON has no infinity: an infinite float becomes the string 'inf'."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
