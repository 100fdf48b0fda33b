"""Results table and privacy-utility plot of the accuracy recipe, from its raw results.

Reads the JSON lines ``examples/fashion_mnist_recipe.py --output`` appends to, keeps the runs
of one dataset, groups them by target epsilon (non-private runs form their own row), and
writes ``benchmarks/results/DATASET.md`` (mean, spread and count of test accuracy per target
epsilon, epsilon spent, wall time) and ``DATASET_privacy_utility.png`` (accuracy against
epsilon, one dot per run, the non-private mean as a line), where DATASET is
``fashion_mnist`` or ``mnist``.

    .venv/bin/python benchmarks/recipe_table.py                      # Fashion-MNIST
    .venv/bin/python benchmarks/recipe_table.py --dataset mnist      # MNIST
    .venv/bin/python benchmarks/recipe_table.py --dataset mnist \
        --input benchmarks/results/mnist_scatter.jsonl --stem mnist_scatter

``--rule shifts`` (or ``flips``) tabulates the test accuracy the runs recorded under that
prediction rule (``--shift-average`` / ``--flip-average`` of the recipe) instead of the plain
one.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


TITLES = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST"}
# The field of a run's record holding its test accuracy under each prediction rule.
SCORE_FIELDS = {
    "plain": "test_accuracy",
    "shifts": "test_accuracy_shift_averaged",
    "flips": "test_accuracy_flip_averaged",
}
RULE_LABELS = {"shifts": "shift-averaged", "flips": "flip-averaged"}


def load(path: Path, dataset: str, field: str = "test_accuracy") -> list[dict[str, Any]]:
    """The non-smoke runs of ``dataset`` in the JSON lines at ``path``, each with its
    accuracy under the chosen prediction rule (``field``) as ``"test_accuracy"``."""
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    chosen = [r for r in runs if r["dataset"] == dataset]
    unscored = [r["seed"] for r in chosen if r.get(field) is None]
    if unscored:
        raise SystemExit(
            f"{path}: the runs of seeds {unscored} have no {field!r}; run them with the "
            "recipe flag of that prediction rule, or choose another --rule."
        )
    return [{**r, "test_accuracy": r[field]} for r in chosen]


def group(runs: list[dict[str, Any]]) -> dict[float, list[dict[str, Any]]]:
    """Runs by target epsilon; non-private runs under ``inf``."""
    groups: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        target = run["target_epsilon"]
        groups[math.inf if target is None else float(target)].append(run)
    return dict(sorted(groups.items()))


def table(groups: dict[float, list[dict[str, Any]]]) -> str:
    lines = [
        "| target epsilon | test accuracy, mean | spread (min-max) | seeds | epsilon spent "
        "| epochs | trained on | wall time per run | + features or prior |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for target, runs in groups.items():
        accuracies = [r["test_accuracy"] for r in runs]
        spent = max(r["epsilon"] for r in runs)
        epochs = sorted({r["settings"]["epochs"] for r in runs})
        minutes = statistics.mean(r["wall_s"] for r in runs) / 60
        # Before training, part of a run's cost: feature extraction (scatter-* models) or
        # the pretraining of a prior (--prior; the time it took to make, also when loaded).
        before_times = [seconds for r in runs if (seconds := _before_training_s(r)) is not None]
        features = f"{statistics.mean(before_times) / 60:.1f} min" if before_times else "-"
        # The recipe holds --validation images out of the training set (5,000 by default);
        # a final run may train on all of it (--validation 0).
        held_out = sorted({r["settings"].get("validation", 5000) for r in runs})
        trained_on = ", ".join("all" if h == 0 else f"all but {h:,}" for h in held_out)
        lines.append(
            f"| {'non-private' if math.isinf(target) else f'{target:g}'} "
            f"| {statistics.mean(accuracies):.4f} "
            f"| {min(accuracies):.4f}-{max(accuracies):.4f} | {len(runs)} "
            f"| {'-' if math.isinf(spent) else f'{spent:.3f}'} "
            f"| {', '.join(map(str, epochs))} | {trained_on} | {minutes:.1f} min | {features} |"
        )
    return "\n".join(lines) + "\n"


def _before_training_s(run: dict[str, Any]) -> float | None:
    if run.get("prior"):
        return float(run["prior"]["seconds"])
    if run.get("features_s") is not None and run["settings"].get("model", "").startswith("scatter"):
        return float(run["features_s"])
    return None


def models(groups: dict[float, list[dict[str, Any]]]) -> str:
    """The ``--model`` names of the runs (older runs without one used the tanh CNN)."""
    names = {_model_of(r) for runs in groups.values() for r in runs}
    return ", ".join(sorted(names))


def _model_of(run: dict[str, Any]) -> str:
    """``--model NAME``, with ``--prior KIND`` where the run started from a prior."""
    name = run["settings"].get("model", "tanh-cnn")
    prior = run["settings"].get("prior", "none")
    return name if prior == "none" else f"{name} --prior {prior}"


def plot(groups: dict[float, list[dict[str, Any]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 3.8))
    private = {t: runs for t, runs in groups.items() if not math.isinf(t)}
    for runs in private.values():
        axes.scatter([r["epsilon"] for r in runs], [r["test_accuracy"] for r in runs], c="C0", s=14)
    targets = list(private)
    means = [statistics.mean(r["test_accuracy"] for r in private[t]) for t in targets]
    axes.plot(targets, means, c="C0", label="dptorch, mean over seeds")
    if math.inf in groups:
        reference = statistics.mean(r["test_accuracy"] for r in groups[math.inf])
        axes.axhline(reference, c="C2", ls="--", label=f"non-private ({reference:.3f})")
    axes.set_xscale("log")
    axes.set_xticks(targets, [f"{t:g}" for t in targets])
    axes.minorticks_off()
    axes.set_xlabel("epsilon (delta = 1e-5, PRV accountant)")
    axes.set_ylabel("test accuracy")
    axes.set_title(f"{title}, {models(groups)}")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dataset", choices=sorted(TITLES), default="fashion-mnist")
    parser.add_argument("--input", type=Path, default=None, help="default: DATASET_recipe.jsonl")
    parser.add_argument("--stem", default=None, help="output file stem (default: DATASET)")
    parser.add_argument(
        "--rule", choices=sorted(SCORE_FIELDS), default="plain", help="prediction rule scored"
    )
    args = parser.parse_args()
    dataset_stem = args.dataset.replace("-", "_")
    source = args.input or RESULTS / f"{dataset_stem}_recipe.jsonl"
    stem = args.stem or dataset_stem
    groups = group(load(source, args.dataset, SCORE_FIELDS[args.rule]))
    markdown = table(groups)
    rule = "" if args.rule == "plain" else f", the {RULE_LABELS[args.rule]} prediction rule"
    (RESULTS / f"{stem}.md").write_text(
        f"{TITLES[args.dataset]}, `examples/fashion_mnist_recipe.py --model "
        f"{models(groups)}` (raw runs: `{source.name}`{rule}), delta 1e-5, test set scored "
        "once per run.\n\n" + markdown
    )
    plot(groups, RESULTS / f"{stem}_privacy_utility.png", TITLES[args.dataset])
    print(markdown)


if __name__ == "__main__":
    main()
