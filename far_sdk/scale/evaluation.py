"""``far eval``: FID, Inception Score and precision/recall of generated samples, through torch-fidelity.

The feature extractor is torch-fidelity's ``FeatureExtractorInceptionV3`` ("inception-v3-compat": the
TensorFlow FID Inception of 2015-12-05, ported bit-compatibly), and the metrics are its
``fid_features_to_statistics`` / ``fid_statistics_to_metric``, ``isc_features_to_metric`` and
``prc_features_to_metric``; this module only feeds them. FID and precision/recall use the 2048-d pool
features, IS the 1008 unbiased logits (as torch-fidelity and ADM's evaluator do). Inputs: ADM-format
``.npz`` (``arr_0`` uint8 [N, H, W, 3]: what ``far generate-dataset`` writes and what ADM's reference
batches hold) or a folder of images.

The Inception weights are read from a path the user gives; nothing is downloaded at run time. The file
is torch-fidelity's release asset :data:`INCEPTION_WEIGHTS_URL` (a PyTorch state dict). It is read once, by
:func:`load_inception_state` (zip CRCs checked, ``torch.load(weights_only=True)``, which refuses any pickle that
holds more than tensors, finite values), and the checked state dict is handed to torch-fidelity's network, whose
own loader (an unsafe ``torch.load``) never opens the file. Every fault of an input (a truncated or bit-flipped
.npz, a file that is no image, an unsafe or corrupted weights file) is a DataError naming the file (``far eval``:
exit status 3). torch (and torch-fidelity) are imported only when this module's functions run, never by
``import far_sdk``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import types
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from far_sdk.bundle.bundle import sha256_file
from far_sdk.errors import (
    BackendUnavailableError,
    DataError,
    DeviceOutOfMemoryError,
    InvalidArgumentError,
    check_range,
)
from far_sdk.scale.npzfile import load_arrays

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FEATURES, LOGITS = "2048", "logits_unbiased"
_FE_LOCK = threading.Lock()


class InceptionWeightsError(DataError):
    """The Inception weights file is missing, unreadable, unsafe or not torch-fidelity's InceptionV3."""


def _where_from(path: Path) -> str:
    return (
        f"far eval needs torch-fidelity's InceptionV3 weights ({INCEPTION_WEIGHTS_FILE}, converted from "
        f"TensorFlow's FID Inception): download {INCEPTION_WEIGHTS_URL} once on a machine with internet and pass "
        f"its path with --inception-weights (given: {path})"
    )


# ---- inputs ----------------------------------------------------------------------------------------


def load_images(path: str | Path) -> np.ndarray:
    """uint8 [N, H, W, 3] from an ADM ``.npz`` (``arr_0``) or a folder of images (sorted by name). Every fault of
    the input (a truncated or bit-flipped .npz, a file that is no image) is a DataError naming the file."""
    p = Path(path)
    if p.is_dir():
        return _load_folder(p)
    if not p.exists():
        raise DataError(
            f"{p} does not exist: give an ADM-format .npz (arr_0: uint8 N x H x W x 3) or a folder of images"
        )
    if not p.is_file():
        raise DataError(f"{p} is not a regular file: give an ADM-format .npz or a folder of images")
    a = load_arrays(p, ("arr_0",))["arr_0"]
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3 or a.shape[0] < 2:
        raise DataError(f"{p}: arr_0 must be uint8 [N >= 2, H, W, 3], got {a.dtype} {list(a.shape)}")
    return a


