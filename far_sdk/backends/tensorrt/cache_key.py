"""What a TensorRT plan was built for: batch profiles ("MIN:OPT:MAX" images per call), the machine
(:class:`BuildEnv`) and the whole :class:`EngineKey` (ONNX sha256, precision, profile, optimisation level,
TensorRT, GPU). Pure Python, no TensorRT; :mod:`far_sdk.backends.tensorrt.cache` stores plans under these keys."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from far_sdk.bundle.graphs import GRAPH_NAMES, TEXT_ENCODER
from far_sdk.errors import IncompatibleBundleError, InvalidArgumentError

PRECISIONS = ("fp32", "fp16", "bf16")
#: Bumped when far-sdk changes how it builds plans (flags, profiles): old plans then stop matching.
KEY_VERSION = 2  # 2: strongly typed networks, fp16 / bf16 from mixed-precision graphs with fp32 islands
DEFAULT_PROFILE = (1, 1, 8)
DEFAULT_OPT_LEVEL = 3
#: Rows of the graph's batch axis per image: the transformer runs the CFG batch [cond; uncond].
ROWS_PER_IMAGE = {"N": 2, "B": 1}
_GRAPH_ROWS = {"transformer": 2, "denoiser": 1, "vae_decoder": 1, TEXT_ENCODER: 1}  # text: one row per prompt


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
