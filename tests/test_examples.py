"""Smoke tests: every example runs end to end with a few steps and reports sane numbers."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.utils.data import TensorDataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _load(name: str) -> ModuleType:
    if str(EXAMPLES) not in sys.path:  # as when run as a script: siblings are importable
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_text_classification_transformer_runs() -> None:
    result = _load("text_classification_transformer").main(["--epochs", "1", "--steps", "3"])
    assert result["steps"] == 3
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert 0.0 < result["epsilon"] < math.inf


def test_lora_gpt2_runs() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    result = _load("lora_gpt2").main(["--epochs", "1", "--steps", "3"])
    assert result["steps"] == 3
    assert math.isfinite(result["test_loss_before"]) and math.isfinite(result["test_loss_after"])
    assert 0.0 < result["epsilon"] < math.inf


def test_text_classification_lstm_runs() -> None:
    result = _load("text_classification_lstm").main(["--epochs", "1", "--steps", "3"])
    assert result["steps"] == 3
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert 0.0 < result["epsilon"] < math.inf


def _fake_fashion_mnist() -> tuple[TensorDataset, TensorDataset]:
    """Random images of Fashion-MNIST's shape: the Debian data package is not installed in
    CI, and this test checks the recipe's mechanics, not its accuracy."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2600, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (2600,), generator=generator)
    return TensorDataset(images[:2000], labels[:2000]), TensorDataset(images[2000:], labels[2000:])


@pytest.mark.parametrize(
    "extra",
    [
        [],
        [
            "--model",
            "group-norm-cnn",
            "--augmentations",
            "2",
            "--ema",
            "0.9",
            "--schedule",
            "cosine",
        ],
        ["--non-private"],
        ["--dataset", "mnist"],
        ["--dataset", "mnist", "--model", "scatter-linear"],  # on scattering features
        # ... normalised by privately released channel statistics (counted in epsilon)
        ["--model", "scatter-linear", "--feature-norm", "private"],
        ["--prior", "dead-leaves"],  # convolutions pretrained on synthetic images
        ["--model", "tanh-cnn-linear-head", "--prior", "dead-leaves"],
        ["--clipping", "automatic"],
        ["--augmentations", "2", "--views", "shifts"],  # garments never mirrored
        ["--clipping", "adaptive"],  # its noisy count is inside the calibrated sigma
    ],
)
def test_fashion_mnist_recipe_runs(monkeypatch: pytest.MonkeyPatch, extra: list[str]) -> None:
    recipe = _load("fashion_mnist_recipe")
    monkeypatch.setattr(recipe, "load_fashion_mnist", _fake_fashion_mnist)
    monkeypatch.setattr(recipe, "load_mnist", _fake_fashion_mnist)  # same shapes as MNIST
    result = recipe.main(["--smoke", "--epsilon", "3", *extra])
    expected = "mnist" if "mnist" in extra else "fashion-mnist"
    assert result["dataset"] == f"{expected} (smoke slice)"
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert len(result["history"]) == 1  # one epoch, scored on the held-out split
    if "--non-private" in extra:
        assert result["epsilon"] == math.inf and result["noise_multiplier"] == 0.0
    else:
        # Calibrated to the target for exactly the planned steps, and never above it.
        assert 2.5 < result["epsilon"] <= 3.0 + 1e-6


def test_fashion_mnist_recipe_never_mirrors_a_digit() -> None:
    """MNIST's augmented views are shifts only (a mirrored 2 is no 2); Fashion-MNIST's may
    also be mirrored. An asymmetric image tells them apart: a shift keeps its left-right
    order, a flip reverses it."""
    recipe = _load("fashion_mnist_recipe")
    image = torch.zeros(1, 28, 28)
    image[:, 10:18, 6] = 1.0  # a bar on the left ...
    image[:, 14, 6:12] = 0.5  # ... and a fainter arm to its right

    def mirrored(view: torch.Tensor) -> bool:
        bar = int(view[0].amax(dim=0).eq(1.0).nonzero()[0])
        arm = int(view[0].amax(dim=0).eq(0.5).nonzero().max())
        return arm < bar

    torch.manual_seed(0)
    assert not any(mirrored(recipe.AUGMENTATIONS["mnist"](image)) for _ in range(50))
    assert any(mirrored(recipe.AUGMENTATIONS["fashion-mnist"](image)) for _ in range(50))
    # --views shifts: no mirror on either dataset; the default keeps each dataset's views.
    for dataset in recipe.DATASETS:
        shifts_only = recipe.augmentation_views(dataset, "shifts")
        assert not any(mirrored(shifts_only(image)) for _ in range(50))
        assert recipe.augmentation_views(dataset) is recipe.AUGMENTATIONS[dataset]


