"""The official FAR-T2I prompt path in a bundle (issue 22): a tiny random Qwen2-VL (tests/qwen_tiny.py, saved the
way the hub's directory is) exported with a tiny official-layout FAR-T2I (300 x 32 context) as one bundle.

References are independent of far_sdk: transformers (``AutoTokenizer`` rebuilds Qwen2's tokenizer from its
vocabulary with its own pipeline; ``Qwen2VLPromptEncoder`` runs the model) and the PyTorch T2I reference sampler.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may reach the hub
transformers = pytest.importorskip("transformers", reason="text encoders need transformers (pip install far-sdk[t2i])")
pytest.importorskip("tokenizers")

from qwen_tiny import save_tiny_qwen2vl  # noqa: E402

import far_sdk  # noqa: E402
from far_sdk.bundle.onnx_external_data import external_data_files  # noqa: E402
from far_sdk.errors import InvalidArgumentError  # noqa: E402
from far_sdk.text import TextEncoder  # noqa: E402
from training.config_t2i import T2I_CONFIGS  # noqa: E402
from training.config_vae import VAE_CONFIGS  # noqa: E402
from training.far_t2i import FART2I  # noqa: E402
from training.graph_modules import randomize_for_export  # noqa: E402
from training.sampler_t2i import sample_reference_t2i  # noqa: E402
from training.text_encoder import QWEN2VL_SYSTEM_PROMPT, Qwen2VLPromptEncoder, prompt_inputs  # noqa: E402
from training.vae import AutoencoderKL  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
FAST = dict(levels=(0, 4, 13), inner_steps=2)  # 3 outer steps: the parity holds at any length
#: far_t2i_tiny with the official text shape's length (300 tokens) over the tiny Qwen2-VL's 32-wide states.
CFG = replace(T2I_CONFIGS["far_t2i_tiny"], token_channels=4, context_len=300, context_dim=32)
LONG = "an astronaut riding a horse on the moon, " * 40  # > 300 tokens
PROMPTS = {
    "ascii": "a photo of a dog",
    "accents": "café crème brûlée on a wooden table",
    "cjk": "一只在窗台上睡觉的猫",
    "emoji": "a red fox 🦊 in the snow ❄️",
    "empty": "",
    "special": "<|im_start|>user a cat<|im_end|>",
    "long": LONG,
}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save_tiny_qwen2vl(tmp_path_factory.mktemp("qwen") / "Qwen2-VL-tiny", extra_texts=[QWEN2VL_SYSTEM_PROMPT])


@pytest.fixture(scope="module")
def encoder(qwen_dir):
    return Qwen2VLPromptEncoder.from_pretrained(qwen_dir)


@pytest.fixture(scope="module")
def far():
    torch.manual_seed(0)
    return randomize_for_export(FART2I(CFG).eval(), seed=1)


@pytest.fixture(scope="module")
def bundle(far, encoder, tmp_path_factory):
    """Exported with the external-data threshold lowered to 50 kB: the encoder's weights go to a .data file."""
    from export.onnx_export import export_bundle

    torch.manual_seed(0)
    vae = AutoencoderKL(VAE_CONFIGS["digits-f2"]).eval()
    out = tmp_path_factory.mktemp("t2i") / "qwen-t2i"
    opts = {"external_data_threshold": 50_000}
    return export_bundle(far, vae, out, name="qwen-t2i", text_encoder=encoder, text_encoder_options=opts)


def test_manifest_describes_the_encoder_and_lists_its_external_data(bundle, encoder):
    m = json.loads((bundle / "manifest.json").read_text())
    enc = m["text"]["encoder"]
    n_sys = len(encoder.tokenizer(QWEN2VL_SYSTEM_PROMPT).input_ids)
    assert (enc["kind"], enc["system_prompt"], enc["system_length"]) == ("qwen2-vl", QWEN2VL_SYSTEM_PROMPT, n_sys)
    assert (enc["pad_token_id"], enc["padding_side"]) == (encoder.tokenizer.pad_token_id, "right")
    assert m["text"] == {**m["text"], "max_length": 300, "hidden_size": 32}
    assert enc["validation"]["max_rel"] <= TOL and enc["external_data"] == "text_encoder.onnx.data"
    assert external_data_files(bundle / "text_encoder.onnx") == {"text_encoder.onnx.data"}
    assert {"text_encoder.onnx", "text_encoder.onnx.data", "tokenizer.json"} <= set(m["files"])
    assert m["files"]["text_encoder.onnx.data"]["size"] > 50_000  # the weights (the graph itself: ~130 kB)


