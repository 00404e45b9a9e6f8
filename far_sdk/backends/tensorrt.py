"""TensorRT backend: the bundle's engines (built by ``far-export trt``) run with ``tensorrt`` and
cuda-python (``cuda.bindings.runtime``); no torch.

Lifecycle per graph, as in the TensorRT demo's ``Engine``: sidecar check (:func:`far_sdk.trt_cache.find_plan`,
before TensorRT sees the plan) -> deserialize (checked for ``None``) -> one execution context ->
device buffers preallocated for the profile's max batch, named after the graph spec. All work goes
to one CUDA stream.

The inner loop stays on the GPU: :meth:`TensorRTBackend.transformer` leaves ``cond`` in device
memory; :meth:`TensorRTBackend.denoise` uploads x, all n noises and the n-row step table once, runs
the n denoiser steps back to back (ping-pong x buffers; ``noise``/``step`` bound to slots of the
uploaded blocks), replayed from a captured CUDA graph per (batch, n) when capture works, and
downloads x once: one host sync per call.

Concurrency: one backend owns one stream, one context per graph and its captured graphs, none of
which may run twice at once, so every public call holds one lock; and ``cond`` lives in one device
buffer, valid until the next transformer call. Run generations in parallel with one backend (one
Generator) per thread.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import BackendUnavailableError, EngineProfileError, IncompatibleBundleError, InvalidArgumentError
from ..graphs import GRAPH_NAMES, STEP_FIELDS, GraphSpec
from ..trt_cache import PRECISIONS, ROWS_PER_IMAGE, BuildEnv, EngineKey, find_plan, format_profile, parse_batch_profile, read_plan
from .base import Backend

log = logging.getLogger(__name__)

ALIGN = 256           # bytes; every address handed to TensorRT is a multiple of this
MAX_CUDA_GRAPHS = 64  # captured (batch, n) loops kept per backend (least recently used dropped)
_TRT_LOGGER = None
_TRT_LOGGER_LOCK = threading.Lock()


class CudaError(BackendUnavailableError):
    """A CUDA runtime or TensorRT execution call failed (out of memory, lost device, ...)."""


# ---- runtime imports and CUDA helpers ----------------------------------------------------------------


def import_runtime() -> tuple[Any, Any]:
    """(tensorrt, cuda.bindings.runtime), or BackendUnavailableError naming what is missing."""
    missing = []
    trt = cudart = None
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer is not loadable
        missing.append(f"tensorrt ({type(e).__name__}: {e})")
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except (ImportError, OSError) as e:
            missing.append(f"cuda-python ({type(e).__name__}: {e})")
    if missing:
        raise BackendUnavailableError(
            "backend 'tensorrt' needs the tensorrt and cuda-python packages and an NVIDIA GPU "
            f"(pip install 'far-sdk[gpu]'); missing: {', '.join(missing)}"
        )
    return trt, cudart


def _check(result: Any, what: str) -> Any:
    """Unpack a cuda-python result ``(err, *values)``; raise :class:`CudaError` naming ``what`` unless err is cudaSuccess."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise CudaError(f"{what} failed: {getattr(err, 'name', err)} ({int(err)})")
    return values[0] if len(values) == 1 else (tuple(values) if values else None)


def _quiet(result: Any, what: str) -> None:
    """Like :func:`_check` for cleanup paths: log instead of raising."""
    try:
        _check(result, what)
    except CudaError as e:
        log.warning("%s", e)


def _parse_device(device: Any) -> int:
    if device is None or device in ("cuda", "gpu", "auto"):
        return 0
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return device
    raise InvalidArgumentError(f"TensorRT device must be 'cuda', 'cuda:N' or a device index, got {device!r}")


