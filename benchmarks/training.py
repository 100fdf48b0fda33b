"""Training-step speed and memory: plain PyTorch, dptorch (each norm route) and Opacus 1.6.

Run: ``make bench`` (or ``.venv/bin/python benchmarks/training.py``). Options: ``--quick``
(few steps, a smoke run), ``--models mlp,cnn`` (a subset), ``--profile`` (torch.profiler top
ops of dptorch's steps instead of timing). Writes ``benchmarks/results/training.json`` and
``training.md`` (``--output STEM`` writes ``STEM.json``/``.md`` instead).

Every (model, mode) runs in a fresh process (this script, re-invoked with ``--worker``), so
one configuration's allocator state, caches and imports never leak into another's numbers.
A step is ``zero_grad, forward, loss, backward, optimizer.step()``; for the private modes it
includes clipping, noise and the accountant's bookkeeping. Each step feeds the same fixed
synthetic batch: the loader handed to ``make_private`` only fixes ``q = batch / N``, so
Poisson batch-size variance never enters the timings.

Memory is the growth of the process's resident set during training: the kernel's high-water
mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` just before the first step, and
growth = ``VmHWM`` after the last step minus ``VmRSS`` before the first. Where that is not
available it falls back to ``ru_maxrss`` after minus before, which misses any peak reached
during setup. The method used is recorded with each result. Part of that growth is not
memory the step holds: pages of the shared libraries' code that the first steps touch are
resident too (file-backed, ~20 MB for the CNN, plain or private alike); their growth
(``RssFile`` after minus before) is reported beside it, so the anonymous part can be read
off. After the timing, each worker
also measures the peak growth of live tensor memory alone over a few steps of a new set-up
(``tensor_memory.py``: the profiler's allocation events, the CPU analogue of
``torch.cuda.max_memory_allocated``), which the C allocator's caching cannot blur.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tensor_memory import tensor_peak_growth_mb

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2
DATASET_SIZE = 60_000  # q = batch / DATASET_SIZE
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
MODES = (
    "plain",
    "dptorch-auto",
    "dptorch-ghost",
    "dptorch-instantiate",
    "dptorch-secure",  # norm_route="auto" with PrivacyEngine(secure_mode=True)
    "opacus-hooks",
    "opacus-ghost",
)
RESULT_TAG = "RESULT "
# Slow configurations get fewer timed steps: about STEP_BUDGET_S of timed stepping, but never
# fewer than MIN_STEPS. Warm-up stops early (after at least one step) past WARMUP_BUDGET_S.
STEP_BUDGET_S = 40.0
MIN_STEPS = 5
WARMUP_BUDGET_S = 15.0
# A row is marked "(contended)" when other processes kept more cores than this busy on
# average while it was timed (the machine is shared; see ``other_busy_cores``).
CONTENDED_CORES = 0.3
# Steps run under the memory profiler for the live-tensor peak (the first one included).
TENSOR_PEAK_STEPS = 3


# -- models ------------------------------------------------------------------------------
class MeanPoolTransformer(nn.Module):
    def __init__(self, vocab: int = 10_000, dim: int = 256, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 4, dim_feedforward=1024, batch_first=True)
            for _ in range(2)
        )
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)  # [B, T, d]
        for layer in self.encoder:
            h = layer(h)
        return self.head(h.mean(dim=1))  # [B, classes]


class RecurrentClassifier(nn.Module):
    """Embedding -> stock ``nn.LSTM``/``nn.GRU`` -> Linear on the last step.

    The private modes swap the recurrent layer for its DP-ready version (dptorch: ``DPLSTM``
    or ``DPGRU`` via ``from_module``; Opacus: its ``ModuleValidator.fix``).
    """

    def __init__(
        self, vocab: int = 10_000, dim: int = 128, classes: int = 2, cell: type = nn.LSTM
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = cell(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))  # [B, T, d]
        return self.head(out[:, -1])


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(8, cout)
        self.skip = (
            nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(h)) + self.skip(x))


def small_resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),  # [B, 16, 32, 32]
        nn.GroupNorm(8, 16),
        nn.ReLU(),
        ResidualBlock(16, 16, 1),
        ResidualBlock(16, 32, 2),  # [B, 32, 16, 16]
        ResidualBlock(32, 64, 2),  # [B, 64, 8, 8]
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)  # each [B, T, d]
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, d/H]
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class GPTBlockLM(nn.Module):
    """Token + position embeddings, one pre-norm decoder block, a language-model head."""

    def __init__(self, vocab: int = 10_000, dim: int = 256, seq: int = 256) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(seq, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, 4)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Positions as [B, T]: per-sample engines need every layer to see the batch. Contiguous
        # because Opacus's ghost embedding norm calls .view on the indices.
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        positions = positions.expand_as(tokens).contiguous()
        h = self.tokens(tokens) + self.positions(positions)  # [B, T, d]
        h = h + self.attention(self.norm1(h))
        h = h + self.mlp(self.norm2(h))
        return self.head(self.norm_out(h))  # [B, T, vocab]


class SequenceCrossEntropy(nn.Module):
    """Mean token loss per sequence (the privacy unit is a sequence), then ``reduction``.

    Has a ``reduction`` attribute because Opacus's ghost mode sets it to ``"none"`` to read
    per-example losses.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        tokens = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [B, T]
        per_sequence = tokens.mean(dim=1)  # [B]
        if self.reduction == "none":
            return per_sequence
        return per_sequence.sum() if self.reduction == "sum" else per_sequence.mean()


