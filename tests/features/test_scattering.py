"""Scattering2D against a direct computation from its definition, and its contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from dptorch import DPValueError
from dptorch.features import Scattering2D
from dptorch.features.scattering import morlet_2d

F64 = torch.float64


def _circular(image: Tensor, kernel: Tensor) -> Tensor:
    """``sum_u image[x - u] kernel[u]`` on the torus, by explicit shifts (no FFT)."""
    out = torch.zeros(image.shape, dtype=torch.complex128)
    rows, cols = kernel.shape
    for dy in range(rows):
        for dx in range(cols):
            out += kernel[dy, dx] * torch.roll(image, shifts=(dy, dx), dims=(0, 1))
    return out


def _by_definition(layer: Scattering2D, image: Tensor) -> Tensor:
    """Low-pass and first-order channels of one ``[H, W]`` image, spatially: reflect-pad,
    circular convolutions with the spatial filters, modulus, low-pass, subsample, crop."""
    pad, step = layer.pad, 2**layer.scales
    padded = F.pad(image[None, None], (pad,) * 4, mode="reflect")[0, 0].to(torch.complex128)
    low_pass = torch.fft.ifft2(layer.low_pass.to(torch.complex128))
    channels = [_circular(padded, low_pass)]
    for j in range(layer.scales):
        for wavelet in layer.wavelets[j].to(torch.complex128):
            modulus = _circular(padded, torch.fft.ifft2(wavelet)).abs().to(torch.complex128)
            channels.append(_circular(modulus, low_pass))
    border = pad // step
    stacked = torch.stack(channels).real[:, ::step, ::step]
    return stacked[:, border:-border, border:-border]


def test_low_pass_and_first_order_match_the_definition() -> None:
    torch.manual_seed(0)
    torch.set_default_dtype(F64)  # filters stored in complex128
    try:
        layer = Scattering2D((8, 8), scales=2, orientations=4)
    finally:
        torch.set_default_dtype(torch.float32)
    image = torch.rand(8, 8, dtype=F64)
    got = layer(image[None, None])[0]  # [K, 2, 2]
    expected = _by_definition(layer, image)  # [1 + J L, 2, 2]
    torch.testing.assert_close(got[: expected.shape[0]], expected, rtol=1e-9, atol=1e-12)


def test_second_order_is_close_to_its_full_resolution_definition() -> None:
    # The second order is computed on a grid subsampled by 2^j2 (the wavelet psi_j2 keeps
    # little energy above it): compare with the same cascade at full resolution.
    torch.manual_seed(0)
    layer = Scattering2D((28, 28))
    images = torch.rand(3, 1, 28, 28)
    got = layer(images)[:, 1 + 16 :]  # [3, 64, 7, 7]
    padded = F.pad(images, (4,) * 4, mode="reflect")
    spectrum = torch.fft.fft2(padded).unsqueeze(2)
    first = torch.fft.fft2(torch.fft.ifft2(spectrum * layer.wavelets[0]).abs())
    second = torch.fft.ifft2(first.unsqueeze(3) * layer.wavelets[1]).abs().flatten(2, 3)
    smooth = torch.fft.ifft2(torch.fft.fft2(second) * layer.low_pass).real
    expected = smooth[..., ::4, ::4][..., 1:-1, 1:-1][:, 0]
    error = (got - expected).norm() / expected.norm()
    assert error < 0.05, f"relative error {error:.3f}"


def test_shapes_channels_and_no_parameters() -> None:
    layer = Scattering2D((28, 28), scales=2, orientations=8)
    out = layer(torch.rand(5, 3, 28, 28))
    assert out.shape == (5, 3 * 81, 7, 7) and layer.channels_per_input == 81
    assert list(layer.parameters()) == []
    assert torch.equal(layer(torch.zeros(1, 1, 28, 28)), torch.zeros(1, 81, 7, 7))


def test_wavelets_have_zero_mean() -> None:
    wavelet = morlet_2d((16, 16), sigma=0.8, theta=0.7, xi=3.0, slant=0.5)
    assert abs(complex(wavelet.sum())) < 1e-12


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Scattering2D((30, 28), scales=2), "multiple of 2\\^scales"),
        (lambda: Scattering2D((28, 28), scales=0), "scales=0"),
        (lambda: Scattering2D((28, 28))(torch.rand(2, 28, 28)), "expects \\[B, C, 28, 28\\]"),
    ],
)
def test_bad_arguments_are_refused_with_their_name(make: object, match: str) -> None:
    with pytest.raises(DPValueError, match=match):
        make()  # type: ignore[operator]
