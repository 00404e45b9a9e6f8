"""The torch backend's fast path: the fused denoiser step, device-drawn noise, torch.compile, reduced
precision per call, and the non-finite check of the loop. CPU tests here; the same checks on a GPU sit
in the ``gpu``-marked class at the end (and in ``scripts/gpu_check.py --perf``'s smoke stage)."""

import numpy as np
import pytest
from conftest import ROOT, rel_err

torch = pytest.importorskip("torch")

import far_sdk  # noqa: E402
from far_sdk.backends.create import create_backend  # noqa: E402
from far_sdk.bundle.bundle import Bundle  # noqa: E402
from far_sdk.errors import NumericalError  # noqa: E402
from far_sdk.maths.diffusion import denoise_step_table  # noqa: E402
from far_sdk.maths.noise import SeededNoise  # noqa: E402

DEMO = ROOT / "engines" / "far-demo"
PLAN = dict(num_steps=4, inner_steps=[8, 8, 10, 12])
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def far_model(tiny_models):
    return tiny_models[0]


def _step_inputs(B=3, L=256, C=16, W=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, C, generator=g)
    noise = torch.randn(B, L, C, generator=g)
    cond = torch.randn(2, B, L, W, generator=g)
    return x, noise, cond


@pytest.mark.parametrize("row", [0, 17, 39])  # t = 999 (x0 amplified 2e4x), a middle step, the last (no noise)
def test_fused_step_equals_denoiser_graph(far_model, row):
    from training.graph_modules import DenoiserGraph, FusedDenoiserStep

    net = far_model.diffloss.net
    ref, fused = DenoiserGraph(net).eval(), FusedDenoiserStep(net).eval()
    x, noise, cond = _step_inputs()
    step = torch.from_numpy(denoise_step_table(40, 3.0, 0.9, None)[row])
    with torch.inference_mode():
        want = ref(x, noise, cond, step)
        temb = fused.time_table(step[:1], torch.float32)[0]
        got = fused(x, noise, cond, temb, step)
        # float64 copy of the same network: both fp32 results are within fp32 rounding of it
        net64 = DenoiserGraph(net).double()
        exact = net64(x.double(), noise.double(), cond.double(), step.double())
        DenoiserGraph(net).float()
    assert got.dtype == torch.float32
    scale = exact.abs().max().item()
    assert (got.double() - exact).abs().max().item() / scale < 1e-5
    assert (want.double() - exact).abs().max().item() / scale < 1e-5
    assert (got - want).abs().max().item() / scale < 1e-5


def test_fused_step_keeps_latents_fp32_under_bf16(far_model):
    import copy

    from training.graph_modules import DenoiserGraph, FusedDenoiserStep

    net16 = copy.deepcopy(far_model.diffloss.net).to(torch.bfloat16)
    fused = FusedDenoiserStep(net16).eval()
    x, noise, cond = _step_inputs(seed=1)
    step = torch.from_numpy(denoise_step_table(40, 3.0, 1.0, None)[20])
    with torch.inference_mode():
        got = fused(x, noise, cond.bfloat16(), fused.time_table(step[:1], torch.bfloat16)[0], step)
        want = DenoiserGraph(far_model.diffloss.net)(x, noise, cond.bfloat16().float(), step)
    assert got.dtype == torch.float32
    # one bf16 network evaluation: ~1e-2 relative on eps, much less on x_prev (dominated by the fp32 terms)
    assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < 2e-2


def test_device_noise_equals_uploaded_numpy_noise():
    """Seeded noise drawn by torch ops (the GPU path's code) vs the same stream drawn by NumPy and uploaded."""
    with far_sdk.Generator(DEMO, backend="torch", device="cpu") as gen:
        a = gen.generate([3, 8], seed=21, output_type="latent", **PLAN).latents
        src = SeededNoise.from_seed(21, 2)
        b = gen.generate([3, 8], noise=lambda shape: src(shape), output_type="latent", **PLAN).latents
        assert src.position == sum(n + 1 for n in PLAN["inner_steps"]) * 256 * 4  # the whole stream was consumed
        assert rel_err(a, b) < 1e-4


def test_torch_and_onnxruntime_agree_on_seeded_noise():
    kw = dict(seed=4, output_type="latent", **PLAN)
    with (
        far_sdk.Generator(DEMO, backend="torch", device="cpu") as ga,
        far_sdk.Generator(DEMO, backend="onnxruntime") as gb,
    ):
        a, b = ga.generate([0, 5], **kw).latents, gb.generate([0, 5], **kw).latents
    assert rel_err(a, b) < 1e-4