def select_device(cudart: Any, device: Any) -> int:
    index = _parse_device(device)
    try:
        count = _check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except CudaError as e:
        raise BackendUnavailableError(f"backend 'tensorrt' needs an NVIDIA GPU, but CUDA reports none ({e})") from e
    if not 0 <= index < count:
        raise BackendUnavailableError(f"backend 'tensorrt': CUDA device {index} requested, {count} visible (check CUDA_VISIBLE_DEVICES)")
    _check(cudart.cudaSetDevice(index), f"cudaSetDevice({index})")
    return index


def device_env(trt: Any, cudart: Any, index: int) -> BuildEnv:
    """TensorRT version, GPU name and compute capability: the machine half of an engine key."""
    prop = _check(cudart.cudaGetDeviceProperties(index), f"cudaGetDeviceProperties({index})")
    name = prop.name.split(b"\0")[0].decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return BuildEnv(str(trt.__version__), name.strip(), f"{prop.major}.{prop.minor}")


def trt_logger(trt: Any) -> Any:
    """The process's one TensorRT logger (TensorRT keeps the first one it sees), routed to :mod:`logging`."""
    global _TRT_LOGGER
    with _TRT_LOGGER_LOCK:
        if _TRT_LOGGER is None:
            _TRT_LOGGER = _make_logger(trt)
    return _TRT_LOGGER


def _make_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that forwards to this module's logger and keeps the last errors for messages."""
    sev = trt.ILogger.Severity
    levels = {sev.INTERNAL_ERROR: logging.ERROR, sev.ERROR: logging.ERROR, sev.WARNING: logging.WARNING,
              sev.INFO: logging.INFO, sev.VERBOSE: logging.DEBUG}

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: collections.deque[str] = collections.deque(maxlen=8)

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.INFO)
            if level >= logging.ERROR:
                self.errors.append(msg)
            if log.isEnabledFor(level):
                log.log(level, "TensorRT: %s", msg)

        def take_errors(self) -> str:
            text = " | ".join(self.errors)
            self.errors.clear()
            return text

    return _Logger()


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _h2d(cudart: Any, dst: int, array: np.ndarray, stream: Any, what: str) -> None:
    """Queue a host-to-device copy; ``array`` must stay alive until the stream is synchronised."""
    _check(cudart.cudaMemcpyAsync(dst, array.ctypes.data, array.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream),
           f"copy of {what} to the GPU")


def _d2h(cudart: Any, src: int, shape: tuple[int, ...], dtype: str, stream: Any, what: str) -> np.ndarray:
    """Queue a device-to-host copy into a new array; read it only after the stream is synchronised."""
    out = np.empty(shape, dtype=dtype)
    _check(cudart.cudaMemcpyAsync(out.ctypes.data, src, out.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream),
           f"copy of {what} from the GPU")
    return out


# ---- one engine --------------------------------------------------------------------------------------