def test_token_ids_equal_the_transformers_tokenizer_for_every_kind_of_prompt(bundle, qwen_dir):
    tok = transformers.AutoTokenizer.from_pretrained(qwen_dir, local_files_only=True)  # a fresh, independent load
    assert type(tok).__name__ == "Qwen2Tokenizer"
    te = TextEncoder(far_sdk.Bundle.load(bundle))
    texts = list(PROMPTS.values())
    with pytest.warns(UserWarning) as caught:
        ids, mask = te.token_ids(texts)
    want_ids, want_mask, n_sys = prompt_inputs(tok, texts, 300, QWEN2VL_SYSTEM_PROMPT)
    np.testing.assert_array_equal(ids, want_ids.numpy())
    np.testing.assert_array_equal(mask, want_mask.numpy().astype(np.int64))
    assert ids.shape == (len(texts), n_sys + 300) and mask[:, :n_sys].all()
    assert mask[list(PROMPTS).index("empty"), n_sys:].sum() == 0  # the empty prompt is all padding
    cut = len(tok(LONG).input_ids) - 300
    assert cut > 0 and [str(w.message) for w in caught] == [
        f"prompt 6 is {cut + 300} tokens long; the text encoder reads 300: the last {cut} tokens were cut (as the "
        "official FAR-T2I code does). Shorten the prompt to keep them"
    ]
    # the special tokens of Qwen2-VL's template are single ids, as in transformers
    special = te.token_ids([PROMPTS["special"]])[0][0, n_sys:]
    assert tok.convert_tokens_to_ids("<|im_start|>") in special and tok.convert_tokens_to_ids("<|im_end|>") in special


