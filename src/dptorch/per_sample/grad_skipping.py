"""Keep autograd from computing parameter gradients that DP-SGD throws away.

The private gradient of a hooked layer is built from its inputs and output gradients; the
ordinary ``p.grad`` that autograd would also compute in the user's backward pass is never
released. So for the duration of each forward call of such a layer, its trainable parameters
are replaced (in ``module._parameters``) by detached aliases of the same storage: autograd
then computes only input gradients. When nothing upstream needs gradients (the first layer,
an embedding), the layer's output is made a fresh leaf that requires grad, so its output
gradient is still captured and nothing is spent differentiating towards the input.

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
                return output.detach().requires_grad_(True)
            return None

        return restore
