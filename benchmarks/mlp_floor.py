"""How close an eager DP-SGD step can get to plain PyTorch on the benchmark MLP.

Run: ``.venv/bin/python benchmarks/mlp_floor.py`` (``--blocks N``; about a minute on two CPU
cores). Writes ``benchmarks/results/mlp_floor.json`` and ``.md``.

Three steps of ``training.py``'s MLP (784-512-512-10, batch 256, 2 threads) alternate in
blocks in one process: plain PyTorch, dptorch's default route, and a hand-written private step
with the same arithmetic and nothing else: the forward keeps each layer's input, one
``autograd.grad`` gives the output gradients (no parameter gradients), the norms are
``|a_i|^2 |g_i|^2 + |g_i|^2`` per layer, the noise is one draw of dptorch's compiled sampler,
and each layer's clipped sum is accumulated into its view of the noise by one ``addmm_``. It
has no checks, no hooks and no accounting, so it is a floor for eager PyTorch, not a
competitor: the gap between it and dptorch is dptorch's own bookkeeping.

The same two private steps built with noise multiplier 0 (both then zero-fill the noise
buffer instead of drawing it) alternate in the same blocks, so one run also says what the
noise costs each of them and whether the gap to the floor depends on it.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import interleaved  # the alternating-blocks timer
import training  # the benchmark models and their step functions

from dptorch.cpu_sampler import kernel_available, kernel_normal_chunks_

LEARNING_RATE = 0.01


def hand_written_step() -> Callable[[], None]:
    """The floor: a private step of ``training.MODELS['mlp']`` in a few eager operations."""
    torch.manual_seed(0)
    spec = training.MODELS["mlp"]
    x, y = spec.batch(torch.Generator().manual_seed(0))
    model = spec.build()
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    params = [p for layer in layers for p in (layer.weight, layer.bias)]
    for p in params:
        p.requires_grad_(False)  # autograd differentiates towards the outputs only
    sizes = [p.numel() for p in params]
    noise = torch.empty(sum(sizes))
    generator = torch.Generator().manual_seed(1)
    batch = len(x)
    std = training.NOISE_MULTIPLIER * training.MAX_GRAD_NORM / batch
    criterion = spec.criterion()

    def release(inputs: list[Tensor], grads: tuple[Tensor, ...]) -> None:
        norm_sq = torch.zeros(batch)
        for a, g in zip(inputs, grads, strict=True):
            g_sq = g.square().sum(1)
            norm_sq += a.square().sum(1) * g_sq + g_sq
        norms = norm_sq.sqrt() * batch  # the mean loss scales every output gradient by 1/B
        factors = (training.MAX_GRAD_NORM / (norms + 1e-6)).clamp_(max=1.0)
        if std == 0:
            noise.zero_()  # what dptorch does at noise multiplier 0
        else:
            seeds = torch.randint(0, 2**63 - 1, (torch.get_num_threads(),), generator=generator)
            kernel_normal_chunks_(noise, std, seeds.tolist())
        views = noise.split(sizes)
        for k, (a, g) in enumerate(zip(inputs, grads, strict=True)):
            scaled = g * factors[:, None]  # g already carries 1/B: this is c_i g_i / B
            views[2 * k].view(layers[k].weight.shape).addmm_(scaled.t(), a)
            views[2 * k + 1].add_(scaled.sum(0))
        for p, v in zip(params, views, strict=True):
            p.sub_(v.view(p.shape), alpha=LEARNING_RATE)

    def step() -> None:
        inputs, outputs = [], []
        h = x
        for k, layer in enumerate(layers):
            inputs.append(h)
            out = nn.functional.linear(h, layer.weight, layer.bias)
            if k == 0:
                out.requires_grad_(True)  # the graph starts at the first output
            outputs.append(out)
            h = torch.relu(out) if k < len(layers) - 1 else out
        grads = torch.autograd.grad(criterion(h, y), outputs)
        with torch.no_grad():
            release(inputs, grads)

    return step


@contextmanager
def _noise_multiplier(value: float) -> Iterator[None]:
    """Build steps with ``training.NOISE_MULTIPLIER`` set to ``value`` (restored after)."""
    saved = training.NOISE_MULTIPLIER
    training.NOISE_MULTIPLIER = value
    try:
        yield
    finally:
        training.NOISE_MULTIPLIER = saved


NOISELESS = " (noise multiplier 0)"


def measure(blocks: int) -> dict[str, object]:
    torch.set_num_threads(training.THREADS)
    warnings.simplefilter("ignore")
    steps = {
        "plain": training._prepare("mlp", "plain")[0],
        "dptorch-auto": training._prepare("mlp", "dptorch-auto")[0],
        "hand-written private step": hand_written_step(),
    }
    with _noise_multiplier(0.0):
        steps["dptorch-auto" + NOISELESS] = training._prepare("mlp", "dptorch-auto")[0]
        steps["hand-written private step" + NOISELESS] = hand_written_step()
    for step in [*steps.values(), *steps.values()]:
        step()
    return interleaved.alternate(steps, blocks, "plain")


def _differences(ms: dict[str, float]) -> list[str]:
    """What the noise costs each private step, and dptorch's gap to the floor with and
    without it (median step times; differences of medians, so only roughly additive)."""
    dp, floor = "dptorch-auto", "hand-written private step"
    return [
        f"- the noise: dptorch {ms[dp] - ms[dp + NOISELESS]:.2f} ms, the floor "
        f"{ms[floor] - ms[floor + NOISELESS]:.2f} ms a step;",
        f"- dptorch minus the floor: {ms[dp] - ms[floor]:.2f} ms with noise, "
        f"{ms[dp + NOISELESS] - ms[floor + NOISELESS]:.2f} ms without.",
    ]


def write(result: dict[str, object], total_s: float) -> None:
    meta = training.run_meta(total_s)
    lines = [
        training.results_heading("MLP step floor", meta, training.THREADS),
        "",
        "Command: `.venv/bin/python benchmarks/mlp_floor.py`. Steps alternate in blocks of "
        f"{interleaved.BLOCK_STEPS}; {result['blocks']} blocks.",
        "",
        *interleaved.alternate_table(result),
        "",
        *_differences(result["median_ms"]),  # type: ignore[arg-type]
    ]
    training.save_results("mlp_floor", {"meta": meta, **result}, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--blocks", type=int, default=20, help="blocks per step kind")
    args = parser.parse_args()
    if not kernel_available():
        sys.exit("the compiled kernel is not built: reinstall dptorch with a C compiler")
    started = time.perf_counter()
    result = measure(args.blocks)
    write(result, time.perf_counter() - started)


if __name__ == "__main__":
    main()
