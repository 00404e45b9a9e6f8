from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
OFFICIAL_TINY = FIXTURES / "official-tiny"


@pytest.fixture(scope="session")
def official_ref():
    """The official code's sampler trace (tests/fixtures/official-tiny/reference.npz)."""
    return dict(np.load(OFFICIAL_TINY / "reference.npz"))


@pytest.fixture(scope="session")
def official_tiny_model():
    torch = pytest.importorskip("torch")  # noqa: F841
    from training import load_official_checkpoint

    return load_official_checkpoint(OFFICIAL_TINY / "checkpoint-last.pth", config="far_parity_tiny")


def rel_err(a, b) -> float:
    """max |a - b| / max |b| — the comparison the fixture README prescribes for its large latents."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs, no dashboard) for the whole session: tests/test_serve.py and
    tests/test_dataset.py share it, so it starts once."""
    import os

    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def plan_of(**options):
    """The plan of these :class:`far_sdk.SamplingOptions` fields over the built-in defaults
    (far_sdk.options.resolve_plan)."""
    from far_sdk.options import SamplingOptions, resolve_plan

    return resolve_plan(given=SamplingOptions(**options))


@pytest.fixture(scope="session")
def tiny_models():
    """(FAR, AutoencoderKL): random far_tiny and kl16-tiny (seed 0), the models every backend test compares against."""
    pytest.importorskip("torch")
    from export.random_bundle import random_models

    return random_models("far_tiny", "kl16-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_models, tmp_path_factory):
    """Those models exported once per session (name "tiny", an id2label table, the exporter's validation skipped: it
    has tests of its own). Read-only: a test that changes a bundle copies it first."""
    pytest.importorskip("onnxruntime")
    from export.random_bundle import random_bundle

    labels = {i: f"digit {i}" for i in range(10)}
    return random_bundle(
        tmp_path_factory.mktemp("tiny") / "tiny",
        "far_tiny",
        "kl16-tiny",
        seed=0,
        name="tiny",
        validate=False,
        id2label=labels,
    )