def _load_folder(p: Path) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415 - loaded on first image: `import far_sdk` stays light

    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise DataError(f"{p} holds {len(files)} images ({', '.join(IMAGE_SUFFIXES)}); give at least 2")
    ims = []
    for f in files:
        if not f.is_file():  # a directory or a FIFO named like an image (a FIFO would block)
            raise DataError(f"{f} is not a regular file; remove it from {p}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    ims.append(np.asarray(im.convert("RGB")))
        except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many types (OSError, SyntaxError, ...)
            raise DataError(f"{f} is not a readable image ({type(e).__name__}: {e}); remove or replace it") from e
    if len({im.shape for im in ims}) != 1:
        raise DataError(
            f"the images in {p} differ in size ({sorted({im.shape for im in ims})[:3]}...); resize them to one "
            "size first"
        )
    return np.stack(ims)


# ---- torch-fidelity --------------------------------------------------------------------------------


@contextlib.contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    """Placeholder ``torchvision`` modules while torch-fidelity is imported.

    torch-fidelity imports torchvision at import time for parts far eval never uses (CIFAR/STL data sets,
    VGG16, CLIP, DINOv2, resizing). A torchvision wheel built for another torch fails to import
    ("operator torchvision::nms does not exist"), as PyPI's does beside a ``+cpu`` torch; the
    InceptionV3 path and the metrics need plain torch only. Any use of a placeholder raises.
    """

    def missing(*_a: Any, **_k: Any):
        raise BackendUnavailableError(
            "this torch-fidelity feature needs torchvision, which does not import here; "
            "far eval uses only InceptionV3 (no torchvision needed)"
        )

    class Missing:
        __init__ = missing

    mods = {
        name: types.ModuleType(name)
        for name in (
            "torchvision",
            "torchvision.datasets",
            "torchvision.transforms",
            "torchvision.transforms.functional",
            "torchvision.models",
        )
    }
    for name, mod in mods.items():
        mod.__getattr__ = lambda attr: missing  # type: ignore[attr-defined]  # PEP 562
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)
    for cls in ("CIFAR10", "CIFAR100", "STL10"):  # torch-fidelity subclasses these at import
        setattr(mods["torchvision.datasets"], cls, type(cls, (Missing,), {}))
    sys.modules.update(mods)
    try:
        yield
    finally:
        for name, mod in mods.items():
            if sys.modules.get(name) is mod:
                del sys.modules[name]


def import_torch_fidelity():
    """torch_fidelity, importable even where torchvision is not (see :func:`_torchvision_stand_in`)."""
    if "torch_fidelity" in sys.modules:
        return sys.modules["torch_fidelity"]
    try:
        import torch  # noqa: F401, PLC0415 - far eval checks for PyTorch before it loads torch-fidelity
    except ImportError as e:
        raise BackendUnavailableError(
            f"far eval needs torch ({e}); install it with: pip install 'far-sdk[eval]'"
        ) from e
    try:
        import torchvision  # noqa: F401, PLC0415 - probed: torch-fidelity declares it, far eval does not use it

        stand_in = contextlib.nullcontext()
    except Exception as e:  # noqa: BLE001 - missing, or a build for another torch (RuntimeError)
        log.debug("torchvision does not import (%s): torch-fidelity gets placeholders", e)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        stand_in = _torchvision_stand_in()
    try:
        with stand_in:
            import torch_fidelity  # noqa: PLC0415 - far eval's optional dependency
    except ImportError as e:
        raise BackendUnavailableError(
            f"far eval needs torch-fidelity ({e}); install it with: pip install 'far-sdk[eval]'"
        ) from e
    return torch_fidelity


def _check_exists(weights: str | Path) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise InceptionWeightsError(f"the Inception weights file {path} does not exist. " + _where_from(path))
    return path