def test_shift_averaged_scores_average_the_five_shifted_predictions() -> None:
    """The scores are the mean of the softmax over the image and its four one-pixel rolls,
    each computed by hand; a prediction that depends on the position of a pixel changes."""
    recipe = _load("fashion_mnist_recipe")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    images = torch.randn(3, 1, 28, 28)
    expected = model(images).softmax(dim=1)
    for rows, cols in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        shifted = torch.cat([images[:, :, -rows:], images[:, :, :-rows]], 2) if rows else images
        shifted = torch.cat([shifted[..., -cols:], shifted[..., :-cols]], 3) if cols else shifted
        expected += model(shifted).softmax(dim=1)
    with torch.no_grad():
        scores = recipe.shift_averaged_scores(model, images)
        torch.testing.assert_close(scores, expected / 5)
        torch.testing.assert_close(scores.sum(dim=1), torch.ones(3))
        assert not torch.allclose(scores, model(images).softmax(dim=1))


def test_accuracy_with_shift_average_scores_a_shift_invariant_model_the_same() -> None:
    """A model that only sees the image's mean is blind to rolls: both rules agree."""
    recipe = _load("fashion_mnist_recipe")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(1, 3)
    )
    data = TensorDataset(torch.randn(40, 1, 28, 28), torch.randint(0, 3, (40,)))
    plain = recipe.accuracy(model, data, batch=16)
    assert recipe.accuracy(model, data, batch=16, rule="shifts") == plain
    assert recipe.accuracy(model, data, batch=16, rule="flips") == plain


def test_flip_averaged_scores_average_the_image_and_its_mirror() -> None:
    """The mean of the softmax of an image and of its left-right mirror, built by hand; a
    model that reads the left half only sees a different image after the flip."""
    recipe = _load("fashion_mnist_recipe")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    images = torch.randn(3, 1, 28, 28)
    mirrored = images[..., torch.arange(27, -1, -1)]
    with torch.no_grad():
        expected = (model(images).softmax(dim=1) + model(mirrored).softmax(dim=1)) / 2
        scores = recipe.flip_averaged_scores(model, images)
        torch.testing.assert_close(scores, expected)
        torch.testing.assert_close(scores.sum(dim=1), torch.ones(3))
        assert not torch.allclose(scores, model(images).softmax(dim=1))


def test_fashion_mnist_recipe_scores_shift_averaged_predictions_on_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recipe = _load("fashion_mnist_recipe")
    monkeypatch.setattr(recipe, "load_fashion_mnist", _fake_fashion_mnist)
    plain = recipe.main(["--smoke", "--epsilon", "3"])
    assert plain["test_accuracy_shift_averaged"] is None
    both = recipe.main(["--smoke", "--epsilon", "3", "--shift-average"])
    assert both["test_accuracy"] == plain["test_accuracy"]  # same seed, same weights
    assert 0.0 <= both["test_accuracy_shift_averaged"] <= 1.0
    with pytest.raises(SystemExit):
        recipe.parse_args(["--model", "scatter-linear", "--shift-average"])


def test_fashion_mnist_recipe_scores_flip_averaged_predictions_on_garments_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recipe = _load("fashion_mnist_recipe")
    monkeypatch.setattr(recipe, "load_fashion_mnist", _fake_fashion_mnist)
    both = recipe.main(["--smoke", "--epsilon", "3", "--flip-average"])
    assert 0.0 <= both["test_accuracy_flip_averaged"] <= 1.0
    assert both["test_accuracy_shift_averaged"] is None
    for refused in (["--dataset", "mnist"], ["--model", "scatter-linear"]):
        with pytest.raises(SystemExit):
            recipe.parse_args([*refused, "--flip-average"])


