"""The normalisation rules' ``xhat * G`` product, formed in place in the rule's temporary."""

from __future__ import annotations

import torch

from dptorch.per_sample.rules.normalization import _times_grad


def test_product_is_formed_in_the_normalized_tensor_when_dtypes_and_shapes_agree() -> None:
    normalized, grad = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    expected = normalized * grad
    product = _times_grad(normalized, grad)
    assert product.data_ptr() == normalized.data_ptr()  # no second temporary
    assert torch.equal(product, expected)  # the same products, bit for bit


def test_product_widens_instead_of_rounding_into_a_narrower_tensor() -> None:
    normalized = torch.randn(4, 3, dtype=torch.float32)
    grad = torch.randn(4, 3, dtype=torch.float64)
    product = _times_grad(normalized, grad)
    assert product.dtype == torch.float64
    assert torch.equal(product, normalized.double() * grad)


def test_product_broadcasts_out_of_place() -> None:
    normalized, grad = torch.randn(4, 1, 5), torch.randn(4, 3, 5)
    product = _times_grad(normalized, grad)
    assert product.shape == (4, 3, 5)
    assert torch.equal(product, normalized * grad)
