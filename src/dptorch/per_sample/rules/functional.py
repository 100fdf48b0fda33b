"""Fallback for any other module that owns parameters: per-sample gradients by ``torch.func``.

The module's forward is re-run on each example alone (``vmap`` over the batch) and
differentiated against the output gradient captured from the user's backward:
``g_i = d/dtheta <module(x_i; theta), G_i>``. This is exact for any module whose output for
example ``i`` depends only on input ``i``, at the cost of one more forward and backward of
that module. Capture is paused during the re-run so inner layers are not recorded twice.

Randomness inside the module (dropout) is redrawn independently per example, so the per-sample
gradient uses a fresh mask: each example's clipped contribution still depends on that example
alone, which is what the privacy argument needs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from dptorch.errors import DPValueError
from dptorch.per_sample.capture import CallRecord
from dptorch.per_sample.rules.base import RuleContext
from dptorch.per_sample.terms import DenseTerm, GradTerm

# Modules that use their children's parameters directly (not by calling the children), so
# the fallback must own their whole subtree.
SUBTREE_OWNERS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def owned_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters the fallback computes for ``module``: direct ones, or its subtree's."""
    recurse = isinstance(module, SUBTREE_OWNERS)
    return list(module.named_parameters(recurse=recurse))


def functional_rule(module: nn.Module, record: CallRecord, ctx: RuleContext) -> list[GradTerm]:
    owned = [(name, p) for name, p in owned_parameters(module) if ctx.wants(p)]
    if not owned:
        return []
    batch_dim = 0 if ctx.batch_first else 1
    grads = [
        (i, g) for i, g in zip(record.output_positions, record.grads, strict=True) if g is not None
    ]
    batch = grads[0][1].shape[batch_dim]
    if batch == 0:  # an empty Poisson batch: vmap cannot map over zero examples
        return [DenseTerm(p, p.detach().new_zeros((0, *p.shape))) for _, p in owned]
    leaves, spec = tree_flatten((record.args, record.kwargs))
    batched = [
        isinstance(leaf, Tensor) and leaf.dim() > batch_dim and leaf.shape[batch_dim] == batch
        for leaf in leaves
    ]
    names = [name for name, _ in owned]

    def example_loss(
        params: tuple[Tensor, ...], leaves_i: list[Any], grads_i: list[Tensor]
    ) -> Tensor:
        inputs = [
            leaf.unsqueeze(batch_dim) if is_batched else leaf
            for leaf, is_batched in zip(leaves_i, batched, strict=True)
        ]
        args, kwargs = tree_unflatten(inputs, spec)
        out = functional_call(module, dict(zip(names, params, strict=True)), args, kwargs)
        out_leaves, _ = tree_flatten(out)
        total = torch.zeros((), dtype=grads_i[0].dtype, device=grads_i[0].device)
        for (position, _), grad_i in zip(grads, grads_i, strict=True):
            total = total + (out_leaves[position] * grad_i.unsqueeze(batch_dim)).sum()
        return total

    leaf_dims = [batch_dim if is_batched else None for is_batched in batched]
    params = tuple(p.detach() for _, p in owned)
    per_sample = vmap(
        grad(example_loss),
        in_dims=(None, leaf_dims, [batch_dim] * len(grads)),
        randomness="different",
    )
    try:
        # no_grad: torch.func's grad still differentiates inside, but nothing outside records
        # the re-run. Without it, a module whose children own trainable parameters (a
        # recurrent layer inside it) returned per-sample gradients that were themselves
        # differentiable functions of those parameters.
        with ctx.capture.paused(), torch.no_grad():
            results = per_sample(params, leaves, [g for _, g in grads])
    except Exception as error:  # torch.func raises many types; re-raise with the module path
        raise DPValueError(
            f"{record.path} ({type(module).__name__}) has no dedicated per-sample rule and "
            f"torch.func could not compute its per-sample gradients: {error}. Replace it with "
            "a supported layer (see ModuleValidator) or register a rule with "
            "dptorch.per_sample.register_rule."
        ) from error
    return [DenseTerm(p, g) for (_, p), g in zip(owned, results, strict=True)]
