"""The bundle: a directory holding ONNX graphs, weights and one ``manifest.json`` describing them.

Layout (``engines/NAME/``)::

    manifest.json          format, versions, model/VAE config, schedules' defaults, graph I/O, sha256 per file
    transformer.onnx       tokens + class ids + level -> per-token MLP condition
    denoiser.onnx          one guided DDPM step
    vae_decoder.onnx       latents -> RGB
    weights.safetensors    the weights the graphs came from (for backend="torch" and re-exports)
    trt/                   TensorRT plans built on this machine (never committed; see far-export trt)

Every file listed in the manifest is verified (plain name inside the bundle, size, sha256)
before any runtime is asked to parse it. Bundles hold no pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError, BundleNotFoundError, IncompatibleBundleError, IntegrityError
from .fileio import atomic_write_bytes
from .graphs import GRAPH_NAMES, GraphSpec, TensorSpec

MANIFEST_NAME = "manifest.json"
BUNDLE_FORMAT = "far-bundle"
#: Bumped when the manifest or a graph's inputs/outputs change incompatibly.
FORMAT_VERSION = 1


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_plain_name(name: str) -> None:
    if not name or name != os.path.basename(name) or name in (".", "..") or "\\" in name:
        raise BundleError(f"manifest names file {name!r}: only plain file names inside the bundle are allowed")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle. Build with :meth:`Bundle.load`."""

    path: Path
    manifest: dict[str, Any] = field(repr=False)

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = True) -> "Bundle":
        """Read ``path/manifest.json``; check format, version and (``verify``) every file's size and sha256."""
        path = Path(path)
        if not path.is_dir():
            raise BundleNotFoundError(f"bundle directory {path} does not exist (create one with `far-export onnx ... --out {path}`)")
        mpath = path / MANIFEST_NAME
        if not mpath.is_file():
            raise BundleNotFoundError(f"{path} has no {MANIFEST_NAME}: not a far bundle, or an export was interrupted")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath} is not valid JSON ({e}); re-export the bundle") from e
        if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
            raise IncompatibleBundleError(f"{mpath} is not a {BUNDLE_FORMAT!r} manifest")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise IncompatibleBundleError(
                f"{path} has bundle format version {version!r}; this far-sdk reads version {FORMAT_VERSION}. "
                "Re-export it with this far-sdk's `far-export onnx` (or install the far-sdk that wrote it: "
                f"{manifest.get('created_by', {}).get('far_sdk', 'unknown')})."
            )
        for key in ("model", "vae", "graphs", "files", "latent_scale"):
            if key not in manifest:
                raise BundleError(f"{mpath} lacks the required entry {key!r}; re-export the bundle")
        bundle = cls(path, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self, names: list[str] | None = None) -> None:
        """Check that each listed file exists, is a plain file, and has the recorded size and sha256."""
        files = self.manifest["files"]
        for name in names if names is not None else list(files):
            if name not in files:
                raise BundleError(f"{self.path}: manifest lists no file {name!r}")
            entry = files[name]
            _check_plain_name(name)
            p = self.path / name
            if p.is_symlink() or not p.is_file():
                raise BundleNotFoundError(f"{self.path} is missing {name} (listed in the manifest); re-export the bundle")
            size = p.stat().st_size
            if size != entry["size"]:
                raise IntegrityError(
                    f"{p} has {size} bytes, the manifest records {entry['size']}: the file is truncated or was replaced. Re-export or re-copy the bundle."
                )
            digest = sha256_file(p)
            if digest != entry["sha256"]:
                raise IntegrityError(f"{p} fails its sha256 check (got {digest[:12]}…, expected {entry['sha256'][:12]}…): the file is corrupted. Re-copy the bundle.")

    # ---- accessors ----------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        _check_plain_name(name)
        if name not in self.manifest["files"]:
            raise BundleError(f"{self.path}: manifest lists no file {name!r}")
        return self.path / name

    def graph_spec(self, name: str) -> GraphSpec:
        g = self.manifest["graphs"].get(name)
        if g is None:
            raise BundleError(f"{self.path}: manifest has no graph {name!r} (has {sorted(self.manifest['graphs'])})")
        return GraphSpec(name, tuple(TensorSpec.from_dict(t) for t in g["inputs"]), tuple(TensorSpec.from_dict(t) for t in g["outputs"]))

    def graph_file(self, name: str) -> Path:
        return self.file(self.manifest["graphs"][name]["file"])

    @property
    def model_config(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def num_classes(self) -> int:
        return int(self.manifest["model"]["num_classes"])

    @property
    def null_class_id(self) -> int:
        return int(self.manifest.get("null_class_id", self.num_classes))

    @property
    def latent_scale(self) -> float:
        return float(self.manifest["latent_scale"])

    @property
    def id2label(self) -> dict[int, str]:
        return {int(k): v for k, v in self.manifest.get("id2label", {}).items()}

    @property
    def defaults(self) -> dict[str, Any]:
        return dict(self.manifest.get("defaults", {}))

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.path.name)


def file_entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


@contextmanager
def atomic_bundle_dir(dest: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; on success it is fsynced and renamed to ``dest``.

    On any error (or interrupt) the temporary directory is removed and an existing ``dest`` is left
    untouched. A non-empty ``dest`` is replaced only with ``overwrite=True``.
    """
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise BundleError(f"{dest} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a bundle is readable like any directory
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        dfd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    """Fill ``files`` with size and sha256 of every graph/weight file present, then write manifest.json."""
    files = {}
    for p in sorted(bundle_dir.iterdir()):
        if p.is_file() and p.name != MANIFEST_NAME:
            files[p.name] = file_entry(p)
    manifest = dict(manifest, format=BUNDLE_FORMAT, format_version=FORMAT_VERSION, files=files)
    missing = [g for g in GRAPH_NAMES if g in manifest.get("graphs", {}) and manifest["graphs"][g]["file"] not in files]
    if missing:
        raise BundleError(f"graphs {missing} have no file in {bundle_dir}")
    atomic_write_bytes(bundle_dir / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
