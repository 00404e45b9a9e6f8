"""A validated HTTP body -> the :class:`~far_sdk.scale.serve.batching.Job` a replica runs, checked against its bundle;
the bundle's summary for ``GET /info`` and the playground; the bundle's defaults for ``/openapi.json``."""

from __future__ import annotations

import inspect
from typing import Any

from far_sdk.bundle.graphs import VAE_ENCODER
from far_sdk.conditioning import class_ids
from far_sdk.errors import InvalidArgumentError, MissingEncoderError
from far_sdk.images import read_image
from far_sdk.options import DEFAULTS, PRESETS, SPECS, T2I_DEFAULTS
from far_sdk.pipeline import Generator, img2img
from far_sdk.scale.serve.batching import Job
from far_sdk.scale.serve.models import MAX_SEED, SAMPLING_FIELDS

#: whether this far_sdk's ``Generator.generate`` takes ``negative_prompt=`` (text, encoded like the prompt)
NEGATIVE_PROMPT = "negative_prompt" in inspect.signature(Generator.generate).parameters


class BadRequestError(InvalidArgumentError):
    """A request that is valid JSON of the right shape but not a valid request for this bundle (HTTP 400)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def make_job(req: Any, gen: Generator, *, max_images: int, streamed: bool = False) -> Job:
    """The :class:`Job` of a validated ``GenerateRequest`` on ``gen``'s bundle; :class:`BadRequestError` or far_sdk's
    :class:`InvalidArgumentError` (unknown class, settings that disagree) saying what to send."""
    b = gen.bundle
    ids: tuple[int, ...] = ()
    prompts: tuple[str, ...] = ()
    negative = None
    if b.conditioning == "text":
        if req.class_labels is not None:
            raise BadRequestError(
                f"bundle {b.name!r} is text-conditioned (FAR-T2I): send prompt (one per image), not class_labels",
                "class_labels",
            )
        if req.prompt is None:
            raise BadRequestError(f"prompt is required: bundle {b.name!r} is text-conditioned (one prompt per image)")
        prompts = tuple(req.prompt)
        if req.negative_prompt is not None:
            if not NEGATIVE_PROMPT:
                raise BadRequestError(
                    "negative_prompt needs a far_sdk whose Generator.generate takes negative_prompt=; this one does "
                    "not (leave the field out)",
                    "negative_prompt",
                )
            negative = tuple(req.negative_prompt)
            if len(negative) == 1:
                negative *= len(prompts)
            elif len(negative) != len(prompts):
                raise BadRequestError(
                    f"negative_prompt holds {len(negative)} strings for {len(prompts)} prompts: send one for every "
                    "image, or one per prompt",
                    "negative_prompt",
                )
    else:
        for name in ("prompt", "negative_prompt"):
            if getattr(req, name) is not None:
                raise BadRequestError(
                    f"bundle {b.name!r} is class-conditional: send class_labels (class ids or names), not {name}", name
                )
        if req.class_labels is None:
            raise BadRequestError("class_labels is required: a class id or name, or a list of them", "class_labels")
        try:
            ids = class_ids(b, req.class_labels)
        except InvalidArgumentError as e:
            raise BadRequestError(str(e), "class_labels") from None
    seed = 0 if req.seed is None else req.seed  # null: not given, as for every field
    fmt = req.output_format or "json"
    n = len(ids) or len(prompts)
    if n > max_images:
        raise BadRequestError(f"{n} images requested; this server allows at most {max_images} per request")
    limit = gen.backend.max_batch
    if streamed and limit is not None and n > limit:
        raise BadRequestError(f"a streamed request holds at most {limit} images on this engine, got {n}")
    if seed > MAX_SEED - (n - 1):
        raise BadRequestError(f"seed + {n - 1} (the last image's seed) must stay below 2**63, got seed {seed}", "seed")
    if fmt == "png" and (n != 1 or streamed):
        why = "a stream answers in JSON events" if streamed else f"this request asks for {n}"
        raise BadRequestError(f"output_format 'png' returns one image; {why} (use 'json')", "output_format")
    settings = {name: getattr(req, name) for name in SAMPLING_FIELDS if getattr(req, name) is not None}
    if req.preset is not None:
        settings["preset"] = req.preset
    plan = gen.plan(**settings)  # far_sdk's checks across fields (eta with ddim only, the bundle's modes, ...)
    image, start = start_image(req, gen, plan)
    return Job(
        seed=seed,
        settings=tuple(sorted(settings.items())),
        class_ids=ids,
        prompts=prompts,
        negative_prompts=negative,
        output_format=fmt,
        image=image,
        start=start,
    )


def start_image(req: Any, gen: Generator, plan: Any) -> tuple[Any, tuple[str, Any] | None]:
    """(uint8 [S, S, 3], ("start_level" | "strength", value)) of an image-to-image request, or (None, None)."""
    if req.image is None:
        for name in ("start_level", "strength"):
            if getattr(req, name) is not None:
                raise BadRequestError(f"{name} goes with image (the picture to start from)", name)
        return None, None
    if (req.start_level is None) == (req.strength is None):
        raise BadRequestError("image needs one of start_level (an outer step) or strength (0..1)", "image")
    try:
        img2img.ImageEncoder(gen.bundle, gen.backend).check()  # a bundle without the encoder: far_sdk's message
    except MissingEncoderError as e:
        raise BadRequestError(str(e), "image") from None
    name = "start_level" if req.start_level is not None else "strength"
    try:
        img2img.start_step(plan, req.start_level, req.strength)
    except InvalidArgumentError as e:
        raise BadRequestError(str(e), name) from None
    try:
        pixels = img2img.to_pixels(read_image(req.image, "image"), int(gen.bundle.manifest["image_size"]), "image")
    except InvalidArgumentError as e:
        raise BadRequestError(str(e), "image") from None
    return pixels, (name, getattr(req, name))


def bundle_defaults(gen: Generator) -> dict[str, Any]:
    """The value each sampling field takes when a request leaves it out (built-in < bundle defaults)."""
    base = T2I_DEFAULTS.over(DEFAULTS) if gen.bundle.conditioning == "text" else DEFAULTS
    given = gen.bundle.defaults.over(base).given()
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in given.items() if k in SPECS}


def bundle_summary(gen: Generator) -> dict[str, Any]:
    """``GET /info``: what the bundle is, what a request may send, and this replica's backend."""
    b = gen.bundle
    return {
        "name": b.manifest.get("name"),
        "path": str(b.path),
        "manifest_sha256": b.manifest.get("manifest_sha256"),
        "conditioning": b.conditioning,
        "num_classes": None if b.conditioning == "text" else b.num_classes,
        "id2label": {str(k): v for k, v in b.id2label.items()},
        "image_size": b.manifest.get("image_size"),
        "sampling_modes": list(b.sampling_modes),
        "defaults": bundle_defaults(gen),
        "presets": {name: p.to_dict() for name, p in PRESETS.items()},
        "negative_prompt": b.conditioning == "text" and NEGATIVE_PROMPT,
        "image_to_image": b.graph_entry(VAE_ENCODER) is not None,  # the image / strength / start_level fields
        "backend": gen.backend.describe(),
    }
