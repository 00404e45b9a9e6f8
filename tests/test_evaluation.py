"""``far eval``: torch-fidelity's FID against an independent float64 computation (scipy's sqrtm), and the
whole command on a locally built InceptionV3 weight file (random weights: the plumbing, not the numbers)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
scipy_linalg = pytest.importorskip("scipy.linalg")

from conftest import ROOT  # noqa: E402

from far_sdk.cli.main import main  # noqa: E402
from far_sdk.errors import EXIT_INPUT  # noqa: E402
from far_sdk.scale.evaluation import (
    INCEPTION_WEIGHTS_URL,
    InceptionWeightsError,
    fid_from_features,
    import_torch_fidelity,
    load_inception,
)  # noqa: E402

BUNDLE = ROOT / "engines" / "far-demo"


def fid_sqrtm(f1: np.ndarray, f2: np.ndarray) -> float:
    """The Fréchet distance in float64 with scipy's matrix square root (TTUR / pytorch-fid's formula)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("dim,n", [(64, 1000), (192, 1500)])
def test_torch_fidelity_fid_matches_scipy_sqrtm_in_float64(dim, n):
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    f1 = rng.normal(size=(n, dim)) @ a + 0.3
    f2 = rng.normal(size=(n, dim)) @ (a + 0.3 * rng.normal(size=(dim, dim)) / np.sqrt(dim))
    want = fid_sqrtm(f1, f2)
    assert want > 1.0
    assert abs(fid_from_features(f1, f2) - want) <= 1e-6 * want


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """A state dict of torch-fidelity's InceptionV3 with He-initialised random weights (no download)."""
    import_torch_fidelity()
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    class Unloaded(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state, strict=True):  # keep the random initialisation
            return None

    real = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *a, **k: None
    try:
        torch.manual_seed(0)
        net = Unloaded("inception-v3-compat", ["2048"])
    finally:
        fe.load_state_dict_from_url = real
    for m in net.modules():  # He init keeps activations O(1) through the 94 convolutions
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def _images(seed: int, n: int = 5):
    import far_sdk

    with far_sdk.Generator(BUNDLE, backend="onnxruntime", threads=1) as gen:
        return gen.generate(list(range(n)), seed=seed, num_steps=2, inner_steps=2, output_type="np").images


@pytest.fixture
def torch_one_thread():
    """Inception at 299 x 299 on a shared 2-core machine: one thread and flushed denormals (random
    weights make some) are several times faster here; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(n)


@pytest.mark.slow
def test_far_eval_end_to_end_matches_independent_metrics_on_the_same_features(
    tmp_path, random_inception, capsys, monkeypatch, torch_one_thread
):
    from PIL import Image

    import far_sdk.scale.evaluation as ev

    samples, ref = _images(0), _images(100)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    (tmp_path / "ref").mkdir()
    for i, im in enumerate(ref):
        Image.fromarray(im).save(tmp_path / "ref" / f"{i:03d}.png")
    seen = []  # the feature arrays far eval computes, to recompute its metrics independently
    extract = ev.extract_features
    monkeypatch.setattr(ev, "extract_features", lambda *a, **k: seen.append(extract(*a, **k)) or seen[-1])
    rc = main(
        [
            "eval",
            "--samples",
            str(tmp_path / "samples.npz"),
            "--reference",
            str(tmp_path / "ref"),
            "--inception-weights",
            str(random_inception),
            "--isc-splits",
            "1",
            "--prc-neighborhood",
            "2",
            "--json",
            str(tmp_path / "m.json"),
        ]
    )
    assert rc == 0
    got = json.loads((tmp_path / "m.json").read_text())
    printed = capsys.readouterr().out.splitlines()
    assert json.loads(printed[0]) == got and printed[1].startswith("FID ")
    (fs, ls), (fr, _) = ((d["2048"], d["logits_unbiased"]) for d in seen)
    assert fs.shape == fr.shape == (5, 2048) and ls.shape == (5, 1008)
    # the plumbing: the first sample and the first reference PNG through the network directly
    net = load_inception(random_inception)
    with torch.no_grad():
        for img, feat in ((samples[0], fs[0]), (ref[0], fr[0])):
            direct = net(torch.from_numpy(img.transpose(2, 0, 1).copy())[None])[0][0].double().numpy()
            np.testing.assert_allclose(feat, direct, rtol=1e-5, atol=1e-6)
    assert fs.std(0).mean() > 1e-3  # the random network tells images apart
    # rank-4 covariances S = Xc^T Xc / (n - 1): the eigenvalues of S1 S2 are those of M M^T, M = X1c X2c^T / (n - 1),
    # so tr (S1 S2)^(1/2) is the sum of M's singular values (5 x 5 instead of 2048 x 2048)
    x1, x2 = fs - fs.mean(0), fr - fr.mean(0)
    tr = np.linalg.svd(x1 @ x2.T / (len(fs) - 1), compute_uv=False).sum()
    fid = (
        ((fs.mean(0) - fr.mean(0)) ** 2).sum() + (x1**2).sum() / (len(fs) - 1) + (x2**2).sum() / (len(fr) - 1) - 2 * tr
    )
    assert got["fid"] == pytest.approx(fid, rel=1e-5)
    p = np.exp(ls - ls.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    isc = np.exp((p * (np.log(p) - np.log(p.mean(0)))).sum(1).mean())
    assert got["inception_score_mean"] == pytest.approx(isc, rel=1e-5)
    d_ss, d_rr, d_sr = (np.linalg.norm(a[:, None] - b[None], axis=-1) for a, b in ((fs, fs), (fr, fr), (fs, fr)))
    k_s, k_r = np.sort(d_ss, 1)[:, 2], np.sort(d_rr, 1)[:, 2]  # the 2nd neighbour (column 0 is the point itself)
    assert got["precision"] == pytest.approx((d_sr <= k_r[None]).any(1).mean())
    assert got["recall"] == pytest.approx((d_sr.T <= k_s[None]).any(1).mean())
    assert got["num_samples"] == got["num_reference"] == 5


def test_missing_or_wrong_weights_fail_with_a_typed_error_naming_the_file(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    missing = tmp_path / "nowhere" / "weights-inception-2015-12-05-6726825d.pth"
    rc = main(
        [
            "eval",
            "--samples",
            str(tmp_path / "s.npz"),
            "--reference",
            str(tmp_path / "s.npz"),
            "--inception-weights",
            str(missing),
        ]
    )
    err = capsys.readouterr().err
    assert rc == EXIT_INPUT and str(missing) in err and INCEPTION_WEIGHTS_URL in err and "does not exist" in err
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(print))  # a pickle that names a callable: never unpickled for real
    with pytest.raises(InceptionWeightsError, match="not a PyTorch state dict of tensors"):
        load_inception(evil)
    other = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), other)
    with pytest.raises(InceptionWeightsError, match="no InceptionV3 state dict"):
        load_inception(other)


def test_the_weights_file_is_read_once_and_only_by_the_safe_loader(random_inception, monkeypatch):
    """torch-fidelity's own loader calls torch.load(weights_only=False): it must never see the file (a file swapped
    after the safe check would run its code there)."""
    calls = []
    real = torch.load

    def spy(f, *a, **k):
        calls.append(k.get("weights_only"))
        return real(f, *a, **k)

    monkeypatch.setattr(torch, "load", spy)
    net = load_inception(random_inception)
    assert calls == [True]
    want = torch.load(random_inception, weights_only=True)  # the weights in the network are the file's
    got = net.state_dict()
    for k in ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight", "fc.weight"):
        assert torch.equal(got[k], want[k]), k