@dataclass(frozen=True)
class ModelSpec:
    description: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    criterion: Callable[[], nn.Module] = nn.CrossEntropyLoss


def _images(b: int, c: int, h: int) -> Callable[[torch.Generator], tuple[torch.Tensor, ...]]:
    return lambda g: (torch.randn(b, c, h, h, generator=g), torch.randint(10, (b,), generator=g))


def _tokens(b: int, t: int, classes: int) -> Callable[[torch.Generator], tuple[torch.Tensor, ...]]:
    return lambda g: (
        torch.randint(10_000, (b, t), generator=g),
        torch.randint(classes, (b,), generator=g),
    )


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(
        "MLP 784-512-512-10, batch 256",
        lambda: nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        ),
        lambda g: (torch.randn(256, 784, generator=g), torch.randint(10, (256,), generator=g)),
    ),
    "cnn": ModelSpec(
        "MNIST CNN (2 conv + 2 linear), batch 256",
        lambda: nn.Sequential(
            nn.Conv2d(1, 16, 8, 2, padding=3),
            nn.ReLU(),
            nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, 2),
            nn.ReLU(),
            nn.MaxPool2d(2, 1),
            nn.Flatten(),
            nn.Linear(512, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        ),
        _images(256, 1, 28),  # type: ignore[arg-type]
    ),
    "transformer": ModelSpec(
        "Embedding 10000x256 + 2 encoder layers (4 heads, ff 1024), seq 64, batch 32",
        MeanPoolTransformer,
        _tokens(32, 64, 2),  # type: ignore[arg-type]
    ),
    "lstm": ModelSpec(
        "Embedding 10000x128 + nn.LSTM 128 (dptorch: DPLSTM), seq 64, batch 64",
        RecurrentClassifier,
        _tokens(64, 64, 2),  # type: ignore[arg-type]
    ),
    "gru": ModelSpec(
        "Embedding 10000x128 + nn.GRU 128 (dptorch: DPGRU), seq 64, batch 64",
        lambda: RecurrentClassifier(cell=nn.GRU),
        _tokens(64, 64, 2),  # type: ignore[arg-type]
    ),
    "resnet": ModelSpec(
        "ResNet-style CNN, GroupNorm, 3 residual blocks (16-32-64), 32x32x3, batch 256",
        small_resnet,
        _images(256, 3, 32),  # type: ignore[arg-type]
    ),
    "gpt": ModelSpec(
        "GPT-style block LM: vocab 10000, d 256, 4 heads, seq 256, batch 8",
        GPTBlockLM,
        lambda g: (
            torch.randint(10_000, (8, 256), generator=g),
            torch.randint(10_000, (8, 256), generator=g),
        ),
        SequenceCrossEntropy,
    ),
}


class FixedSizeDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``size`` examples cycling through one batch: only its length (hence q) matters."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, size: int) -> None:
        self.x, self.y, self.size = x, y, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i % len(self.x)], self.y[i % len(self.y)]


# -- one configuration, in a worker process ----------------------------------------------
def _prepare(model_name: str, mode: str) -> tuple[Callable[[], Any], dict[str, Any]]:
    """Build the model for ``mode`` and return ``(one_training_step, notes)``."""
    torch.manual_seed(0)
    spec = MODELS[model_name]
    x, y = spec.batch(torch.Generator().manual_seed(0))
    model = spec.build()
    criterion = spec.criterion()
    loader = DataLoader(FixedSizeDataset(x, y, DATASET_SIZE), batch_size=len(x))
    notes: dict[str, Any] = {"batch_size": len(x), "sample_rate": len(x) / DATASET_SIZE}
    private: dict[str, Any] = {"noise_multiplier": NOISE_MULTIPLIER, "max_grad_norm": MAX_GRAD_NORM}
    accountant: Any = None
    optimizer: torch.optim.Optimizer

    if mode.startswith("dptorch-"):
        import dptorch

        model, replaced = _dp_layers(model)
        if replaced:
            notes["dptorch_fix"] = f"replaced {replaced} with their dptorch.layers versions"
        secure = mode == "dptorch-secure"
        engine = dptorch.PrivacyEngine(secure_mode=secure)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        model, optimizer, _ = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            norm_route="auto" if secure else mode.removeprefix("dptorch-"),  # type: ignore[arg-type]
            **private,
        )
        accountant = engine.accountant
    elif mode.startswith("opacus-"):
        from opacus import PrivacyEngine as OpacusEngine
        from opacus.validators import ModuleValidator as OpacusValidator

        if not OpacusValidator.is_valid(model):
            # e.g. nn.MultiheadAttention -> DPMultiheadAttention, nn.LSTM -> DPLSTM.
            before = {type(m).__name__ for m in model.modules()}
            model = OpacusValidator.fix(model)
            after = {type(m).__name__ for m in model.modules()}
            notes["opacus_fix"] = f"replaced {sorted(before - after)} with {sorted(after - before)}"
        engine = OpacusEngine()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        if mode == "opacus-ghost":
            model, optimizer, criterion, _ = engine.make_private(
                module=model,
                optimizer=optimizer,
                criterion=criterion,
                data_loader=loader,
                grad_sample_mode="ghost",
                **private,
            )
        else:
            model, optimizer, _ = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, **private
            )
        accountant = engine.accountant
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    step = training_step(model, optimizer, criterion, x, y)
    if accountant is not None:
        notes["accountant"] = type(accountant).__name__
        notes["_accountant"] = accountant
    return step, notes


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
) -> Callable[[], None]:
    """The step every benchmark times: ``zero_grad``, forward and loss, ``backward``,
    ``optimizer.step()`` on the fixed batch ``(x, y)``."""

    def step() -> None:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()

    return step


def _dp_layers(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """``dptorch.ModuleValidator.fix``: stock attention / recurrent layers swapped for
    dptorch's DP-ready ones (what the Opacus modes get from Opacus's own ``fix``); returns the
    fixed model and the names of the layer types it replaced."""
    from dptorch import ModuleValidator

    before = {type(m).__name__ for m in model.modules()}
    fixed = ModuleValidator.fix(model)
    after = {type(m).__name__ for m in fixed.modules()}
    return fixed, sorted(before - after)


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM)
    except OSError:
        return False
    return _rss_kib("VmHWM") is not None


