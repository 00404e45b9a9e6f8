"""The TensorRT engine cache of a bundle: finding the plan built for a key, checked before TensorRT sees it.

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
to one machine's GPU and TensorRT. The key is :mod:`~far_sdk.backends.tensorrt.cache_key`, writing is
:mod:`~far_sdk.backends.tensorrt.cache_store`. This module imports no TensorRT: it is importable (and tested)
anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from far_sdk.backends.tensorrt.cache_key import (
    DEFAULT_OPT_LEVEL,
    DEFAULT_PROFILE,
    KEY_VERSION,
    PRECISIONS,
    ROWS_PER_IMAGE,
    BuildEnv,
    EngineKey,
    format_profile,
    graph_rows,
    key_for,
    parse_batch_profile,
)
from far_sdk.bundle.bundle import sha256_file
from far_sdk.errors import BackendUnavailableError, IncompatibleBundleError

log = logging.getLogger(__name__)

#: The key's names are re-exported: callers use ``cache`` for both (``tc.EngineKey``, ``tc.parse_batch_profile``).
__all__ = [
    "DEFAULT_OPT_LEVEL",
    "DEFAULT_PROFILE",
    "KEY_VERSION",
    "PRECISIONS",
    "ROWS_PER_IMAGE",
    "BuildEnv",
    "EngineKey",
    "EngineNotBuiltError",
    "check_plan",
    "find_plan",
    "format_profile",
    "graph_rows",
    "key_for",
    "parse_batch_profile",
    "read_plan",
    "read_sidecar",
    "trt_dir",
]

SIDECAR_FORMAT = "far-trt-plan"
INDEX_NAME = "engines.json"
TIMING_CACHE_NAME = "timing.cache"
LOCK_NAME = ".lock"


class EngineNotBuiltError(IncompatibleBundleError, BackendUnavailableError):
    """No plan in ``bundle/trt`` was built for this graph, precision, profile, TensorRT and GPU.

    Also a :class:`~far_sdk.errors.BackendUnavailableError`, so ``backend="auto"`` moves on to the
    next backend when no engine was built for this machine.
    """


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


def sidecars(bundle: Any, graph: str | None = None) -> list[tuple[EngineKey, dict[str, Any], Path]]:
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
        nearest = _nearest(sidecars(bundle, key.graph), key)
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
    cands = sidecars(bundle, graph)
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