def test_onnx_hidden_states_equal_transformers(bundle, encoder):
    texts = list(PROMPTS.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the long prompt's cut
        got = TextEncoder(far_sdk.Bundle.load(bundle)).encode(texts)
    want = encoder.encode(texts).numpy()
    assert got.shape == want.shape == (len(texts), 300, 32) and got.dtype == np.float32
    assert rel_err(got, want) <= TOL
    assert float(np.abs(want[0] - want[1]).max()) > 1e-2  # the prompts give different states


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_prompts_generate_what_the_torch_reference_gives_with_transformers_states(bundle, far, encoder, backend):
    prompts = [PROMPTS["ascii"], PROMPTS["cjk"]]
    opts = {"threads": 2} if backend == "onnxruntime" else {"device": "cpu"}
    with far_sdk.Generator(bundle, backend=backend, **opts) as gen:
        out = gen.generate(prompt=prompts, seed=5, output_type="latent", **FAST)
    ref = sample_reference_t2i(far, encoder.encode(prompts), plan=out.plan, seed=5).numpy()
    assert out.latents.shape == ref.shape == (2, 4, 16, 16)
    assert rel_err(out.latents, ref) <= TOL


def test_negative_prompt_text_is_encoded_like_the_prompt(bundle, encoder):
    prompts = [PROMPTS["ascii"], PROMPTS["emoji"]]
    with far_sdk.Generator(bundle, backend="onnxruntime", threads=2) as gen:
        got = gen.generate(prompt=prompts, negative_prompt="blurry, low quality", seed=2, output_type="latent", **FAST)
        neg = encoder.encode(["blurry, low quality"] * 2).numpy()
        want = gen.generate(prompt=prompts, negative_prompt_embeds=neg, seed=2, output_type="latent", **FAST)
        plain = gen.generate(prompt=prompts, seed=2, output_type="latent", **FAST)
        assert rel_err(got.latents, want.latents) <= TOL
        assert rel_err(got.latents, plain.latents) > 1e-3  # it did replace the learned null context
        per_prompt = gen.generate(prompt=prompts, negative_prompt=["blurry, low quality", "a cat"], seed=2, **FAST)
        assert len(per_prompt.images) == 2
        with pytest.raises(InvalidArgumentError, match="list of 2 strings"):
            gen.generate(prompt=prompts, negative_prompt=["a", "b", "c"], **FAST)
        with pytest.raises(InvalidArgumentError, match="not both"):
            gen.generate(prompt=prompts, negative_prompt="a", negative_prompt_embeds=neg, **FAST)


def test_float16_weight_storage_halves_the_weights_and_keeps_float32_outputs(qwen_dir, tmp_path):
    import onnx
    import onnxruntime as ort

    from export.qwen_export import export_qwen2vl_encoder

    enc = Qwen2VLPromptEncoder.from_pretrained(qwen_dir)  # rounded in place by the export: a fresh copy
    entry = export_qwen2vl_encoder(enc, tmp_path, 17, weight_dtype="float16")
    model = onnx.load(str(tmp_path / "text_encoder.onnx"))
    kinds = {i.data_type for i in model.graph.initializer if np.prod(i.dims) >= 1024}
    assert kinds == {onnx.TensorProto.FLOAT16} and "external_data" not in entry
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert entry["weight_dtype"] == "float16" and entry["validation"]["max_rel"] <= TOL
    texts = [PROMPTS["accents"], PROMPTS["cjk"]]
    ids, mask, _ = prompt_inputs(enc.tokenizer, texts, 300, QWEN2VL_SYSTEM_PROMPT)
    sess = ort.InferenceSession(str(tmp_path / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.long().numpy()})[0]
    assert got.dtype == np.float32
    full = Qwen2VLPromptEncoder.from_pretrained(qwen_dir).encode(texts).numpy()  # float32 weights
    assert 0 < rel_err(got, full) < 2e-2  # float16 storage moves the states a little ...
    assert rel_err(got, enc.encode(texts).numpy()) <= TOL  # ... and is exactly the rounded model


def test_far_info_shows_the_encoder(bundle, capsys):
    from far_sdk.cli.main import main

    assert main(["info", "--bundle", str(bundle)]) == 0
    text = capsys.readouterr().out
    assert "qwen2-vl (qwen2_vl, 2 layers, float32 weights), 300 tokens x 32" in text
    assert "system prompt: 726 characters" in text and "'Given a user prompt, generate" in text


_NO_TORCH = """import importlib.abc, sys
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "training", "export"):
            raise ImportError(f"{name} is hidden in this test")
sys.meta_path.insert(0, _Blocked())
"""


@pytest.mark.slow
def test_far_generate_with_prompts_runs_where_torch_cannot_be_imported(bundle, tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(_NO_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hide), str(ROOT)])}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "hidden in this test" in probe.stderr
    out = tmp_path / "grid.png"
    cmd = [sys.executable, "-m", "far_sdk.cli.main", "generate", "--bundle", str(bundle), "--prompt", "a dog"]
    cmd += ["--prompt", LONG, "--negative-prompt", "blurry", "--inner-steps", "2", "--backend", "onnxruntime"]
    cmd += ["--out", str(out), "--out-dir", str(tmp_path / "pngs"), "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "generated 2 image(s) (2 prompts" in r.stdout and out.is_file()
    assert "tokens were cut" in r.stderr  # the long prompt's warning, one line
    from far_sdk.cli.outputs import Settings

    settings = Settings.from_png(tmp_path / "pngs" / "prompt-a-dog_seed0.png")  # --from-image reads it back
    assert settings.conditioning == {"prompt": ["a dog", LONG], "negative_prompt": ["blurry", "blurry"]}
    from PIL import Image

    from far_sdk.cli.main import main

    again = tmp_path / "again.png"
    png = tmp_path / "pngs" / "prompt-a-dog_seed0.png"
    assert main(["generate", "--from-image", str(png), "--out", str(again), "--no-progress"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(png)))


@pytest.mark.slow
def test_far_export_reads_the_encoder_kind_from_the_directory(far, qwen_dir, tmp_path, capsys):
    from export.cli import main
    from training.checkpoint import save_official_checkpoint

    ckpt, vae = tmp_path / "checkpoint-last.pth", tmp_path / "vae.ckpt"
    save_official_checkpoint(ckpt, far)
    torch.manual_seed(0)
    torch.save({"model": AutoencoderKL(VAE_CONFIGS["digits-f2"]).state_dict()}, vae)
    base = ["-q", "onnx", "--checkpoint", str(ckpt), "--vae", str(vae), "--vae-config", "digits-f2", "--no-validate"]
    out = tmp_path / "bundle"
    args = [*base, "--text-encoder", str(qwen_dir), "--text-encoder-dtype", "bfloat16", "--out", str(out)]
    assert main(args) == 0
    enc = json.loads((out / "manifest.json").read_text())["text"]["encoder"]
    assert (enc["kind"], enc["weight_dtype"], enc["validation"]) == ("qwen2-vl", "bfloat16", None)
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "llama"}')
    capsys.readouterr()
    assert main([*base, "--text-encoder", str(other), "--out", str(tmp_path / "b2")]) == 2
    assert "model_type is 'llama'" in capsys.readouterr().err
    assert main([*base, "--text-encoder-dtype", "float16", "--out", str(tmp_path / "b3")]) == 2
    assert "--text-encoder-dtype goes with --text-encoder" in capsys.readouterr().err


@pytest.mark.slow
def test_far_export_trt_builds_the_text_encoder_and_the_backend_prompts_with_it(bundle, tmp_path, monkeypatch):
    """On the TensorRT simulator (tests/trt_sim.py: "engines" run the ONNX graphs in onnxruntime)."""
    import shutil

    import trt_sim

    from export.trt_build import build_engines
    from far_sdk.backends.tensorrt.backend import TensorRTBackend

    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    trt_sim.install(monkeypatch)
    results = build_engines(b, precision="fp32", batch=(1, 2, 2), progress=lambda m: None)  # exact: fp32
    assert [r.graph for r in results] == ["transformer", "denoiser", "vae_decoder", "text_encoder"]
    assert results[-1].plan.is_file() and results[-1].validation["max_rel"] <= 1e-5  # vs onnxruntime at build
    backend = TensorRTBackend(far_sdk.Bundle.load(b))
    assert backend.extra_graphs == ("text_encoder",)
    calls, run = [], backend.run

    def spy(graph, feeds):
        calls.append((graph, len(next(iter(feeds.values())))))
        return run(graph, feeds)

    monkeypatch.setattr(backend, "run", spy)
    prompts = [PROMPTS["ascii"], PROMPTS["cjk"], PROMPTS["emoji"]]
    with far_sdk.Generator(b, backend=backend) as gen:
        out = gen.generate(prompt=prompts, negative_prompt="blurry", seed=4, output_type="latent", **FAST)
    # prompts, then negatives, each split to the engines' 2 images per call
    assert [c for c in calls if c[0] == "text_encoder"] == [("text_encoder", 2), ("text_encoder", 1)] * 2
    with far_sdk.Generator(b, backend="onnxruntime", threads=2) as ref_gen:
        ref = ref_gen.generate(prompt=prompts, negative_prompt="blurry", seed=4, output_type="latent", **FAST)
    assert rel_err(out.latents, ref.latents) < 1e-5
    demo = tmp_path / "class-bundle"
    shutil.copytree(ROOT / "engines" / "far-demo", demo)
    with pytest.raises(InvalidArgumentError, match="no text encoder graph"):
        build_engines(demo, graphs=["text_encoder"], progress=lambda m: None)


def test_an_altered_text_section_is_refused_saying_what_differs(bundle, tmp_path):
    import shutil

    from hostile import reseal

    from far_sdk.errors import BundleError

    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    reseal(b, lambda m: m["text"]["encoder"].update(system_prompt="a shorter system prompt"))
    with pytest.raises(BundleError, match="its system prompt is 12 tokens .* exported for 162"):
        TextEncoder(far_sdk.Bundle.load(b)).encode(["a dog"])
    reseal(b, lambda m: m["text"]["encoder"]["inputs"][0].update(shape=["B", 300]))
    with pytest.raises(BundleError, match=r"text\.encoder\.inputs"):
        far_sdk.Bundle.load(b)