def _refusal(e: BaseException) -> str:
    """What torch's loader refused, without its advice to retry with ``weights_only=False`` or to allow-list the
    global (either would run the file's code: far-sdk never suggests it)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    sentences = [s.strip() for ln in text.splitlines() for s in ln.split(". ") if s.strip()]
    unsafe = ("weights_only", "trust", "safe_globals", "documentation", "file an issue", "weights only load failed")
    safe = [s for s in sentences if not any(w in s.lower() for w in unsafe)]
    return (safe[0] if safe else type(e).__name__).rstrip(".")


def load_inception_state(path: Path) -> dict[str, Any]:
    """The weights file's state dict, read safely: zip CRCs checked (torch.load does not), ``weights_only=True``
    (a pickle holding code is refused, and the refusal never suggests an unsafe load), no warnings printed, every
    tensor finite. InceptionWeightsError naming the file otherwise."""
    import torch  # noqa: PLC0415 - PyTorch is optional for the runtime: loaded when used

    def bad(what: str, e: BaseException | None = None) -> InceptionWeightsError:
        return InceptionWeightsError(f"{path} {what}. " + _where_from(path))

    if path.stat().st_size == 0:
        raise bad("is empty (0 bytes)")
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # torch.save's zip format (is_zipfile misses a truncated one)
    if zipped:
        try:
            with zipfile.ZipFile(path) as zf:
                member = zf.testzip()
        except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise bad(f"is not a readable zip archive ({e}): it is probably truncated") from e
        if member is not None:
            raise bad(f"is corrupted: its member {member!r} fails its CRC check")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise next to a one-line refusal
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: refuses code
    except EOFError as e:
        raise bad("ends early: it is truncated") from e
    except Exception as e:  # noqa: BLE001 - torch raises several types for unreadable and unsafe files
        raise bad(f"is not a PyTorch state dict of tensors (the safe loader refused it: {_refusal(e)})") from e
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise bad("holds no InceptionV3 state dict (no Mixed_7c.* tensors)")
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise bad(f"holds a {type(v).__name__} at {k!r}, not a tensor")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise bad(f"has NaN or inf values in {k!r}: it is corrupted")
    return state


def load_inception(weights: str | Path, device: str = "cpu"):
    """torch-fidelity's InceptionV3 with the weights at ``weights`` (nothing is downloaded). The file is read once,
    by :func:`load_inception_state`: torch-fidelity's own loader (``torch.load(weights_only=False)``) never sees it."""
    path = _check_exists(weights)
    state = load_inception_state(path)
    import_torch_fidelity()
    import torch_fidelity.feature_extractor_inceptionv3 as fe  # noqa: PLC0415 - far eval's optional dependency

    with _FE_LOCK:  # torch-fidelity "downloads" when given no path: hand it the checked state dict instead
        fetch = fe.load_state_dict_from_url
        fe.load_state_dict_from_url = lambda *_a, **_k: state
        try:
            model = fe.FeatureExtractorInceptionV3("inception-v3-compat", [FEATURES, LOGITS])
        except RuntimeError as e:  # load_state_dict: missing keys or shape mismatches
            raise InceptionWeightsError(
                f"{path} does not fit torch-fidelity's InceptionV3 ({str(e).splitlines()[0]}). " + _where_from(path)
            ) from e
        finally:
            fe.load_state_dict_from_url = fetch
    return model.to(device)


def check_device(device: str) -> str:
    """``device`` if torch knows it and it is usable here; else a typed error naming --device."""
    import torch  # noqa: PLC0415 - PyTorch is optional for the runtime: loaded when used

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InvalidArgumentError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from e
    if d.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"--device {device}: CUDA is not available here; use --device cpu")
    return device


def extract_features(model, images: np.ndarray, batch_size: int = 64, device: str = "cpu") -> dict[str, np.ndarray]:
    """{"2048": float64 [N, 2048] pool features, "logits_unbiased": float64 [N, 1008]} of uint8 NHWC images."""
    import torch  # noqa: PLC0415 - PyTorch is optional for the runtime: loaded when used

    feats: dict[str, list] = {FEATURES: [], LOGITS: []}
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size].transpose(0, 3, 1, 2))).to(
                    device
                )  # (B, 3, H, W) uint8
                out = model(x)
                for k, v in zip((FEATURES, LOGITS), out):
                    feats[k].append(v.detach().cpu().double().numpy())  # host sync
    except (RuntimeError, MemoryError) as e:
        if not isinstance(e, MemoryError) and not any(m in str(e).lower() for m in ("out of memory", "can't allocate")):
            raise
        raise DeviceOutOfMemoryError(
            f"out of memory computing Inception features of {batch_size} images at a time on {device}: lower --batch"
        ) from e
    return {k: np.concatenate(v) for k, v in feats.items()}


