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
import re
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import best_match

from far_sdk.bundle.graphs import GRAPH_NAMES, graph_specs
from far_sdk.errors import BundleError, IncompatibleBundleError, IntegrityError, InvalidArgumentError
from far_sdk.maths.masking import sampling_modes
from far_sdk.maths.schedules import MODES
from far_sdk.options import DEFAULTS, SamplingOptions, options_json_schema, resolve_plan

BUNDLE_FORMAT = "far-bundle"
#: Bumped when the manifest or a graph's inputs/outputs change incompatibly.
#: 2: the manifest carries ``manifest_sha256`` and is checked against :data:`SCHEMA`.
#: 3: ``sampling_modes`` (mask mode); a model built with mask=True has a transformer that takes ``mask``.
FORMAT_VERSION = 3
DIGEST_KEY = "manifest_sha256"
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


# ---- the schema ----------------------------------------------------------------------------------------
# Ranges are generous for any FAR model (FAR-H: D 1280, grid 16, 16 channels, MLP 1536 wide) and small
# enough that nothing a manifest asks for allocates beyond a few GB per image or overflows an int64.

_PLAIN_NAME = r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}\Z"  # a file inside the bundle: no paths, no hidden files
_SHA256 = {"type": "string", "pattern": r"^[0-9a-f]{64}\Z"}
_FILE = {"type": "string", "pattern": _PLAIN_NAME}
_BOOL = {"type": "boolean"}
_TEXT = {"type": "string", "maxLength": 1000}


