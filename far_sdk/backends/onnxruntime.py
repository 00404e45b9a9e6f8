"""ONNX Runtime backend (CPU; CUDA / TensorRT execution providers when onnxruntime-gpu and a GPU exist).

With ``io_binding`` the inner loop runs through ``IOBinding``, allocating and copying nothing per step
that can be avoided:

- CPU (off by default, see :data:`CPU_IO_BINDING_DEFAULT`): every input is bound by address to the
  caller's arrays (x, the n-row noise and step blocks, cond), the output to one of two preallocated x
  buffers; step i's output buffer is step i+1's input (ping-pong), so no step copies x or allocates an
  output. Results are bitwise those of plain ``session.run`` (same kernels, same input memory).
- GPU ("cuda" / "tensorrt"): the transformer's ``cond`` stays in device memory (an ``OrtValue``);
  :meth:`OnnxRuntimeBackend.denoise` uploads x, all n noises and the n step rows once, ping-pongs x
  between two device buffers, and downloads x once. Each ``run_with_iobinding`` still ends with ONNX
  Runtime's own stream synchronisation (its default); no data crosses the bus per step.

The CUDA EP's own CUDA-graph mode (``enable_cuda_graph``) is not used: it replays one run with the
input and output addresses fixed at capture, while this loop binds a different noise/step slot and
the other x buffer at every step, and ONNX Runtime's Python API has no device-to-device copy to move
them into fixed buffers.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from far_sdk.backends import ort_tensorrt
from far_sdk.backends.base import Backend, check_backend_options
from far_sdk.backends.tensorrt.cache_key import DEFAULT_PROFILE, format_profile, parse_batch_profile
from far_sdk.bundle.bundle import Bundle
from far_sdk.bundle.graphs import DENOISER_FEWSTEP, GRAPH_NAMES
from far_sdk.errors import BackendUnavailableError, BundleError, DeviceOutOfMemoryError, InvalidArgumentError

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
#: Bytes between the starts of the noise/step slots uploaded to the GPU (TensorRT wants 256-byte aligned I/O).
DEVICE_ALIGN = 256
#: The CPU default of ``io_binding``. On a far_tiny bundle (1 thread, 200 denoiser calls, batch 1 and 4) both
#: ways took the same time within 2% (a call computes for ~1 ms; binding saves microseconds), so the CPU
#: keeps plain ``session.run``, the simpler path. ``scripts/gpu_check.py --io-binding-bench`` re-measures.
CPU_IO_BINDING_DEFAULT = False


def _import_ort():
    try:
        import onnxruntime as ort  # noqa: PLC0415 - the backend's runtime: loaded when chosen
    except ImportError as e:
        raise BackendUnavailableError(
            "backend 'onnxruntime' needs the onnxruntime package: pip install onnxruntime (CPU) or onnxruntime-gpu"
        ) from e
    return ort


@dataclass(frozen=True)
class OrtValueCond:
    """The transformer's ``cond`` [2B, L, W] kept in GPU memory as an ``OrtValue`` the caller owns
    (each transformer call makes a new one, so an older one stays valid)."""

    value: Any
    images: int


def _aligned_empty(shape: tuple[int, ...], align: int = 64) -> np.ndarray:
    """An uninitialised float32 array whose data starts on an ``align``-byte boundary (as onnxruntime's own buffers
    do)."""
    n = int(np.prod(shape))
    raw = np.empty(n + align // 4, dtype=np.float32)
    start = (-raw.ctypes.data % align) // 4
    return raw[start : start + n].reshape(shape)


def _aligned_rows(a: np.ndarray, align: int) -> tuple[np.ndarray, int]:
    """a [n, ...] float32 -> (block [n, k] float32 whose rows start every ``align`` bytes, row stride in bytes)."""
    n, row = a.shape[0], int(np.prod(a.shape[1:]))
    k = -(-row * 4 // align) * align // 4
    if k == row:
        return np.ascontiguousarray(a, dtype=np.float32).reshape(n, row), row * 4
    block = np.zeros((n, k), dtype=np.float32)
    block[:, :row] = a.reshape(n, row)
    return block, k * 4


class OnnxRuntimeBackend(Backend):
    """One InferenceSession per graph, created once from the verified file path.

    ``device``: "cpu", "cuda", "cuda:N" or "tensorrt" / "tensorrt:N" (EPs; the TensorRT EP's set-up, profiles and
    caches: :mod:`far_sdk.backends.ort_tensorrt`), or "auto" (CUDA when this onnxruntime build offers it, else CPU).
    ``threads``: intra-op threads (default: all cores the process may use).
    ``io_binding``: run the inner loop through IOBinding (None: on for GPU devices, off on CPU where it
    measured no faster; bitwise the same results on CPU). On a GPU, off means plain ``session.run`` with
    host arrays at every step (for comparison).
    ``trt_fp16``: TensorRT EP engines in fp16 with fp32 islands, validated before use (default off: fp32);
    ``batch``: the TensorRT EP's profile, "MIN:OPT:MAX" images per call (default 1:1:8). ``tf32``: allow TF32 math
    in the CUDA EP (default off, for fp32 parity with the other backends).
    """

    name = "onnxruntime"

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str = "auto",
        threads: int | None = None,
        io_binding: bool | None = None,
        trt_fp16: bool = False,
        tf32: bool = False,
        batch: Any = None,
        **other: Any,
    ):
        super().__init__(bundle)
        check_backend_options(self.name, ("device", "threads", "io_binding", "trt_fp16", "tf32", "batch"), other, log)
        self._trt_profile = parse_batch_profile(DEFAULT_PROFILE if batch is None else batch)
        ort = _import_ort()
        self._ort = ort
        available = ort.get_available_providers()
        if device == "auto":
            device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        m = re.fullmatch(r"(cpu|cuda|tensorrt)(?::(\d+))?", device) if isinstance(device, str) else None
        if m is None or (m.group(1) == "cpu" and m.group(2)):
            raise InvalidArgumentError(
                "onnxruntime device must be 'cpu', 'cuda', 'cuda:N', 'tensorrt', 'tensorrt:N' or 'auto', got "
                f"{device!r}"
            )
        kind, self._device_id = m.group(1), int(m.group(2) or 0)
        wanted = PROVIDER_ALIASES[kind]
        if wanted[0] not in available:
            raise BackendUnavailableError(
                f"onnxruntime {ort.__version__} here offers {available}, not {wanted[0]}: install onnxruntime-gpu "
                "(instead of onnxruntime) on a machine with a CUDA GPU"
            )
        self._kind = kind
        self._on_gpu = kind != "cpu"
        self._mem = "cuda" if self._on_gpu else "cpu"  # where the device-resident path keeps cond and x
        self._io_binding = (self._on_gpu or CPU_IO_BINDING_DEFAULT) if io_binding is None else bool(io_binding)
        self._trt_fp16, self._tf32 = bool(trt_fp16), bool(tf32)
        opts = ort.SessionOptions()
        if threads is None:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._sessions = {}
        for g in GRAPH_NAMES:
            path = bundle.graph_file(g)  # verified by Bundle.load before any parse
            if kind == "tensorrt":  # fp16: the mixed-precision copy (ort_tensorrt's docstring)
                path = ort_tensorrt.model_path(bundle, g, self._trt_fp16 and g != "vae_decoder")
            try:
                self._sessions[g] = ort.InferenceSession(str(path), sess_options=opts, providers=self._providers(g))
            except Exception as e:  # onnxruntime's own exception classes
                raise BundleError(
                    f"onnxruntime could not load graph {g!r} from {path}: {str(e).splitlines()[0]}"
                ) from e
            got = self._sessions[g].get_providers()
            if got[0] != wanted[0]:  # onnxruntime falls back to the next provider when one fails to start
                raise BackendUnavailableError(
                    f"onnxruntime could not start {wanted[0]} for graph {g!r} (it runs on {got}); check the CUDA, cuDNN"
                    f"{' and TensorRT' if kind == 'tensorrt' else ''} libraries onnxruntime-gpu {ort.__version__} needs"
                )
        if kind != "tensorrt" and bundle.graph_entry(DENOISER_FEWSTEP) is not None:  # TensorRT: no profile for it
            try:
                self._sessions[DENOISER_FEWSTEP] = ort.InferenceSession(
                    str(bundle.graph_file(DENOISER_FEWSTEP)), sess_options=opts, providers=self._providers("denoiser")
                )
            except Exception as e:  # onnxruntime's own exception classes
                raise BundleError(
                    f"onnxruntime could not load graph {DENOISER_FEWSTEP!r}: {str(e).splitlines()[0]}"
                ) from e
        self.runs_fewstep = DENOISER_FEWSTEP in self._sessions
        self._outputs = {g: [o.name for o in s.get_outputs()] for g, s in self._sessions.items()}
        self._validation = None
        if kind == "tensorrt" and self._trt_fp16:  # before first use: fp16 against fp32 at t = 999, t = 0, a loop
            cpu = ort.InferenceSession(str(bundle.graph_file("denoiser")), providers=["CPUExecutionProvider"])
            images = self._trt_profile[0]  # inside the engine's profile
            self._validation = ort_tensorrt.validate_denoiser(bundle, self._sessions["denoiser"], cpu, images)

    def _providers(self, graph: str) -> list[Any]:
        # Option values as the strings onnxruntime parses ("0"/"1" for flags).
        providers: list[Any] = []
        for p in PROVIDER_ALIASES[self._kind]:
            if p == "TensorrtExecutionProvider":
                fp16 = self._trt_fp16 and graph != "vae_decoder"  # fp16 VAE decoders overflow
                opts = ort_tensorrt.provider_options(self.bundle, graph, self._device_id, self._trt_profile, fp16)
                providers.append((p, opts))
            elif p == "CUDAExecutionProvider":
                providers.append((p, {"device_id": str(self._device_id), "use_tf32": "1" if self._tf32 else "0"}))
            else:
                providers.append(p)
        return providers

    @property
    def max_batch(self) -> int | None:
        return self._trt_profile[2] if self._kind == "tensorrt" else None

    # ---- properties -------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        return self._kind if not self._on_gpu else f"{self._kind}:{self._device_id}"

    @property
    def precision(self) -> str:
        return "fp16" if self._kind == "tensorrt" and self._trt_fp16 else "fp32"

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(
            onnxruntime=self._ort.__version__,
            providers=self._sessions["denoiser"].get_providers(),
            io_binding=self._io_binding,
        )
        if self._on_gpu:
            d.update(tf32=self._tf32)
        if self._kind == "tensorrt":
            d.update(trt_fp16=self._trt_fp16, trt_batch=format_profile(self._trt_profile), validation=self._validation)
        return d

    # ---- the stages -------------------------------------------------------------------------------
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if graph not in self._sessions:
            raise InvalidArgumentError(f"graph must be one of {tuple(self._sessions)}, got {graph!r}")
        sess = self._sessions[graph]
        try:
            outs = sess.run(self._outputs[graph], feeds)
        except Exception as e:
            raise _run_error(e, graph, feeds) from e
        return dict(zip(self._outputs[graph], outs))

    def transformer(
        self, tokens: np.ndarray, conditioning: dict[str, np.ndarray], level: int, mask: np.ndarray | None = None
    ) -> Any:
        """tokens [2B, L, C], conditioning (the CFG batch's inputs), mask [2B, L] (a masking transformer) -> cond
        [2B, L, W]: host array on
        CPU, :class:`OrtValueCond` on a GPU."""
        if not (self._on_gpu and self._io_binding):
            return super().transformer(tokens, conditioning, level, mask)
        sess, ort = self._sessions["transformer"], self._ort
        rows, L = int(tokens.shape[0]), int(tokens.shape[1])
        W = int(self.bundle.manifest["mlp_width"])
        b = sess.io_binding()
        b.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.float32))  # copied to the GPU by the run
        for name, value in conditioning.items():  # class_ids, or a text bundle's context and null
            b.bind_cpu_input(name, value)
        b.bind_cpu_input("level", np.array([level], dtype=np.float32))
        for name, value in self._mask_feed(mask, rows, L).items():
            b.bind_cpu_input(name, value)
        cond = ort.OrtValue.ortvalue_from_shape_and_type(
            [rows, L, W], np.float32, self._mem, self._device_id
        )  # (2B, L, W)
        b.bind_ortvalue_output("cond", cond)
        self._run_bound(sess, b, "transformer")
        return OrtValueCond(cond, rows // 2)

    def denoise(
        self, x: np.ndarray, noises: np.ndarray, cond: Any, steps: np.ndarray, denoiser: str = "denoiser"
    ) -> np.ndarray:
        """n guided steps of graph ``denoiser``: x [B, L, C], noises [n, B, L, C], cond [2B, L, W], steps [n, 10] ->
        x_0 [B, L, C] (a new array)."""
        if steps.shape[0] == 0:
            return np.array(x, dtype=np.float32)
        if denoiser not in self._sessions:
            raise InvalidArgumentError(f"graph must be one of {tuple(self._sessions)}, got {denoiser!r}")
        if not self._io_binding:
            return super().denoise(x, noises, self._host_cond(cond), steps, denoiser)
        if self._on_gpu:
            return self._denoise_device(x, noises, cond, steps, denoiser)
        return self._denoise_cpu(x, noises, cond, steps, denoiser)

    def _host_cond(self, cond: Any) -> np.ndarray:
        return cond.value.numpy() if isinstance(cond, OrtValueCond) else cond

    def _run_bound(self, sess: Any, binding: Any, graph: str) -> None:
        try:
            sess.run_with_iobinding(binding)
        except Exception as e:
            raise _run_error(e, graph, None) from e

    def _denoise_cpu(self, x, noises, cond, steps, denoiser="denoiser") -> np.ndarray:
        sess = self._sessions[denoiser]
        x = np.ascontiguousarray(x, dtype=np.float32)
        noises = np.ascontiguousarray(noises, dtype=np.float32)
        steps = np.ascontiguousarray(steps, dtype=np.float32)
        B, n = x.shape[0], steps.shape[0]
        cond2 = np.ascontiguousarray(self._host_cond(cond), dtype=np.float32)
        cond2 = cond2.reshape(2, B, *cond2.shape[-2:])  # [2B, L, W] -> [2, B, L, W], no copy
        shape, f32 = list(x.shape), np.float32
        nz0, nz_stride = noises.ctypes.data, noises[0].nbytes
        st0, st_stride = steps.ctypes.data, steps[0].nbytes
        # Two output buffers: step 0 reads the caller's x (never written), step i writes bufs[i % 2].
        bufs = (_aligned_empty(x.shape), _aligned_empty(x.shape))
        b = sess.io_binding()
        b.bind_input(
            "cond", "cpu", 0, f32, list(cond2.shape), cond2.ctypes.data
        )  # the arrays above outlive the binding
        src = x.ctypes.data
        for i in range(n):
            b.bind_input("x", "cpu", 0, f32, shape, src)
            b.bind_input("noise", "cpu", 0, f32, shape, nz0 + i * nz_stride)
            b.bind_input("step", "cpu", 0, f32, [steps.shape[1]], st0 + i * st_stride)
            b.bind_output("x_prev", "cpu", 0, f32, shape, bufs[i % 2].ctypes.data)
            self._run_bound(sess, b, denoiser)
            src = bufs[i % 2].ctypes.data
        return bufs[(n - 1) % 2]

    def _denoise_device(self, x, noises, cond, steps, denoiser="denoiser") -> np.ndarray:
        sess, OrtValue, mem, dev = self._sessions[denoiser], self._ort.OrtValue, self._mem, self._device_id
        x = np.array(x, dtype=np.float32)  # a copy: in CPU memory ortvalue_from_numpy wraps it, and step 1 writes it
        B, n = x.shape[0], steps.shape[0]
        shape, f32 = list(x.shape), np.float32
        # One upload each: x, all n noises, all n step rows (rows padded to DEVICE_ALIGN-byte slots).
        nz_block, nz_stride = _aligned_rows(np.asarray(noises, dtype=np.float32), DEVICE_ALIGN)
        st_block, st_stride = _aligned_rows(np.asarray(steps, dtype=np.float32), DEVICE_ALIGN)
        nz = OrtValue.ortvalue_from_numpy(nz_block, mem, dev)
        st = OrtValue.ortvalue_from_numpy(st_block, mem, dev)
        xs = (OrtValue.ortvalue_from_numpy(x, mem, dev), OrtValue.ortvalue_from_shape_and_type(shape, f32, mem, dev))
        if isinstance(cond, OrtValueCond):
            if cond.images != B:
                raise InvalidArgumentError(f"cond was computed for {cond.images} images, x has {B}")
            cond_value = cond.value
        else:
            cond_value = OrtValue.ortvalue_from_numpy(np.ascontiguousarray(cond, dtype=np.float32), mem, dev)
        W = int(cond_value.shape()[-1])
        b = sess.io_binding()
        b.bind_input(
            "cond", mem, dev, f32, [2, B, shape[1], W], cond_value.data_ptr()
        )  # [2B, L, W] read as [2, B, L, W]
        for i in range(n):  # step i reads xs[i % 2] and writes the other
            b.bind_input("x", mem, dev, f32, shape, xs[i % 2].data_ptr())
            b.bind_input("noise", mem, dev, f32, shape, nz.data_ptr() + i * nz_stride)
            b.bind_input("step", mem, dev, f32, [steps.shape[1]], st.data_ptr() + i * st_stride)
            b.bind_output("x_prev", mem, dev, f32, shape, xs[(i + 1) % 2].data_ptr())
            self._run_bound(sess, b, denoiser)
        # The one download (the runs above synchronised their stream). In CPU memory numpy() is a view of a
        # buffer that dies with this frame, hence the copy (a few KB per image).
        return xs[n % 2].numpy().copy()

    def close(self) -> None:
        self._sessions.clear()


#: Phrases of onnxruntime's allocation failures (CPU arena, CUDA and TensorRT providers).
_OOM_PHRASES = (
    "failed to allocate memory",
    "bad_alloc",
    "out of memory",
    "cudaerrormemoryallocation",
    "cuda_error_out_of_memory",
)


def _run_error(e: Exception, graph: str, feeds: dict | None) -> Exception:
    """onnxruntime's exception for a failed run -> the far_sdk error that says what happened."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, MemoryError) or any(p in str(e).lower() for p in _OOM_PHRASES):
        rows = next((int(v.shape[0]) for v in (feeds or {}).values() if getattr(v, "ndim", 0)), None)
        at = f" at {rows} rows" if rows else ""
        return DeviceOutOfMemoryError(
            f"out of memory running graph {graph!r}{at}: generate fewer images per call "
            f"(max_batch=...) or free memory ({msg})"
        )
    return BundleError(f"onnxruntime failed running graph {graph!r}: {msg}")
