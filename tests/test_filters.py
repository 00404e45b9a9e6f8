"""Frequency filters: exact linear operators vs torch's interpolate, the official trace, and an FFT reference."""

import numpy as np
import pytest

from far_sdk.errors import InvalidArgumentError
from far_sdk.maths import filters as Fl


@pytest.mark.parametrize("k", range(1, 17))
def test_spatial_filter_equals_torch_interpolate(k):
    torch = pytest.importorskip("torch")  # the reference only: the filters themselves are NumPy
    import torch.nn.functional as F

    x = torch.randn(3, 16, 16, 16, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    ref = F.interpolate(F.interpolate(x, size=(k, k), mode="area"), size=(16, 16), mode="bicubic", align_corners=False)
    out = Fl.low_pass(x.numpy(), k, "spatial")
    assert np.abs(out - ref.numpy()).max() < 1e-6


def test_spatial_filter_matches_official_trace(official_ref):
    x = official_ref["filter_in"]
    np.testing.assert_allclose(
        np.stack([Fl.filter_matrix(k) for k in range(1, 17)]), official_ref["filter_matrices"], atol=1e-6
    )
    for k in range(1, 17):
        np.testing.assert_allclose(Fl.low_pass(x, k), official_ref[f"filter_out_{k}"], atol=1e-5, err_msg=f"level {k}")


def test_level_zero_is_zeros_and_level_16_identity():
    for kind in Fl.FILTER_TYPES:
        assert not Fl.filter_matrix(0, kind).any()
        np.testing.assert_allclose(Fl.filter_matrix(16, kind), np.eye(16), atol=1e-12)


def _fft_low_pass(x, k):
    """Independent reference: 2-D FFT, keep |f| < k/2 per axis (half weight at |f| = k/2), inverse FFT."""
    f = np.fft.fftfreq(16) * 16  # signed integer frequencies
    g = np.where(np.abs(f) < k / 2, 1.0, np.where(np.abs(f) == k / 2, 0.5, 0.0))
    if k == 16:
        g[:] = 1.0
    if k == 0:
        g[:] = 0.0
    X = np.fft.fft2(x)
    return np.real(np.fft.ifft2(X * g[:, None] * g[None, :]))


@pytest.mark.parametrize("k", range(0, 17))
def test_fourier_filter_equals_fft_reference(k):
    x = np.random.default_rng(k).standard_normal((2, 4, 16, 16))
    np.testing.assert_allclose(Fl.low_pass(x, k, "fourier"), _fft_low_pass(x, k), atol=1e-10)


def test_fourier_level_one_is_the_mean():
    x = np.random.default_rng(3).standard_normal((16, 16))
    np.testing.assert_allclose(Fl.low_pass(x, 1, "fourier"), np.full((16, 16), x.mean()), atol=1e-12)


def test_filters_preserve_constants():
    x = np.full((16, 16), 3.25)
    for kind in Fl.FILTER_TYPES:
        for k in range(1, 17):
            np.testing.assert_allclose(Fl.low_pass(x, k, kind), x, atol=1e-9)


@pytest.mark.parametrize("bad", [-1, 17, 2.0, None])
def test_bad_level_raises(bad):
    with pytest.raises(InvalidArgumentError):
        Fl.filter_matrix(bad)


def test_unknown_filter_type_names_choices():
    with pytest.raises(InvalidArgumentError, match="spatial"):
        Fl.filter_matrix(3, "gaussian")


def test_token_layout_is_row_major_and_the_numpy_and_torch_twins_agree():
    """Token t of a G x G grid is row t // G, column t % G (the official ``flatten(2).transpose(1, 2)``); the NumPy
    (far_sdk.maths.filters) and torch (training.filters) helpers are inverses and low-pass tokens alike, equal to the
    official interpolate pair in image layout."""
    torch = pytest.importorskip("torch")
    from training import filters as T

    G, C = 16, 3
    img = np.random.default_rng(5).standard_normal((2, C, G, G)).astype(np.float32)
    tok = Fl.grid_to_tokens(img)
    assert tok.shape == (2, G * G, C) and tok[1, 5 * G + 7, 2] == img[1, 2, 5, 7]
    np.testing.assert_array_equal(Fl.tokens_to_grid(tok, G), img)
    np.testing.assert_array_equal(T.grid_to_tokens(torch.from_numpy(img)).numpy(), tok)
    np.testing.assert_array_equal(T.tokens_to_grid(torch.from_numpy(tok), G).numpy(), img)
    for k in (1, 4, 11):
        m = Fl.filter_matrix(k, "spatial").astype(np.float32)
        ref = T.official_low_pass(torch.from_numpy(img), k).numpy()  # F.interpolate area + bicubic
        np.testing.assert_allclose(Fl.tokens_to_grid(Fl.low_pass_tokens(tok, m), G), ref, atol=2e-6)
        out = T.low_pass_tokens(torch.from_numpy(tok), torch.from_numpy(m)).numpy()
        np.testing.assert_allclose(T.tokens_to_grid(torch.from_numpy(out), G).numpy(), ref, atol=2e-6)
