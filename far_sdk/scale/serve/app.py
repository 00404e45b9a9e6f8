"""The ``far serve`` replica: a FastAPI app (``@serve.ingress``) around one :class:`~far_sdk.Generator`.

Routes (exact paths; anything else is 404, another method 405):

- ``GET /``: the playground page (far_sdk/scale/serve/static/playground.html).
- ``POST /generate``: a :class:`~far_sdk.scale.serve.models.GenerateRequest` -> ``GenerateResponse`` (or a PNG).
- ``POST /generate/stream``: the same request as Server-Sent Events: one ``step`` event per outer step (what the step
  hands on, decoded: the coarse-to-fine picture), then one ``result`` event (or one ``error`` event).
- ``GET /health``, ``GET /info`` (the bundle and this replica), ``GET /metrics`` (Prometheus),
  ``GET /openapi.json`` and ``GET /docs`` (the schema with this bundle's defaults).

``@serve.batch`` collects concurrent requests, streamed or not; every group of them that shares settings becomes one
``generate`` call (:func:`~far_sdk.scale.serve.batching.run_group`). A client that disconnects has its job marked: a
job not started yet is dropped, and a call whose clients have all gone stops after its current outer step.
This module imports Ray and FastAPI: :func:`far_sdk.scale.serve.build_app` imports it when a deployment is built.
"""

import asyncio
import base64
import json
import logging
import time
from collections import Counter
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

import far_sdk
from far_sdk.errors import InvalidArgumentError
from far_sdk.pipeline import Generator
from far_sdk.scale.serve import metrics
from far_sdk.scale.serve.batching import GroupResult, Job, encode_png, group_by_settings, run_group
from far_sdk.scale.serve.config import ServeConfig
from far_sdk.scale.serve.models import ErrorResponse, GenerateRequest, GenerateResponse, StepEvent, parse_body
from far_sdk.scale.serve.requests import BadRequestError, bundle_defaults, bundle_summary, make_job

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # bytes: the largest request body read (prompts included)
ROUTES = (
    "GET /, POST /generate, POST /generate/stream, GET /health, GET /info, GET /metrics, GET /docs, GET /openapi.json"
)
_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}},
}
_ERRORS = {
    400: {"model": ErrorResponse, "description": "a bad request: far_sdk's message, naming the field"},
    413: {"model": ErrorResponse, "description": "a body over 1 MiB"},
    503: {"description": "the replicas' queues are full (back-pressure): retry later"},
}

app = FastAPI(
    title="far-sdk",
    version=far_sdk.__version__,
    description="FAR image generation (Frequency Autoregressive Image Generation with Continuous Tokens, "
    "arXiv 2503.05305) served by far-sdk on Ray Serve. Every field left out takes the bundle's default.",
    redirect_slashes=False,
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


def error(status: int, message: str, kind: str = "BadRequestError", field: str | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=message, type=kind, field=field).model_dump(), status)


def far_error(e: BaseException) -> JSONResponse:
    """A far_sdk error as an answer: 400 for bad input (naming the field where one is known), 500 otherwise."""
    status = 400 if isinstance(e, InvalidArgumentError) else 500
    return error(status, str(e), type(e).__name__, getattr(e, "field", None))


@app.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    if e.status_code == 404:
        return error(404, f"no route {request.url.path!r}; routes: {ROUTES}", "NotFound")
    if e.status_code == 405:
        return error(405, f"{request.method} is not allowed on {request.url.path}; routes: {ROUTES}", "NotAllowed")
    return error(e.status_code, str(e.detail), "HTTPError")


async def read_body(request: Request) -> bytes | None:
    """The body, or None once it passes :data:`MAX_BODY` bytes (not read further)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def b64png(image) -> str:
    return base64.b64encode(encode_png(image)).decode()


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def openapi_schema(gen: Generator) -> dict:
    """The OpenAPI document, with the request model whose sampling fields show this bundle's defaults."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    req = GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(req.pop("$defs", {}))
    for name, value in bundle_defaults(gen).items():
        prop = req["properties"][name]
        prop["default"] = value
        prop["description"] += f" This bundle: {json.dumps(value)}."
    schemas["GenerateRequest"] = req
    schemas["StepEvent"] = StepEvent.model_json_schema(ref_template="#/components/schemas/{model}")
    return doc