def run_worker(model_name: str, mode: str, steps: int, warmup: int) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    warnings.simplefilter("ignore")
    result: dict[str, Any] = {"model": model_name, "mode": mode}
    try:
        step, notes = _prepare(model_name, mode)
    except Exception as error:  # the refusal is the result
        return result | {"error": f"setup: {type(error).__name__}: {error}"}
    accountant = notes.pop("_accountant", None)
    result["notes"] = notes
    file_before = _rss_kib("RssFile")
    if _reset_peak():
        method, before = "VmHWM reset via /proc/self/clear_refs", _rss_kib("VmRSS")
    else:
        method, before = "ru_maxrss after - before", _maxrss_kib()
    busy_before, own_before = _machine_busy_s(), _own_cpu_s()
    times: list[float] = []
    try:
        warm = _timed_steps(step, warmup, budget_s=WARMUP_BUDGET_S)
        if warm[-1] * steps > STEP_BUDGET_S:
            steps = max(MIN_STEPS, int(STEP_BUDGET_S / warm[-1]))
        started = time.perf_counter()
        times = _timed_steps(step, steps, budget_s=math.inf)
        elapsed = time.perf_counter() - started
    except Exception as error:
        result["error"] = f"step {len(times)}: {type(error).__name__}: {error}"
        result["traceback_tail"] = traceback.format_exc().splitlines()[-6:]
        return result
    after = _rss_kib("VmHWM") if method.startswith("VmHWM") else _maxrss_kib()
    file_after = _rss_kib("RssFile")
    quartiles = statistics.quantiles(times, n=4)
    result |= {
        "steps": steps,
        "warmup": len(warm),
        "warmup_ms": [t * 1e3 for t in warm],
        "times_ms": [t * 1e3 for t in times],
        "median_ms": statistics.median(times) * 1e3,
        "iqr_ms": (quartiles[2] - quartiles[0]) * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "peak_growth_mb": ((after or 0) - (before or 0)) / 1024,
        "peak_rss_mb": (_rss_kib("VmHWM") or _maxrss_kib()) / 1024,
        # Resident pages of mapped files (library code first run during the steps): part of
        # peak_growth_mb, but not memory the training holds.
        "file_pages_growth_mb": (
            None if file_before is None or file_after is None else (file_after - file_before) / 1024
        ),
        "memory_method": method,
        # Contention on this shared machine: CPU cores that OTHER processes kept busy, on
        # average, during the timed steps (machine busy time minus this process's own).
        "other_busy_cores": _other_busy_cores(busy_before, own_before, elapsed),
    }
    if accountant is not None:
        history = getattr(accountant, "history", None) or []
        result["accountant_history"] = [list(entry) for entry in history]
    # After the timing, on a new set-up (the profiler slows every op, so it never runs
    # while steps are timed): the live-tensor peak, which the C allocator cannot blur.
    del step, accountant
    gc.collect()
    try:
        result["tensor_peak_growth_mb"] = tensor_peak_growth_mb(
            lambda: _prepare(model_name, mode)[0], TENSOR_PEAK_STEPS
        )
    except Exception as error:
        result["tensor_peak_error"] = f"{type(error).__name__}: {error}"
    return result


def _timed_steps(step: Callable[[], Any], count: int, budget_s: float) -> list[float]:
    """Seconds per step for ``count`` steps, stopping early (after one) past ``budget_s``."""
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) < max(count, 1) and (not times or time.perf_counter() - begin < budget_s):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def _machine_busy_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (``/proc/stat``), or ``None``."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _other_busy_cores(busy_before: float | None, own_before: float, seconds: float) -> float | None:
    busy_after = _machine_busy_s()
    if busy_before is None or busy_after is None or seconds <= 0:
        return None
    others = (busy_after - busy_before) - (_own_cpu_s() - own_before)
    return max(0.0, others / seconds)


