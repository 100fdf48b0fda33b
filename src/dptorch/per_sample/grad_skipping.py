"""Keep autograd from computing parameter gradients that DP-SGD throws away.

The private gradient of a hooked layer is built from its inputs and output gradients; the
ordinary ``p.grad`` that autograd would also compute in the user's backward pass is never
released. So for the duration of each forward call of such a layer, its trainable parameters
are replaced (in ``module._parameters``) by detached aliases of the same storage: autograd
then computes only input gradients. When nothing upstream needs gradients (the first layer,
an embedding), the layer's output is given a graph node of its own (:func:`start_graph_at`),
so its output gradient is still captured and nothing is spent differentiating towards the
input.

The originals are restored by an always-called forward hook, so the module looks unchanged
outside its own forward, also after an exception. A parameter that still receives ``.grad``
was used outside its module's forward call, which the engine reports.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dptorch.per_sample.capture import HOOK_MARK


def inside_functorch() -> bool:
    """Whether a torch.func transform (vmap, grad) is running the current forward."""
    return torch._C._functorch.peek_interpreter_stack() is not None


class ParameterGradSkipper:
    """Swaps trainable parameters for detached aliases during each forward of ``modules``.

    Args:
        modules: ``{module: [names of its direct trainable parameters]}``.
    """

    def __init__(self, modules: dict[nn.Module, list[str]]) -> None:
        self._modules = modules
        self._saved: dict[nn.Module, list[list[tuple[str, nn.Parameter]]]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [m._parameters[n] for m, names in self._modules.items() for n in names]  # type: ignore[misc]

    def attach(self, *, prepend: bool = False) -> None:
        """Register before the capture's hooks (or ``prepend`` to them, if those are in place):
        they must see the replaced output."""
        for module, names in self._modules.items():
            pre = self._make_pre_hook(names)
            post = self._make_post_hook()
            setattr(pre, HOOK_MARK, True)
            setattr(post, HOOK_MARK, True)
            self._handles.append(module.register_forward_pre_hook(pre, prepend=prepend))
            self._handles.append(
                module.register_forward_hook(post, always_call=True, prepend=prepend)
            )

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_pre_hook(self, names: list[str]) -> Any:
        def swap(module: nn.Module, args: Any) -> None:
            if not torch.is_grad_enabled() or inside_functorch():
                # A torch.func re-run (the fallback rule of an enclosing module) owns the
                # parameters for its duration; leave them, and its output, alone.
                self._saved.setdefault(module, []).append([])
                return
            originals: list[tuple[str, nn.Parameter]] = []
            for name in names:
                param = module._parameters[name]
                assert param is not None  # names hold only registered parameters
                originals.append((name, param))
                module._parameters[name] = param.detach()  # type: ignore[assignment]
            self._saved.setdefault(module, []).append(originals)

        return swap

    def _make_post_hook(self) -> Any:
        def restore(module: nn.Module, args: Any, output: Any) -> Any:
            stack = self._saved.get(module)
            if not stack:
                return None
            originals = stack.pop()
            for name, param in originals:
                module._parameters[name] = param
            if (
                originals
                and isinstance(output, Tensor)
                and not output.requires_grad
                and output.is_floating_point()
            ):
                # Nothing upstream needs gradients: start the graph here.
                return start_graph_at(output)
            return None

        return restore


class _GraphStart(torch.autograd.Function):
    """Identity on ``tensor`` that gives it a ``grad_fn``, so gradients reach its hooks.

    ``anchor`` is an empty tensor that requires grad (the node's reason to exist); the
    backward returns no gradient for either input, so nothing is spent past this node.
    """

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, tensor: Tensor) -> Tensor:  # type: ignore[override]
        if torch.compiler.is_compiling():
            # A compiled graph treats an input returned as is as a view of it, and refuses
            # in-place operations on such views; a copy is an output of its own.
            return tensor.clone()
        # Marked dirty and returned as is: the output IS ``tensor`` (no copy), now a
        # non-leaf, so in-place operations on it (``ReLU(inplace=True)``) are allowed.
        ctx.mark_dirty(tensor)
        return tensor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None]:  # type: ignore[override]
        return None, None


def start_graph_at(output: Tensor) -> Tensor:
    """``output`` (which needs no gradient) as the first node of a graph that requires grad.

    Why not ``output.detach().requires_grad_()``: a leaf that requires grad refuses in-place
    operations (a first ``Conv2d`` followed by ``ReLU(inplace=True)`` failed), its
    ``AccumulateGrad`` node holds it until the backward pass reaches the node (plain
    training frees a first convolution's output once the next layer has read it: 3 MB of
    the benchmark CNN's peak), and its ``.grad`` held the output gradient once more.
    """
    if output._is_view():
        # Marking a view dirty would rewrite its base's history; a fresh tensor has none.
        output = output.clone()
    anchor = torch.empty(0, dtype=output.dtype, device=output.device, requires_grad=True)
    result: Tensor = _GraphStart.apply(anchor, output)
    return result