@pytest.mark.slow
def test_compiled_step_equals_eager_on_cpu():
    """torch.compile (Inductor's CPU backend) computes the same denoiser step as eager PyTorch."""
    eager = create_backend(Bundle.load(DEMO), "torch", device="cpu", compile=False)
    comp = create_backend(Bundle.load(DEMO), "torch", device="cpu", compile=True)
    assert comp.describe()["compiled"] is True
    rng = np.random.default_rng(3)
    B, L, C = 2, 256, 4
    x = rng.standard_normal((B, L, C)).astype(np.float32)
    noises = rng.standard_normal((3, B, L, C)).astype(np.float32)
    cond = eager.transformer(
        rng.standard_normal((2 * B, L, C)).astype(np.float32), {"class_ids": np.array([1, 2, 10, 10])}, 3
    )
    steps = denoise_step_table(50, 3.0, 1.0, 4.0)[20:23]
    a, b = comp.denoise(x, noises, cond, steps), eager.denoise(x, noises, cond, steps)
    assert rel_err(a, b) < 1e-5
    # and the fused, device-noise path through a whole (short) generation
    kw = dict(seed=2, output_type="latent", num_steps=2, inner_steps=[10, 12])
    with far_sdk.Generator(DEMO, backend=comp) as g1, far_sdk.Generator(DEMO, backend=eager) as g2:
        assert rel_err(g1.generate([6], **kw).latents, g2.generate([6], **kw).latents) < 1e-4


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_per_call_within_bounds(precision):
    """One transformer call and one denoiser step against fp32 (bounds for an 8- / 11-bit mantissa)."""
    b32 = create_backend(Bundle.load(DEMO), "torch", device="cpu")
    blo = create_backend(Bundle.load(DEMO), "torch", device="cpu", precision=precision)
    rng = np.random.default_rng(5)
    B, L, C = 2, 256, 4
    tokens = rng.standard_normal((2 * B, L, C)).astype(np.float32)
    ids = {"class_ids": np.array([4, 9, 10, 10])}
    c32 = b32.transformer(tokens, ids, 5).float().numpy()
    clo = blo.transformer(tokens, ids, 5).float().numpy()
    tol = {"bf16": 2e-2, "fp16": 3e-3}[precision]
    assert np.linalg.norm(clo - c32) / np.linalg.norm(c32) < tol
    x = rng.standard_normal((B, L, C)).astype(np.float32)
    noise = rng.standard_normal((1, B, L, C)).astype(np.float32)
    steps = denoise_step_table(50, 3.0, 1.0, 4.0)[25:26]
    x32, xlo = b32.denoise(x, noise, c32, steps), blo.denoise(x, noise, c32, steps)
    assert xlo.dtype == np.float32
    assert np.linalg.norm(xlo - x32) / np.linalg.norm(x32) < tol


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_nan_noise_is_a_numerical_error_naming_the_draw(backend):
    with far_sdk.Generator(DEMO, backend=backend, **({"device": "cpu"} if backend == "torch" else {})) as gen:
        src = SeededNoise.from_seed(0, 1)
        calls = {"n": 0}

        def noise(shape):
            calls["n"] += 1
            z = src(shape)
            if calls["n"] == 5:  # an inner draw of outer step 0
                z[0, 7, 1] = np.nan
            return z

        with pytest.raises(NumericalError, match="noise draw 4"):
            gen.generate([2], noise=noise, output_type="latent", **PLAN)


def test_diverging_latents_are_a_numerical_error_naming_the_outer_step():
    """Finite but absurd noise (1e37) overflows inside the torch sampler: the loop's check names the step."""
    with far_sdk.Generator(DEMO, backend="torch", device="cpu") as gen:
        src = SeededNoise.from_seed(0, 1)
        calls = {"n": 0}

        def noise(shape):
            calls["n"] += 1
            z = src(shape)
            return z * np.float32(1e37) if calls["n"] >= 9 + 1 else z  # from outer step 1's x_T on

        with pytest.raises(NumericalError, match="outer step 1") as e:
            gen.generate([2], noise=noise, output_type="latent", **PLAN)
        assert e.value.step == 1


def test_non_finite_step_output_of_any_backend_is_caught():
    """The loop checks every outer step's sample whatever the backend computes (here ONNX Runtime whose
    denoiser output is poisoned from outer step 2 on)."""
    from far_sdk.backends.onnxruntime import OnnxRuntimeBackend

    class Poisoned(OnnxRuntimeBackend):
        calls = 0

        def denoise(self, x, noises, cond, steps):
            Poisoned.calls += 1
            out = super().denoise(x, noises, cond, steps)
            if Poisoned.calls >= 3:
                out = out.copy()
                out[0, 5, 2] = np.inf
            return out

    with far_sdk.Generator(DEMO, backend=Poisoned(far_sdk.Bundle.load(DEMO))) as gen:
        with pytest.raises(NumericalError, match="outer step 2") as e:
            gen.generate([2], seed=0, output_type="latent", **PLAN)
        assert e.value.step == 2


