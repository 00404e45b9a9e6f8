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
    """The plan of these :class:`far_sdk.SamplingOptions` fields over the built-in defaults (far_sdk.options.resolve_plan)."""
    from far_sdk.options import SamplingOptions, resolve_plan

    return resolve_plan(given=SamplingOptions(**options))