@pytest.mark.parametrize("kind", ["flat", "automatic", "per_layer", "adaptive"])
def test_fashion_mnist_recipe_hands_its_clipping_policy_to_the_engine(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    import dptorch.privacy_engine as engine_module

    recipe = _load("fashion_mnist_recipe")
    monkeypatch.setattr(recipe, "load_fashion_mnist", _fake_fashion_mnist)
    asked: list[object] = []
    original = engine_module.make_clipping_policy

    def recording(kind: object, *args: object, **kwargs: object) -> object:
        asked.append(kind)
        return original(kind, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module, "make_clipping_policy", recording)
    result = recipe.main(["--smoke", "--epsilon", "3", "--clipping", kind])
    assert set(asked) == {kind}  # every calibration trial and the final engine got it
    assert result["settings"]["clipping"] == kind
    assert result["epsilon"] <= 3.0 + 1e-6


def test_fashion_mnist_recipe_prior_changes_neither_sigma_nor_epsilon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The prior reads no data, so nothing is recorded for it: the run is calibrated and
    accounted exactly as without it."""
    recipe = _load("fashion_mnist_recipe")
    monkeypatch.setattr(recipe, "load_fashion_mnist", _fake_fashion_mnist)
    plain = recipe.main(["--smoke", "--epsilon", "2"])
    primed = recipe.main(["--smoke", "--epsilon", "2", "--prior", "dead-leaves"])
    assert primed["prior"] is not None and plain["prior"] is None
    assert primed["noise_multiplier"] == plain["noise_multiplier"]
    assert primed["epsilon"] == plain["epsilon"]


def test_fashion_mnist_recipe_saves_its_prior_and_loads_it_for_the_same_settings_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    recipe = _load("fashion_mnist_recipe")
    monkeypatch.setattr(recipe, "load_fashion_mnist", _fake_fashion_mnist)
    prior_file = tmp_path / "prior.pt"
    argv = ["--smoke", "--prior", "dead-leaves", "--prior-file", str(prior_file)]
    learned = recipe.main(argv)["prior"]
    assert prior_file.exists() and "loaded_from" not in learned
    saved = torch.load(prior_file, weights_only=True)["weights"]
    loaded_model = recipe.tanh_cnn()
    args = recipe.parse_args(argv)
    loaded = recipe.apply_prior(loaded_model, args)
    assert loaded["loaded_from"] == str(prior_file) and loaded["steps"] == learned["steps"]
    for name, value in loaded_model[:7].state_dict().items():
        assert torch.equal(value, saved[name])
    with pytest.raises(SystemExit, match="made with"):
        recipe.apply_prior(recipe.tanh_cnn(), recipe.parse_args([*argv, "--seed", "1"]))


def test_fashion_mnist_recipe_refuses_a_prior_for_scattering_features(
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = _load("fashion_mnist_recipe")
    with pytest.raises(SystemExit):
        recipe.parse_args(["--model", "scatter-linear", "--prior", "dead-leaves"])
    assert "--prior dead-leaves" in capsys.readouterr().err


def test_fashion_mnist_recipe_refuses_augmentations_on_scattering_features() -> None:
    recipe = _load("fashion_mnist_recipe")
    with pytest.raises(SystemExit):
        recipe.parse_args(["--model", "scatter-linear", "--augmentations", "2"])


@pytest.mark.parametrize(
    "extra", [["--model", "tanh-cnn"], ["--model", "scatter-linear", "--non-private"]]
)
def test_fashion_mnist_recipe_refuses_private_feature_norm_where_it_means_nothing(
    extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _load("fashion_mnist_recipe")
    with pytest.raises(SystemExit):
        recipe.parse_args(["--feature-norm", "private", *extra])
    assert "--feature-norm private" in capsys.readouterr().err
