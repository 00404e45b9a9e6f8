"""One TensorRT engine on cuda-python, no torch: the runtime imports, CUDA call checking and copies,
:class:`EngineRunner` (deserialize -> execution context -> named device buffers) and
:func:`run_plan_once` (build-time validation). :class:`far_sdk.backends.tensorrt.backend.TensorRTBackend` runs
a bundle's three engines with these; ``export.trt_build`` validates the plans it builds with them.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from typing import Any

import numpy as np

from far_sdk.backends.tensorrt.cache import ROWS_PER_IMAGE, BuildEnv
from far_sdk.bundle.graphs import GraphSpec
from far_sdk.errors import (
    BackendUnavailableError,
    DeviceOutOfMemoryError,
    EngineProfileError,
    IncompatibleBundleError,
    InvalidArgumentError,
)

log = logging.getLogger(__name__)

ALIGN = 256  # bytes; every address handed to TensorRT is a multiple of this
CUDA_ERROR_MEMORY_ALLOCATION = 2  # cudaErrorMemoryAllocation
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
        import tensorrt as trt  # noqa: PLC0415 - GPU-only dependency: loaded with the engine
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer is not loadable
        missing.append(f"tensorrt ({type(e).__name__}: {e})")
    try:
        from cuda.bindings import runtime as cudart  # noqa: PLC0415 - GPU-only dependency: loaded with the engine
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6  # noqa: PLC0415 - GPU-only dependency: loaded with the engine
        except (ImportError, OSError) as e:
            missing.append(f"cuda-python ({type(e).__name__}: {e})")
    if missing:
        raise BackendUnavailableError(
            "backend 'tensorrt' needs the tensorrt and cuda-python packages and an NVIDIA GPU "
            f"(pip install 'far-sdk[gpu]'); missing: {', '.join(missing)}"
        )
    return trt, cudart


def check_cuda(result: Any, what: str) -> Any:
    """Unpack a cuda-python result ``(err, *values)``; raise :class:`CudaError` naming ``what`` unless err is
    cudaSuccess."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) == CUDA_ERROR_MEMORY_ALLOCATION:
        raise DeviceOutOfMemoryError(
            f"{what} failed: out of GPU memory ({getattr(err, 'name', err)}): pass a smaller max_batch, or build the "
            "engines for a smaller batch profile"
        )
    if int(err) != 0:
        raise CudaError(f"{what} failed: {getattr(err, 'name', err)} ({int(err)})")
    return values[0] if len(values) == 1 else (tuple(values) if values else None)


