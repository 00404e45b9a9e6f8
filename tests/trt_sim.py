"""Test support for the TensorRT tests: a simulated tensorrt + cuda-python whose "engines" run the
bundle's ONNX graphs in onnxruntime on NumPy "device memory", and a bundle without real graphs for
the engine cache (which never parses them). Used by tests/test_trt.py and tests/test_trt_cache.py."""

from __future__ import annotations

import base64
import ctypes
import enum
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import far_sdk
from far_sdk.backends.tensorrt import cache as tc
from far_sdk.bundle.bundle import Bundle, write_manifest
from far_sdk.bundle.graphs import GRAPH_NAMES, graph_specs

#: The machine the simulator claims to be (and the one the cache tests build keys for).
ENV = tc.BuildEnv("10.8.0.43", "NVIDIA H100 80GB HBM3", "9.0")


# ---- a bundle without real graphs (create_backend and the cache never parse them) -----------------------


def write_fake_bundle(d: Path) -> Bundle:
    """A verified bundle in ``d`` whose graph files are well-formed protobuf holding no graph."""
    d.mkdir()
    specs = graph_specs(seq_len=4, token_channels=2, mlp_width=8, grid_size=2, image_size=32)
    graphs = {}
    for i, g in enumerate(GRAPH_NAMES):
        # a ModelProto holding only ir_version (field 1) and a doc_string (field 6): well-formed protobuf, no graph
        doc = b"not really onnx %d" % i
        (d / f"{g}.onnx").write_bytes(bytes([0x08, 9, 0x32, len(doc)]) + doc)
        graphs[g] = {"file": f"{g}.onnx", "opset": 17, **specs[g].to_dict(), "validation": None}
    model = {
        "encoder_embed_dim": 8,
        "encoder_depth": 1,
        "encoder_num_heads": 2,
        "decoder_embed_dim": 8,
        "decoder_depth": 1,
        "decoder_num_heads": 2,
        "mlp_ratio": 4.0,
        "token_channels": 2,
        "grid_size": 2,
        "buffer_size": 4,
        "num_classes": 10,
        "diffloss_d": 1,
        "diffloss_w": 8,
        "mask": False,
        "label_drop_prob": 0.1,
        "attn_dropout": 0.1,
        "proj_dropout": 0.1,
        "diffusion_batch_mul": 1,
        "num_sampling_steps": 100,
    }
    vae = {
        "embed_dim": 2,
        "z_channels": 2,
        "ch": 8,
        "ch_mult": [1, 1, 1, 1, 1],
        "num_res_blocks": 1,
        "in_channels": 3,
        "out_ch": 3,
        "resolution": 32,
        "attn_resolutions": [],
        "dropout": 0.0,
        "gn_groups": 4,
        "eps": 1e-6,
    }
    write_manifest(
        d,
        {
            "name": "fake",
            "created_by": {"far_sdk": far_sdk.__version__},
            "model": model,
            "vae": vae,
            "latent_scale": 0.2325,
            "null_class_id": 10,
            "mlp_width": 8,
            "image_size": 32,
            "sampling_modes": ["nomask", "mask"],
            "defaults": {},
            "graphs": graphs,
            "source": {"kind": "unspecified"},
        },
    )
    return Bundle.load(d)


# ---- a simulated tensorrt + cuda-python ------------------------------------------------------------------


