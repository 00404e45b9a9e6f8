"""Hostile input on ``far eval``: truncated, bit-flipped, lying or pickled ``.npz`` files (samples and reference), image
folders holding something that is no image, unsafe, corrupted or non-finite Inception weights, and bad devices. Each
is one line on stderr with the documented status (3: a bad input file), never "internal error", never torch's advice
to load unsafely, and no warning lines."""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
import zipfile

import numpy as np
import pytest
from hostile import one_line_error, run_cli

torch = pytest.importorskip("torch")

from far_sdk.cli.main import main  # noqa: E402
from far_sdk.errors import EXIT_INPUT, EXIT_RUNTIME, EXIT_USAGE  # noqa: E402
from far_sdk.scale.evaluation import load_images  # noqa: E402


def _npz(path, **arrays) -> bytes:
    np.savez(path, **arrays)
    return path.read_bytes()


@pytest.fixture
def good(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "good.npz"
    _npz(path, arr_0=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    return path


def _eval(samples, reference, weights, *extra) -> tuple[int, str, str]:
    argv = ["eval", "--samples", str(samples), "--reference", str(reference), "--inception-weights", str(weights)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rc, out, err = run_cli(main, [*argv, "--isc-splits", "1", "--prc-neighborhood", "1", *extra])
    assert not seen, [str(w.message) for w in seen]  # no warning noise beside the one line
    return rc, out, err


def _lying_header(path) -> None:
    """A valid zip whose arr_0.npy header claims 10^12 bytes that it does not hold."""
    header = b"{'descr': '|u1', 'fortran_order': False, 'shape': (1000000, 1000, 1000, 1), }"
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\x00" * 64
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arr_0.npy", npy)


def _pickled(path) -> None:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array([os.system, 1], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arr_0.npy", buf.getvalue())


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x01
    return bytes(b)


def _unread_weights(tmp_path):
    """A weights file that exists (checked first) and is never read: the images fail before it."""
    p = tmp_path / "unread.pth"
    p.write_bytes(b"never read")
    return p


def _flip_tensor_data(data: bytes) -> bytes:
    """One bit flipped inside a torch.save'd tensor of ones (torch.load itself would not notice)."""
    return _flip(data, data.find(struct.pack("<8f", *[1.0] * 8)) + 13)


@pytest.mark.parametrize(
    "make,why",
    [
        (lambda p, g: p.write_bytes(g[: len(g) // 2]), "is not a readable .npz file (BadZipFile"),
        (lambda p, g: p.write_bytes(g[:-30]), "is not a readable .npz file"),
        (lambda p, g: p.write_bytes(_flip(g, 200)), "Bad CRC-32 for file 'arr_0.npy'"),
        (lambda p, g: p.write_bytes(b""), "is not a readable .npz file"),
        (lambda p, g: _lying_header(p), "declares uint8 [1000000, 1000, 1000, 1]"),
        (lambda p, g: _pickled(p), "holds Python objects (a pickle)"),
        (lambda p, g: _npz(p, images=np.zeros((4, 8, 8, 3), np.uint8)), "has no arr_0 (arrays: images)"),
        (lambda p, g: _npz(p, arr_0=np.zeros((4, 8, 8, 3), np.float32)), "arr_0 must be uint8 [N >= 2, H, W, 3]"),
        (lambda p, g: os.mkfifo(p), "is not a regular file"),
    ],
)
@pytest.mark.parametrize("role", ["samples", "reference"])
def test_a_damaged_npz_is_a_one_line_input_error_naming_it(tmp_path, good, make, why, role):
    bad = tmp_path / "bad.npz"
    make(bad, good.read_bytes())
    pair = (bad, good) if role == "samples" else (good, bad)
    rc, _, err = _eval(*pair, _unread_weights(tmp_path))
    assert rc == EXIT_INPUT and one_line_error(err) and "internal error" not in err, err
    assert str(bad) in err and why in err, err


def _folder(tmp_path, extra: dict) -> object:
    d = tmp_path / "folder"
    d.mkdir()
    from PIL import Image

    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    for name, make in extra.items():
        make(d / name)
    return d


def _truncated_png(p) -> None:
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(buf, format="PNG")
    p.write_bytes(buf.getvalue()[:60])


@pytest.mark.parametrize(
    "name,make,why",
    [
        ("3.png", lambda p: p.write_bytes(b"not an image"), "is not a readable image (UnidentifiedImageError"),
        ("3.png", _truncated_png, "is not a readable image"),
        ("3.jpg", lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20), "is not a readable image"),
        ("3.png", lambda p: p.mkdir(), "is not a regular file"),
        ("3.png", os.mkfifo, "is not a regular file"),
    ],
)
def test_a_folder_with_something_that_is_no_image_is_a_one_line_input_error_naming_the_file(
    tmp_path, good, name, make, why
):
    folder = _folder(tmp_path, {name: make})
    rc, _, err = _eval(folder, good, _unread_weights(tmp_path))
    assert rc == EXIT_INPUT and one_line_error(err) and str(folder / name) in err and why in err, err


def test_a_folder_with_a_decompression_bomb_is_refused(tmp_path, monkeypatch):
    from PIL import Image

    folder = _folder(tmp_path, {})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 8 x 8 = 64 pixels: past the warning level, below 2x
    with pytest.raises(Exception, match="is not a readable image .*DecompressionBomb") as e:
        load_images(folder)
    assert type(e.value).__name__ == "DataError"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _torch_file(path, state) -> bytes:
    torch.save(state, path)
    return path.read_bytes()


@pytest.mark.parametrize(
    "make,why",
    [
        (lambda p: p.write_bytes(pickle.dumps(_Evil(), protocol=2)), "unsupported GLOBAL posix.system"),
        (lambda p: p.write_bytes(pickle.dumps(_Evil(), protocol=4)), "the safe loader refused it"),
        (lambda p: _torch_file(p, {"x": _Evil()}), "the safe loader refused it"),
        (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
        (lambda p: p.write_bytes(_torch_file(p, {"a": torch.ones(64)})[:-40]), "truncated"),
        (
            lambda p: p.write_bytes(
                _flip_tensor_data(_torch_file(p, {"Mixed_7c.branch_pool.conv.weight": torch.ones(256)}))
            ),
            "fails its CRC check",
        ),
        (lambda p: _torch_file(p, {"Mixed_7c.branch_pool.conv.weight": torch.tensor([1.0, float("nan")])}), "NaN"),
        (lambda p: _torch_file(p, {"Mixed_7c.branch_pool.conv.weight": [1.0]}), "holds a list"),
        (lambda p: _torch_file(p, {"fc.weight": torch.ones(2)}), "no InceptionV3 state dict"),
    ],
)
def test_bad_inception_weights_are_refused_in_one_line_without_unsafe_advice(tmp_path, good, make, why):
    weights = tmp_path / "weights.pth"
    make(weights)
    rc, _, err = _eval(good, good, weights)
    assert rc == EXIT_INPUT and one_line_error(err) and str(weights) in err and why in err, err
    assert "weights_only" not in err and "trust" not in err.lower() and "safe_globals" not in err, err
    assert "pwned" not in err


def test_a_device_torch_does_not_know_or_cannot_use_is_refused_naming_the_flag(tmp_path, good):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    rc, _, err = _eval(good, good, weights, "--device", "gpu-please")
    assert rc == EXIT_USAGE and one_line_error(err) and "--device 'gpu-please' is not a torch device" in err, err
    if not torch.cuda.is_available():
        rc, _, err = _eval(good, good, weights, "--device", "cuda")
        assert rc == EXIT_RUNTIME and one_line_error(err) and "CUDA is not available here" in err, err
