"""The fast path's limits, on the CPU: Generator.warmup on every backend, out of memory in any stage as
DeviceOutOfMemoryError (simulated allocation failures), the VAE decoder falling back to smaller chunks, a compiler
failure reported as a CompileError (not a capture failure), the captured-graph cache evicting least recently used
(a stand-in torch.cuda), and the official-way eager baseline under fp16 autocast."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT

torch = pytest.importorskip("torch")

import far_sdk  # noqa: E402
from far_sdk.backends.torch.graphs import StageGraphs  # noqa: E402
from far_sdk.errors import CompileError, DeviceOutOfMemoryError, InvalidArgumentError  # noqa: E402

DEMO = ROOT / "engines" / "far-demo"
TINY_PLAN = dict(num_steps=2, inner_steps=2)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "torch-eager"])
def test_warmup_runs_each_batch_size_and_changes_no_image(backend):
    with (
        far_sdk.Generator(DEMO, backend=backend, device="cpu") as warm,
        far_sdk.Generator(DEMO, backend=backend) as cold,
    ):
        seconds = warm.warmup(batch_sizes=[1, 2], **TINY_PLAN)
        assert sorted(seconds) == [1, 2] and all(s > 0 for s in seconds.values())
        a = warm.generate([3, 4], seed=5, output_type="latent", **TINY_PLAN).latents
        b = cold.generate([3, 4], seed=5, output_type="latent", **TINY_PLAN).latents
        np.testing.assert_array_equal(a, b)


def test_warmup_rejects_bad_arguments():
    with far_sdk.Generator(DEMO, backend="onnxruntime", device="cpu") as gen:
        for bad in ([], [0], [1.5], [True]):
            with pytest.raises(InvalidArgumentError, match="batch_sizes must be positive integers"):
                gen.warmup(bad)
        with pytest.raises(InvalidArgumentError, match="warmup\\(\\) chooses seed itself"):
            gen.warmup([1], seed=3)


def _oom(*_a, **_k):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_in_the_inner_loop_is_typed():
    with far_sdk.Generator(DEMO, backend="torch", device="cpu") as gen:
        fused, seeded, _host = gen.backend._steps["denoiser"]
        gen.backend._steps["denoiser"] = (fused, seeded, _oom)
        x = np.zeros((1, 256, 4), np.float32)
        cond = np.zeros((2, 1, 256, 128), np.float32)
        from far_sdk.maths.diffusion import denoise_step_table

        with pytest.raises(DeviceOutOfMemoryError, match="out of memory denoising 1 images per call.*max_batch"):
            gen.backend.denoise(x, np.zeros((2, 1, 256, 4), np.float32), cond, denoise_step_table(2, 3.0, 1.0))


def test_decode_falls_back_to_smaller_chunks_then_reports_one_image_out_of_memory():
    with far_sdk.Generator(DEMO, backend="torch", device="cpu") as gen:
        be = gen.backend
        latents = np.random.default_rng(0).standard_normal((5, 4, 16, 16)).astype(np.float32)
        whole = be.decode(latents)
        decoder, sizes = be._graphs["vae_decoder"], []

        def two_at_most(z):  # a GPU with room for two images
            sizes.append(z.shape[0])
            return decoder(z) if z.shape[0] <= 2 else _oom()

        be._graphs["vae_decoder"] = two_at_most
        np.testing.assert_allclose(be.decode(latents), whole, rtol=0, atol=1e-5)
        assert sizes == [5, 2, 2, 1]  # the whole batch fails, then halves
        be._graphs["vae_decoder"] = _oom
        with pytest.raises(DeviceOutOfMemoryError, match="decoding one image"):
            be.decode(latents)


def test_a_compiler_failure_is_a_compile_error():
    class BackendCompilerFailed(RuntimeError):
        pass

    BackendCompilerFailed.__module__ = "torch._dynamo.exc"  # where torch.compile's failures come from

    def body():
        raise BackendCompilerFailed("backend='inductor' raised: CppCompileError: C++ compile error")

    stages = StageGraphs(torch, torch.device("cpu"), 4, enabled=False)
    with pytest.raises(CompileError, match=r"torch.compile failed for stage \('loop', 1\).*compile=False"):
        stages.run(("loop", 1), body)
    with pytest.raises(ValueError, match="not a compiler"):  # other errors pass through untouched
        stages.run(("loop", 1), lambda: (_ for _ in ()).throw(ValueError("not a compiler problem")))


def test_captured_graphs_are_evicted_least_recently_used():
    class Graph:
        replays = 0

        def replay(self):
            Graph.replays += 1

    ctx = lambda *a, **k: contextlib.nullcontext()  # noqa: E731
    stream = SimpleNamespace(wait_stream=lambda s: None)
    cuda = SimpleNamespace(
        device=ctx,
        graph_pool_handle=lambda: None,
        Stream=lambda d: stream,
        CUDAGraph=Graph,
        current_stream=lambda d: stream,
        stream=ctx,
        graph=ctx,
        synchronize=lambda d: None,
    )
    stages = StageGraphs(SimpleNamespace(cuda=cuda), "cuda:0", 2, enabled=True)
    for key in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" arrives
        stages.run(key, lambda: None)
    assert list(stages._graphs) == ["a", "c"] and stages.captures == 3 and Graph.replays == 4


def test_official_eager_baseline_runs_under_fp16_autocast():
    kw = dict(seed=1, num_steps=1, inner_steps=2, output_type="latent")
    with far_sdk.Generator(DEMO, backend="torch-eager", device="cpu") as gen:
        d = gen.backend.describe()
        assert d["precision"] == "fp32" and d["autocast"] is None  # "auto": fp32 on the CPU, fp16 on CUDA
        fp32 = gen.generate([1], **kw).latents
    with far_sdk.Generator(DEMO, backend="torch-eager", device="cpu", precision="fp16") as gen:
        assert gen.backend.describe()["autocast"] == "float16"
        fp16 = gen.generate([1], **kw).latents
    assert np.isfinite(fp16).all() and np.abs(fp16 - fp32).max() > 0  # autocast really changed the arithmetic
    with pytest.raises(InvalidArgumentError, match="torch-eager precision must be"):
        far_sdk.Generator(DEMO, backend="torch-eager", device="cpu", precision="bf16")


def test_adaln_modulation_tables_in_chunks_give_the_same_steps(monkeypatch):
    """The adaLN modulations of k steps are one GEMM before those steps (far_sdk.backends.torch.fast.table_steps):
    any chunking computes the same inner loop, and the budget picks a whole outer step at FAR-L batch 1 but one
    step at a time at batch 64."""
    from far_sdk.backends.torch import fast
    from far_sdk.maths.diffusion import denoise_step_table

    K = (3 * 3 + 2) * 1024  # FAR-L's diffusion MLP: depth 3, width 1024
    assert fast.table_steps(70, 2 * 256, K, 2) == 46 and fast.table_steps(10, 512, K, 2) == 10
    assert fast.table_steps(100, 2 * 64 * 256, K, 2) == 1
    rng = np.random.default_rng(4)
    x, noises = rng.standard_normal((2, 256, 4), np.float32), rng.standard_normal((5, 2, 256, 4), np.float32)
    cond = rng.standard_normal((2, 2, 256, 128), np.float32)
    steps = denoise_step_table(5, 3.0, 1.0)
    with far_sdk.Generator(DEMO, backend="torch", device="cpu") as gen:
        whole = gen.backend.denoise(x, noises, cond, steps)  # one table of 5 steps
        monkeypatch.setattr(fast, "TABLE_BYTES", 2 * 2 * 512 * 11 * 128 * 4)  # two steps per table
        assert fast.table_steps(5, 2 * 2 * 256, 11 * 128, 4) == 2
        chunked = gen.backend.denoise(x, noises, cond, steps)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5 * float(np.abs(whole).max()))


def test_bf16_vae_decoder_falls_back_to_fp32_when_compiling_fails():
    from far_sdk.backends.torch.fast import FastDecoder

    class CompileFailed(RuntimeError):
        pass

    CompileFailed.__module__ = "torch._inductor.exc"
    dec = FastDecoder(torch, torch.nn.Conv2d(4, 3, 3, padding=1))
    z = torch.randn(2, 4, 8, 8)
    seen = []
    dec._module = lambda t: seen.append((t.dtype, t.is_contiguous(memory_format=torch.channels_last))) or t[:, :3]
    assert dec(z).dtype == torch.float32 and seen == [(torch.bfloat16, True)]  # bf16, channels-last in; fp32 out
    dec._module = lambda t: (_ for _ in ()).throw(CompileFailed("C++ compile error"))
    assert dec(z) is None and dec.failed and dec(z) is None  # the caller decodes in fp32 from then on