# ---- metrics (torch-fidelity's functions) -----------------------------------------------------------


def fid_from_features(samples: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance of two feature sets [N, D] by torch-fidelity (float64): |mu1 - mu2|^2 +
    tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))."""
    import torch  # noqa: PLC0415 - PyTorch is optional for the runtime: loaded when used

    import_torch_fidelity()
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric  # noqa: PLC0415 - far eval's optional dependency

    s1 = fid_features_to_statistics(torch.from_numpy(np.asarray(samples, dtype=np.float64)))
    s2 = fid_features_to_statistics(torch.from_numpy(np.asarray(reference, dtype=np.float64)))
    return float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])


def metrics_from_features(
    samples: dict[str, np.ndarray], reference: dict[str, np.ndarray], *, isc_splits: int = 10, prc_neighborhood: int = 3
) -> dict[str, float]:
    """FID and precision/recall (samples vs reference, 2048-d features) and IS (the samples' logits)."""
    import torch  # noqa: PLC0415 - PyTorch is optional for the runtime: loaded when used

    import_torch_fidelity()
    from torch_fidelity.metric_isc import isc_features_to_metric  # noqa: PLC0415 - far eval's optional dependency
    from torch_fidelity.metric_prc import prc_features_to_metric  # noqa: PLC0415 - far eval's optional dependency

    out = {"fid": fid_from_features(samples[FEATURES], reference[FEATURES])}
    isc = isc_features_to_metric(torch.from_numpy(samples[LOGITS]), splits=isc_splits, shuffle=True, rng_seed=2020)
    out["inception_score_mean"], out["inception_score_std"] = isc["inception_score_mean"], isc["inception_score_std"]
    prc = prc_features_to_metric(
        torch.from_numpy(samples[FEATURES]),
        torch.from_numpy(reference[FEATURES]),
        prc_neighborhood=prc_neighborhood,
        prc_batch_size=10000,
        save_cpu_ram=False,
        verbose=False,
    )
    out.update(precision=float(prc["precision"]), recall=float(prc["recall"]), f_score=float(prc["f_score"]))
    return out


def evaluate(
    samples: str | Path,
    reference: str | Path,
    weights: str | Path,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    isc_splits: int = 10,
    prc_neighborhood: int = 3,
) -> dict[str, Any]:
    """Metrics of ``samples`` against ``reference`` (each an ADM .npz or an image folder)."""
    check_range("batch_size (--batch)", batch_size, 1, None, integer=True)
    _check_exists(weights)  # before reading 50k images
    check_device(device)
    ims = load_images(samples)
    ref = load_images(reference)
    check_range("isc_splits (--isc-splits, at most the number of samples)", isc_splits, 1, len(ims), integer=True)
    n = min(len(ims), len(ref)) - 1
    check_range("prc_neighborhood (--prc-neighborhood, below either image count)", prc_neighborhood, 1, n, integer=True)
    model = load_inception(weights, device)
    f_s = extract_features(model, ims, batch_size, device)
    f_r = extract_features(model, ref, batch_size, device)
    tf = import_torch_fidelity()
    return {
        **metrics_from_features(f_s, f_r, isc_splits=isc_splits, prc_neighborhood=prc_neighborhood),
        "num_samples": len(ims),
        "num_reference": len(ref),
        "samples": str(samples),
        "reference": str(reference),
        "image_size": list(ims.shape[1:3]),
        "inception_weights": str(weights),
        "inception_weights_sha256": sha256_file(weights),
        "feature_extractor": "inception-v3-compat",
        "isc_splits": isc_splits,
        "prc_neighborhood": prc_neighborhood,
        "torch_fidelity": tf.__version__,
    }