# ---- GPU ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
class TestFastPathCuda:
    @pytest.fixture(scope="class")
    def cpu_latents(self):
        return (
            far_sdk.Generator(DEMO, backend="torch", device="cpu")
            .generate([1, 7, 3], seed=3, output_type="latent", **PLAN)
            .latents
        )

    def test_compiled_graphs_fp32_match_cpu(self, cpu_latents):
        with far_sdk.Generator(
            DEMO, backend="torch", device="cuda", precision="fp32", compile=True, cuda_graphs=True
        ) as gen:
            d = gen.backend.describe()
            assert d["compiled"] and d["cuda_graphs"]
            a = gen.generate([1, 7, 3], seed=3, output_type="latent", **PLAN).latents
            assert rel_err(a, cpu_latents) < 1e-3
            np.testing.assert_array_equal(a, gen.generate([1, 7, 3], seed=3, output_type="latent", **PLAN).latents)

    def test_device_noise_equals_uploaded_numpy_noise(self):
        with far_sdk.Generator(DEMO, backend="torch", device="cuda", precision="fp32") as gen:
            a = gen.generate([2, 5], seed=8, output_type="latent", **PLAN).latents
            src = SeededNoise.from_seed(8, 2)
            b = gen.generate([2, 5], noise=lambda shape: src(shape), output_type="latent", **PLAN).latents
            assert rel_err(a, b) < 1e-4

    @pytest.mark.parametrize("precision", ["bf16", "fp16"])
    def test_reduced_precision_per_call(self, precision):
        b32 = create_backend(Bundle.load(DEMO), "torch", device="cuda", compile=False)
        blo = create_backend(Bundle.load(DEMO), "torch", device="cuda", precision=precision, compile=False)
        rng = np.random.default_rng(5)
        tokens = rng.standard_normal((4, 256, 4)).astype(np.float32)
        ids = {"class_ids": np.array([4, 9, 10, 10])}
        c32 = b32.transformer(tokens, ids, 5).float().cpu().numpy()
        clo = blo.transformer(tokens, ids, 5).float().cpu().numpy()
        assert np.linalg.norm(clo - c32) / np.linalg.norm(c32) < {"bf16": 2e-2, "fp16": 3e-3}[precision]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_preview_shows_what_each_step_hands_on(backend):
    """preview=True decodes the low-passed latents the next step sees (coarse to fine), "raw" the full estimate."""
    from far_sdk.images import to_uint8
    from far_sdk.maths.filters import low_pass

    with far_sdk.Generator(DEMO, backend=backend, **({"device": "cpu"} if backend == "torch" else {})) as gen:
        for mode in (True, "raw"):
            infos = []
            out = gen.generate([4], seed=1, preview=mode, on_step=infos.append, output_type="latent", **PLAN)
            plan = out.plan
            assert [i.step for i in infos] == list(range(plan.num_steps))
            for i in infos:
                after = plan.filter_after[i.step]
                want = i.latents if after is None else low_pass(i.latents, after, plan.filter)
                np.testing.assert_allclose(i.handed_on, want, rtol=1e-5, atol=1e-5)
                shown = i.handed_on if mode is True else i.latents
                np.testing.assert_array_equal(np.asarray(i.preview[0]), to_uint8(gen.decode(shown))[0])
            np.testing.assert_array_equal(infos[-1].latents, out.latents)
        with pytest.raises(far_sdk.errors.InvalidArgumentError, match="preview"):
            gen.generate([4], preview="blurry")


def test_seed_none_draws_a_fresh_seed_that_reproduces_the_images():
    with far_sdk.Generator(DEMO, backend="onnxruntime") as gen:
        kw = dict(output_type="latent", num_steps=2, inner_steps=[3, 4])
        a, b = gen.generate([1, 2], seed=None, **kw), gen.generate([1, 2], seed=None, **kw)
        assert a.seeds != b.seeds and a.seeds[1] == a.seeds[0] + 1 and a.seeds[1] < 2**63
        assert not np.array_equal(a.latents, b.latents)
        np.testing.assert_array_equal(gen.generate([1, 2], seed=a.seeds[0], **kw).latents, a.latents)


def test_onnxruntime_out_of_memory_is_reported_as_such():
    from far_sdk.backends.onnxruntime import _run_error
    from far_sdk.errors import BundleError, DeviceOutOfMemoryError

    oom = RuntimeError(
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running MatMul node. "
        "Name:'/MatMul' Status Message: Failed to allocate memory for requested buffer of size 17179869184"
    )
    e = _run_error(oom, "denoiser", {"x": np.zeros((64, 256, 16), np.float32)})
    assert isinstance(e, DeviceOutOfMemoryError) and "max_batch" in str(e) and "64 rows" in str(e)
    other = _run_error(
        RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions"), "transformer", None
    )
    assert type(other) is BundleError and "failed running graph 'transformer'" in str(other)