def check_cuda_quietly(result: Any, what: str) -> None:
    """Like :func:`check_cuda` for cleanup paths: log instead of raising."""
    try:
        check_cuda(result, what)
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
        count = check_cuda(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except CudaError as e:
        raise BackendUnavailableError(f"backend 'tensorrt' needs an NVIDIA GPU, but CUDA reports none ({e})") from e
    if not 0 <= index < count:
        raise BackendUnavailableError(
            f"backend 'tensorrt': CUDA device {index} requested, {count} visible (check CUDA_VISIBLE_DEVICES)"
        )
    check_cuda(cudart.cudaSetDevice(index), f"cudaSetDevice({index})")
    return index


def device_env(trt: Any, cudart: Any, index: int) -> BuildEnv:
    """TensorRT version, GPU name and compute capability: the machine half of an engine key."""
    prop = check_cuda(cudart.cudaGetDeviceProperties(index), f"cudaGetDeviceProperties({index})")
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
    levels = {
        sev.INTERNAL_ERROR: logging.ERROR,
        sev.ERROR: logging.ERROR,
        sev.WARNING: logging.WARNING,
        sev.INFO: logging.INFO,
        sev.VERBOSE: logging.DEBUG,
    }

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


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def copy_to_device(cudart: Any, dst: int, array: np.ndarray, stream: Any, what: str) -> None:
    """Queue a host-to-device copy; ``array`` must stay alive until the stream is synchronised."""
    check_cuda(
        cudart.cudaMemcpyAsync(
            dst, array.ctypes.data, array.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream
        ),
        f"copy of {what} to the GPU",
    )


def copy_to_host(cudart: Any, src: int, shape: tuple[int, ...], dtype: str, stream: Any, what: str) -> np.ndarray:
    """Queue a device-to-host copy into a new array; read it only after the stream is synchronised."""
    out = np.empty(shape, dtype=dtype)
    check_cuda(
        cudart.cudaMemcpyAsync(out.ctypes.data, src, out.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream),
        f"copy of {what} from the GPU",
    )
    return out


# ---- one engine --------------------------------------------------------------------------------------


class EngineRunner:
    """One graph's engine, execution context and named device buffers (sized for ``max_images``)."""

    def __init__(self, trt: Any, cudart: Any, plan: bytes, spec: GraphSpec, max_images: int, what: str):
        self.spec, self.what = spec, what
        self._trt, self._cudart = trt, cudart
        self.tensors = {t.name: t for t in spec.inputs + spec.outputs}
        self.buffers: dict[str, int] = {}
        self.images: int | None = None  # the batch the input shapes are set for
        self.needs_warmup = True  # no enqueue since the last shape change
        self.context = self.engine = None
        self._logger = trt_logger(trt)
        self._logger.take_errors()
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise IncompatibleBundleError(
                f"TensorRT could not deserialize {what} ({self._logger.take_errors() or 'no reason given'}) although "
                "its "
                "sidecar matches this TensorRT and GPU: rebuild it with `far-export trt ... --rebuild`"
            )
        self._check_io()
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise CudaError(
                f"TensorRT could not create an execution context for {what} (out of GPU memory?): "
                f"{self._logger.take_errors()}"
            )
        try:
            for name in self.tensors:
                self.buffers[name] = int(
                    check_cuda(
                        cudart.cudaMalloc(aligned(self.nbytes(name, max_images))), f"cudaMalloc for {spec.name}.{name}"
                    )
                )
        except BaseException:
            self.close()
            raise

    def _check_io(self) -> None:
        e, trt = self.engine, self._trt
        names = {e.get_tensor_name(i) for i in range(e.num_io_tensors)}
        if names != set(self.tensors):
            raise IncompatibleBundleError(
                f"{self.what} has tensors {sorted(names)}, the bundle's graph spec {sorted(self.tensors)}: rebuild it"
            )
        for t in self.spec.inputs + self.spec.outputs:
            mode = trt.TensorIOMode.INPUT if t in self.spec.inputs else trt.TensorIOMode.OUTPUT
            dtype = np.dtype(trt.nptype(e.get_tensor_dtype(t.name)))
            if e.get_tensor_mode(t.name) != mode or dtype != np.dtype(t.dtype):
                raise IncompatibleBundleError(
                    f"{self.what}: tensor {t.name!r} is a {dtype} {e.get_tensor_mode(t.name)}, the graph spec says "
                    f"{t.dtype} {mode}: rebuild it"
                )

    def shape(self, name: str, images: int) -> tuple[int, ...]:
        return tuple(ROWS_PER_IMAGE[d] * images if isinstance(d, str) else int(d) for d in self.tensors[name].shape)

    def nbytes(self, name: str, images: int) -> int:
        return math.prod(self.shape(name, images)) * np.dtype(self.tensors[name].dtype).itemsize

    def set_images(self, images: int) -> bool:
        """Set the input shapes for ``images`` images; True when they changed (captured graphs are then stale)."""
        if images == self.images:
            return False
        for t in self.spec.inputs:
            if any(isinstance(d, str) for d in t.shape) and not self.context.set_input_shape(
                t.name, self.shape(t.name, images)
            ):
                raise EngineProfileError(
                    f"{self.what} rejects {t.name} of shape {self.shape(t.name, images)}: {self._logger.take_errors()}"
                )
        for t in self.spec.outputs:
            got = tuple(self.context.get_tensor_shape(t.name))
            if got != self.shape(t.name, images):
                raise IncompatibleBundleError(
                    f"{self.what}: output {t.name} has shape {got}, expected {self.shape(t.name, images)}"
                )
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
            raise CudaError(
                f"TensorRT failed to enqueue {self.what}: {self._logger.take_errors() or 'no reason given'}"
            )
        self.needs_warmup = False

    def close(self) -> None:
        for name, ptr in self.buffers.items():
            check_cuda_quietly(self._cudart.cudaFree(ptr), f"cudaFree({self.spec.name}.{name})")
        self.buffers.clear()
        self.context = self.engine = self._runtime = None  # context before engine before runtime


class PlanSession:
    """One plan deserialized once and run on host feeds any number of times (build-time validation):
    ``with PlanSession(...) as s: out = s.run(feeds)``."""

    def __init__(self, trt: Any, cudart: Any, plan: Any, spec: GraphSpec, images: int, what: str):
        self._cudart, self.spec, self.images = cudart, spec, images
        self._stream = check_cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._runner = None
        try:
            self._runner = EngineRunner(trt, cudart, plan, spec, images, what)
            self._runner.set_images(images)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> PlanSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, spec, images, runner, stream = self._cudart, self.spec, self.images, self._runner, self._stream
        keep = [np.ascontiguousarray(feeds[t.name], dtype=t.dtype) for t in spec.inputs]
        for t, a in zip(spec.inputs, keep):
            if a.shape != runner.shape(t.name, images):
                raise InvalidArgumentError(
                    f"{spec.name}.{t.name}: expected shape {runner.shape(t.name, images)}, got {a.shape}"
                )
            copy_to_device(cudart, runner.buffers[t.name], a, stream, f"{spec.name}.{t.name}")
        runner.bind()
        runner.enqueue(int(stream))
        out = {
            t.name: copy_to_host(
                cudart, runner.buffers[t.name], runner.shape(t.name, images), t.dtype, stream, f"{spec.name}.{t.name}"
            )
            for t in spec.outputs
        }
        check_cuda(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")  # host sync: outputs are read now
        return out

    def close(self) -> None:
        cudart = self._cudart
        check_cuda_quietly(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")  # nothing queued
        if self._runner is not None:  # may outlive the buffers
            self._runner.close()
            self._runner = None
        check_cuda_quietly(cudart.cudaStreamDestroy(self._stream), "cudaStreamDestroy")


def run_plan_once(
    trt: Any, cudart: Any, plan: Any, spec: GraphSpec, images: int, feeds: dict[str, np.ndarray], what: str
) -> dict[str, np.ndarray]:
    """Deserialize ``plan``, run it once on host ``feeds`` for ``images`` images, return its outputs."""
    with PlanSession(trt, cudart, plan, spec, images, what) as s:
        return s.run(feeds)
