"""Step time of the benchmark transformer with stock attention vs DPMultiheadAttention.

The "transformer" config of ``training.py`` (Embedding 10000x256, 2 encoder layers, 4 heads,
ff 1024, seq 64, batch 32): plain PyTorch, dptorch with stock ``nn.MultiheadAttention``
(torch.func fallback for the attention) and dptorch with every attention replaced by
``DPMultiheadAttention.from_module`` (one-pass Linear rule). Modes are interleaved step by
step in one process, so load from other processes on a shared machine hits them alike.

    python benchmarks/attention_swap.py --rounds 15
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training  # the benchmarks' training step

from dptorch import PrivacyEngine
from dptorch.layers import DPMultiheadAttention

try:
    from benchmarks.training import MeanPoolTransformer
except ImportError:  # run as a script from benchmarks/
    from training import MeanPoolTransformer  # type: ignore[no-redef]


def _swap_attention(model: nn.Module) -> nn.Module:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(parent, name, DPMultiheadAttention.from_module(child))
    return model


def _step_fn(mode: str, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = MeanPoolTransformer()
    if mode == "dptorch-dpmha":
        model = _swap_attention(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    if mode != "plain":
        loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
        model, optimizer, _ = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0,
        )  # fmt: skip
    return training.training_step(model, optimizer, nn.CrossEntropyLoss(), x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(10_000, (32, 64), generator=g), torch.randint(2, (32,), generator=g)
    modes = ["plain", "dptorch-stock-mha", "dptorch-dpmha"]
    steps = {mode: _step_fn(mode, x, y) for mode in modes}
    for step in steps.values():  # warm-up
        step()
        step()
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode, step in steps.items():
            start = time.perf_counter()
            step()
            times[mode].append(time.perf_counter() - start)
    plain = statistics.median(times["plain"])
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, {args.rounds} interleaved rounds")  # fmt: skip
    for mode in modes:
        median = statistics.median(times[mode])
        print(f"{mode:20s} median {median * 1e3:8.1f} ms  ({median / plain:.2f}x plain)")


if __name__ == "__main__":
    main()
