"""The examples' own logic (examples/ is not a package: each module is loaded from its file)."""

import importlib.util
import sys

import pytest
from conftest import ROOT


def _example(name: str):
    sys.path.insert(0, str(ROOT / "examples"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_evaluate_demo_caches_its_classifier(tmp_path):
    """A rerun of examples/evaluate_demo.py loads the classifier instead of training it again."""
    torch = pytest.importorskip("torch")
    ev = _example("evaluate_demo")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 32, 32, generator=g) * 2 - 1, torch.arange(32) % 10
    a, cached_a = ev.cached_classifier(x, y, tmp_path, epochs=1)
    b, cached_b = ev.cached_classifier(x, y, tmp_path, epochs=1)
    c, cached_c = ev.cached_classifier(x, y, tmp_path, epochs=2)  # another recipe: trained again
    assert (cached_a, cached_b, cached_c) == (False, True, False) and len(list(tmp_path.glob("digitnet-*.pt"))) == 2
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)
    rows = [
        {"setting": "ref", "inner_steps_total": 700, "accuracy": 0.99, "frechet_distance": 3.0},
        {"setting": "ok", "inner_steps_total": 175, "accuracy": 0.98, "frechet_distance": 3.4},
        {"setting": "slow", "inner_steps_total": 176, "accuracy": 1.0, "frechet_distance": 2.0},
        {"setting": "bad", "inner_steps_total": 50, "accuracy": 0.97, "frechet_distance": 3.0},
    ]
    assert [c["all_ok"] for c in ev.fast_setting_checks(rows)] == [True, False, False]
