"""A small private training run that checkpoints every step and can be made to die.

Run by tests/test_failure_injection.py as ``python tests/failure_worker.py DIR STEPS [FAULT]
[--secure] [--noise SIGMA]``. It resumes from ``DIR/run.pt`` when that exists, trains to
STEPS steps (saving after each) and writes ``DIR/final.pt`` (parameters and accountant
history). FAULT is ``KIND:N``: SIGKILL itself at the N-th time it reaches KIND, one of

* ``forward``, ``backward``, ``step``: before the forward pass, after backward, after
  ``optimizer.step()`` (the update is made, its checkpoint not yet written);
* ``write``: in the middle of writing the checkpoint's temporary file (``N`` counts saves,
  the cut falls at ``FRACTION`` of its bytes: ``write:N:FRACTION``);
* ``replace``: after the temporary file is complete and fsynced, before it is renamed;
* ``dirsync``: after the rename, before the directory is fsynced.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dptorch.safe_torch_file as safe_torch_file
from dptorch import PrivacyEngine

N, BATCH = 48, 12  # q = 1/4: four batches per pass, so runs cross pass boundaries
_seen: Counter[str] = Counter()
_fault: tuple[str, int, float] | None = None


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _reach(kind: str) -> None:
    if _fault is None or _fault[0] != kind:
        return
    _seen[kind] += 1
    if _seen[kind] == _fault[1]:
        _die()


def _install_save_faults() -> None:
    real_save, real_replace, real_dirsync = (
        torch.save,
        os.replace,
        safe_torch_file._fsync_directory,
    )

    def save(obj: Any, file: Any) -> None:
        if _fault is not None and _fault[0] == "write" and _seen["write"] + 1 == _fault[1]:
            buffer = io.BytesIO()
            real_save(obj, buffer)
            data = buffer.getvalue()
            file.write(data[: int(len(data) * _fault[2])])
            file.flush()
            os.fsync(file.fileno())
            _die()
        _seen["write"] += 1
        real_save(obj, file)

    def replace(source: Any, target: Any) -> None:
        _reach("replace")
        real_replace(source, target)

    def dirsync(directory: Path) -> None:
        _reach("dirsync")
        real_dirsync(directory)

    safe_torch_file.torch.save = save  # type: ignore[attr-defined]
    safe_torch_file.os.replace = replace  # type: ignore[attr-defined]
    safe_torch_file._fsync_directory = dirsync  # type: ignore[attr-defined]


def build(secure: bool, noise: float) -> tuple[PrivacyEngine, nn.Module, Any, DataLoader]:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(N, 6), torch.randint(0, 3, (N,)))
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    engine = PrivacyEngine(accountant="rdp", secure_mode=secure)
    generator = None if secure else torch.Generator().manual_seed(1)
    module, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        data_loader=DataLoader(data, batch_size=BATCH, generator=torch.Generator().manual_seed(2)),
        noise_multiplier=noise,
        max_grad_norm=1.0,
        noise_generator=generator,
    )
    return engine, module, optimizer, loader


def main(argv: list[str]) -> None:
    global _fault
    torch.set_num_threads(1)  # one thread: bit-for-bit equal runs in every process
    directory, steps = Path(argv[0]), int(argv[1])
    secure = "--secure" in argv
    noise = float(argv[argv.index("--noise") + 1]) if "--noise" in argv else 1.0
    spec = next((a for a in argv[2:] if ":" in a), None)
    if spec is not None:
        kind, count, *rest = spec.split(":")
        _fault = (kind, int(count), float(rest[0]) if rest else 0.5)
    _install_save_faults()
    engine, module, optimizer, loader = build(secure, noise)
    checkpoint = directory / "run.pt"
    step = 0
    if checkpoint.exists():
        info = engine.load_checkpoint(
            path=checkpoint, module=module, optimizer=optimizer, data_loader=loader
        )
        step = int(info.metadata["step"])
        assert info.steps == step, (info.steps, step)  # the budget spent is the steps done
    while step < steps:
        for x, y in loader:
            _reach("forward")
            optimizer.zero_grad()
            F.cross_entropy(module(x), y).backward()
            _reach("backward")
            optimizer.step()
            _reach("step")
            step += 1
            engine.save_checkpoint(
                path=checkpoint,
                module=module,
                optimizer=optimizer,
                data_loader=loader,
                metadata={"step": step},
            )
            if step == steps:
                break
    final = {
        "params": [p.detach().clone() for p in module.parameters()],
        "history": [list(e) for e in engine.accountant.history],
    }
    torch.save(final, directory / "final.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
