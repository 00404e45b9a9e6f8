"""The bundle manifest's JSON Schema (2020-12), declared once: every key, type and range a ``manifest.json`` may
hold (:data:`SCHEMA`; its sampling ``defaults`` come from :func:`far_sdk.options.options_json_schema`, the same
description the runtime checks options against). :mod:`far_sdk.bundle.manifest` checks a manifest against it with
:func:`schema_error`, then the relations one schema cannot state."""

from __future__ import annotations

import re
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import best_match

from far_sdk.bundle.graphs import DENOISER_FEWSTEP, GRAPH_NAMES, OPTIONAL_GRAPHS
from far_sdk.maths.schedules import MODES
from far_sdk.options import options_json_schema

BUNDLE_FORMAT = "far-bundle"
#: Bumped when the manifest or a graph's inputs/outputs change incompatibly.
#: 2: the manifest carries ``manifest_sha256`` and is checked against :data:`SCHEMA`.
#: 3: ``sampling_modes`` (mask mode); a model built with mask=True has a transformer that takes ``mask``.
FORMAT_VERSION = 3
DIGEST_KEY = "manifest_sha256"

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
    return {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        "required": [k for k in properties if k not in optional],
    }


_PROB = _num(0.0, 1.0)
_MODEL = _object(
    {
        "encoder_embed_dim": _int(1, 16384),
        "encoder_depth": _int(1, 1024),
        "encoder_num_heads": _int(1, 1024),
        "decoder_embed_dim": _int(1, 16384),
        "decoder_depth": _int(1, 1024),
        "decoder_num_heads": _int(1, 1024),
        "mlp_ratio": _num(0.0, 64.0, open_lo=True),
        "token_channels": _int(1, 256),
        "grid_size": _int(1, 128),
        "buffer_size": _int(0, 16384),
        "num_classes": _int(1, 1_000_000),
        "diffloss_d": _int(1, 1024),
        "diffloss_w": _int(1, 16384),
        "mask": _BOOL,
        "label_drop_prob": _PROB,
        "attn_dropout": _PROB,
        "proj_dropout": _PROB,
        "diffusion_batch_mul": _int(1, 1024),
        "num_sampling_steps": _int(1, 10_000),
    }
)
_VAE = _object(
    {
        "embed_dim": _int(1, 256),
        "z_channels": _int(1, 256),
        "ch": _int(1, 4096),
        "ch_mult": {"type": "array", "items": _int(1, 64), "minItems": 1, "maxItems": 8},
        "num_res_blocks": _int(1, 64),
        "in_channels": _int(1, 16),
        "out_ch": _int(1, 16),
        "resolution": _int(1, 16384),
        "attn_resolutions": {"type": "array", "items": _int(1, 16384), "maxItems": 16},
        "dropout": {"type": "number", "minimum": 0.0, "exclusiveMaximum": 1.0},
        "gn_groups": _int(1, 4096),
        "eps": _num(0.0, 1.0, open_lo=True),
    }
)
_TENSOR = _object(
    {
        "name": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z"},
        "dtype": {"enum": ["float32", "float16", "bfloat16", "int64", "int32"]},
        "shape": {
            "type": "array",
            "maxItems": 8,
            "items": {"oneOf": [_int(0, 2**31 - 1), {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]{0,31}\Z"}]},
        },
    }
)
_BOUND = {"oneOf": [{"type": "null"}, _num(0.0, 1e30)]}
_VALIDATION = {
    "oneOf": [
        {"type": "null"},
        _object(
            {
                "max_abs": _num(0.0, 1e30),
                "max_rel": _num(0.0, 1e30),
                "batch_sizes": {"type": "array", "items": _int(1, 1 << 20), "maxItems": 16},
                "tolerance": _object({"max_abs": _BOUND, "max_rel": _BOUND}),
            }
        ),
    ]
}
_GRAPH = _object(
    {
        "file": _FILE,
        "external_data": _FILE,
        "opset": _int(7, 100),
        "inputs": {"type": "array", "items": _TENSOR, "minItems": 1, "maxItems": 16},
        "outputs": {"type": "array", "items": _TENSOR, "minItems": 1, "maxItems": 16},
        "validation": _VALIDATION,
    },
    optional=("external_data",),
)
#: The distilled few-step denoiser (graph ``denoiser_fewstep``): its step counts and how it was made.
_FEWSTEP = _object(
    {
        "graph": {"const": DENOISER_FEWSTEP},
        "steps": {"type": "array", "items": _int(1, 1000), "minItems": 1, "maxItems": 16, "uniqueItems": True},
        "teacher_steps": _int(1, 1000),
        "method": _TEXT,
        "made_by": _TEXT,
        "student": _object({"file": _FILE, "sha256": _SHA256}),
        "training": {"type": "object"},
    }
)
#: A file fetched from the Hugging Face Hub: its repository, the commit it resolved to, its path there.
_SOURCE_HUB = _object(
    {
        "repo_id": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}\Z"},
        "revision": {"type": "string", "pattern": r"^[0-9a-f]{40}\Z"},
        "path": _TEXT,
    }
)
_SOURCE_VAE = _object({"file": _FILE, "sha256": _SHA256, "hub": _SOURCE_HUB}, optional=("hub",))
_SOURCE = _object(
    {
        "kind": {"enum": ["checkpoint", "random-init", "unspecified"]},
        "file": _FILE,
        "sha256": _SHA256,
        "use_ema": _BOOL,
        "seed": _int(0, 2**64 - 1),
        "vae": _SOURCE_VAE,
        "hub": _SOURCE_HUB,
    },
    optional=("file", "sha256", "use_ema", "seed", "vae", "hub"),
)

#: A FAR-T2I model (training.config_t2i.T2IConfig): no class table, cross-attention to the text.
_MODEL_T2I = _object(
    {
        "encoder_embed_dim": _int(1, 16384),
        "encoder_depth": _int(1, 1024),
        "encoder_num_heads": _int(1, 1024),
        "decoder_embed_dim": _int(1, 16384),
        "decoder_depth": _int(1, 1024),
        "decoder_num_heads": _int(1, 1024),
        "attention_head_dim": _int(1, 4096),
        "mlp_ratio": _num(0.0, 64.0, open_lo=True),
        "token_channels": _int(1, 256),
        "grid_size": _int(1, 128),
        "context_dim": _int(1, 65536),
        "context_len": _int(1, 65536),
        "diffloss_d": _int(1, 1024),
        "diffloss_w": _int(1, 16384),
        "label_drop_prob": _PROB,
        "mask_ratio_min": _PROB,
        "diffusion_batch_mul": _int(1, 1024),
        "num_sampling_steps": _int(1, 10_000),
    }
)
#: The kinds of bundled text encoder (manifest ``text.encoder.kind``; absent: "small", the first format):
#: "small": training.text_encoder.SmallTextEncoder, the prompt alone; "qwen2-vl": the official FAR-T2I path,
#: Qwen2-VL's language model behind a system prompt (export.qwen_export).
ENCODER_KINDS = ("small", "qwen2-vl")
#: How a bundled Qwen2-VL encoder stores its weights (it computes and returns float32 in each case).
ENCODER_WEIGHT_DTYPES = ("float32", "float16", "bfloat16")
_SIDE = {"enum": ["left", "right"]}
_ENCODER = _object(
    {
        "kind": {"enum": list(ENCODER_KINDS)},
        "file": _FILE,
        "external_data": _FILE,
        "tokenizer": _FILE,
        "pad_token_id": _int(0, 2**31 - 1),
        "padding_side": _SIDE,
        "truncation_side": _SIDE,
        "system_prompt": {"type": "string", "maxLength": 100_000},
        "system_length": _int(0, 65536),
        "model_type": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}\Z"},
        "num_layers": _int(1, 4096),
        "weight_dtype": {"enum": list(ENCODER_WEIGHT_DTYPES)},
        "opset": _int(7, 100),
        "inputs": {"type": "array", "items": _TENSOR, "minItems": 2, "maxItems": 2},
        "outputs": {"type": "array", "items": _TENSOR, "minItems": 1, "maxItems": 1},
        "validation": {
            "oneOf": [
                {"type": "null"},
                _object(
                    {
                        "max_abs": _num(0.0, 1e30),
                        "max_rel": _num(0.0, 1e30),
                        "batch_sizes": {"type": "array", "items": _int(1, 1 << 20), "maxItems": 16},
                    }
                ),
            ]
        },
    },
    optional=(
        "kind",
        "external_data",
        "padding_side",
        "truncation_side",
        "system_prompt",
        "system_length",
        "model_type",
        "num_layers",
        "weight_dtype",
        "opset",
        "inputs",
        "outputs",
        "validation",
    ),
)
#: A text-conditioned bundle's text side: the context the transformer takes, and optionally a bundled encoder.
_TEXT_SECTION = _object(
    {"hidden_size": _int(1, 65536), "max_length": _int(1, 65536), "encoder": _ENCODER},
    optional=("encoder",),
)
#: The manifest of bundle format :data:`FORMAT_VERSION`, declared once (JSON Schema 2020-12).
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "far-sdk bundle manifest",
    **_object(
        {
            "name": {"type": "string", "minLength": 1, "maxLength": 255},
            "created_by": {
                "type": "object",
                "additionalProperties": {"type": "string", "maxLength": 200},
                "maxProperties": 32,
            },
            "model": {"type": "object"},  # _MODEL, or _MODEL_T2I for conditioning "text" (the if / then below)
            "conditioning": {"enum": ["class", "text"]},
            "text": _TEXT_SECTION,
            "vae": _VAE,
            "latent_scale": _num(0.0, 1e6, open_lo=True),
            "null_class_id": _int(0, 1_000_000),
            "mlp_width": _int(1, 16384),
            "image_size": _int(1, 16384),
            "id2label": {
                "type": "object",
                "maxProperties": 1_000_000,
                "propertyNames": {"pattern": r"^(0|[1-9][0-9]{0,6})\Z"},
                "additionalProperties": _TEXT,
            },
            "sampling_modes": {
                "type": "array",
                "items": {"enum": list(MODES)},
                "minItems": 1,
                "maxItems": len(MODES),
                "uniqueItems": True,
            },
            "defaults": options_json_schema(),
            "graphs": _object({g: _GRAPH for g in GRAPH_NAMES + OPTIONAL_GRAPHS}, optional=OPTIONAL_GRAPHS),
            "fewstep": _FEWSTEP,
            "weights": _object({"file": _FILE, "prefixes": _object({"far": _TEXT, "vae": _TEXT})}),
            "source": _SOURCE,
            "format": {"const": BUNDLE_FORMAT},
            "format_version": {"const": FORMAT_VERSION},
            "files": {
                "type": "object",
                "minProperties": 1,
                "maxProperties": 4096,
                "propertyNames": {"pattern": _PLAIN_NAME},
                "additionalProperties": _object({"size": _int(0, 2**53), "sha256": _SHA256}),
            },
            DIGEST_KEY: _SHA256,
        },
        optional=("id2label", "weights", "conditioning", "text", "null_class_id", "fewstep"),
    ),
    "if": {"properties": {"conditioning": {"const": "text"}}, "required": ["conditioning"]},
    "then": {"properties": {"model": _MODEL_T2I}},
    "else": {"properties": {"model": _MODEL}},
}


def _validator() -> Any:
    # JSON Schema's "integer" admits 16.0 and True; a manifest's ints must be Python ints.
    checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _c, x: isinstance(x, int) and not isinstance(x, bool)
    )
    return validators.extend(Draft202012Validator, type_checker=checker)(SCHEMA)


_VALIDATOR = _validator()


def schema_error(manifest: Any) -> tuple[str, str] | None:
    """(field, message) of the most relevant way ``manifest`` breaks :data:`SCHEMA`, or None when it holds."""
    err = best_match(_VALIDATOR.iter_errors(manifest))
    if err is None:
        return None
    field = ""
    for p in err.absolute_path:
        field += f"[{p}]" if isinstance(p, int) else (f".{p}" if field else str(p))
    return field or "(top level)", err.message


def plain_name_ok(name: Any) -> bool:
    """Whether ``name`` is a plain file name inside the bundle (no directories, not hidden)."""
    return isinstance(name, str) and re.match(_PLAIN_NAME, name) is not None
