"""The HTTP API's request and response models (pydantic), generated from :mod:`far_sdk.options`.

Every sampling option is a field of :class:`GenerateRequest` whose JSON Schema is that option's
:meth:`~far_sdk.options.OptionSpec.json_schema` (the one the manifest's ``defaults`` use: range, choices) with its
:attr:`~far_sdk.options.OptionSpec.doc`, and whose validation is :meth:`~far_sdk.options.OptionSpec.check`, so
``/openapi.json`` and far_sdk agree by construction and a bad value gets far_sdk's own message naming the field.
The other fields (class labels, prompts, seed, preset, output format) are checked the same way.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema, create_model
from pydantic_core import PydanticCustomError

from far_sdk.errors import FarError, InvalidArgumentError, check_choice
from far_sdk.options import PRESETS, SPECS

OUTPUT_FORMATS = ("json", "png")
MAX_PROMPT_CHARS = 2000  # a prompt is truncated to the encoder's tokens anyway; this bounds the work per request
MAX_SEED = 2**63 - 1
MAX_LABEL_CHARS = 256  # a class name (id2label) or a class id written as a string
EXAMPLE = {"class_labels": [3, "7"], "seed": 0, "num_steps": 10, "cfg": 3.0}


def _far(check):
    """A pydantic before-validator running far_sdk's ``check(value)``; its message becomes the field's error."""

    def validate(value: Any) -> Any:
        if value is None:
            return None  # not given: the bundle's default
        try:
            return check(value)
        except FarError as e:
            raise PydanticCustomError("far_sdk", "{message}", {"message": str(e)}) from None

    return BeforeValidator(validate)


def _labels(value: Any) -> list:
    labels = value if isinstance(value, list) else [value]
    if not labels or not all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in labels):
        raise InvalidArgumentError(
            f"class_labels must be a class id (integer), a class name (string) or a non-empty list of them, "
            f"got {json.dumps(value)[:80]}"
        )
    for x in labels:
        if isinstance(x, str) and len(x) > MAX_LABEL_CHARS:
            raise InvalidArgumentError(f"class_labels names hold at most {MAX_LABEL_CHARS} characters, got {len(x)}")
    return labels


def _texts(name: str):
    def check(value: Any) -> list[str]:
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidArgumentError(f"{name} must be a string or a non-empty list of strings, got {value!r:.80}")
        for t in texts:
            if len(t) > MAX_PROMPT_CHARS:
                raise InvalidArgumentError(f"{name} strings hold at most {MAX_PROMPT_CHARS} characters, got {len(t)}")
        return texts

    return check


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise InvalidArgumentError(f"seed must be an integer in 0..2**63 - 1, got {json.dumps(value)[:40]}")
    return value


def _image(value: Any) -> bytes:
    """A base64 image (PNG, JPEG, ...; a data: URL prefix allowed) -> its bytes (decoded and checked in make_job)."""
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError("image must be a base64-encoded PNG or JPEG file (a non-empty string)")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error) as e:
        raise InvalidArgumentError(f"image is not valid base64 ({e}); send the file's bytes base64-encoded") from None


def _start_level(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 64:
        raise InvalidArgumentError(f"start_level must be an outer step (integer >= 0), got {json.dumps(value)[:40]}")
    return value


def _strength(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise InvalidArgumentError(f"strength must be a number in [0, 1] (1: from scratch), got {value!r:.40}")
    return float(value)


def _option_field(name: str) -> tuple[Any, Any]:
    spec = SPECS[name]
    schema = spec.json_schema()
    if spec.kind == "clip":  # over HTTP, null means "not given" like every other field; false means "never clip"
        schema = {"oneOf": [{"const": False}, schema["oneOf"][1]]}
    doc = (
        "clamp each step's x0 estimate to [-X, X]; false: never (the official sampler)."
        if spec.kind == "clip"
        else spec.doc
    )
    schema = {**schema, "description": doc + " Left out or null: the bundle's default."}
    return Annotated[Any, WithJsonSchema(schema), _far(lambda v: spec.check(name, v))], Field(None)


_STRINGS = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}
_LABEL = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string"}]}
_REQUEST_FIELDS: dict[str, tuple[Any, Any]] = {
    "class_labels": (
        Annotated[
            Any, WithJsonSchema({"anyOf": [_LABEL, {"type": "array", "items": _LABEL, "minItems": 1}]}), _far(_labels)
        ],
        Field(None, description="Class bundles: one class id or id2label name per image (a list, or one label)."),
    ),
    "prompt": (
        Annotated[Any, WithJsonSchema(_STRINGS), _far(_texts("prompt"))],
        Field(None, description="Text (FAR-T2I) bundles: one prompt per image (a list, or one prompt)."),
    ),
    "negative_prompt": (
        Annotated[Any, WithJsonSchema(_STRINGS), _far(_texts("negative_prompt"))],
        Field(
            None,
            description="Text bundles: the unconditional rows' text (one for every image, or one per prompt) "
            "instead of the model's learned null context.",
        ),
    ),
    "seed": (
        Annotated[
            Any,
            WithJsonSchema({"type": "integer", "minimum": 0, "maximum": MAX_SEED}),
            _far(_seed),
        ],
        Field(0, description="Image j of the request draws the noise stream of seed + j (as generate(seed=) does)."),
    ),
    "preset": (
        Annotated[
            Any, WithJsonSchema({"enum": list(PRESETS)}), _far(lambda v: check_choice("preset", v, tuple(PRESETS)))
        ],
        Field(None, description="A named setting (far_sdk.options.PRESETS) over the bundle's defaults."),
    ),
    "image": (
        Annotated[Any, WithJsonSchema({"type": "string", "contentEncoding": "base64"}), _far(_image)],
        Field(
            None,
            description="Image-to-image (docs/IMAGE_TO_IMAGE.md): a base64 PNG or JPEG every image of the request "
            "starts from (centre-cropped and resized to the bundle's size); needs start_level or strength.",
        ),
    ),
    "start_level": (
        Annotated[Any, WithJsonSchema({"type": "integer", "minimum": 0}), _far(_start_level)],
        Field(None, description="With image: the outer step to start from (0: from scratch .. num_steps: the input)."),
    ),
    "strength": (
        Annotated[Any, WithJsonSchema({"type": "number", "minimum": 0, "maximum": 1}), _far(_strength)],
        Field(None, description="With image: 0..1, how much may change (start_level = round((1 - s) num_steps))."),
    ),
    **{name: _option_field(name) for name in SPECS},
    "output_format": (
        Annotated[
            Any,
            WithJsonSchema({"enum": list(OUTPUT_FORMATS)}),
            _far(lambda v: check_choice("output_format", v, OUTPUT_FORMATS)),
        ],
        Field("json", description="'json': base64 PNGs with seeds, plan and timings; 'png': the one image's PNG."),
    ),
}

#: ``POST /generate`` and ``POST /generate/stream`` bodies: every sampling option of far_sdk.options, plus these.
GenerateRequest = create_model(
    "GenerateRequest",
    __config__=ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE]}),
    **_REQUEST_FIELDS,
)
REQUEST_FIELDS = tuple(_REQUEST_FIELDS)
SAMPLING_FIELDS = tuple(SPECS)


class GenerateResponse(BaseModel):
    """``POST /generate`` (output_format json) and the last event of ``POST /generate/stream``."""

    images: list[str] = Field(description="base64 PNG per image")
    seeds: list[int] = Field(description="image j's seed (seed + j): the same image comes back for the same seed")
    class_labels: list[int] | None = Field(None, description="class ids (class bundles)")
    prompts: list[str] | None = Field(None, description="prompts (text bundles)")
    plan: dict[str, Any] = Field(description="the resolved sampling plan (levels, cfg and inner steps per step, ...)")
    timings: dict[str, float] = Field(
        description="seconds: queue (waiting for the replica), transformer, denoise, filter, vae_decode (stages of "
        "the merged generate call), preview (streamed previews), generate (the call), encode (PNG), total"
    )
    batch_images: int = Field(description="images in the merged generate call this request rode in")
    batch_requests: int = Field(description="requests merged into that call")


class StepEvent(BaseModel):
    """One ``step`` event of ``POST /generate/stream``: what outer step ``step`` hands on, decoded."""

    step: int
    num_steps: int
    level: int = Field(description="this step's input frequency level")
    images: list[str] = Field(description="base64 PNG per image (at most 128 px a side)")


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong and what to send instead")
    type: str = Field(description="the far_sdk error class")
    field: str | None = Field(None, description="the request field at fault, when one is")


def parse_body(body: bytes) -> tuple[Any, None] | tuple[None, ErrorResponse]:
    """(the validated :data:`GenerateRequest`, None) or (None, the 400 answer: far_sdk's message naming the field)."""
    try:
        return GenerateRequest.model_validate_json(body), None
    except ValidationError as e:
        return None, validation_error(e)


def validation_error(e: ValidationError) -> ErrorResponse:
    errors = e.errors(include_url=False)
    unknown = [str(x["loc"][0]) for x in errors if x["type"] == "extra_forbidden"]
    if unknown:
        close = difflib.get_close_matches(unknown[0], REQUEST_FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return ErrorResponse(
            error=f"unknown field(s) {', '.join(unknown)}{hint}; allowed: {', '.join(REQUEST_FIELDS)}",
            type="BadRequestError",
            field=unknown[0],
        )
    err = errors[0]
    if err["type"] == "json_invalid":
        msg = f"the request body is not valid JSON ({err['msg']}); send an object such as {json.dumps(EXAMPLE)}"
        return ErrorResponse(error=msg, type="BadRequestError")
    if not err["loc"]:
        got = type(err.get("input")).__name__
        return ErrorResponse(error=f"the request body must be a JSON object, got {got}", type="BadRequestError")
    name = str(err["loc"][0])
    if err["type"] == "far_sdk":
        return ErrorResponse(error=err["msg"], type="InvalidArgumentError", field=name)
    return ErrorResponse(error=f"{name}: {err['msg']}", type="BadRequestError", field=name)
