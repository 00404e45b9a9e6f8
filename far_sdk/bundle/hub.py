"""Where a bundle or an official file comes from: a local path, or the Hugging Face Hub by name.

- :func:`locate_bundle`: ``"hub:OWNER/REPO[@REVISION]"`` -> a local bundle directory (:func:`download_bundle`);
  any other value is a local path, which must exist (else :class:`BundleNotFoundError` with a "did you mean" among
  its neighbours).
- :func:`hub_download`: one file of a Hub repository -> :class:`HubFile` (its local path and the commit it came
  from), through huggingface_hub's own cache: resumed downloads, ``HF_HUB_OFFLINE=1`` (the cache only),
  ``HF_TOKEN`` (or ``hf auth login``) for private or gated repositories, ``HF_ENDPOINT`` (a mirror), ``HF_HUB_CACHE``.
  Its failures become typed errors naming what was asked: a repository, revision or file that does not exist is an
  :class:`InvalidArgumentError`; no connection (or offline) without a cached copy is a :class:`HubError`.
- :func:`download_bundle`: a bundle published as a Hub repository: ``manifest.json`` first, then every file the
  manifest lists, pinned to the commit that manifest came from, so a push in between cannot mix two versions.
  The Hub cache holds its files as symbolic links, which a bundle refuses; the bundle is therefore assembled,
  once per commit, from hard links to the cached blobs (copies where links cannot be made) under
  ``$FAR_SDK_CACHE/hub`` (default ``~/.cache/far-sdk/hub``), and :meth:`Bundle.load` verifies every file.

huggingface_hub is imported on first use (``pip install 'far-sdk[hub]'``): ``import far_sdk`` stays light.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from far_sdk.bundle.bundle import MANIFEST_NAME, atomic_bundle_dir
from far_sdk.errors import BundleError, BundleNotFoundError, HubError, InvalidArgumentError, closest, did_you_mean

HUB_PREFIX = "hub:"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubFile:
    """One file fetched from the Hub: where it is on this machine and exactly which version it is."""

    path: Path  # inside huggingface_hub's cache (a symbolic link to its blob)
    repo_id: str
    filename: str  # path inside the repository
    commit: str  # the commit it was resolved to (40 hex digits), whatever revision was asked for

    def source(self) -> dict[str, str]:
        """What a manifest's ``source`` records of it (``hub``: repository, commit, path)."""
        return {"repo_id": self.repo_id, "revision": self.commit, "path": self.filename}


def parse_hub_spec(spec: str, what: str = "bundle") -> tuple[str, str | None]:
    """``"hub:OWNER/REPO[@REVISION]"`` -> (repo_id, revision or None)."""
    body = spec[len(HUB_PREFIX) :] if spec.startswith(HUB_PREFIX) else spec
    repo_id, _, revision = body.partition("@")
    check_repo_id(repo_id, what)
    return repo_id, (revision or None)


def check_repo_id(repo_id: str, what: str) -> str:
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise InvalidArgumentError(f"{what} {repo_id!r} is not a Hub repository id: expected OWNER/NAME")
    return repo_id


def _hf() -> Any:
    try:
        import huggingface_hub.constants  # noqa: PLC0415 - optional dependency, loaded when the Hub is used
        import huggingface_hub.errors  # noqa: PLC0415, F401 - (the same)
    except ImportError as e:
        raise HubError(
            f"fetching from the Hugging Face Hub needs huggingface_hub ({e}): pip install 'far-sdk[hub]'"
        ) from e
    return huggingface_hub