# defined last: Ray Serve pickles the app, with what its routes reference, when it is decorated
@serve.ingress(app)
class FarServer:
    """One replica: one Generator, batching, the routes."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.gen = Generator(cfg.bundle, backend=cfg.backend, **cfg.backend_options)
        self.batch_sizes: Counter[int] = Counter()  # images per generate call -> calls
        self.counts: Counter[str] = Counter()  # requests by outcome, calls stopped early
        self.metrics = metrics.ServeMetrics()
        self._waiting: list = []  # (job, future) not yet generated
        self._busy = asyncio.Lock()  # one generate call at a time per replica
        self.generate_batch.set_max_batch_size(cfg.max_batch)
        self.generate_batch.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1000.0)

    def check_health(self) -> None:  # Ray Serve restarts a replica whose check raises
        if self.gen._closed:
            raise RuntimeError("the replica's Generator is closed")

    # Ray Serve forms a batch as soon as its wait ends, even while the previous one still runs, so under load it
    # would queue many small batches. Up to 4 of them enter here at once; whichever holds the Generator takes every
    # waiting job (max_batch at a time), so they merge into the next call.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=4)  # sizes set in __init__
    async def generate_batch(self, jobs: list[Job]) -> list:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in jobs]
        self._waiting.extend(zip(jobs, futures))
        async with self._busy:
            while not all(f.done() for f in futures):
                take, self._waiting = self._waiting[: self.cfg.max_batch], self._waiting[self.cfg.max_batch :]
                await self._run(take)
        return [f.result() for f in futures]

    async def _run(self, take: list) -> None:
        live = []
        for job, fut in take:
            if job.cancelled.is_set():
                fut.set_result(None)  # its client has gone: nobody reads this
            else:
                live.append((job, fut))
        jobs = [j for j, _ in live]
        for idx in group_by_settings(jobs).values():
            group = [jobs[i] for i in idx]
            started = time.perf_counter()
            try:  # the loop runs in a thread so this replica keeps answering /health and queuing
                res = await asyncio.to_thread(run_group, self.gen, group)
            except Exception as e:  # noqa: BLE001 - one group's failure is its requests' answer, not the batch's
                if not isinstance(e, InvalidArgumentError):
                    log.exception("generate failed for a group of %d requests", len(group))
                for i in idx:
                    live[i][1].set_result(e)
                continue
            self.batch_sizes[res.batch_images] += 1
            self.counts["stopped_early"] += res.stopped
            self.metrics.call(res.batch_images, res.batch_requests, res.timings)
            for k, i in enumerate(idx):
                live[i][1].set_result((res, started, k))  # k: the job's place in res.images

    async def _job(self, request: Request, route: str, streamed: bool) -> Job | JSONResponse:
        body = await read_body(request)
        if body is None:
            return error(413, f"the request body is over {MAX_BODY} bytes", "PayloadTooLarge")
        req, bad = parse_body(body)
        if bad is not None:
            self._outcome(route, "bad_request")
            return JSONResponse(bad.model_dump(), 400)
        try:
            return make_job(req, self.gen, max_images=self.cfg.max_images_per_request, streamed=streamed)
        except (BadRequestError, InvalidArgumentError) as e:
            self._outcome(route, "bad_request")
            return far_error(e)

    def _outcome(self, route: str, outcome: str, timings: dict | None = None) -> None:
        self.counts[outcome] += 1
        self.metrics.request(route, outcome, timings)

    def _answer(self, job: Job, res: GroupResult, started: float, k: int) -> dict:
        t0 = time.perf_counter()
        images = [b64png(im) for im in res.images[k]]
        timings = {"queue": started - job.arrived, **res.timings, "encode": time.perf_counter() - t0}
        timings["total"] = time.perf_counter() - job.arrived
        return GenerateResponse(
            images=images,
            seeds=list(job.seeds),
            class_labels=list(job.class_ids) if job.class_ids else None,
            prompts=list(job.prompts) if job.prompts else None,
            plan=res.plan,
            timings={key: round(v, 6) for key, v in timings.items()},
            batch_images=res.batch_images,
            batch_requests=res.batch_requests,
        ).model_dump()

    # ---- routes --------------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self, request: Request) -> HTMLResponse:
        page = resources.files("far_sdk.scale.serve").joinpath("static/playground.html").read_text("utf-8")
        base = request.scope.get("root_path", "").rstrip("/") + "/"
        return HTMLResponse(page.replace("<head>", f'<head>\n<base href="{base}">', 1))

    @app.get("/health", summary="liveness")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/info", summary="the bundle, its defaults and this replica")
    async def info(self) -> dict:
        return {
            **bundle_summary(self.gen),
            "max_batch": self.cfg.max_batch,
            "batch_wait_ms": self.cfg.batch_wait_ms,
            "max_images_per_request": self.cfg.max_images_per_request,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "requests": dict(self.counts),
        }

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (Ray Serve's and far-sdk's)")
    async def prometheus(self) -> PlainTextResponse:
        text = await asyncio.to_thread(metrics.scrape)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self) -> dict:
        return openapi_schema(self.gen)

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="far-sdk API")

    @app.post(
        "/generate",
        summary="generate images",
        response_model=GenerateResponse,
        responses={200: {"content": {"image/png": {}}}, **_ERRORS},
        openapi_extra={"requestBody": _BODY},
    )
    async def generate(self, request: Request) -> Response:
        job = await self._job(request, "generate", streamed=False)
        if isinstance(job, Response):
            return job
        try:
            out = await self.generate_batch(job)
        except asyncio.CancelledError:
            job.cancelled.set()
            self._outcome("generate", "disconnected")
            raise
        if isinstance(out, BaseException):
            self._outcome("generate", "bad_request" if isinstance(out, InvalidArgumentError) else "error")
            return far_error(out)
        res, started, k = out
        answer = self._answer(job, res, started, k)
        self._outcome("generate", "ok", answer["timings"])
        headers = {"X-Far-Batch-Images": str(res.batch_images), "X-Far-Batch-Requests": str(res.batch_requests)}
        if job.output_format == "png":
            return Response(base64.b64decode(answer["images"][0]), media_type="image/png", headers=headers)
        return JSONResponse(answer, headers=headers)

    @app.post(
        "/generate/stream",
        summary="generate images, streaming each outer step's preview (Server-Sent Events)",
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "Server-Sent Events: `event: step` (data: a StepEvent) per outer step, then "
                "`event: result` (data: a GenerateResponse) or `event: error` (data: an ErrorResponse)",
            },
            **_ERRORS,
        },
        openapi_extra={"requestBody": _BODY},
    )
    async def generate_stream(self, request: Request) -> Response:
        job = await self._job(request, "stream", streamed=True)
        if isinstance(job, Response):
            return job
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def preview(step: int, num_steps: int, level: int, images) -> None:  # runs in the generating thread
            event = StepEvent(step=step, num_steps=num_steps, level=level, images=[b64png(im) for im in images])
            loop.call_soon_threadsafe(queue.put_nowait, sse("step", event.model_dump()))

        job.preview = preview
        return StreamingResponse(
            self._events(job, queue), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    async def _events(self, job: Job, queue: asyncio.Queue):
        task = asyncio.ensure_future(self.generate_batch(job))
        get = None
        done = False
        try:
            yield b": queued\n\n"  # the headers go out now; the client sees the stream open
            while not task.done() or not queue.empty():
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    yield get.result()
                else:
                    get.cancel()
            out = task.result()
            if isinstance(out, BaseException):
                self._outcome("stream", "bad_request" if isinstance(out, InvalidArgumentError) else "error")
                resp = far_error(out)
                yield sse("error", json.loads(resp.body))
            else:
                res, started, k = out
                answer = self._answer(job, res, started, k)
                self._outcome("stream", "ok", answer["timings"])
                yield sse("result", answer)
            done = True
        finally:
            if get is not None and not get.done():
                get.cancel()
            if not done:  # the client went away (or the response was cancelled): free the slot
                job.cancelled.set()
                task.cancel()
                self._outcome("stream", "disconnected")
