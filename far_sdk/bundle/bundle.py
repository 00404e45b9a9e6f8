"""The bundle: a directory holding ONNX graphs, weights and one ``manifest.json`` describing them.

Layout (``engines/NAME/``)::

    manifest.json          format, versions, model/VAE config, schedules' defaults, graph I/O, sha256 per file
    transformer.onnx       tokens + class ids + level -> per-token MLP condition
    denoiser.onnx          one guided DDPM step
    vae_decoder.onnx       latents -> RGB
    weights.safetensors    the weights the graphs came from (for backend="torch" and re-exports)
    trt/                   TensorRT plans built on this machine (never committed; see far-export trt)

The manifest is checked first, before any field is used: its own digest and layout, format version and
schema (:mod:`far_sdk.bundle.manifest`). Then every file it lists is verified (plain name inside the bundle, not
a link, size, sha256) before any runtime is asked to parse it, and every file a graph reads as external
data must be among them (:mod:`far_sdk.bundle.onnx_external_data`). Bundles hold no pickles.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from far_sdk.bundle.graphs import GRAPH_NAMES, OPTIONAL_GRAPHS, TEXT_ENCODER, GraphSpec, TensorSpec
from far_sdk.bundle.manifest import MAX_MANIFEST_BYTES, dump_manifest, read_manifest
from far_sdk.bundle.onnx_external_data import external_data_files
from far_sdk.bundle.schema import BUNDLE_FORMAT, FORMAT_VERSION
from far_sdk.bundle.weights import load_torch_state
from far_sdk.errors import BundleError, BundleNotFoundError, IntegrityError, InvalidArgumentError
from far_sdk.fileio import atomic_write_bytes
from far_sdk.options import SamplingOptions

if TYPE_CHECKING:
    from far_sdk.options import SamplingOptions

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
__all__ = [
    "BUNDLE_FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Bundle",
    "atomic_bundle_dir",
    "clean_stale_partials",
    "sha256_file",
    "write_manifest",
]


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
    def load(cls, path: str | os.PathLike, *, verify: bool = True) -> Bundle:
        """Read ``path/manifest.json`` and check it before any field is used: its digest and layout, format
        version and schema (:mod:`far_sdk.bundle.manifest`); then (``verify``) every listed file's size and sha256
        and the external-data files of every graph."""
        path = Path(path)
        if not path.is_dir():
            raise BundleNotFoundError(
                f"bundle directory {path} does not exist (create one with `far-export onnx ... --out {path}`)"
            )
        mpath = path / MANIFEST_NAME
        if mpath.is_symlink():
            raise BundleError(
                f"{mpath} is a symbolic link; a bundle holds plain files only. Re-copy the bundle without links"
            )
        if not mpath.is_file():
            raise BundleNotFoundError(f"{path} has no {MANIFEST_NAME}: not a far bundle, or an export was interrupted")
        try:
            with open(mpath, "rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
        except OSError as e:
            raise BundleError(f"cannot read {mpath}: {e.strerror or e}") from e
        bundle = cls(path, read_manifest(data, str(mpath)))
        if verify:
            bundle.verify()
        return bundle

    def verify(self, names: list[str] | None = None) -> None:
        """Check that each listed file (or each of ``names``) is a plain file with the recorded size and sha256,
        and that every file a graph reads as external data is listed (so hashed) too."""
        files = self.manifest["files"]
        names = list(files) if names is None else list(names)
        for name in names:
            if name not in files:
                raise BundleError(f"{self.path}: manifest lists no file {name!r}")
            entry = files[name]
            _check_plain_name(name)
            p = self.path / name
            if p.is_symlink():
                raise BundleError(
                    f"{p} is a symbolic link (listed in the manifest); a bundle holds plain files only. "
                    "Re-copy the bundle without links"
                )
            if not p.exists():
                raise BundleNotFoundError(
                    f"{self.path} is missing {name} (listed in the manifest); re-export the bundle"
                )
            if not p.is_file():
                raise BundleError(f"{p} is not a regular file (listed in the manifest); re-export the bundle")
            size = p.stat().st_size
            if size != entry["size"]:
                raise IntegrityError(
                    f"{p} has {size} bytes, the manifest records {entry['size']}: the file is truncated or was "
                    "replaced. Re-export or re-copy the bundle."
                )
            digest = sha256_file(p)
            if digest != entry["sha256"]:
                raise IntegrityError(
                    f"{p} fails its sha256 check (got {digest[:12]}…, expected {entry['sha256'][:12]}…): the file is "
                    "corrupted. Re-copy the bundle."
                )
        graph_files = {g["file"] for g in self.manifest["graphs"].values()}
        graph_files |= {e["file"] for e in [(self.text or {}).get("encoder")] if e}  # the text encoder's too
        for name in names:
            if name in graph_files:
                self._check_external_data(name)

    def _check_external_data(self, name: str) -> None:
        """Refuse a graph that reads data from a file the manifest does not list (and so does not hash)."""
        for loc in sorted(external_data_files(self.path / name)):
            if loc not in self.manifest["files"] or os.path.basename(loc) != loc:
                raise BundleError(
                    f"{self.path / name} reads external data from {loc!r}, which the manifest does not list and hash: "
                    "the graph was altered. Re-export the bundle"
                )

    # ---- accessors ----------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        _check_plain_name(name)
        if name not in self.manifest["files"]:
            raise BundleError(f"{self.path}: manifest lists no file {name!r}")
        return self.path / name

    def graph_entry(self, name: str) -> dict[str, Any] | None:
        """A graph's manifest entry; the text encoder's (``text.encoder``) when it declares its inputs/outputs."""
        enc = (self.text or {}).get("encoder") or {}
        return self.manifest["graphs"].get(name) or (enc if name == TEXT_ENCODER and "inputs" in enc else None)

    def graph_spec(self, name: str) -> GraphSpec:
        g = self.graph_entry(name)
        if g is None:
            raise BundleError(f"{self.path}: manifest has no graph {name!r} (has {sorted(self.manifest['graphs'])})")
        return GraphSpec(
            name,
            tuple(TensorSpec.from_dict(t) for t in g["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in g["outputs"]),
        )

    def graph_file(self, name: str) -> Path:
        g = self.graph_entry(name)
        if g is None:
            raise BundleError(f"{self.path}: manifest has no graph {name!r} (has {sorted(self.manifest['graphs'])})")
        return self.file(g["file"])

    def load_torch_weights(self) -> dict[str, Any]:
        """The bundle's weights as torch tensors on CPU, after :func:`far_sdk.bundle.weights.load_torch_state`'s checks
        (header, layout, finite values); needs torch."""

        return load_torch_state(self.file(self.manifest.get("weights", {}).get("file", "weights.safetensors")))

    @property
    def model_config(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def sampling_modes(self) -> tuple[str, ...]:
        """The modes this bundle samples in ("nomask", "mask"; see :mod:`far_sdk.maths.masking`)."""
        return tuple(self.manifest["sampling_modes"])

    @property
    def conditioning(self) -> str:
        """ "class" (class labels) or "text" (a FAR-T2I bundle: prompts / prompt embeddings; manifest ``text``)."""
        return str(self.manifest.get("conditioning", "class"))

    @property
    def text(self) -> dict[str, Any] | None:
        """A text bundle's text section (hidden_size, max_length, optional bundled encoder); None for a class bundle."""
        return self.manifest.get("text")

    @property
    def num_classes(self) -> int:
        if self.conditioning == "text":
            raise InvalidArgumentError(
                f"bundle {self.name!r} is text-conditioned (FAR-T2I): it has no classes; pass prompt= or prompt_embeds="
            )
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
    def defaults(self) -> SamplingOptions:
        """The bundle's sampling defaults (the manifest's ``defaults``, checked at load)."""

        return SamplingOptions.from_dict(self.manifest.get("defaults", {}), what=f"{self.path}/manifest.json defaults")

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.path.name)


