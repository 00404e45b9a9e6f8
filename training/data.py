"""Training data: cached latents, ImageFolder trees (ImageNet layout) encoded through a VAE, latent caching."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from far_sdk.errors import DataError, InvalidArgumentError
from far_sdk.fileio import atomic_writer

from .vae import AutoencoderKL

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


# ---- data ------------------------------------------------------------------------------------------


class LatentDataset(Dataset):
    """Cached latents: ``.npz`` or ``.safetensors`` with ``latents`` [N, C, H, W] (already times the latent
    scale) and ``labels`` [N] int. npz is read into memory; safetensors is read per item (large caches)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"latents file {self.path} does not exist; write one with `far-train cache-latents`")
        if self.path.suffix not in (".npz", ".safetensors"):
            raise InvalidArgumentError(f"latents file {self.path} must end in .npz or .safetensors")
        self._latents: np.ndarray | None = None
        self._handle: Any = None
        try:
            shape, dtype, labels = self._read_header()
        except InvalidArgumentError:
            raise
        except Exception as e:  # zipfile.BadZipFile, SafetensorError, OSError, ValueError
            raise DataError(
                f"latents file {self.path} is unreadable ({type(e).__name__}: {e}); "
                "re-write it with `far-train cache-latents`"
            ) from e
        if len(shape) != 4 or dtype != "float32":
            raise DataError(f"{self.path}: 'latents' must be float32 [N, C, H, W], found {dtype} {list(shape)}")
        if labels.ndim != 1 or labels.shape[0] != shape[0] or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{self.path}: 'labels' must be int [N={shape[0]}], found {labels.dtype} {list(labels.shape)}"
            )
        if shape[0] == 0 or labels.min() < 0:
            raise DataError(f"{self.path}: needs at least one sample and labels >= 0")
        self.labels = labels.astype(np.int64)
        self.latent_shape = tuple(shape[1:])

    def _read_header(self) -> tuple[tuple[int, ...], str, np.ndarray]:
        """(latents shape, latents dtype name, labels); npz latents are kept in memory."""
        if self.path.suffix == ".npz":
            with np.load(self.path) as f:
                _check_keys(self.path, list(f.keys()))
                self._latents, labels = np.asarray(f["latents"]), np.asarray(f["labels"])
            return self._latents.shape, str(self._latents.dtype), labels
        from safetensors import safe_open  # noqa: PLC0415 - loaded when the weights are read

        with safe_open(self.path, "np") as f:
            _check_keys(self.path, list(f.keys()))
            sl = f.get_slice("latents")
            dtype = "float32" if sl.get_dtype() == "F32" else sl.get_dtype()
            return tuple(sl.get_shape()), dtype, f.get_tensor("labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._latents is not None:
            x = self._latents[i]
        else:
            if self._handle is None:  # opened lazily, once per (worker) process
                from safetensors import safe_open  # noqa: PLC0415 - loaded when the weights are read

                self._handle = safe_open(self.path, "np")
            x = self._handle.get_slice("latents")[i : i + 1][0]
        return torch.from_numpy(np.array(x, dtype=np.float32)), torch.tensor(self.labels[i])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None}