class EngineRunner:
    """One graph's engine, execution context and named device buffers (sized for ``max_images``)."""

    def __init__(self, trt: Any, cudart: Any, plan: bytes, spec: GraphSpec, max_images: int, what: str):
        self.spec, self.what = spec, what
        self._trt, self._cudart = trt, cudart
        self.tensors = {t.name: t for t in spec.inputs + spec.outputs}
        self.buffers: dict[str, int] = {}
        self.images: int | None = None   # the batch the input shapes are set for
        self.needs_warmup = True         # no enqueue since the last shape change
        self.context = self.engine = None
        self._logger = trt_logger(trt)
        self._logger.take_errors()
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise IncompatibleBundleError(
                f"TensorRT could not deserialize {what} ({self._logger.take_errors() or 'no reason given'}) although its "
                "sidecar matches this TensorRT and GPU: rebuild it with `far-export trt ... --rebuild`"
            )
        self._check_io()
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise CudaError(f"TensorRT could not create an execution context for {what} (out of GPU memory?): {self._logger.take_errors()}")
        try:
            for name in self.tensors:
                self.buffers[name] = int(_check(cudart.cudaMalloc(_align(self.nbytes(name, max_images))), f"cudaMalloc for {spec.name}.{name}"))
        except BaseException:
            self.close()
            raise

    def _check_io(self) -> None:
        e, trt = self.engine, self._trt
        names = {e.get_tensor_name(i) for i in range(e.num_io_tensors)}
        if names != set(self.tensors):
            raise IncompatibleBundleError(f"{self.what} has tensors {sorted(names)}, the bundle's graph spec {sorted(self.tensors)}: rebuild it")
        for t in self.spec.inputs + self.spec.outputs:
            mode = trt.TensorIOMode.INPUT if t in self.spec.inputs else trt.TensorIOMode.OUTPUT
            dtype = np.dtype(trt.nptype(e.get_tensor_dtype(t.name)))
            if e.get_tensor_mode(t.name) != mode or dtype != np.dtype(t.dtype):
                raise IncompatibleBundleError(f"{self.what}: tensor {t.name!r} is a {dtype} {e.get_tensor_mode(t.name)}, the graph spec says {t.dtype} {mode}: rebuild it")

    def shape(self, name: str, images: int) -> tuple[int, ...]:
        return tuple(ROWS_PER_IMAGE[d] * images if isinstance(d, str) else int(d) for d in self.tensors[name].shape)

    def nbytes(self, name: str, images: int) -> int:
        return math.prod(self.shape(name, images)) * np.dtype(self.tensors[name].dtype).itemsize

    def set_images(self, images: int) -> bool:
        """Set the input shapes for ``images`` images; True when they changed (captured graphs are then stale)."""
        if images == self.images:
            return False
        for t in self.spec.inputs:
            if any(isinstance(d, str) for d in t.shape) and not self.context.set_input_shape(t.name, self.shape(t.name, images)):
                raise EngineProfileError(f"{self.what} rejects {t.name} of shape {self.shape(t.name, images)}: {self._logger.take_errors()}")
        for t in self.spec.outputs:
            got = tuple(self.context.get_tensor_shape(t.name))
            if got != self.shape(t.name, images):
                raise IncompatibleBundleError(f"{self.what}: output {t.name} has shape {got}, expected {self.shape(t.name, images)}")
        self.images, self.needs_warmup = images, True
        return True

    def bind(self, addresses: dict[str, int] | None = None) -> None:
        """Point every I/O tensor at ``addresses[name]``, or at this runner's own buffer."""
        for name, own in self.buffers.items():
            ptr = own if addresses is None else addresses.get(name, own)
            if not self.context.set_tensor_address(name, ptr):
                raise CudaError(f"{self.what}: set_tensor_address({name!r}) failed: {self._logger.take_errors()}")

    def enqueue(self, stream: int) -> None:
        if not self.context.execute_async_v3(stream):
            raise CudaError(f"TensorRT failed to enqueue {self.what}: {self._logger.take_errors() or 'no reason given'}")
        self.needs_warmup = False

    def close(self) -> None:
        for name, ptr in self.buffers.items():
            _quiet(self._cudart.cudaFree(ptr), f"cudaFree({self.spec.name}.{name})")
        self.buffers.clear()
        self.context = self.engine = self._runtime = None  # context before engine before runtime