def file_entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


#: A leftover temporary bundle directory whose writer's pid is gone (or lives on another host) is removed
#: once it has been left untouched this long (a backstop against pid reuse and shared filesystems).
STALE_PARTIAL_SECONDS = 6 * 3600
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _partial_prefix(dest: Path) -> str:
    return f".{dest.name}.far-{os.getpid()}@{_HOST}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_partials(dest: str | os.PathLike, *, now: float | None = None) -> list[Path]:
    """Remove temporary directories that an interrupted :func:`atomic_bundle_dir` left beside ``dest``.

    Only directories this tool names ``.DEST.far-PID@HOST.XXXX.partial`` are candidates, never links; one
    is removed when its writer (PID on this HOST) is no longer running, or when nothing in it has changed
    for :data:`STALE_PARTIAL_SECONDS`. Returns the directories removed.
    """
    dest = Path(dest)
    parent = dest.parent
    pattern = re.compile(re.escape(f".{dest.name}.far-") + r"(\d+)@([A-Za-z0-9-]+)\.[A-Za-z0-9_]+\.partial\Z")
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if m is None or p.is_symlink() or not p.is_dir():
            continue
        pid, host = int(m.group(1)), m.group(2)
        dead = host == _HOST and pid != os.getpid() and not _pid_alive(pid)
        try:
            newest = max([p.lstat().st_mtime] + [q.lstat().st_mtime for q in p.iterdir()])
        except OSError:
            continue
        if dead or now - newest > STALE_PARTIAL_SECONDS:
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                log.info("removed %s, left by an interrupted export (pid %d on %s)", p, pid, host)
                removed.append(p)
    return removed


@contextmanager
def atomic_bundle_dir(dest: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; on success it is fsynced and renamed to ``dest``.

    On any error (or interrupt) the temporary directory is removed and an existing ``dest`` is left
    untouched. A non-empty ``dest`` is replaced only with ``overwrite=True``. Temporary directories that
    a killed earlier export left beside ``dest`` are removed first (:func:`clean_stale_partials`).
    """
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise BundleError(f"{dest} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(dest), suffix=".partial", dir=dest.parent))
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


def write_manifest(bundle_dir: Path, manifest: dict[str, Any], names: Collection[str] | None = None) -> None:
    """Fill ``files`` with size and sha256 of every graph/weight file present (``names``: only those), add the
    format, version and digest, check the result against the schema, and write manifest.json."""
    files = {}
    for p in sorted(bundle_dir.iterdir()):
        if p.is_file() and p.name != MANIFEST_NAME and (names is None or p.name in names):
            files[p.name] = file_entry(p)
    manifest = dict(manifest, format=BUNDLE_FORMAT, format_version=FORMAT_VERSION, files=files)
    missing = [
        g
        for g in (*GRAPH_NAMES, *OPTIONAL_GRAPHS)
        if g in manifest.get("graphs", {}) and manifest["graphs"][g]["file"] not in files
    ]
    if missing:
        raise BundleError(f"graphs {missing} have no file in {bundle_dir}")
    data = dump_manifest(manifest)
    read_manifest(data, str(bundle_dir / MANIFEST_NAME))  # the writer never writes what the reader refuses
    atomic_write_bytes(bundle_dir / MANIFEST_NAME, data)
