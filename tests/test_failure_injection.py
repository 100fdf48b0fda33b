"""Failure injection: training processes SIGKILLed at chosen and random points.

Each scenario runs tests/failure_worker.py in a subprocess that checkpoints after every
step and kills itself at a fault point: mid-step, mid-write of the checkpoint file, between
the write and the rename, after the rename. Then:

* the checkpoint path holds either nothing or a complete checkpoint (leftovers are only
  the writer's ``.tmp`` files, which are never read);
* a complete checkpoint resumes with exactly the budget of the steps it recorded;
* the resumed run finishes with the accountant charging every step once, and (outside
  secure mode) with parameters bit-for-bit equal to a run that was never interrupted;
* a resume under other DP settings is refused with a message that names them.

The fast test runs its scenarios' processes side by side; the slow ones draw 16 seeded
random fault points and 8 kills at random times.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dptorch.accountants import create_accountant
from tests import failure_worker

WORKER = Path(__file__).with_name("failure_worker.py")
ROOT = WORKER.parent.parent
STEPS = 9  # two full passes of four batches and one batch into the third
DELTA = 1e-5


@dataclass
class Scenario:
    fault: str  # KIND:N[:FRACTION], see failure_worker
    saved: int  # steps the checkpoint must record after the kill
    secure: bool = False


def _start(directory: Path, *args: str) -> subprocess.Popen[str]:
    directory.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(directory), str(STEPS), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def _epsilon(steps: int) -> float:
    accountant = create_accountant("rdp")
    for _ in range(steps):
        accountant.step(noise_multiplier=1.0, sample_rate=0.25)
    return accountant.get_epsilon(DELTA)


def _check_killed_state(directory: Path, expected_steps: int, secure: bool) -> list[str]:
    """What is on disk after the kill: nothing half-written, and the right budget."""
    problems = []
    # final.pt: a kill at a random time can come after the run has finished.
    leftovers = [p.name for p in directory.iterdir() if p.name not in ("run.pt", "final.pt")]
    if any(not (name.startswith(".run.pt.") and name.endswith(".tmp")) for name in leftovers):
        problems.append(f"unexpected files {leftovers}")
    checkpoint = directory / "run.pt"
    if not checkpoint.exists():
        return problems + ([] if expected_steps == 0 else ["no checkpoint"])
    engine, module, optimizer, loader = failure_worker.build(secure, 1.0)
    info = engine.load_checkpoint(
        path=checkpoint, module=module, optimizer=optimizer, data_loader=loader
    )
    if (info.steps, info.metadata["step"]) != (expected_steps, expected_steps):
        problems.append(f"checkpoint records {info.steps} steps, expected {expected_steps}")
    if engine.get_epsilon(DELTA) != pytest.approx(_epsilon(expected_steps)):
        problems.append("the resumed epsilon is not that of the recorded steps")
    return problems


def _final(directory: Path) -> dict[str, object]:
    return torch.load(directory / "final.pt", weights_only=True)


def _run_scenarios(tmp_path: Path, scenarios: list[Scenario]) -> None:
    reference_dir = tmp_path / "reference"
    processes = {"reference": _start(reference_dir)}
    for index, scenario in enumerate(scenarios):
        flags = ["--secure"] if scenario.secure else []
        processes[str(index)] = _start(tmp_path / str(index), scenario.fault, *flags)
    results = {name: _finish(process) for name, process in processes.items()}
    assert results["reference"][0] == 0, results["reference"][1]
    reference = _final(reference_dir)

    problems: list[str] = []
    for index, scenario in enumerate(scenarios):
        code, err = results[str(index)]
        if code != -signal.SIGKILL:
            problems.append(f"{scenario.fault}: exit code {code}, not killed: {err[-500:]}")
            continue
        where = tmp_path / str(index)
        problems += [
            f"{scenario.fault}: {p}"
            for p in _check_killed_state(where, scenario.saved, scenario.secure)
        ]
    # A resume under other DP settings, from a copy of the first killed run, must refuse.
    shutil.copytree(tmp_path / "0", tmp_path / "other-settings")
    refused = _start(tmp_path / "other-settings", "--noise", "2.0")
    resumes = {
        str(i): _start(tmp_path / str(i), *(["--secure"] if s.secure else []))
        for i, s in enumerate(scenarios)
    }
    code, err = _finish(refused)
    if code == 0 or "noise_multiplier: checkpoint 1.0, this run 2.0" not in err:
        problems.append(f"a resume with noise_multiplier=2.0 was not refused by name: {err[-500:]}")
    for index, scenario in enumerate(scenarios):
        code, err = _finish(resumes[str(index)])
        if code != 0:
            problems.append(f"{scenario.fault}: resume failed: {err[-800:]}")
            continue
        final = _final(tmp_path / str(index))
        if final["history"] != [[1.0, 0.25, STEPS]]:
            problems.append(f"{scenario.fault}: history {final['history']}")
        same = all(
            torch.equal(a, b) for a, b in zip(final["params"], reference["params"], strict=True)
        )
        if not scenario.secure and not same:
            problems.append(
                f"{scenario.fault}: resumed parameters differ from the uninterrupted run"
            )
        if scenario.secure and same:
            problems.append(f"{scenario.fault}: a secure run reproduced the seeded run's noise")
    assert not problems, "\n".join(problems)


FAST = [
    Scenario("write:3:0.5", saved=2),  # killed half-way through writing checkpoint 3
    Scenario("step:6", saved=5),  # parameters updated, checkpoint 6 not written
    # Secure mode (no RNG state to resume), killed with checkpoint 4 complete but not renamed.
    Scenario("replace:4", saved=3, secure=True),
    # The other points (forward, backward, after the rename) are in the slow test's draws.
]


def test_killed_runs_resume_with_the_right_budget_and_never_a_torn_checkpoint(
    tmp_path: Path,
) -> None:
    _run_scenarios(tmp_path, FAST)


@pytest.mark.slow
def test_many_seeded_random_fault_points(tmp_path: Path) -> None:
    rng = random.Random(1234)
    scenarios = []
    for _ in range(16):
        kind = rng.choice(["forward", "backward", "step", "write", "replace", "dirsync"])
        count = rng.randint(1, STEPS)
        fault = f"{kind}:{count}" + (f":{rng.random():.3f}" if kind == "write" else "")
        saved = count if kind == "dirsync" else count - 1
        scenarios.append(Scenario(fault, saved, secure=rng.random() < 0.25))
    _run_scenarios(tmp_path, scenarios)


@pytest.mark.slow
def test_kills_at_random_times_leave_a_loadable_checkpoint_or_none(tmp_path: Path) -> None:
    rng = random.Random(99)
    for attempt in range(8):
        directory = tmp_path / str(attempt)
        process = _start(directory)
        time.sleep(rng.uniform(2.0, 5.0))  # import takes ~2 s: kills land in training
        process.send_signal(signal.SIGKILL)
        _finish(process)
        checkpoint = directory / "run.pt"
        if checkpoint.exists():
            saved = torch.load(checkpoint, weights_only=True)
            steps = saved["metadata"]["step"]
            assert _check_killed_state(directory, steps, secure=False) == []
        code, err = _finish(_start(directory))
        assert code == 0, err
        assert _final(directory)["history"] == [[1.0, 0.25, STEPS]]
