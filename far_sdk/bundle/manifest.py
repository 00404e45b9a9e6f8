"""``manifest.json``: its digest, its one schema, and reading it so that it cannot lie.

Reading (:func:`read_manifest`) goes in this order, and no field is used before its step:

1. the bytes: at most :data:`MAX_MANIFEST_BYTES`, strict UTF-8, JSON without duplicate keys,
   NaN/Infinity or out-of-range floats;
2. the digest: ``manifest_sha256`` must equal :func:`manifest_digest` — the sha256 of the
   *canonical* JSON of the manifest without that field (sorted keys, no whitespace, ASCII only:
   ``json.dumps(m, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``); and the file must
   be exactly what :func:`dump_manifest` writes for those values (``json.dumps(m, indent=2)`` and a
   newline). The second rule closes the gap the first leaves: spellings of the same value
   (``1e-06`` / ``1E-06``, a 17th digit that rounds to the same double, ``\\u00e9`` / ``\\u00E9``) hash
   alike canonically, so without it a flipped bit there would pass unseen;
3. the format name and version (:data:`FORMAT_VERSION`);
4. :data:`SCHEMA` (JSON Schema 2020-12, checked with ``jsonschema``): every key, type and range;
   then the relations one schema cannot state (:func:`_check_relations`): graph and weight files
   listed in ``files``, ``null_class_id`` = ``num_classes``, graph I/O = the model's shapes,
   ``defaults`` a valid sampling plan.

Any failure is one :class:`~far_sdk.errors.BundleError` (or subclass) naming the bundle and, for
schema failures, the field (``model.grid_size``, ``graphs.denoiser.file``, ...).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from far_sdk.bundle.graphs import (
    DENOISER_FEWSTEP,
    GRAPH_NAMES,
    OPTIONAL_GRAPHS,
    fewstep_spec,
    graph_specs,
    text_encoder_spec,
)
from far_sdk.bundle.schema import BUNDLE_FORMAT, DIGEST_KEY, FORMAT_VERSION, schema_error
from far_sdk.errors import BundleError, IncompatibleBundleError, IntegrityError, InvalidArgumentError
from far_sdk.maths.masking import sampling_modes
from far_sdk.options import DEFAULTS, SamplingOptions, resolve_plan

MAX_MANIFEST_BYTES = 16 << 20

# ---- digest and layout -------------------------------------------------------------------------------


def canonical_json(manifest: dict[str, Any]) -> bytes:
    """The bytes the digest covers: the manifest without ``manifest_sha256``, sorted keys, no whitespace, ASCII."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 (hex) of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(manifest)).hexdigest()