def run_plan_once(trt: Any, cudart: Any, plan: Any, spec: GraphSpec, images: int, feeds: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """Deserialize ``plan``, run it once on host ``feeds`` for ``images`` images, return its outputs (build-time validation)."""
    stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
    runner = None
    try:
        runner = EngineRunner(trt, cudart, plan, spec, images, what)
        runner.set_images(images)
        keep = [np.ascontiguousarray(feeds[t.name], dtype=t.dtype) for t in spec.inputs]
        for t, a in zip(spec.inputs, keep):
            if a.shape != runner.shape(t.name, images):
                raise InvalidArgumentError(f"{spec.name}.{t.name}: expected shape {runner.shape(t.name, images)}, got {a.shape}")
            _h2d(cudart, runner.buffers[t.name], a, stream, f"{spec.name}.{t.name}")
        runner.bind()
        runner.enqueue(int(stream))
        out = {t.name: _d2h(cudart, runner.buffers[t.name], runner.shape(t.name, images), t.dtype, stream, f"{spec.name}.{t.name}")
               for t in spec.outputs}
        _check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")  # host sync: outputs are read now
        return out
    finally:
        _quiet(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")  # nothing queued may outlive the buffers
        if runner is not None:
            runner.close()
        _quiet(cudart.cudaStreamDestroy(stream), "cudaStreamDestroy")


@dataclass(frozen=True)
class DeviceCond:
    """The transformer's ``cond`` [2B, L, W] left in GPU memory; valid until the next transformer call."""

    ptr: int
    images: int
    generation: int
    owner: int


# ---- the backend -------------------------------------------------------------------------------------


class TensorRTBackend(Backend):
    """Engines from ``bundle/trt`` built for this GPU and TensorRT (see ``far-export trt``).

    ``precision``: the transformer's and denoiser's ("fp16" | "bf16" | "fp32"; None: the built one,
    fp16 first); ``vae_precision`` likewise for the VAE decoder (None: fp32 first); ``batch``: the
    profile to load ("MIN:OPT:MAX" or a 3-tuple; None: the largest built); ``cuda_graphs``: replay
    the denoiser loop from captured CUDA graphs (falls back to plain launches if capture fails).
    Other options (e.g. ``threads``) are ignored.
    """

    name = "tensorrt"
    concurrent_generate = False

    def __init__(self, bundle: Bundle, *, device: Any = None, precision: str | None = None, vae_precision: str | None = None,
                 batch: Any = None, opt_level: int | None = None, cuda_graphs: bool = True, **ignored: Any):
        super().__init__(bundle)
        self._closed, self._lock = True, threading.Lock()
        if ignored:
            log.info("TensorRT backend: ignoring options %s", sorted(ignored))
        for label, p in (("precision", precision), ("vae_precision", vae_precision)):
            if p is not None and p not in PRECISIONS:
                raise InvalidArgumentError(f"{label} must be one of {PRECISIONS} or None, got {p!r}")
        self._trt, self._cudart = trt, cudart = import_runtime()
        self._device = select_device(cudart, device)
        self.env = device_env(trt, cudart, self._device)
        profile = None if batch is None else parse_batch_profile(batch)
        # Every sidecar is checked before any plan reaches TensorRT.
        self.keys: dict[str, EngineKey] = {}
        for g in GRAPH_NAMES:
            vae = g == "vae_decoder"
            self.keys[g], _ = find_plan(bundle, g, env=self.env, precision=vae_precision if vae else precision, profile=profile,
                                        opt_level=opt_level, prefer=("fp32", "bf16", "fp16") if vae else ("fp16", "bf16", "fp32"),
                                        verify_sha=False)  # read_plan below hashes the bytes it loads
        self._min_images = max(k.profile[0] for k in self.keys.values())
        self._max_images = min(k.profile[2] for k in self.keys.values())
        if self._min_images > self._max_images:
            raise IncompatibleBundleError(f"the engines' batch profiles do not overlap ({self._profiles()}): rebuild them with one --batch")
        self._runners: dict[str, EngineRunner] = {}
        self._blocks: dict[str, tuple[int, int]] = {}          # name -> (device ptr, bytes)
        self._graphs: collections.OrderedDict = collections.OrderedDict()  # loop key -> cudaGraphExec_t
        self._pending: list[np.ndarray] = []                   # host arrays kept alive until the next sync
        self._use_graphs, self._cond_generation, self._stream = bool(cuda_graphs), 0, None
        self._closed = False
        try:
            self._stream = _check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
            for g in GRAPH_NAMES:
                key = self.keys[g]
                self._runners[g] = EngineRunner(trt, cudart, read_plan(bundle, key), bundle.graph_spec(g), key.profile[2],
                                                what=f"the {g} engine {key.plan_name}")
        except BaseException:
            self.close()
            raise
        log.info("TensorRT backend on %s: %s", self.env.describe(), self._profiles())

    # ---- properties ---------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        return f"cuda:{self._device}"

    @property
    def precision(self) -> str:
        return self.keys["denoiser"].precision

    @property
    def max_batch(self) -> int:
        return self._max_images

    def _profiles(self) -> str:
        return ", ".join(f"{g} {k.precision} batch {format_profile(k.profile)}" for g, k in self.keys.items())

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(tensorrt=self.env.tensorrt, gpu=self.env.gpu, compute_capability=self.env.compute_capability,
                 batch=f"{self._min_images}..{self._max_images}", cuda_graphs=self._use_graphs,
                 engines={g: {"precision": k.precision, "profile": format_profile(k.profile), "opt_level": k.opt_level,
                              "plan": k.plan_name} for g, k in self.keys.items()})
        return d

    # ---- small steps (call with the lock held) ----------------------------------------------------------
    @property
    def _sh(self) -> int:
        return int(self._stream)

    def _enter(self) -> None:
        if self._closed:
            raise BackendUnavailableError("this TensorRT backend was closed")
        _check(self._cudart.cudaSetDevice(self._device), "cudaSetDevice")  # the current device is per host thread

    def _sync(self) -> None:
        """Host sync: wait for the stream; host arrays handed to copies may go afterwards."""
        _check(self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        self._pending.clear()

    def _check_images(self, images: int, what: str) -> None:
        if not self._min_images <= images <= self._max_images:
            raise EngineProfileError(
                f"{what}: {images} images per call, but this bundle's engines take {self._min_images}..{self._max_images} "
                f"({self._profiles()}). Split the batch (generate(max_batch=...)) or rebuild with "
                f"`far-export trt --bundle {self.bundle.path} --batch 1:{max(1, min(images, self._max_images))}:{max(images, self._max_images)} --rebuild`"
            )

    def _upload(self, dst: int, array: np.ndarray, what: str) -> None:
        self._pending.append(array)
        _h2d(self._cudart, dst, array, self._stream, what)

    def _upload_input(self, r: EngineRunner, name: str, value: Any, images: int) -> None:
        """Validate ``value``'s shape for ``images`` images and queue its copy into ``r``'s buffer ``name``."""
        array = np.ascontiguousarray(value, dtype=r.tensors[name].dtype)
        if array.shape != r.shape(name, images):
            raise InvalidArgumentError(f"{r.spec.name}.{name}: expected shape {r.shape(name, images)} for {images} images, got {array.shape}")
        self._upload(r.buffers[name], array, f"{r.spec.name}.{name}")

    def _download(self, src: int, shape: tuple[int, ...], dtype: str, what: str) -> np.ndarray:
        out = _d2h(self._cudart, src, shape, dtype, self._stream, what)
        self._pending.append(out)
        return out

    def _upload_slots(self, name: str, array: np.ndarray) -> tuple[int, int]:
        """Upload array [n, ...] into a device block, one ALIGN-ed slot per row; returns (block ptr, slot stride)."""
        n, row = array.shape[0], array[0].nbytes
        stride = _align(row)
        ptr, size = self._blocks.get(name, (0, 0))
        if size < n * stride:
            if ptr:
                self._sync()  # no queued work may still read the old block
                self._drop_graphs()
                _check(self._cudart.cudaFree(ptr), f"cudaFree({name} block)")
                del self._blocks[name]
            size = _align(n * stride)
            ptr = int(_check(self._cudart.cudaMalloc(size), f"cudaMalloc({size} bytes for {name})"))
            self._blocks[name] = (ptr, size)
        self._pending.append(array)
        _check(self._cudart.cudaMemcpy2DAsync(ptr, stride, array.ctypes.data, row, row, n,
                                              self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream),
               f"copy of {n} {name} rows to the GPU")
        return ptr, stride

    def _drop_graphs(self) -> None:
        while self._graphs:
            _, exe = self._graphs.popitem(last=False)
            _quiet(self._cudart.cudaGraphExecDestroy(exe), "cudaGraphExecDestroy")

    # ---- the stages -------------------------------------------------------------------------------------
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if graph not in GRAPH_NAMES:
            raise InvalidArgumentError(f"graph must be one of {GRAPH_NAMES}, got {graph!r}")
        with self._lock:
            self._enter()
            r = self._runners[graph]
            first = next(t for t in r.spec.inputs if any(isinstance(d, str) for d in t.shape))
            axis, sym = next((i, d) for i, d in enumerate(first.shape) if isinstance(d, str))
            images, rem = divmod(int(np.shape(feeds[first.name])[axis]), ROWS_PER_IMAGE[sym])
            if rem:
                raise InvalidArgumentError(f"{graph}.{first.name}: the batch axis must hold {ROWS_PER_IMAGE[sym]} rows per image")
            self._check_images(images, f"graph {graph!r}")
            if r.set_images(images):
                self._drop_graphs()
            for t in r.spec.inputs:
                self._upload_input(r, t.name, feeds[t.name], images)
            r.bind()
            r.enqueue(self._sh)
            if graph == "transformer":
                self._cond_generation += 1  # its cond buffer was overwritten
            out = {t.name: self._download(r.buffers[t.name], r.shape(t.name, images), t.dtype, f"{graph}.{t.name}") for t in r.spec.outputs}
            self._sync()  # host sync: the outputs are read now
            return out

    def transformer(self, tokens: np.ndarray, class_ids: np.ndarray, level: int) -> DeviceCond:
        """tokens [2B, L, C], class_ids [2B] -> cond [2B, L, W], left on the GPU (no host sync)."""
        with self._lock:
            self._enter()
            r = self._runners["transformer"]
            rows = int(np.shape(tokens)[0])
            if rows % 2:
                raise InvalidArgumentError(f"the transformer takes the CFG batch [cond; uncond]: an even number of rows, got {rows}")
            images = rows // 2
            self._check_images(images, "transformer")
            r.set_images(images)
            self._upload_input(r, "tokens", tokens, images)
            self._upload_input(r, "class_ids", class_ids, images)
            self._upload_input(r, "level", np.array([level], dtype=np.float32), images)
            r.bind()
            r.enqueue(self._sh)
            self._cond_generation += 1
            return DeviceCond(ptr=r.buffers["cond"], images=images, generation=self._cond_generation, owner=id(self))

    def denoise(self, x: np.ndarray, noises: np.ndarray, cond: Any, steps: np.ndarray) -> np.ndarray:
        """n guided DDPM steps on the GPU: x [B, L, C], noises [n, B, L, C], steps [n, 10] -> x_0 [B, L, C] (one host sync)."""
        with self._lock:
            self._enter()
            r = self._runners["denoiser"]
            x = np.ascontiguousarray(x, dtype=np.float32)
            noises = np.ascontiguousarray(noises, dtype=np.float32)
            steps = np.ascontiguousarray(steps, dtype=np.float32)
            B, n = x.shape[0], steps.shape[0]
            self._check_images(B, "denoise")
            if noises.shape != (n, *x.shape) or steps.shape != (n, len(STEP_FIELDS)):
                raise InvalidArgumentError(f"denoise: x {x.shape} needs noises {(n, *x.shape)} and steps {(n, len(STEP_FIELDS))}, "
                                           f"got {noises.shape} and {steps.shape}")
            if n == 0:
                return x.copy()
            if r.set_images(B):
                self._drop_graphs()
            cond_ptr = self._cond_ptr(r, cond, B)
            self._upload_input(r, "x", x, B)
            noise_ptr, noise_stride = self._upload_slots("noise", noises)
            step_ptr, step_stride = self._upload_slots("step", steps)
            xs = (r.buffers["x"], r.buffers["x_prev"])  # ping-pong: step i reads xs[i % 2], writes the other

            def addresses(i: int) -> dict[str, int]:
                return {"x": xs[i % 2], "x_prev": xs[(i + 1) % 2], "cond": cond_ptr,
                        "noise": noise_ptr + i * noise_stride, "step": step_ptr + i * step_stride}

            self._run_steps(r, n, (B, n, cond_ptr, noise_ptr, noise_stride, step_ptr, step_stride), addresses)
            out = self._download(xs[n % 2], x.shape, "float32", "denoiser.x_prev")
            self._sync()  # the one host sync of the inner loop
            return out

    def _cond_ptr(self, r: EngineRunner, cond: Any, images: int) -> int:
        if isinstance(cond, DeviceCond):
            if cond.owner != id(self) or cond.generation != self._cond_generation:
                raise InvalidArgumentError(
                    "cond is stale: another transformer call on this TensorRT backend ran since it was computed (a backend "
                    "keeps one cond on the GPU; run concurrent generations with one Generator per thread)")
            if cond.images != images:
                raise InvalidArgumentError(f"cond was computed for {cond.images} images, x has {images}")
            return cond.ptr
        host = np.asarray(cond, dtype=np.float32).reshape(r.shape("cond", images))  # a host cond [2B, L, W] or [2, B, L, W]
        self._upload_input(r, "cond", host, images)
        return r.buffers["cond"]

    def _run_steps(self, r: EngineRunner, n: int, key: tuple, addresses) -> None:
        if self._use_graphs:
            exe = self._graphs.get(key)
            if exe is None:
                exe = self._capture(r, n, key, addresses)
            else:
                self._graphs.move_to_end(key)
            if exe is not None:
                _check(self._cudart.cudaGraphLaunch(exe, self._stream), "cudaGraphLaunch")
                return
        self._enqueue_steps(r, n, addresses)

    def _enqueue_steps(self, r: EngineRunner, n: int, addresses) -> None:
        for i in range(n):
            r.bind(addresses(i))
            r.enqueue(self._sh)

    def _capture(self, r: EngineRunner, n: int, key: tuple, addresses) -> Any:
        """Capture the n-step loop into a CUDA graph; None (and plain launches from now on) if capture fails."""
        cudart = self._cudart
        if r.needs_warmup:
            # TensorRT finishes shape-dependent setup in the first enqueue after a shape change, which must
            # not happen inside a capture. Step 0 reads xs[0] and writes xs[1]: harmless, the graph redoes it.
            self._enqueue_steps(r, 1, addresses)
            self._sync()
        graph = None
        try:
            _check(cudart.cudaStreamBeginCapture(self._stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
                   "cudaStreamBeginCapture")
            try:
                self._enqueue_steps(r, n, addresses)
            finally:
                graph = _check(cudart.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
            exe = _check(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except CudaError as e:
            cudart.cudaGetLastError()  # clear the capture's error state
            log.warning("CUDA graph capture of the %d-step denoiser loop failed (%s); running the steps as plain launches", n, e)
            self._use_graphs = False
            return None
        finally:
            if graph is not None:
                _quiet(cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")  # the instantiated graph does not need it
        self._graphs[key] = exe
        while len(self._graphs) > MAX_CUDA_GRAPHS:
            _, old = self._graphs.popitem(last=False)
            _quiet(cudart.cudaGraphExecDestroy(old), "cudaGraphExecDestroy")
        return exe

    def synchronize(self) -> None:
        with self._lock:
            self._enter()
            self._sync()

    def close(self) -> None:
        """Free graphs, buffers, contexts, engines and the stream. Idempotent; the backend is unusable afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            cudart = self._cudart
            if self._stream is not None:
                _quiet(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            self._drop_graphs()
            for r in self._runners.values():
                r.close()
            self._runners.clear()
            for name, (ptr, _) in self._blocks.items():
                _quiet(cudart.cudaFree(ptr), f"cudaFree({name} block)")
            self._blocks.clear()
            self._pending.clear()
            if self._stream is not None:
                _quiet(cudart.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
                self._stream = None
