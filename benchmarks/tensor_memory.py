"""Peak growth of live torch tensor memory during training, from the profiler's allocation events.

The resident-set measure in ``training.py`` (``VmHWM``) counts what the process holds from
the kernel, which depends on the C allocator as much as on the tensors: glibc keeps freed
blocks in its heaps or returns them, depending on their size and on what was freed before,
so two steps that allocate the same tensors in a different order can differ by tens of MB.
This measure counts the tensors only, as ``torch.cuda.max_memory_allocated`` does on a GPU:
every CPU tensor allocation and free, in order, from ``torch.profiler`` with
``profile_memory=True``; the result is the highest total of live tensor bytes during the
training steps minus the total just before the first step (set-up excluded, so the model's
weights and the data are not counted, but everything a step allocates, gradients, optimizer
state and buffers kept across steps included).

The events are read from ``prof.profiler.kineto_results.experimental_event_tree()``, an
experimental torch interface (used here with torch 2.13); if it changes, the worker
records ``tensor_peak_error`` instead of a number.

Frees of blocks allocated before the profiler started are not reported by the profiler, so
call it on a fresh set-up with nothing else being freed meanwhile; such a free could only
make the result too high, never too low.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.profiler import ProfilerActivity, profile, record_function

TRAINING_MARK = "benchmark::training_steps"


def tensor_peak_growth_mb(prepare: Callable[[], Callable[[], Any]], steps: int) -> float:
    """MB of live tensor memory above the pre-training level at the peak of ``steps`` steps.

    Args:
        prepare: builds the model, optimizer and data and returns one training step.
        steps: how many steps to run (the first one included: its one-time buffers count).
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = prepare()
        with record_function(TRAINING_MARK):
            for _ in range(steps):
                step()
    events: list[tuple[int, int]] = []  # (time ns, bytes: + allocated, - freed)
    training_start: int | None = None
    pending = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while pending:
        node = pending.pop()
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation":
            events.append((node.start_time_ns, int(fields.alloc_size)))
        elif node.name == TRAINING_MARK:
            training_start = node.start_time_ns
        pending.extend(node.children)
    if training_start is None:
        raise RuntimeError("the profiler recorded no training steps")
    events.sort()
    total = baseline = peak = 0
    for time_ns, size in events:
        total += size
        if time_ns < training_start:
            baseline = peak = total
        else:
            peak = max(peak, total)
    return (peak - baseline) / 2**20
