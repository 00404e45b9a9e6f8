"""The TensorRT engine cache of a bundle: what each plan was built for, and writing plans safely.

A TensorRT plan runs only on the TensorRT version and GPU it was built with, and only for the
precision and batch profile it was built for. Every plan therefore has an :class:`EngineKey` and a
sidecar next to it, and a runtime checks the sidecar **before** it hands the plan to TensorRT
(``IRuntime.deserialize_cuda_engine`` returns ``None`` for a foreign plan instead of raising).

Layout under ``bundle/trt/`` (machine-local, never committed)::

    <graph>-<precision>-<digest12>.plan        the serialized engine
    <graph>-<precision>-<digest12>.plan.json   its sidecar: key, plan sha256 and size, build time, validation
    engines.json                               index of the engines built here (rebuilt from the sidecars)
    timing.cache                               TensorRT timing cache, shared by all builds
    .lock                                      flock()ed while a build writes into this directory

Built engines are recorded in ``engines.json`` and the sidecars, **not** in ``manifest.json``: the
manifest is hashed, immutable once exported and identical on every machine, while engines belong
to one machine's GPU and TensorRT. This module imports no TensorRT: it is importable (and tested)
anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from far_sdk.bundle.bundle import sha256_file
from far_sdk.bundle.graphs import GRAPH_NAMES, TEXT_ENCODER
from far_sdk.errors import BackendUnavailableError, IncompatibleBundleError, InvalidArgumentError
from far_sdk.fileio import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
#: Bumped when far-sdk changes how it builds plans (flags, profiles): old plans then stop matching.
KEY_VERSION = 1
SIDECAR_FORMAT = "far-trt-plan"
INDEX_NAME = "engines.json"
TIMING_CACHE_NAME = "timing.cache"
LOCK_NAME = ".lock"
DEFAULT_PROFILE = (1, 1, 8)
DEFAULT_OPT_LEVEL = 3
#: Rows of the graph's batch axis per image: the transformer runs the CFG batch [cond; uncond].
ROWS_PER_IMAGE = {"N": 2, "B": 1}
_GRAPH_ROWS = {"transformer": 2, "denoiser": 1, "vae_decoder": 1, TEXT_ENCODER: 1}  # text: one call per prompt set


class EngineNotBuiltError(IncompatibleBundleError, BackendUnavailableError):
    """No plan in ``bundle/trt`` was built for this graph, precision, profile, TensorRT and GPU.

    Also a :class:`~far_sdk.errors.BackendUnavailableError`, so ``backend="auto"`` moves on to the
    next backend when no engine was built for this machine.
    """


# ---- batch profiles ------------------------------------------------------------------------------


def parse_batch_profile(value: str | int | Sequence[int]) -> tuple[int, int, int]:
    """``"1:4:8"`` -> (1, 4, 8): the min, opt and max images per call; ``"4"`` -> (4, 4, 4) (a static batch).

    Also accepts an int or a 3-sequence of ints. Raises :class:`InvalidArgumentError` unless
    ``1 <= min <= opt <= max``.
    """
    usage = (
        "expected MIN:OPT:MAX images per call with 1 <= MIN <= OPT <= MAX (e.g. 1:4:8), "
        "or one number for a static batch"
    )
    if isinstance(value, bool):
        raise InvalidArgumentError(f"batch profile {value!r}: {usage}")
    if isinstance(value, int):
        parts: list[Any] = [value] * 3
    elif isinstance(value, str):
        raw = [p.strip() for p in value.strip().split(":")]
        if len(raw) == 1:
            raw = raw * 3
        if len(raw) != 3 or not all(p.isdigit() for p in raw):
            raise InvalidArgumentError(f"batch profile {value!r}: {usage}")
        parts = [int(p) for p in raw]
    else:
        parts = list(value)
        if len(parts) != 3 or any(isinstance(p, bool) or not isinstance(p, int) for p in parts):
            raise InvalidArgumentError(f"batch profile {value!r}: {usage}")
    lo, opt, hi = (int(p) for p in parts)
    if not 1 <= lo <= opt <= hi:
        raise InvalidArgumentError(f"batch profile {value!r}: {usage}")
    return lo, opt, hi


def format_profile(profile: Sequence[int]) -> str:
    return ":".join(str(int(p)) for p in profile)


def graph_rows(graph: str, images: int) -> int:
    """Size of ``graph``'s batch axis for ``images`` images (the transformer's is 2x: the CFG batch)."""
    return _GRAPH_ROWS[graph] * images


# ---- the key ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildEnv:
    """The machine half of a key: TensorRT version, GPU name, compute capability ("major.minor")."""

    tensorrt: str
    gpu: str
    compute_capability: str

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt} on {self.gpu} ({self.compute_capability})"


@dataclass(frozen=True)
class EngineKey:
    """Everything a plan depends on. Equal keys <=> interchangeable plans.

    ``profile`` is in images per call (min, opt, max); the transformer's batch axis holds twice as
    many rows (see :func:`graph_rows`). ``external_data_sha256`` is the sha256 of the graph's
    external weights file, when it has one.
    """

    graph: str
    onnx_sha256: str
    precision: str
    profile: tuple[int, int, int]
    opt_level: int
    tensorrt: str
    gpu: str
    compute_capability: str
    external_data_sha256: str | None = None
    key_version: int = KEY_VERSION

    def __post_init__(self) -> None:
        if self.graph not in (*GRAPH_NAMES, TEXT_ENCODER):
            raise InvalidArgumentError(f"graph must be one of {(*GRAPH_NAMES, TEXT_ENCODER)}, got {self.graph!r}")
        if self.precision not in PRECISIONS:
            raise InvalidArgumentError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        object.__setattr__(self, "profile", parse_batch_profile(tuple(self.profile)))
        if isinstance(self.opt_level, bool) or not isinstance(self.opt_level, int) or not 0 <= self.opt_level <= 5:
            raise InvalidArgumentError(f"builder optimisation level must be an integer 0..5, got {self.opt_level!r}")

    @property
    def env(self) -> BuildEnv:
        return BuildEnv(self.tensorrt, self.gpu, self.compute_capability)

    @property
    def graph_profile(self) -> tuple[int, int, int]:
        """The profile over the graph's own batch axis (rows)."""
        return tuple(graph_rows(self.graph, p) for p in self.profile)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["profile"] = list(self.profile)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> EngineKey:
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or not {"graph", "onnx_sha256", "precision", "profile"} <= set(d) or set(d) - names:
            raise IncompatibleBundleError(f"not an engine key: {d!r}")
        try:
            return cls(**{**d, "profile": tuple(d["profile"])})
        except (InvalidArgumentError, TypeError) as e:
            raise IncompatibleBundleError(f"invalid engine key {d!r}: {e}") from e

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """sha256 of the canonical JSON (sorted keys, no spaces); the first 12 hex digits name the file."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @property
    def plan_name(self) -> str:
        return f"{self.graph}-{self.precision}-{self.digest()[:12]}.plan"


def key_for(
    bundle: Any, graph: str, *, precision: str, profile: Sequence[int], opt_level: int, env: BuildEnv
) -> EngineKey:
    """The key of ``graph`` of ``bundle`` (a :class:`~far_sdk.bundle.bundle.Bundle`); hashes come from its manifest."""
    entry = bundle.graph_entry(graph)  # the text encoder's is the manifest's text.encoder
    files = bundle.manifest["files"]
    data = entry.get("external_data")
    return EngineKey(
        graph=graph,
        onnx_sha256=files[entry["file"]]["sha256"],
        precision=precision,
        profile=tuple(profile),
        opt_level=opt_level,
        tensorrt=env.tensorrt,
        gpu=env.gpu,
        compute_capability=env.compute_capability,
        external_data_sha256=files[data]["sha256"] if data else None,
    )


# ---- paths -----------------------------------------------------------------------------------------


def _bundle_path(bundle: Any) -> Path:
    return Path(getattr(bundle, "path", bundle))


def trt_dir(bundle: Any) -> Path:
    return _bundle_path(bundle) / "trt"


def plan_path(bundle: Any, key: EngineKey) -> Path:
    return trt_dir(bundle) / key.plan_name


def sidecar_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


def rebuild_hint(bundle: Any, key: EngineKey) -> str:
    flag = "--vae-precision" if key.graph == "vae_decoder" else "--precision"
    hint = (
        f"far-export trt --bundle {_bundle_path(bundle)} {flag} {key.precision} --batch {format_profile(key.profile)}"
    )
    if key.opt_level != DEFAULT_OPT_LEVEL:
        hint += f" --opt-level {key.opt_level}"
    return hint


# ---- sidecars and checks ---------------------------------------------------------------------------


def read_sidecar(path: Path) -> tuple[EngineKey, dict[str, Any]]:
    try:
        side = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IncompatibleBundleError(f"{path} is unreadable ({e}): delete it and rebuild the engine") from e
    if not isinstance(side, dict) or side.get("format") != SIDECAR_FORMAT or "key" not in side:
        raise IncompatibleBundleError(f"{path} is not a {SIDECAR_FORMAT!r} sidecar: delete it and rebuild the engine")
    return EngineKey.from_dict(side["key"]), side


def _sidecars(bundle: Any, graph: str | None = None) -> list[tuple[EngineKey, dict[str, Any], Path]]:
    """Every readable sidecar (of ``graph``) in bundle/trt; unreadable ones are logged and skipped."""
    out = []
    d = trt_dir(bundle)
    if not d.is_dir():
        return out
    for p in sorted(d.glob(f"{graph or '*'}-*.plan.json")):
        try:
            key, side = read_sidecar(p)
        except IncompatibleBundleError as e:
            log.warning("%s", e)
            continue
        if graph is None or key.graph == graph:
            out.append((key, side, p))
    return out


def diff_fields(found: EngineKey, wanted: EngineKey) -> list[str]:
    return [f.name for f in fields(EngineKey) if getattr(found, f.name) != getattr(wanted, f.name)]


def explain_mismatch(found: EngineKey, wanted: EngineKey) -> str:
    """One sentence per group of differing fields, e.g. "built for TensorRT 10.3 on NVIDIA A100 (8.0), this is ..."."""
    diff = set(diff_fields(found, wanted))
    parts = []
    if diff & {"tensorrt", "gpu", "compute_capability"}:
        parts.append(f"built for {found.env.describe()}, this is {wanted.env.describe()}")
    if diff & {"onnx_sha256", "external_data_sha256"}:
        parts.append(
            f"built from another {found.graph} graph (ONNX sha256 {found.onnx_sha256[:12]}…, the bundle has "
            f"{wanted.onnx_sha256[:12]}…): the bundle was re-exported"
        )
    if "precision" in diff:
        parts.append(f"built in {found.precision}, wanted {wanted.precision}")
    if "profile" in diff:
        parts.append(
            f"built for batch {format_profile(found.profile)} images per call, wanted {format_profile(wanted.profile)}"
        )
    if "opt_level" in diff:
        parts.append(f"built at builder optimisation level {found.opt_level}, wanted {wanted.opt_level}")
    if "key_version" in diff:
        parts.append(
            f"written by another far-sdk engine format (v{found.key_version}, this one reads v{wanted.key_version})"
        )
    return "; ".join(parts)


def _nearest(candidates: list[tuple[EngineKey, dict[str, Any], Path]], wanted: EngineKey):
    return min(candidates, key=lambda c: (len(diff_fields(c[0], wanted)), -_built_at(c[1]))) if candidates else None


def _built_at(side: dict[str, Any]) -> float:
    t = side.get("built_at_unix", 0)
    return float(t) if isinstance(t, (int, float)) else 0.0


def check_plan(bundle: Any, key: EngineKey, *, verify_sha: bool = True) -> Path:
    """Path of the plan built for exactly ``key``; checks the sidecar (and the plan's size and sha256).

    Raises :class:`EngineNotBuiltError` (an :class:`~far_sdk.errors.IncompatibleBundleError`) when
    no plan was built for ``key``, naming the fields in which the nearest plan differs and the
    command that rebuilds it; :class:`~far_sdk.errors.IncompatibleBundleError` when the plan file
    does not match its sidecar (truncated or replaced).
    """
    plan = plan_path(bundle, key)
    side_p = sidecar_path(plan)
    hint = rebuild_hint(bundle, key)
    if not side_p.is_file():
        if plan.is_file():
            raise EngineNotBuiltError(
                f"{plan} has no sidecar {side_p.name} (an interrupted build, or copied without it): rebuild with {hint}"
            )
        nearest = _nearest(_sidecars(bundle, key.graph), key)
        if nearest is None:
            raise EngineNotBuiltError(
                f"no TensorRT engine for graph {key.graph!r} in {trt_dir(bundle)}: build the engines with {hint}"
            )
        found, _, p = nearest
        raise EngineNotBuiltError(
            f"no TensorRT engine for graph {key.graph!r} matches: {p.name[:-5]} was {explain_mismatch(found, key)}. "
            f"Rebuild with {hint}"
        )
    found, side = read_sidecar(side_p)
    if found != key:  # a name collision or an edited sidecar
        raise EngineNotBuiltError(
            f"{side_p.name} was {explain_mismatch(found, key) or 'written for another key'}. Rebuild with {hint}"
        )
    if not plan.is_file():
        raise EngineNotBuiltError(
            f"{side_p.name} has no plan {plan.name} (deleted, or an interrupted build): rebuild with {hint}"
        )
    size = plan.stat().st_size
    if size != side.get("plan_size"):
        raise IncompatibleBundleError(
            f"{plan} has {size} bytes, its sidecar records {side.get('plan_size')}: the plan is truncated or was "
            f"replaced. Rebuild with {hint} --rebuild"
        )
    if verify_sha:
        check_plan_bytes_sha(plan, side, sha256_file(plan), hint)
    return plan


def check_plan_bytes_sha(plan: Path, side: dict[str, Any], digest: str, hint: str) -> None:
    if digest != side.get("plan_sha256"):
        raise IncompatibleBundleError(
            f"{plan} fails its sha256 check (got {digest[:12]}…, the sidecar records "
            f"{str(side.get('plan_sha256'))[:12]}…): "
            f"the plan is corrupted or was replaced. Rebuild with {hint} --rebuild"
        )


def read_plan(bundle: Any, key: EngineKey) -> bytes:
    """The verified bytes of ``key``'s plan (read once: hashed in memory, then handed to TensorRT)."""
    plan = check_plan(bundle, key, verify_sha=False)
    data = plan.read_bytes()
    _, side = read_sidecar(sidecar_path(plan))
    check_plan_bytes_sha(plan, side, hashlib.sha256(data).hexdigest(), rebuild_hint(bundle, key))
    return data


def find_plan(
    bundle: Any,
    graph: str,
    *,
    env: BuildEnv,
    precision: str | None = None,
    profile: Sequence[int] | None = None,
    opt_level: int | None = None,
    prefer: Sequence[str] = ("fp16", "bf16", "fp32"),
    verify_sha: bool = True,
) -> tuple[EngineKey, Path]:
    """The plan of ``graph`` built for this bundle and ``env``; ``None`` criteria match anything.

    Among several matches: the first precision in ``prefer``, then the largest max batch, then the
    newest build. Raises :class:`EngineNotBuiltError` explaining the nearest plan when none matches.
    ``verify_sha=False`` checks the plan's size only (for callers that go on with :func:`read_plan`).
    """
    if profile is not None:
        profile = parse_batch_profile(tuple(profile))
    ref = key_for(
        bundle,
        graph,
        precision=precision or "fp32",
        profile=profile or DEFAULT_PROFILE,
        opt_level=DEFAULT_OPT_LEVEL if opt_level is None else opt_level,
        env=env,
    )
    cands = _sidecars(bundle, graph)
    ok = [
        c
        for c in cands
        if c[0].env == env
        and c[0].onnx_sha256 == ref.onnx_sha256
        and c[0].external_data_sha256 == ref.external_data_sha256
        and c[0].key_version == KEY_VERSION
        and precision in (None, c[0].precision)
        and profile in (None, c[0].profile)
        and opt_level in (None, c[0].opt_level)
    ]
    if ok:
        rank = {p: i for i, p in enumerate(prefer)}
        key = min(ok, key=lambda c: (rank.get(c[0].precision, len(rank)), -c[0].profile[2], -_built_at(c[1])))[0]
        return key, check_plan(bundle, key, verify_sha=verify_sha)
    # Nothing matches: ask for the nearest plan's settings where the caller left them open, so the
    # error names only real differences (e.g. the TensorRT version).
    nearest = _nearest(cands, ref)
    base = nearest[0] if nearest is not None else ref
    wanted = replace(
        ref,
        precision=precision or (base.precision if nearest else ("fp32" if graph == "vae_decoder" else "fp16")),
        profile=profile or base.profile,
        opt_level=base.opt_level if opt_level is None else opt_level,
    )
    check_plan(bundle, wanted)  # raises with the explanation
    return wanted, plan_path(bundle, wanted)  # pragma: no cover - only if a plan appeared meanwhile


# ---- writing ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def build_lock(bundle: Any) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``bundle/trt/.lock``: a second builder waits here, then finds the plan built."""
    d = trt_dir(bundle)
    d.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl  # noqa: PLC0415 - POSIX only: Windows has none (handled below)
    except ImportError:  # Windows: no flock; concurrent builds there are the caller's business
        log.warning("no file locking on this platform: do not build engines for %s from two processes at once", d)
        yield d
        return
    with open(d / LOCK_NAME, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building engines in %s; waiting for it", d)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield d
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def record_plan(
    bundle: Any,
    key: EngineKey,
    plan: bytes | memoryview,
    *,
    build_seconds: float,
    validation: dict[str, Any] | None,
    far_sdk_version: str | None = None,
) -> Path:
    """Write ``plan`` and its sidecar atomically (call under :func:`build_lock`), then refresh the index.

    The old sidecar goes first, so a crash in between leaves a plan without a sidecar (rejected
    and rebuilt), never a sidecar describing another plan.
    """
    path = plan_path(bundle, key)
    side_p = sidecar_path(path)
    with contextlib.suppress(FileNotFoundError):
        side_p.unlink()
    view = memoryview(plan).cast("B")
    atomic_write_bytes(path, view)
    now = time.time()
    atomic_write_json(
        side_p,
        {
            "format": SIDECAR_FORMAT,
            "key": key.to_dict(),
            "digest": key.digest(),
            "graph_batch": list(key.graph_profile),
            "plan": path.name,
            "plan_size": view.nbytes,
            "plan_sha256": hashlib.sha256(view).hexdigest(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "built_at_unix": now,
            "build_seconds": round(float(build_seconds), 3),
            "far_sdk": far_sdk_version,
            "validation": validation,
        },
    )
    write_index(bundle)
    return path


def write_index(bundle: Any) -> Path:
    """Rewrite ``bundle/trt/engines.json`` from the sidecars (so it never disagrees with them)."""
    engines = []
    for key, side, p in _sidecars(bundle):
        engines.append(
            {
                "graph": key.graph,
                "precision": key.precision,
                "profile": format_profile(key.profile),
                "opt_level": key.opt_level,
                "tensorrt": key.tensorrt,
                "gpu": key.gpu,
                "compute_capability": key.compute_capability,
                "plan": p.name[:-5],
                "plan_size": side.get("plan_size"),
                "built_at": side.get("built_at"),
                "build_seconds": side.get("build_seconds"),
                "validation": side.get("validation"),
            }
        )
    path = trt_dir(bundle) / INDEX_NAME
    atomic_write_json(
        path,
        {
            "format": "far-trt-index",
            "note": "TensorRT engines built on this machine; manifest.json (hashed, immutable) does not list them.",
            "engines": engines,
        },
    )
    return path