def dump_manifest(manifest: dict[str, Any]) -> bytes:
    """The bytes of ``manifest.json``: ``manifest`` (key order kept) with its digest as the last key."""
    m = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    m[DIGEST_KEY] = manifest_digest(m)
    return (json.dumps(m, indent=2, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")


# ---- reading --------------------------------------------------------------------------------------------


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook that refuses a key given twice (JSON allows it; the last would win silently)."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return d


def _finite_float(text: str) -> float:
    v = float(text)
    if v in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return v


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes, where: str) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, no float overflow. Raises BundleError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BundleError(
            f"{where} is not UTF-8 text (byte {e.start}): the file is corrupted; re-export or re-copy the bundle"
        ) from None
    try:
        return json.loads(
            text, object_pairs_hook=no_duplicate_keys, parse_float=_finite_float, parse_constant=_no_constant
        )
    except (ValueError, RecursionError) as e:
        raise BundleError(
            f"{where} is not valid JSON ({e}); the file is corrupted: re-export or re-copy the bundle"
        ) from None


def read_manifest(data: bytes, where: str) -> dict[str, Any]:
    """Parse and check ``manifest.json``'s bytes (``where`` names the file in messages); see the module doc."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(
            f"{where} has {len(data)} bytes, more than any manifest ({MAX_MANIFEST_BYTES}); not a far bundle manifest"
        )
    m = parse_json(data, where)
    if not isinstance(m, dict):
        raise BundleError(f"{where} holds a JSON {type(m).__name__}, not an object; not a far bundle manifest")
    digest = m.get(DIGEST_KEY)
    if digest is None:
        version = m.get("format_version")
        raise IncompatibleBundleError(
            f"{where} carries no manifest digest ({DIGEST_KEY!r}): it was written by an older far-sdk (bundle format "
            f"version {version!r}; this far-sdk reads version {FORMAT_VERSION}) or its digest key was damaged. "
            "Re-export the bundle with this far-sdk's `far-export onnx`."
        )
    if not isinstance(digest, str) or manifest_digest(m) != digest:
        raise IntegrityError(
            f"{where} fails its digest check ({DIGEST_KEY}): the manifest was edited or corrupted. "
            "Re-copy or re-export the bundle."
        )
    if dump_manifest(m) != data:
        raise IntegrityError(
            f"{where} is not laid out as far-sdk writes it (same values, different bytes): the manifest "
            "was edited or corrupted. Re-copy or re-export the bundle."
        )
    if m.get("format") != BUNDLE_FORMAT:
        raise IncompatibleBundleError(
            f"{where} is not a {BUNDLE_FORMAT!r} manifest (format {str(m.get('format'))[:40]!r})"
        )
    if m.get("format_version") != FORMAT_VERSION:
        made_by = (
            m.get("created_by", {}).get("far_sdk", "unknown") if isinstance(m.get("created_by"), dict) else "unknown"
        )
        raise IncompatibleBundleError(
            f"{where} has bundle format version {str(m.get('format_version'))[:20]}; this far-sdk reads version "
            f"{FORMAT_VERSION}. "
            "Re-export it with this far-sdk's `far-export onnx`, or from its own weights with "
            "scripts/reexport_bundle.py "
            f"(or install the far-sdk that wrote it: {str(made_by)[:40]})."
        )
    validate_manifest(m, where)
    return m


def _short(text: str, n: int = 300) -> str:
    return text if len(text) <= n else text[:n] + "…"


def validate_manifest(m: dict[str, Any], where: str) -> None:
    """:data:`SCHEMA`, then the cross-field relations; raises one BundleError naming the field."""
    err = schema_error(m)
    if err is not None:
        raise BundleError(f"{where}: field {err[0]}: {_short(err[1])}; re-export the bundle")
    _check_relations(m, where)


def _relation_error(where: str, field: str, message: str) -> BundleError:
    return BundleError(f"{where}: field {field}: {message}; re-export the bundle")


def _check_relations(m: dict[str, Any], where: str) -> None:
    files, model, vae = m["files"], m["model"], m["vae"]
    text = _check_text(m, where)
    for g, entry in m["graphs"].items():
        for key in ("file", "external_data"):
            if key in entry and entry[key] not in files:
                raise _relation_error(where, f"graphs.{g}.{key}", f"{entry[key]!r} is not listed in files")
    if "weights" in m and m["weights"]["file"] not in files:
        raise _relation_error(where, "weights.file", f"{m['weights']['file']!r} is not listed in files")
    for part in ("encoder", "decoder"):
        d, h = model[f"{part}_embed_dim"], model[f"{part}_num_heads"]
        if d % h:
            raise _relation_error(where, f"model.{part}_num_heads", f"{h} does not divide {part}_embed_dim {d}")
    if text is None and m.get("null_class_id") != model["num_classes"]:
        raise _relation_error(
            where,
            "null_class_id",
            f"{m['null_class_id']} differs from model.num_classes {model['num_classes']} (the null class follows the "
            "real ones)",
        )
    if m["mlp_width"] != model["diffloss_w"]:
        raise _relation_error(
            where, "mlp_width", f"{m['mlp_width']} differs from model.diffloss_w {model['diffloss_w']}"
        )
    if vae["embed_dim"] != model["token_channels"]:
        raise _relation_error(
            where, "vae.embed_dim", f"{vae['embed_dim']} differs from model.token_channels {model['token_channels']}"
        )
    channels = sorted({vae["ch"] * k for k in (1, *vae["ch_mult"]) if (vae["ch"] * k) % vae["gn_groups"]})
    if channels:
        raise _relation_error(
            where, "vae.gn_groups", f"{vae['gn_groups']} does not divide the channel counts {channels}"
        )
    image_size = model["grid_size"] * 2 ** (len(vae["ch_mult"]) - 1)
    if m["image_size"] != image_size:
        raise _relation_error(
            where, "image_size", f"{m['image_size']} differs from grid_size x the VAE's downsampling ({image_size})"
        )
    for k in m.get("id2label", {}) if text is None else ():
        if int(k) >= model["num_classes"]:
            raise _relation_error(where, f"id2label.{k}", f"class id {k} is outside 0..{model['num_classes'] - 1}")
    masked = text is not None or model["mask"]
    modes = list(sampling_modes(masked))
    if m["sampling_modes"] != modes:
        raise _relation_error(
            where,
            "sampling_modes",
            f"{m['sampling_modes']} differ from {modes}, the modes of a model built with mask={masked}",
        )
    if m["defaults"].get("mode", DEFAULTS.mode) not in modes:
        raise _relation_error(
            where,
            "defaults.mode",
            f"{m['defaults'].get('mode', DEFAULTS.mode)!r} (omitted: {DEFAULTS.mode!r}) is not one "
            f"of the sampling modes {modes}",
        )
    specs = graph_specs(
        seq_len=model["grid_size"] ** 2,
        token_channels=model["token_channels"],
        mlp_width=m["mlp_width"],
        grid_size=model["grid_size"],
        image_size=m["image_size"],
        masked=masked,
        text=None if text is None else (text["max_length"], text["hidden_size"]),
    )
    if (DENOISER_FEWSTEP in m["graphs"]) != ("fewstep" in m):
        raise _relation_error(
            where, "fewstep", f"the graph {DENOISER_FEWSTEP!r} and the 'fewstep' section come together (one is missing)"
        )
    specs[DENOISER_FEWSTEP] = fewstep_spec(specs)
    for g in (*GRAPH_NAMES, *(o for o in OPTIONAL_GRAPHS if o in m["graphs"])):
        want = specs[g].to_dict()
        for io in ("inputs", "outputs"):
            if m["graphs"][g][io] != want[io]:
                raise _relation_error(
                    where,
                    f"graphs.{g}.{io}",
                    f"{_short(json.dumps(m['graphs'][g][io]), 200)} do not match the "
                    f"model's shapes {json.dumps(want[io])}",
                )
    _check_defaults(m["defaults"], where)


def _check_text(m: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The text section of a text-conditioned bundle (None for a class-conditional one), consistent with the model."""
    kind, model = m.get("conditioning", "class"), m["model"]
    t2i = "context_dim" in model
    if (kind == "text") != t2i or (kind == "text") != ("text" in m):
        raise _relation_error(
            where,
            "conditioning",
            f"{kind!r} does not match the model (a FAR-T2I model: {t2i}) and the "
            f"text section (present: {'text' in m}); a text bundle has both, a class bundle neither",
        )
    if kind != "text":
        return None
    for key in ("null_class_id", "id2label"):
        if key in m:
            raise _relation_error(where, key, "a text-conditioned bundle has no class table")
    text = m["text"]
    if (text["hidden_size"], text["max_length"]) != (model["context_dim"], model["context_len"]):
        raise _relation_error(
            where,
            "text",
            f"hidden_size / max_length {text['hidden_size']} / {text['max_length']} differ "
            f"from model.context_dim / context_len {model['context_dim']} / {model['context_len']}",
        )
    enc = text.get("encoder", {})
    for key in ("file", "tokenizer", "external_data"):
        if key in enc and enc[key] not in m["files"]:
            raise _relation_error(where, f"text.encoder.{key}", f"{enc[key]!r} is not listed in files")
    want = text_encoder_spec(text["max_length"], text["hidden_size"], enc.get("system_length", 0)).to_dict()
    for io in ("inputs", "outputs"):
        if io in enc and enc[io] != want[io]:
            raise _relation_error(
                where, f"text.encoder.{io}", f"{_short(json.dumps(enc[io]), 200)} differ from {json.dumps(want[io])}"
            )
    return text


def _check_defaults(defaults: dict[str, Any], where: str) -> None:
    try:
        resolve_plan(SamplingOptions.from_dict(defaults))
    except InvalidArgumentError as e:
        raise _relation_error(where, "defaults", f"not a valid sampling plan ({e})") from None
