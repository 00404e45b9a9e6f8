"""Official weights and bundles by name from the Hugging Face Hub, through huggingface_hub's real download code.

No network here: the Hub is ``tests/hub_server.py`` on 127.0.0.1 (``HF_ENDPOINT``), or a cache laid out by hand as
huggingface_hub documents it (``HF_HUB_OFFLINE=1``). Each command runs in a subprocess, since huggingface_hub reads
its environment when imported. The download chunk is lowered to 64 KiB in those subprocesses (a 9.6 MB checkpoint
then spans many chunks, as a multi-GB one does with the default 10 MiB), so that a connection cut halfway is resumed
with a ``Range`` request: the path a real interrupted download takes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer, Repo, commit_of
from PIL import Image

pytest.importorskip("huggingface_hub")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "engines" / "far-demo"
OFFICIAL_TINY = ROOT / "tests" / "fixtures" / "official-tiny" / "checkpoint-last.pth"
C1, C2 = commit_of("far release"), commit_of("far-demo bundle")
PRELUDE = "import sys, huggingface_hub.constants as c; c.DOWNLOAD_CHUNK_SIZE = 1 << 16\n"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, bytes]:
    """The official layout (figereatfish/FAR): a checkpoint per model folder and vae/kl16.ckpt; here the official
    code's tiny checkpoint (tests/fixtures/official-tiny) and a random kl16-tiny VAE in MAR's kl16.ckpt layout."""
    torch = pytest.importorskip("torch")
    from training.config_vae import VAE_CONFIGS
    from training.vae import AutoencoderKL

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "kl16.ckpt"
    torch.save({"model": AutoencoderKL(VAE_CONFIGS["kl16-tiny"]).state_dict()}, path)
    return {"far_parity_tiny/checkpoint-last.pth": OFFICIAL_TINY.read_bytes(), "vae/kl16.ckpt": path.read_bytes()}


def demo_files() -> dict[str, bytes]:
    manifest = json.loads((DEMO / "manifest.json").read_text())
    files = {n: (DEMO / n).read_bytes() for n in ["manifest.json", *manifest["files"]]}
    return {**files, "README.md": b"# a far-sdk bundle\n"}  # a file the manifest does not list: not fetched


def hub(release: dict[str, bytes] | None = None, **extra: Repo) -> HubServer:
    bundle = demo_files()
    tampered = {**bundle, "denoiser.onnx": bundle["denoiser.onnx"][:-1] + b"\0"}
    repos = {
        "someone/far-demo": Repo({C2: bundle}, {"main": C2}),
        "someone/far-demo-tampered": Repo({C2: tampered}, {"main": C2}),
        "someone/private-demo": Repo({C2: bundle}, {"main": C2}, token="hf_test_token"),
        **extra,
    }
    if release is not None:
        repos["figereatfish/FAR"] = Repo({C1: release}, {"main": C1, "v1.0": C1})
    return HubServer(repos=repos)


def run(code: str, *args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env = {**base, "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", **env}
    cmd = [sys.executable, "-c", PRELUDE + code, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


FAR_EXPORT = "from export.cli import main; sys.exit(main(sys.argv[1:]))"
FAR = "from far_sdk.cli.main import main; sys.exit(main(sys.argv[1:]))"


def export_args(out: Path, *extra: str) -> list[str]:
    return ["-q", "onnx", "--hub", "figereatfish/FAR", "--model", "far_parity_tiny", "--vae-config", "kl16-tiny",
            "--no-validate", "--out", str(out), *extra]  # fmt: skip


def populate_cache(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], ref: str = "main") -> None:
    """huggingface_hub's cache layout, written by hand: refs/REF -> commit, blobs/ETAG, snapshots/COMMIT/PATH
    as relative symbolic links to the blobs."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / ref).write_text(commit)
    for path, data in files.items():
        blob = root / "blobs" / sha256(data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def expected_source(release: dict[str, bytes], commit: str) -> dict:
    ckpt, vae = release["far_parity_tiny/checkpoint-last.pth"], release["vae/kl16.ckpt"]
    return {
        "kind": "checkpoint",
        "file": "checkpoint-last.pth",
        "sha256": sha256(ckpt),
        "use_ema": True,
        "hub": {"repo_id": "figereatfish/FAR", "revision": commit, "path": "far_parity_tiny/checkpoint-last.pth"},
        "vae": {
            "file": "kl16.ckpt",
            "sha256": sha256(vae),
            "hub": {"repo_id": "figereatfish/FAR", "revision": commit, "path": "vae/kl16.ckpt"},
        },
    }


@pytest.mark.slow
def test_far_export_fetches_official_weights_by_name_resumes_a_cut_download_and_records_the_commit(release, tmp_path):
    with hub(release) as server:
        server.cut_once.add("figereatfish/FAR/far_parity_tiny/checkpoint-last.pth")
        env = {"HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp_path / "hf")}
        r = run(FAR_EXPORT, *export_args(tmp_path / "out", "--hub-revision", "v1.0"), env=env)
        assert r.returncode == 0, r.stderr
        gets = [(p, rng) for m, p, rng in server.requests if m == "GET" and p.endswith("checkpoint-last.pth")]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    # the tag v1.0 is recorded as the commit it resolved to; the hashes are those of the files the server holds
    assert manifest["source"] == expected_source(release, C1)
    # the first GET was cut halfway; the second asked for the rest only
    size = len(release["far_parity_tiny/checkpoint-last.pth"])
    assert len(gets) == 2 and gets[0][1] is None, gets
    resumed_at = int(gets[1][1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at < size
    blob = (
        tmp_path / "hf" / "models--figereatfish--FAR" / "blobs" / sha256(release["far_parity_tiny/checkpoint-last.pth"])
    )
    assert sha256(blob.read_bytes()) == blob.name  # the cache holds the whole file


@pytest.mark.slow
def test_far_export_offline_uses_a_prepopulated_cache_and_sends_no_request(release, tmp_path):
    populate_cache(tmp_path / "hf", "figereatfish/FAR", C1, release)
    with hub() as server:  # up, but must not be asked: offline
        env = {"HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
        r = run(FAR_EXPORT, *export_args(tmp_path / "out"), env=env)
        empty = {"HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
        missing = run(FAR_EXPORT, *export_args(tmp_path / "out2"), env=empty)
        assert server.requests == []
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["source"] == expected_source(release, C1)
    assert missing.returncode == 4 and not (tmp_path / "out2").exists()
    assert "not in the Hugging Face cache" in missing.stderr and "HF_HUB_OFFLINE is set" in missing.stderr


def test_far_export_names_a_wrong_revision_a_missing_file_and_an_unknown_repository(release, tmp_path):
    cases = [
        (["--hub-revision", "v9"], "revision 'v9' does not exist in Hub repository figereatfish/FAR"),
        (["--hub-file", "far_huge/checkpoint-last.pth"], "figereatfish/FAR@main has no --checkpoint file"),
        (["--vae", "hub:figereatfish/FAR/vae/kl16.pt"], "no --vae file 'vae/kl16.pt'"),
    ]
    with hub(release) as server:
        env = {"HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp_path / "hf")}
        for extra, message in cases:
            r = run(FAR_EXPORT, *export_args(tmp_path / "out", *extra), env=env)
            assert r.returncode == 2 and message in r.stderr.splitlines()[-1], r.stderr
        other = ["onnx", "--hub", "figereatfish/FRA", "--model", "far_large", "--out", str(tmp_path / "o")]
        r = run(FAR_EXPORT, *other, env=env)
        assert r.returncode == 2 and "Hub repository figereatfish/FRA was not found" in r.stderr
    assert not (tmp_path / "out").exists()


GENERATE = """
import numpy as np, sys
sys.modules["torch"] = None  # a hub: bundle needs no torch
import far_sdk
kw = dict(class_labels=[3, 7], seed=0, num_steps=2, inner_steps=2, output_type="latent")
with far_sdk.Generator(sys.argv[1], backend="onnxruntime") as hub:
    with far_sdk.Generator(sys.argv[2], backend="onnxruntime") as local:
        a, b = hub.generate(**kw).latents, local.generate(**kw).latents
    print(hub.bundle.path, bool(np.array_equal(a, b)), sorted(p.name for p in hub.bundle.path.iterdir()))
    print(*(p.is_symlink() for p in hub.bundle.path.iterdir()))
"""


@pytest.mark.slow
def test_a_bundle_published_on_the_hub_runs_torch_free_as_the_local_one_and_then_offline(tmp_path):
    with hub() as server:
        server.cut_once.add("someone/far-demo/transformer.onnx")
        env = {"HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp_path / "hf"), "FAR_SDK_CACHE": str(tmp_path / "far")}
        r = run(GENERATE, "hub:someone/far-demo", str(DEMO), env=env)
        assert r.returncode == 0, r.stderr
        fetched = {p.rsplit("/", 1)[-1] for m, p, _ in server.requests if m == "GET"}
        ranges = [rng for m, p, rng in server.requests if m == "GET" and p.endswith("transformer.onnx")]
    path, equal, names = r.stdout.splitlines()[0].split(" ", 2)
    assert Path(path) == tmp_path / "far" / "hub" / "someone--far-demo" / C2 and equal == "True"
    assert eval(names) == sorted(demo_files().keys() - {"README.md"})  # what the manifest lists, nothing else
    assert "README.md" not in fetched and set(r.stdout.splitlines()[1].split()) == {"False"}  # plain files
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    # offline afterwards: the same bundle, from the caches alone
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    r = run(FAR, "info", "hub:someone/far-demo", env=offline)
    assert r.returncode == 0 and "bundle 'far-demo'" in r.stdout, r.stderr
    # an image made from it records the bundle pinned to that commit (--from-image finds the same files again)
    argv = ["generate", "hub:someone/far-demo", "--class", "3", "--steps", "1", "--inner-steps", "1", "--no-progress"]
    r = run(FAR, *argv, "--out-dir", str(tmp_path / "img"), env=offline)
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "img" / "class3_seed0.png") as im:
        assert json.loads(im.text["far-sdk"])["bundle"] == f"hub:someone/far-demo@{C2}"


def test_far_info_on_hub_bundles_names_what_is_wrong(tmp_path):
    with hub() as server:
        env = {"HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp_path / "hf"), "FAR_SDK_CACHE": str(tmp_path / "far")}
        cases = [
            ("hub:someone/far-demo@nope", 2, "revision 'nope' does not exist in Hub repository someone/far-demo"),
            ("hub:someone/far-dmeo", 2, "Hub repository someone/far-dmeo was not found"),
            ("hub:someone/far-demo-tampered", 3, "denoiser.onnx fails its sha256 check"),
            ("hub:someone/private-demo", 2, "or is private or gated"),
            ("hub:not-a-repo", 2, "'not-a-repo' is not a Hub repository id"),
        ]
        for spec, status, message in cases:
            r = run(FAR, "info", spec, env=env)
            assert r.returncode == status and message in r.stderr.splitlines()[-1], (spec, r.stderr)
        r = run(FAR, "info", "hub:someone/private-demo", env={**env, "HF_TOKEN": "hf_test_token"})  # logged in
        assert r.returncode == 0, r.stderr


def test_hub_specs_parse_to_repository_path_and_revision():
    from export.hub import checkpoint_file, hub_checkpoint, parse_file_spec
    from far_sdk.bundle.hub import parse_hub_spec
    from far_sdk.errors import InvalidArgumentError

    assert parse_hub_spec("hub:owner/repo@v1") == ("owner/repo", "v1")
    assert parse_hub_spec("hub:owner/repo") == ("owner/repo", None)
    assert parse_file_spec("hub:figereatfish/FAR/vae/kl16.ckpt@main", "--vae") == (
        "figereatfish/FAR",
        "vae/kl16.ckpt",
        "main",
    )
    assert checkpoint_file("far_large") == "far_large/checkpoint-last.pth" and checkpoint_file(None) == (
        "checkpoint-last.pth"
    )
    assert (
        hub_checkpoint("figereatfish/FAR_T2I", None, None, "abc") == "hub:figereatfish/FAR_T2I/checkpoint-last.pth@abc"
    )
    for bad in ("hub:owner", "hub:../x", "hub:a/b/../c"):
        with pytest.raises(InvalidArgumentError):
            parse_hub_spec(bad)
    with pytest.raises(InvalidArgumentError, match="expected hub:OWNER/REPO/PATH"):
        parse_file_spec("hub:owner/repo", "--vae")