def hub_download(repo_id: str, filename: str, revision: str | None = None, *, what: str = "file") -> HubFile:
    """``filename`` of model repository ``repo_id`` at ``revision`` (default: main) through the Hub cache."""
    hf = _hf()
    errors = hf.errors
    check_repo_id(repo_id, "repository")
    at = f"{repo_id}@{revision or 'main'}"
    try:
        path = Path(hf.hf_hub_download(repo_id, filename, revision=revision))
    except errors.LocalEntryNotFoundError as e:  # offline, or no connection, and not in the cache
        mode = "HF_HUB_OFFLINE is set" if hf.constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise HubError(
            f"{what} {filename} of {at} is not in the Hugging Face cache ({hf.constants.HF_HUB_CACHE}) and {mode}: "
            "connect once (unset HF_HUB_OFFLINE), or copy a cache that has it"
        ) from e
    except errors.RevisionNotFoundError as e:
        raise InvalidArgumentError(
            f"revision {revision!r} does not exist in Hub repository {repo_id} (a branch, tag or commit hash)"
        ) from e
    except errors.RepositoryNotFoundError as e:  # also gated / private without a token
        raise InvalidArgumentError(
            f"Hub repository {repo_id} was not found at {hf.constants.ENDPOINT}, or is private or gated: check the "
            "name, or log in (HF_TOKEN, `hf auth login`)"
        ) from e
    except errors.EntryNotFoundError as e:
        hint = _close_files(hf, repo_id, revision, filename)
        raise InvalidArgumentError(f"{at} has no {what} {filename!r}{hint}") from e
    except (errors.HfHubHTTPError, OSError) as e:
        raise HubError(f"downloading {filename} from {at} failed: {' '.join(str(e).split())}") from e
    commit = path.parents[len(filename.split("/")) - 1].name
    if not _COMMIT.match(commit):
        raise HubError(f"{path} is not inside a Hugging Face cache snapshot; cannot tell which commit it is")
    return HubFile(path, repo_id, filename, commit)


def _close_files(hf: Any, repo_id: str, revision: str | None, filename: str) -> str:
    """ " (did you mean 'X'?)" among the repository's files, when they can be listed."""
    try:
        return did_you_mean(filename, hf.list_repo_files(repo_id, revision=revision))
    except Exception:  # noqa: BLE001 - only a hint: offline, a mirror without the listing API, ...
        return ""


def cache_dir() -> Path:
    """far-sdk's own cache (``$FAR_SDK_CACHE``, else ``$XDG_CACHE_HOME/far-sdk``, else ``~/.cache/far-sdk``)."""
    if os.environ.get("FAR_SDK_CACHE"):
        return Path(os.environ["FAR_SDK_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "far-sdk"


def download_bundle(repo_id: str, revision: str | None = None) -> Path:
    """The bundle published as Hub repository ``repo_id`` (at ``revision``) as a local directory of plain files."""
    manifest = hub_download(repo_id, MANIFEST_NAME, revision, what="bundle manifest")
    dest = cache_dir() / "hub" / repo_id.replace("/", "--") / manifest.commit
    if (dest / MANIFEST_NAME).is_file():
        return dest  # assembled before; Bundle.load verifies it
    try:
        files = json.loads(manifest.path.read_bytes())["files"]
        names = [str(n) for n in files]
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{repo_id}@{manifest.commit}: {MANIFEST_NAME} is not a far bundle manifest ({e})") from e
    for name in names:
        if not name or name != os.path.basename(name) or name in (".", ".."):
            raise BundleError(f"{repo_id}: manifest names file {name!r}; only plain file names are allowed")
    fetched = [manifest] + [hub_download(repo_id, n, manifest.commit, what="bundle file") for n in names]
    with atomic_bundle_dir(dest) as tmp:
        for f in fetched:
            _link_or_copy(Path(os.path.realpath(f.path)), tmp / f.filename)
    return dest


def _link_or_copy(blob: Path, target: Path) -> None:
    try:
        os.link(blob, target)
    except OSError:  # another filesystem, or links not allowed: a copy
        shutil.copyfile(blob, target)


def locate_bundle(spec: str | os.PathLike) -> Path:
    """A bundle named by the user -> its local directory: ``hub:OWNER/REPO[@REVISION]`` is downloaded
    (:func:`download_bundle`); a local path must exist (else :class:`BundleNotFoundError`, with the closest
    existing name beside it)."""
    text = os.fspath(spec)
    if text.startswith(HUB_PREFIX):
        return download_bundle(*parse_hub_spec(text))
    path = Path(text)
    if not path.exists() and path.parent.is_dir() and path.name:
        close = closest(path.name, [p.name for p in path.parent.iterdir() if p.is_dir() and p.name[:1] != "."])
        if close:
            raise BundleNotFoundError(f"bundle directory {path} does not exist (did you mean {path.parent / close}?)")
    return path
