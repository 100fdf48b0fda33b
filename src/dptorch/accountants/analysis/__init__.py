"""Pure privacy analysis: functions from mechanism parameters to privacy curves.

Nothing here keeps state or knows about training; the accountants in
:mod:`dptorch.accountants` call these functions on the history they record.
"""

from __future__ import annotations

from dptorch.accountants.analysis.rdp import DEFAULT_ORDERS, compute_rdp, rdp_to_epsilon

__all__ = ["DEFAULT_ORDERS", "compute_rdp", "rdp_to_epsilon"]
