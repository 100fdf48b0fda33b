"""Empirical privacy auditing: check dptorch's DP-SGD against its own accountant.

An audit trains with canaries (examples the auditor adds, each with probability 1/2), scores
them, and turns the scores into a statistical LOWER bound on epsilon. A lower bound above the
accountant's epsilon (``report.violated``) is evidence of a privacy bug; a lower bound below
it proves nothing more than that this audit found no bug.

    from dptorch.audit import audit_dpsgd, small_classification_data, small_mlp
    report = audit_dpsgd(small_mlp, small_classification_data(), noise_multiplier=2.6,
                         max_grad_norm=1.0, sample_rate=0.5, steps=20)
    print(report.summary())

One run: :func:`audit_dpsgd` (Steinke, Nasr, Jagielski 2023, arXiv 2305.08846). Many runs:
:func:`audit_dpsgd_many_runs` (Clopper-Pearson). The bounds alone, from scores you computed:
:func:`one_run_lower_bound_from_scores`, :func:`many_run_lower_bound_from_scores`.
"""

from __future__ import annotations

from dptorch.audit.builtin_setup import (
    AuditSetup,
    small_classification_data,
    small_mlp,
    small_setup,
)
from dptorch.audit.canaries import GradientCanaries, InputCanaries
from dptorch.audit.faults import FAULTS, planted_fault
from dptorch.audit.many_run_bound import (
    ManyRunBound,
    clopper_pearson_upper,
    many_run_lower_bound_from_scores,
)
from dptorch.audit.many_runs import audit_dpsgd_many_runs
from dptorch.audit.one_run import audit_dpsgd
from dptorch.audit.one_run_bound import (
    OneRunBound,
    one_run_epsilon_lower_bound,
    one_run_lower_bound_from_scores,
    one_run_p_value,
)
from dptorch.audit.report import AuditReport

__all__ = [
    "FAULTS",
    "AuditReport",
    "AuditSetup",
    "GradientCanaries",
    "InputCanaries",
    "ManyRunBound",
    "OneRunBound",
    "audit_dpsgd",
    "audit_dpsgd_many_runs",
    "clopper_pearson_upper",
    "many_run_lower_bound_from_scores",
    "one_run_epsilon_lower_bound",
    "one_run_lower_bound_from_scores",
    "one_run_p_value",
    "planted_fault",
    "small_classification_data",
    "small_mlp",
    "small_setup",
]