def _int(lo: int, hi: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _num(lo: float, hi: float, *, open_lo: bool = False) -> dict[str, Any]:
    return {"type": "number", ("exclusiveMinimum" if open_lo else "minimum"): lo, "maximum": hi}


def _object(properties: dict[str, Any], *, optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """A closed object: every property required unless named optional; no other keys (a misspelt key is an error)."""
    return {"type": "object", "properties": properties, "additionalProperties": False,
            "required": [k for k in properties if k not in optional]}


_PROB = _num(0.0, 1.0)
_MODEL = _object({
    "encoder_embed_dim": _int(1, 16384), "encoder_depth": _int(1, 1024), "encoder_num_heads": _int(1, 1024),
    "decoder_embed_dim": _int(1, 16384), "decoder_depth": _int(1, 1024), "decoder_num_heads": _int(1, 1024),
    "mlp_ratio": _num(0.0, 64.0, open_lo=True),
    "token_channels": _int(1, 256),
    "grid_size": _int(1, 128),
    "buffer_size": _int(0, 16384),
    "num_classes": _int(1, 1_000_000),
    "diffloss_d": _int(1, 1024), "diffloss_w": _int(1, 16384),
    "mask": _BOOL,
    "label_drop_prob": _PROB, "attn_dropout": _PROB, "proj_dropout": _PROB,
    "diffusion_batch_mul": _int(1, 1024),
    "num_sampling_steps": _int(1, 10_000),
})
_VAE = _object({
    "embed_dim": _int(1, 256), "z_channels": _int(1, 256), "ch": _int(1, 4096),
    "ch_mult": {"type": "array", "items": _int(1, 64), "minItems": 1, "maxItems": 8},
    "num_res_blocks": _int(1, 64), "in_channels": _int(1, 16), "out_ch": _int(1, 16),
    "resolution": _int(1, 16384),
    "attn_resolutions": {"type": "array", "items": _int(1, 16384), "maxItems": 16},
    "dropout": {"type": "number", "minimum": 0.0, "exclusiveMaximum": 1.0},
    "gn_groups": _int(1, 4096),
    "eps": _num(0.0, 1.0, open_lo=True),
})
_TENSOR = _object({
    "name": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z"},
    "dtype": {"enum": ["float32", "float16", "bfloat16", "int64", "int32"]},
    "shape": {"type": "array", "maxItems": 8,
              "items": {"oneOf": [_int(0, 2**31 - 1), {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]{0,31}\Z"}]}},
})
_BOUND = {"oneOf": [{"type": "null"}, _num(0.0, 1e30)]}
_VALIDATION = {"oneOf": [{"type": "null"}, _object({
    "max_abs": _num(0.0, 1e30), "max_rel": _num(0.0, 1e30),
    "batch_sizes": {"type": "array", "items": _int(1, 1 << 20), "maxItems": 16},
    "tolerance": _object({"max_abs": _BOUND, "max_rel": _BOUND}),
})]}
_GRAPH = _object({
    "file": _FILE,
    "external_data": _FILE,
    "opset": _int(7, 100),
    "inputs": {"type": "array", "items": _TENSOR, "minItems": 1, "maxItems": 16},
    "outputs": {"type": "array", "items": _TENSOR, "minItems": 1, "maxItems": 16},
    "validation": _VALIDATION,
}, optional=("external_data",))
_SOURCE_VAE = _object({"file": _FILE, "sha256": _SHA256})
_SOURCE = _object({
    "kind": {"enum": ["checkpoint", "random-init", "unspecified"]},
    "file": _FILE, "sha256": _SHA256, "use_ema": _BOOL, "seed": _int(0, 2**64 - 1), "vae": _SOURCE_VAE,
}, optional=("file", "sha256", "use_ema", "seed", "vae"))

#: A FAR-T2I model (training.config_t2i.T2IConfig): no class table, cross-attention to the text.
_MODEL_T2I = _object({
    "encoder_embed_dim": _int(1, 16384), "encoder_depth": _int(1, 1024), "encoder_num_heads": _int(1, 1024),
    "decoder_embed_dim": _int(1, 16384), "decoder_depth": _int(1, 1024), "decoder_num_heads": _int(1, 1024),
    "attention_head_dim": _int(1, 4096), "mlp_ratio": _num(0.0, 64.0, open_lo=True),
    "token_channels": _int(1, 256), "grid_size": _int(1, 128),
    "context_dim": _int(1, 65536), "context_len": _int(1, 65536),
    "diffloss_d": _int(1, 1024), "diffloss_w": _int(1, 16384),
    "label_drop_prob": _PROB, "mask_ratio_min": _PROB,
    "diffusion_batch_mul": _int(1, 1024), "num_sampling_steps": _int(1, 10_000),
})
#: A text-conditioned bundle's text side: the context the transformer takes, and optionally a bundled encoder.
_TEXT_SECTION = _object({
    "hidden_size": _int(1, 65536),
    "max_length": _int(1, 65536),
    "encoder": _object({"file": _FILE, "tokenizer": _FILE, "pad_token_id": _int(0, 2**31 - 1)}),
}, optional=("encoder",))
#: The manifest of bundle format :data:`FORMAT_VERSION`, declared once (JSON Schema 2020-12).
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "far-sdk bundle manifest",
    **_object({
        "name": {"type": "string", "minLength": 1, "maxLength": 255},
        "created_by": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 200}, "maxProperties": 32},
        "model": {"type": "object"},    # _MODEL, or _MODEL_T2I for conditioning "text" (the if / then below)
        "conditioning": {"enum": ["class", "text"]},
        "text": _TEXT_SECTION,
        "vae": _VAE,
        "latent_scale": _num(0.0, 1e6, open_lo=True),
        "null_class_id": _int(0, 1_000_000),
        "mlp_width": _int(1, 16384),
        "image_size": _int(1, 16384),
        "id2label": {"type": "object", "maxProperties": 1_000_000,
                     "propertyNames": {"pattern": r"^(0|[1-9][0-9]{0,6})\Z"}, "additionalProperties": _TEXT},
        "sampling_modes": {"type": "array", "items": {"enum": list(MODES)}, "minItems": 1, "maxItems": len(MODES),
                           "uniqueItems": True},
        "defaults": options_json_schema(),
        "graphs": _object({g: _GRAPH for g in GRAPH_NAMES}),
        "weights": _object({"file": _FILE, "prefixes": _object({"far": _TEXT, "vae": _TEXT})}),
        "source": _SOURCE,
        "format": {"const": BUNDLE_FORMAT},
        "format_version": {"const": FORMAT_VERSION},
        "files": {"type": "object", "minProperties": 1, "maxProperties": 4096,
                  "propertyNames": {"pattern": _PLAIN_NAME},
                  "additionalProperties": _object({"size": _int(0, 2**53), "sha256": _SHA256})},
        DIGEST_KEY: _SHA256,
    }, optional=("id2label", "weights", "conditioning", "text", "null_class_id")),
    "if": {"properties": {"conditioning": {"const": "text"}}, "required": ["conditioning"]},
    "then": {"properties": {"model": _MODEL_T2I}},
    "else": {"properties": {"model": _MODEL}},
}

_validator = None


def _schema_validator():
    global _validator
    if _validator is None:
        # JSON Schema's "integer" admits 16.0 and True; a manifest's ints must be Python ints.
        checker = Draft202012Validator.TYPE_CHECKER.redefine(
            "integer", lambda _c, x: isinstance(x, int) and not isinstance(x, bool))
        _validator = validators.extend(Draft202012Validator, type_checker=checker)(SCHEMA)
    return _validator


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
        raise BundleError(f"{where} is not UTF-8 text (byte {e.start}): the file is corrupted; re-export or re-copy the bundle") from None
    try:
        return json.loads(text, object_pairs_hook=no_duplicate_keys, parse_float=_finite_float, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise BundleError(f"{where} is not valid JSON ({e}); the file is corrupted: re-export or re-copy the bundle") from None


def read_manifest(data: bytes, where: str) -> dict[str, Any]:
    """Parse and check ``manifest.json``'s bytes (``where`` names the file in messages); see the module doc."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{where} has {len(data)} bytes, more than any manifest ({MAX_MANIFEST_BYTES}); not a far bundle manifest")
    m = parse_json(data, where)
    if not isinstance(m, dict):
        raise BundleError(f"{where} holds a JSON {type(m).__name__}, not an object; not a far bundle manifest")
    digest = m.get(DIGEST_KEY)
    if digest is None:
        version = m.get("format_version")
        raise IncompatibleBundleError(
            f"{where} carries no manifest digest ({DIGEST_KEY!r}): it was written by an older far-sdk (bundle format "
            f"version {version!r}; this far-sdk reads version {FORMAT_VERSION}) or its digest key was damaged. "
            "Re-export the bundle with this far-sdk's `far-export onnx`.")
    if not isinstance(digest, str) or manifest_digest(m) != digest:
        raise IntegrityError(f"{where} fails its digest check ({DIGEST_KEY}): the manifest was edited or corrupted. "
                             "Re-copy or re-export the bundle.")
    if dump_manifest(m) != data:
        raise IntegrityError(f"{where} is not laid out as far-sdk writes it (same values, different bytes): the manifest "
                             "was edited or corrupted. Re-copy or re-export the bundle.")
    if m.get("format") != BUNDLE_FORMAT:
        raise IncompatibleBundleError(f"{where} is not a {BUNDLE_FORMAT!r} manifest (format {str(m.get('format'))[:40]!r})")
    if m.get("format_version") != FORMAT_VERSION:
        made_by = m.get("created_by", {}).get("far_sdk", "unknown") if isinstance(m.get("created_by"), dict) else "unknown"
        raise IncompatibleBundleError(
            f"{where} has bundle format version {str(m.get('format_version'))[:20]}; this far-sdk reads version {FORMAT_VERSION}. "
            f"Re-export it with this far-sdk's `far-export onnx`, or from its own weights with scripts/reexport_bundle.py "
            f"(or install the far-sdk that wrote it: {str(made_by)[:40]}).")
    validate_manifest(m, where)
    return m


def _field(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _short(text: str, n: int = 300) -> str:
    return text if len(text) <= n else text[:n] + "…"


def validate_manifest(m: dict[str, Any], where: str) -> None:
    """:data:`SCHEMA`, then the cross-field relations; raises one BundleError naming the field."""
    err = best_match(_schema_validator().iter_errors(m))
    if err is not None:
        raise BundleError(f"{where}: field {_field(err.absolute_path)}: {_short(err.message)}; re-export the bundle")
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
        raise _relation_error(where, "null_class_id", f"{m['null_class_id']} differs from model.num_classes {model['num_classes']} (the null class follows the real ones)")
    if m["mlp_width"] != model["diffloss_w"]:
        raise _relation_error(where, "mlp_width", f"{m['mlp_width']} differs from model.diffloss_w {model['diffloss_w']}")
    if vae["embed_dim"] != model["token_channels"]:
        raise _relation_error(where, "vae.embed_dim", f"{vae['embed_dim']} differs from model.token_channels {model['token_channels']}")
    channels = sorted({vae["ch"] * k for k in (1, *vae["ch_mult"]) if (vae["ch"] * k) % vae["gn_groups"]})
    if channels:
        raise _relation_error(where, "vae.gn_groups", f"{vae['gn_groups']} does not divide the channel counts {channels}")
    image_size = model["grid_size"] * 2 ** (len(vae["ch_mult"]) - 1)
    if m["image_size"] != image_size:
        raise _relation_error(where, "image_size", f"{m['image_size']} differs from grid_size x the VAE's downsampling ({image_size})")
    for k in m.get("id2label", {}) if text is None else ():
        if int(k) >= model["num_classes"]:
            raise _relation_error(where, f"id2label.{k}", f"class id {k} is outside 0..{model['num_classes'] - 1}")
    masked = text is not None or model["mask"]
    modes = list(sampling_modes(masked))
    if m["sampling_modes"] != modes:
        raise _relation_error(where, "sampling_modes", f"{m['sampling_modes']} differ from {modes}, the modes of a model built "
                              f"with mask={masked}")
    if m["defaults"].get("mode", DEFAULTS.mode) not in modes:
        raise _relation_error(where, "defaults.mode", f"{m['defaults'].get('mode', DEFAULTS.mode)!r} (omitted: {DEFAULTS.mode!r}) is not one "
                              f"of the sampling modes {modes}")
    specs = graph_specs(seq_len=model["grid_size"] ** 2, token_channels=model["token_channels"], mlp_width=m["mlp_width"],
                        grid_size=model["grid_size"], image_size=m["image_size"], masked=masked,
                        text=None if text is None else (text["max_length"], text["hidden_size"]))
    for g in GRAPH_NAMES:
        want = specs[g].to_dict()
        for io in ("inputs", "outputs"):
            if m["graphs"][g][io] != want[io]:
                raise _relation_error(where, f"graphs.{g}.{io}", f"{_short(json.dumps(m['graphs'][g][io]), 200)} do not match the "
                                      f"model's shapes {json.dumps(want[io])}")
    _check_defaults(m["defaults"], where)


def _check_text(m: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The text section of a text-conditioned bundle (None for a class-conditional one), consistent with the model."""
    kind, model = m.get("conditioning", "class"), m["model"]
    t2i = "context_dim" in model
    if (kind == "text") != t2i or (kind == "text") != ("text" in m):
        raise _relation_error(where, "conditioning", f"{kind!r} does not match the model (a FAR-T2I model: {t2i}) and the "
                              f"text section (present: {'text' in m}); a text bundle has both, a class bundle neither")
    if kind != "text":
        return None
    for key in ("null_class_id", "id2label"):
        if key in m:
            raise _relation_error(where, key, "a text-conditioned bundle has no class table")
    text = m["text"]
    if (text["hidden_size"], text["max_length"]) != (model["context_dim"], model["context_len"]):
        raise _relation_error(where, "text", f"hidden_size / max_length {text['hidden_size']} / {text['max_length']} differ "
                              f"from model.context_dim / context_len {model['context_dim']} / {model['context_len']}")
    for key in ("file", "tokenizer"):
        if "encoder" in text and text["encoder"][key] not in m["files"]:
            raise _relation_error(where, f"text.encoder.{key}", f"{text['encoder'][key]!r} is not listed in files")
    return text


def _check_defaults(defaults: dict[str, Any], where: str) -> None:
    try:
        resolve_plan(SamplingOptions.from_dict(defaults))
    except InvalidArgumentError as e:
        raise _relation_error(where, "defaults", f"not a valid sampling plan ({e})") from None


def plain_name_ok(name: Any) -> bool:
    """Whether ``name`` is a plain file name inside the bundle (no directories, not hidden)."""
    return isinstance(name, str) and re.match(_PLAIN_NAME, name) is not None