def _wait_for_quiet(limit_s: float, threshold_cores: float = 0.5) -> float:
    """Wait (up to ``limit_s``) until other processes use under ``threshold_cores``."""
    begin = time.perf_counter()
    while time.perf_counter() - begin < limit_s:
        before = _machine_busy_s()
        time.sleep(0.5)
        after = _machine_busy_s()
        if before is None or after is None or (after - before) / 0.5 < threshold_cores:
            break
    return time.perf_counter() - begin


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


# -- the driver --------------------------------------------------------------------------
def _plan(quick: bool) -> tuple[int, int]:
    """(timed steps, warm-up steps)."""
    return (5, 1) if quick else (20, 3)


def _run_config(model: str, mode: str, steps: int, warmup: int, timeout: float) -> dict[str, Any]:
    env = os.environ | {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    command = [sys.executable, __file__, "--worker", model, mode]
    command += ["--steps", str(steps), "--warmup", str(warmup)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": model, "mode": mode, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {
            "model": model,
            "mode": mode,
            "error": f"worker exited {done.returncode}: {' | '.join(tail)}",
        }
    result: dict[str, Any] = json.loads(lines[-1].removeprefix(RESULT_TAG))
    result["process_seconds"] = time.perf_counter() - start
    return result


def _opacus_available() -> str | None:
    try:
        import opacus
    except ImportError:
        return None
    return str(opacus.__version__)


def _git(*args: str) -> str:
    """Read-only git output (unstripped: ``status --porcelain`` lines start with a space)."""
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=RESULTS.parent
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save_results(stem: str, payload: dict[str, Any], markdown: list[str]) -> None:
    """Write ``results/<stem>.json`` (``payload``) and ``results/<stem>.md`` (the lines), and
    print the markdown."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))


def results_heading(title: str, meta: dict[str, Any], threads: int) -> str:
    """A results file's first line: ``title``, commit (flagged if the tree was dirty), torch,
    CPU, threads and duration, from :func:`run_meta`'s ``meta``."""
    dirty = " (uncommitted changes)" if meta["uncommitted_changes"] else ""
    return (
        f"# {title}: commit {meta['commit'][:10]}{dirty}, torch {meta['torch']}, {meta['cpu']}, "
        f"{threads} thread{'s' if threads != 1 else ''}, {meta['total_seconds'] / 60:.1f} min"
    )


def run_meta(total_s: float) -> dict[str, Any]:
    """What every results file records about its run: commit, torch, CPU, duration."""
    commit = _git("rev-parse", "HEAD").strip() or "unknown"
    return {
        "commit": commit,
        "uncommitted_changes": bool(_git("status", "--porcelain").strip()),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "total_seconds": total_s,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or reference is None:
        return "-"
    return f"{value / reference:.2f}x"


def _megabytes(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | mode | median ms | IQR ms | steps | vs plain | vs Opacus best "
        "| peak growth MB | of it file pages MB | tensor peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        plain = next((r.get("median_ms") for r in rows if r["mode"] == "plain"), None)
        opacus = [
            r["median_ms"] for r in rows if r["mode"].startswith("opacus") and "median_ms" in r
        ]
        best = min(opacus) if opacus else None
        for r in rows:
            if "median_ms" not in r:
                reason = r.get("error") or r.get("skipped", "")
                reason = reason.replace("|", "/").replace("\n", " ")
                reason = reason if len(reason) <= 160 else reason[:157] + "..."
                lines.append(f"| {model} | {r['mode']} | failed: {reason} | | | | | | | |")
                continue
            busy = r.get("other_busy_cores") or 0.0
            mark = " (contended)" if busy > CONTENDED_CORES else ""
            lines.append(
                f"| {model} | {r['mode']}{mark} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | {r['steps']} | "
                f"{_ratio(r['median_ms'], plain)} | {_ratio(r['median_ms'], best)} | "
                f"{r['peak_growth_mb']:.0f} | {_megabytes(r.get('file_pages_growth_mb'))} | "
                f"{_megabytes(r.get('tensor_peak_growth_mb'))} |"
            )
    return "\n".join(lines)


def run_all(models: list[str], quick: bool, timeout: float, output: str | None = None) -> None:
    """Run every mode of ``models``; a full default run writes ``training.json``/``.md``,
    a ``--quick`` or ``--models`` subset writes ``training.partial.*`` so it never replaces
    the published table."""
    steps, warmup = _plan(quick)
    opacus_version = _opacus_available()
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    for model in models:
        for mode in MODES:
            if mode.startswith("opacus") and opacus_version is None:
                results.append({"model": model, "mode": mode, "skipped": "opacus not installed"})
                continue
            waited = _wait_for_quiet(limit_s=0 if quick else 30)
            result = _run_config(model, mode, steps, warmup, timeout)
            result["waited_for_quiet_s"] = waited
            results.append(result)
            shown = (
                f"{result['median_ms']:.1f} ms (IQR {result['iqr_ms']:.1f}), "
                f"+{result['peak_growth_mb']:.0f} MB (tensors "
                f"+{_megabytes(result.get('tensor_peak_growth_mb'))} MB)"
                if "median_ms" in result
                else result.get("error", "")
            )
            print(f"{model:12s} {mode:20s} {shown}", flush=True)
    total = time.perf_counter() - started
    dirty = [line[3:] for line in _git("status", "--porcelain").splitlines() if line]
    commit = _git("rev-parse", "HEAD").strip() or "unknown"
    meta: dict[str, Any] = {
        "machine": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": THREADS,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus_version,
        "commit": commit,
        "uncommitted_changes": dirty,
        "quick": quick,
        "steps": steps,
        "warmup": warmup,
        "dataset_size": DATASET_SIZE,
        "noise_multiplier": NOISE_MULTIPLIER,
        "max_grad_norm": MAX_GRAD_NORM,
        "total_seconds": total,
        "models": {name: MODELS[name].description for name in models},
    }
    table = _table(results)
    RESULTS.mkdir(exist_ok=True)
    stem = output or ("training" if not quick and models == list(MODELS) else "training.partial")
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2) + "\n"
    )
    header = (
        f"Training-step benchmark: commit {commit[:10]}"
        f"{' (with uncommitted changes)' if dirty else ''}, torch {meta['torch']}, "
        f"opacus {opacus_version or 'absent'}, {meta['cpu']}, {THREADS} threads, "
        f"{steps} timed steps after {warmup} warm-up (fewer, at least {MIN_STEPS}, where "
        f"{steps} steps would pass {STEP_BUDGET_S:.0f} s; see the steps column), fresh process "
        "each; "
        f"total {total / 60:.1f} min.\n"
    )
    (RESULTS / f"{stem}.md").write_text(f"{header}\n{table}\n")
    print(f"\n{table}\n\ntotal {total:.0f} s")


# -- profiling (for the README's overhead notes) -----------------------------------------
def profile(models: list[str], route: str, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(THREADS)
    warnings.simplefilter("ignore")
    for model in models:
        for mode in ("plain", f"dptorch-{route}"):
            step, _ = _prepare(model, mode)
            for _ in range(3):
                step()
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    step()
            print(f"\n### {model} / {mode}: 10 steps, sorted by self CPU time\n")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="5 timed steps, a smoke run")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per config")
    parser.add_argument("--profile", action="store_true", help="profile dptorch, no timing")
    parser.add_argument("--route", default="auto", help="dptorch norm_route for --profile")
    parser.add_argument(
        "--output", help="file stem under benchmarks/results/ (default: training[.partial])"
    )
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model_name, mode = args.worker
        result = run_worker(model_name, mode, steps=args.steps, warmup=args.warmup)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    if args.profile:
        profile(models, args.route, rows=15)
        return
    run_all(models, args.quick, args.timeout, args.output)


if __name__ == "__main__":
    main()