class CudaErr(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorStreamCaptureUnsupported = 900


OK = CudaErr.cudaSuccess


class FakeStream:
    def __int__(self):
        return 77


class FakeCuda:
    """Device memory in NumPy (fresh allocations read as NaN), synchronous copies, stream capture
    recording enqueued work for replay. Only what the backend and the builder call."""

    cudaStreamNonBlocking = 1
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeGlobal=0, cudaStreamCaptureModeThreadLocal=1)

    def __init__(self, fail_capture=False):
        self.mem: dict[int, np.ndarray] = {}
        self.next, self.capture, self.fail_capture = 1 << 32, None, fail_capture
        self.syncs = self.launches = self.captures = 0

    def view(self, ptr, n):
        for base, buf in self.mem.items():
            if base <= ptr and ptr + n <= base + buf.size:
                return buf[ptr - base : ptr - base + n]
        raise AssertionError(f"access of {n} bytes at {ptr:#x} outside every allocation")

    def cudaGetDeviceCount(self):
        return OK, 1

    def cudaSetDevice(self, i):
        return (OK,)

    def cudaGetDeviceProperties(self, i):
        return OK, SimpleNamespace(name=ENV.gpu.encode() + b"\0\0garbage", major=9, minor=0)

    def cudaMalloc(self, n):
        assert self.capture is None
        base, self.next = self.next, self.next + (-(-n // 4096)) * 4096
        self.mem[base] = np.full(n, 0xFF, dtype=np.uint8)
        return OK, base

    def cudaFree(self, ptr):
        del self.mem[ptr]
        return (OK,)

    def cudaStreamCreateWithFlags(self, flags):
        return OK, FakeStream()

    cudaStreamCreate = lambda self: self.cudaStreamCreateWithFlags(0)  # noqa: E731

    def cudaStreamDestroy(self, s):
        return (OK,)

    def cudaStreamSynchronize(self, s):
        assert self.capture is None
        self.syncs += 1
        return (OK,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        assert self.capture is None, "copies from pageable memory cannot be captured"
        if kind == 1:
            self.view(dst, n)[:] = np.frombuffer(ctypes.string_at(src, n), dtype=np.uint8)
        else:
            ctypes.memmove(dst, self.view(src, n).ctypes.data, n)
        return (OK,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        assert kind == 1 and width <= dpitch and width <= spitch
        for row in range(height):
            self.cudaMemcpyAsync(dst + row * dpitch, src + row * spitch, width, kind, stream)
        return (OK,)

    def cudaStreamBeginCapture(self, stream, mode):
        if self.fail_capture:
            return (CudaErr.cudaErrorStreamCaptureUnsupported,)
        self.capture = []
        return (OK,)

    def cudaStreamEndCapture(self, stream):
        ops, self.capture = self.capture, None
        self.captures += 1
        return OK, SimpleNamespace(ops=ops)

    def cudaGraphInstantiate(self, graph, flags):
        return OK, SimpleNamespace(ops=list(graph.ops))

    def cudaGraphLaunch(self, exe, stream):
        self.launches += 1
        for op in exe.ops:
            op()
        return (OK,)

    def cudaGraphExecDestroy(self, exe):
        return (OK,)

    def cudaGraphDestroy(self, g):
        return (OK,)

    def cudaGetLastError(self):
        return (OK,)


def make_fake_trt(cuda: FakeCuda, *, overflow_vae_fp16=False):
    """A tensorrt stand-in: the 'plan' is JSON naming the ONNX file, its profile and flags; the
    engine runs the ONNX graph in onnxruntime on the fake device memory."""
    import onnxruntime as ort

    stats = SimpleNamespace(builds=[], deserialized=0)
    NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0})
    dtypes = {"tensor(float)": np.float32, "tensor(int64)": np.int64}

    class ILogger:
        Severity = enum.Enum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")

        def __init__(self):
            pass

    class Context:
        def __init__(self, engine):
            self.e, self.shapes, self.addrs, self.dirty = engine, {}, {}, True

        def set_input_shape(self, name, shape):
            lo, _, hi = self.e.plan["profile"][name]
            if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
            self.dirty |= self.shapes.get(name) != tuple(shape)
            self.shapes[name] = tuple(shape)
            return True

        def _shape(self, info):
            sym = {
                d: self.shapes[i.name][k]
                for i in self.e.inputs
                for k, d in enumerate(i.shape)
                if isinstance(d, str) and i.name in self.shapes
            }
            return tuple(sym[d] if isinstance(d, str) else d for d in info.shape)

        def get_tensor_shape(self, name):
            return self._shape(next(o for o in self.e.inputs + self.e.outputs if o.name == name))

        def set_tensor_address(self, name, ptr):
            assert ptr % 256 == 0, f"{name} at {ptr:#x} is not 256-byte aligned"
            self.addrs[name] = ptr
            return True

        def execute_async_v3(self, stream):
            if cuda.capture is not None and self.dirty:
                return False  # like TensorRT: the first enqueue after a shape change cannot be captured
            io = [(i, self._shape(i), self.addrs[i.name]) for i in self.e.inputs + self.e.outputs]
            op = lambda: self._run(io)  # noqa: E731 - addresses and shapes as at enqueue time
            if cuda.capture is not None:
                cuda.capture.append(op)
            else:
                self.dirty = False
                op()
            return True

        def _run(self, io):
            n_in = len(self.e.inputs)
            feeds = {}
            for info, shape, ptr in io[:n_in]:
                dt = np.dtype(dtypes[info.type])
                feeds[info.name] = cuda.view(ptr, int(np.prod(shape)) * dt.itemsize).view(dt).reshape(shape).copy()
            outs = self.e.session.run([o.name for o in self.e.outputs], feeds)
            for (_info, shape, ptr), out in zip(io[n_in:], outs):
                if (
                    overflow_vae_fp16 and self.e.plan["graph"] == "vae_decoder" and 10 in self.e.plan["casts_to"]
                ):  # fp16
                    out = np.full_like(out, np.inf)
                assert out.shape == shape
                cuda.view(ptr, out.nbytes)[:] = np.ascontiguousarray(out).view(np.uint8).reshape(-1)

    class Engine:
        def __init__(self, plan):
            self.plan = plan
            model = base64.b64decode(plan["model"])  # the graph as parsed (a mixed-precision copy is gone by now)
            self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            self.inputs, self.outputs = self.session.get_inputs(), self.session.get_outputs()
            self.num_io_tensors = len(self.inputs) + len(self.outputs)
            self._by_name = {t.name: t for t in self.inputs + self.outputs}

        def get_tensor_name(self, i):
            return (self.inputs + self.outputs)[i].name

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if any(i.name == name for i in self.inputs) else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return dtypes[self._by_name[name].type]

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            assert isinstance(logger, ILogger)

        def deserialize_cuda_engine(self, data):
            stats.deserialized += 1
            try:
                return Engine(json.loads(bytes(data)))
            except ValueError:
                return None  # like TensorRT for a foreign plan

    class Cache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+"

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache, self.builder_optimization_level = {"TF32"}, [], None, None

        set_flag = lambda self, f: self.flags.add(f)  # noqa: E731
        clear_flag = lambda self, f: self.flags.discard(f)  # noqa: E731

        def set_memory_pool_limit(self, pool, size):
            self.workspace = size

        def add_optimization_profile(self, p):
            self.profiles.append(p)
            return 0

        create_timing_cache = lambda self, data: Cache(data)  # noqa: E731

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        get_timing_cache = lambda self: self.cache  # noqa: E731

    class Network:
        onnx = None

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            self.network.onnx = path
            return True

    class Profile(dict):
        def set_shape(self, name, lo, opt, hi):
            self[name] = [list(lo), list(opt), list(hi)]

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            net = Network()
            net.strongly_typed = bool(flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
            return net

        create_builder_config = lambda self: Config()  # noqa: E731
        create_optimization_profile = lambda self: Profile()  # noqa: E731

        def build_serialized_network(self, network, config):
            import onnx

            model = onnx.load(network.onnx)  # external weights resolve beside it, as TensorRT's parser does
            graph = Path(network.onnx).stem.split("-")[0]
            plan = {
                "graph": graph,
                "onnx": network.onnx,
                "model": base64.b64encode(model.SerializeToString()).decode(),
                "strongly_typed": network.strongly_typed,
                "casts_to": sorted({a.i for n in model.graph.node if n.op_type == "Cast" for a in n.attribute}),
                "profile": config.profiles[0],
                "flags": sorted(config.flags),
                "opt_level": config.builder_optimization_level,
                "timing_cache_in": config.cache.data.decode(),
            }
            stats.builds.append({k: v for k, v in plan.items() if k != "model"})
            return json.dumps(plan).encode()

    trt = SimpleNamespace(
        __version__=ENV.tensorrt,
        NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag,
        ILogger=ILogger,
        Runtime=Runtime,
        Builder=Builder,
        OnnxParser=OnnxParser,
        TensorIOMode=enum.Enum("TensorIOMode", "INPUT OUTPUT"),
        nptype=lambda dt: dt,
        BuilderFlag=SimpleNamespace(FP16="FP16", BF16="BF16", TF32="TF32"),
        MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
    )
    return trt, stats


def install(monkeypatch, **opts) -> SimpleNamespace:
    """Patch a fresh simulated tensorrt + cuda-python into the TensorRT backend and builder.
    ``fail_capture``: CUDA graph capture fails; ``cuda_class``: a FakeCuda subclass (e.g. older bindings); other
    options go to :func:`make_fake_trt`."""
    import os
    import tempfile

    import export.trt_build as trt_build
    import far_sdk.backends.tensorrt.backend as trt_backend
    import far_sdk.backends.tensorrt.engine as trt_engine

    if not os.environ.get("FAR_SDK_CACHE", "").startswith(tempfile.gettempdir()):  # engine caches: never in ~/.cache
        monkeypatch.setenv("FAR_SDK_CACHE", tempfile.mkdtemp(prefix="far-sim-cache-"))
    cuda = opts.pop("cuda_class", FakeCuda)(fail_capture=opts.pop("fail_capture", False))
    trt, stats = make_fake_trt(cuda, **opts)
    monkeypatch.setattr(trt_backend, "import_runtime", lambda: (trt, cuda))
    monkeypatch.setattr(trt_build, "import_runtime", lambda: (trt, cuda))
    monkeypatch.setattr(trt_engine, "_TRT_LOGGER", None)  # TensorRT keeps the first logger: a fresh one per simulator
    return SimpleNamespace(cuda=cuda, trt=trt, stats=stats)