def _check_keys(path: Path, keys: list[str]) -> None:
    missing = [k for k in ("latents", "labels") if k not in keys]
    if missing:
        raise DataError(f"latents file {path} lacks {missing} (found {sorted(keys)})")


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """ImageFolder layout: root/<class>/**/<image>. Classes sorted by name -> index; samples sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image root {root} is not a directory (expected root/<class>/<image files>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    samples = [
        (p, i)
        for i, c in enumerate(classes)
        for p in sorted((root / c).rglob("*"))
        if p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not samples:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under class folders of {root}")
    return classes, samples


def center_crop(image: Any, size: int) -> Any:
    """ADM centre crop: halve (BOX) while the short side >= 2 size, bicubic-resize the short side to size, crop the
    centre."""
    from PIL import Image  # noqa: PLC0415 - loaded on first image: `import far_sdk` stays light

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageFolderImages(Dataset):
    """(image [3, R, R] in [-1, 1], label) from an ImageFolder tree; centre crop, optional random h-flip."""

    def __init__(self, root: str | os.PathLike, resolution: int, flip: bool = True):
        self.classes, self.samples = scan_image_folder(root)
        self.resolution, self.flip = resolution, flip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image  # noqa: PLC0415 - loaded on first image: `import far_sdk` stays light

        path, label = self.samples[i]
        with Image.open(path) as im:
            im = center_crop(im.convert("RGB"), self.resolution)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # (3, R, R)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.contiguous(), torch.tensor(label, dtype=torch.int64)


class ImageFolderLatents(Dataset):
    """Latents encoded on the fly: posterior.sample() * scale of each (cropped, randomly flipped) image.

    :func:`train` loads images with workers and encodes whole batches on the training device;
    indexing encodes one image on the VAE's device.
    """

    def __init__(self, root: str | os.PathLike, vae: AutoencoderKL, scale: float, flip: bool = True):
        self.vae, self.scale = vae.eval(), float(scale)
        self.images = ImageFolderImages(root, vae.config.resolution, flip)

    @property
    def num_classes(self) -> int:
        return len(self.images.classes)

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images [B, 3, R, R] in [-1, 1] -> latents [B, E, R/f, R/f] = posterior sample * scale."""
        return self.vae.encode(images).sample(generator) * self.scale

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, label = self.images[i]
        device = next(self.vae.parameters()).device
        return self.encode(x[None].to(device))[0].cpu(), label


def write_latents(path: str | os.PathLike, latents: np.ndarray, labels: np.ndarray) -> Path:
    """Write ``latents`` float32 [N, C, H, W] and ``labels`` int64 [N] to .npz or .safetensors, atomically."""
    path = Path(path)
    arrays = {
        "latents": np.ascontiguousarray(latents, dtype=np.float32),
        "labels": np.ascontiguousarray(labels, dtype=np.int64),
    }
    if path.suffix not in (".npz", ".safetensors"):
        raise InvalidArgumentError(f"latents output {path} must end in .npz or .safetensors")
    with atomic_writer(path) as f:
        if path.suffix == ".npz":
            np.savez(f, **arrays)
        else:
            from safetensors.numpy import save  # noqa: PLC0415 - loaded when the weights are read

            f.write(save(arrays))
    return path


def cache_latents(
    image_root: str | os.PathLike,
    vae: AutoencoderKL,
    out_path: str | os.PathLike,
    scale: float,
    batch: int = 32,
    *,
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
) -> Path:
    """Encode every image of an ImageFolder tree (centre crop, no flip) and write ``posterior.sample() * scale``.

    One fixed sample per image (seeded), unlike the official cache, which stores the posterior moments of the
    image and its mirror and samples anew each epoch. The VAE runs on the device its parameters are on.
    """
    from tqdm import tqdm  # noqa: PLC0415 - loaded on first use: `import far_sdk` stays light

    images = ImageFolderImages(image_root, vae.config.resolution, flip=False)
    device = next(vae.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    vae.eval()
    lat, lab = [], []
    loader = DataLoader(images, batch_size=batch, shuffle=False, num_workers=num_workers)
    with torch.no_grad():
        for x, y in tqdm(loader, desc="encode", disable=not progress):
            z = vae.encode(x.to(device)).sample(gen) * scale  # (B, E, h, w)
            lat.append(z.float().cpu().numpy())  # host sync
            lab.append(y.numpy())
    out = write_latents(out_path, np.concatenate(lat), np.concatenate(lab))
    log.info("wrote %d latents of %d classes to %s", len(images), len(images.classes), out)
    return out


def load_latents_or_images(
    data: str | None, image_root: str | None, vae: AutoencoderKL | None, scale: float
) -> Dataset:
    """The CLI's data choice: a latents file, or an ImageFolder encoded on the fly through ``vae``."""
    if (data is None) == (image_root is None):
        raise InvalidArgumentError("give exactly one of --data (latents file) or --image-root (ImageFolder + --vae)")
    if data is not None:
        return LatentDataset(data)
    if vae is None:
        raise InvalidArgumentError("--image-root needs --vae (a VAE checkpoint) to encode the images")
    return ImageFolderLatents(image_root, vae, scale)
