"""Train a prompt-conditioned FAR-T2I on scikit-learn's digits on a CPU (the text-to-image demo's recipe).

Data: the class-conditional demo's 80 % training split (training/demo_data.py) with captions from
training/demo_t2i.py (14 phrasings per digit for training; 5 held-out paraphrases per digit only for "eval").
Stages, each skipped when its output exists (``--stage NAME`` reruns one):

1. ``vae``: the demo's digits-f2 VAE by its own recipe (examples/train_demo.py's stage), which reproduces
   engines/far-demo's decoder (the bundle carries no encoder); the difference is printed -> WORK/vae/
2. ``latents``: 4 posterior samples per training image x the latent scale -> WORK/latents.npz
3. ``text``: a byte-level BPE tokenizer trained on the training captions, a small transformers Qwen2Model
   (2 layers, width 64) pre-trained to tell the digit from a caption (mean-pooled last hidden state ->
   linear head, 15 % random token replacement; the head is discarded) -> WORK/text_encoder/; the training
   captions' hidden states [16, 64] and a caption of the right digit for every latent -> WORK/text_latents.npz
4. ``far``: FAR-T2I (far_t2i_demo preset) with far-train's loop (T2I step) -> WORK/far/checkpoint-last.pth
6. ``bundle`` (by name only): the torch-free bundle -> engines/far-t2i-demo (text encoder inside; evaluate it with
   examples/evaluate_t2i_bundle.py)
5. ``eval``: the reference T2I sampler (EMA weights) on every held-out paraphrase, ``--per-prompt`` images each,
   decoded and labelled by the demo's digit classifier (examples/evaluate_demo.py) -> WORK/eval.json

    .venv/bin/python examples/train_t2i_demo.py --work /tmp/t2i-demo              # all stages
    .venv/bin/python examples/train_t2i_demo.py --work /tmp/t2i-demo --stage eval --per-prompt 20
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import VAE_CONFIGS, load_official_checkpoint, load_official_vae  # noqa: E402
from training.demo_data import load_digits_images, split_indices  # noqa: E402
from training.demo_t2i import caption_pairs, held_out_captions, train_captions  # noqa: E402
from training.sampler_t2i import sample_reference_t2i, t2i_plan  # noqa: E402
from training.text_encoder import SmallTextEncoder  # noqa: E402
from training.train import TrainConfig, train  # noqa: E402
from training.train_t2i import TextLatentDataset, write_text_latents  # noqa: E402

VAE_CONFIG = "digits-f2"
MODEL = "far_t2i_demo"


def stage_vae(a, work: Path) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    import train_demo

    (work / "vae").mkdir(parents=True, exist_ok=True)
    train_demo.stage_vae(argparse.Namespace(vae_steps=a.vae_steps, vae_lr=1e-3, seed=a.seed), work / "vae")
    print(f"vae: max |decoder - engines/far-demo decoder| = {bundle_decoder_difference(work):.3g}")


def bundle_decoder_difference(work: Path) -> float:
    """Largest difference between our VAE's decoder weights and engines/far-demo's (0: the same VAE)."""
    from safetensors.numpy import load_file

    ours = load_official_vae(work / "vae" / "vae.ckpt", VAE_CONFIGS[VAE_CONFIG]).state_dict()
    theirs = load_file(ROOT / "engines" / "far-demo" / "weights.safetensors")
    return max(float(np.abs(ours[k[4:]].numpy() - v).max()) for k, v in theirs.items() if k.startswith("vae."))


@torch.no_grad()
def stage_latents(a, work: Path) -> None:
    vae = load_official_vae(work / "vae" / "vae.ckpt", VAE_CONFIGS[VAE_CONFIG])
    scale = json.loads((work / "vae" / "vae.json").read_text())["latent_scale"]
    x, y = load_digits_images(32)
    tr, _ = split_indices(y)
    gen = torch.Generator().manual_seed(a.seed)
    post = vae.encode(x[tr])
    lat = np.concatenate([(post.sample(generator=gen) * scale).numpy() for _ in range(a.samples)])
    lab = np.tile(y[tr].numpy(), a.samples)
    np.savez(work / "latents.npz", latents=lat.astype(np.float32), labels=lab)
    print(f"latents: {lat.shape} (std {lat.std():.3f})")


def pretrain_text_encoder(
    enc: SmallTextEncoder, captions: list[str], labels: np.ndarray, steps: int, seed: int
) -> float:
    """Teach the encoder which digit a caption names: CE of a linear head on the masked mean of the last hidden
    state, with 15 % of the tokens replaced at random (robustness to unseen words). Returns the last accuracy."""
    torch.manual_seed(seed)
    tok, model = enc.tokenizer, enc.model.train()
    head = torch.nn.Linear(enc.hidden_size, 10)
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=3e-3, weight_decay=0.01)
    ids = tok(
        captions, return_tensors="pt", padding="max_length", max_length=enc.context_len, truncation=True
    ).input_ids
    real = ids != tok.pad_token_id
    y = torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(seed)
    acc = 0.0
    for _ in range(steps):
        swap = (torch.rand(ids.shape, generator=gen) < 0.15) & real
        noisy = torch.where(swap, torch.randint(1, len(tok), ids.shape, generator=gen), ids)
        h = model(noisy, attention_mask=real.long()).last_hidden_state  # (N, T, H)
        pooled = (h * real[..., None]).sum(1) / real.sum(1, keepdim=True)
        logits = head(pooled)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc = float((logits.argmax(1) == y).float().mean())
    model.eval()
    return acc


def stage_text(a, work: Path) -> None:
    caps, cap_labels = train_captions()
    t0 = time.time()
    enc = SmallTextEncoder.build(
        caps, context_len=16, hidden_size=64, layers=2, heads=4, vocab_size=a.vocab, seed=a.seed
    )
    acc = pretrain_text_encoder(enc, caps, cap_labels, a.text_steps, a.seed)
    enc.save_pretrained(work / "text_encoder")
    contexts = enc.encode(caps).numpy()  # (M, 16, 64)
    with np.load(work / "latents.npz") as f:
        lat, lab = f["latents"], f["labels"]
    write_text_latents(work / "text_latents.npz", lat, contexts, caption_pairs(lab, cap_labels, a.seed))
    print(
        f"text: vocab {len(enc.tokenizer)}, pre-training accuracy {acc:.3f}, contexts {contexts.shape} "
        f"({time.time() - t0:.0f} s)"
    )


def stage_far(a, work: Path) -> None:
    out = work / "far"
    resume = str(out) if (out / "checkpoint-last.pth").exists() else None
    cfg = TrainConfig(
        model=MODEL,
        batch_size=a.batch,
        steps=a.far_steps,
        lr=a.far_lr,
        warmup_steps=100,
        ema_rate=a.ema,
        grad_clip=1.0,
        out_dir=str(out),
        save_every=a.save_every,
        log_every=50,
        seed=a.seed,
        diffusion_batch_mul=a.mul,
        high_t_fraction=a.high_t,
        resume=resume,
        progress=False,
    )
    t0 = time.time()
    res = train(cfg, TextLatentDataset(work / "text_latents.npz"))
    hist = [(s, round(loss, 4)) for s, loss, _ in res.history]
    log = work / "far.json"
    prev = json.loads(log.read_text()) if resume and log.exists() else {"history": [], "seconds": 0.0}
    log.write_text(
        json.dumps(
            {"steps": res.step, "seconds": prev["seconds"] + time.time() - t0, "history": prev["history"] + hist}
        )
    )
    print(f"far: {res.step} steps; loss {hist[0][1] if hist else '-'} -> {hist[-1][1] if hist else '-'}")


@torch.no_grad()
def stage_eval(a, work: Path) -> dict:
    sys.path.insert(0, str(ROOT / "examples"))
    from digit_classifier import cached_classifier, classify, default_cache_dir

    x, y = load_digits_images(32)
    tr, _ = split_indices(y)
    net, _ = cached_classifier(x[tr], y[tr], default_cache_dir())
    far = load_official_checkpoint(work / "far" / "checkpoint-last.pth", use_ema=a.weights == "ema")
    vae = load_official_vae(work / "vae" / "vae.ckpt", VAE_CONFIGS[VAE_CONFIG]).eval()
    scale = json.loads((work / "vae" / "vae.json").read_text())["latent_scale"]
    enc = SmallTextEncoder.from_pretrained(work / "text_encoder")
    caps, labels = held_out_captions()
    if a.prompts:
        keep = np.arange(len(caps))[:: max(1, len(caps) // a.prompts)][: a.prompts]
        caps, labels = [caps[i] for i in keep], labels[keep]
    plan = t2i_plan(cfg=a.cfg, inner_steps=a.inner_steps, x0_clip=a.x0_clip)
    rows, t0 = [], time.time()
    for i, (cap, digit) in enumerate(zip(caps, labels)):
        ctx = enc.encode([cap]).expand(a.per_prompt, -1, -1)
        lat = sample_reference_t2i(far, ctx, plan=plan, seed=a.seed + 1000 * i)
        img = vae.decode(lat / scale).clamp(-1, 1)
        pred, _ = classify(net, img)
        rows.append(
            {
                "prompt": cap,
                "digit": int(digit),
                "accuracy": float((pred == digit).mean()),
                "predicted": np.bincount(pred, minlength=10).tolist(),
            }
        )
        print(f"  {cap!r}: {rows[-1]['accuracy']:.2f}", flush=True)
    acc = float(np.mean([r["accuracy"] for r in rows]))
    res = {
        "accuracy": acc,
        "prompts": len(rows),
        "per_prompt": a.per_prompt,
        "weights": a.weights,
        "cfg": a.cfg,
        "inner_steps": a.inner_steps,
        "x0_clip": a.x0_clip,
        "far_steps": far_steps(work),
        "seconds": time.time() - t0,
        "rows": rows,
    }
    (work / a.eval_name).write_text(json.dumps(res, indent=1))
    print(
        f"eval: held-out paraphrase accuracy {acc:.3f} over {len(rows)} prompts x {a.per_prompt} images "
        f"({time.time() - t0:.0f} s)"
    )
    return res


def stage_bundle(a, work: Path) -> Path:
    """The torch-free bundle: the FAR-T2I checkpoint (``--weights``), the VAE's decoder and the text encoder as ONNX,
    with the eval's sampling settings as its defaults (the official T2I levels, constant CFG) -> ``--bundle-out``."""
    from export.onnx_export import checkpoint_source, export_bundle

    ckpt = work / "far" / "checkpoint-last.pth"
    use_ema = a.weights == "ema"
    far = load_official_checkpoint(ckpt, use_ema=use_ema)
    vae = load_official_vae(work / "vae" / "vae.ckpt", VAE_CONFIGS[VAE_CONFIG]).eval()
    scale = json.loads((work / "vae" / "vae.json").read_text())["latent_scale"]
    enc = SmallTextEncoder.from_pretrained(work / "text_encoder")
    out = export_bundle(
        far,
        vae,
        a.bundle_out,
        name=a.bundle_out.name,
        latent_scale=scale,
        text_encoder=enc,
        overwrite=True,
        defaults={"cfg": a.cfg, "inner_steps": a.inner_steps, "x0_clip": a.x0_clip},
        source=checkpoint_source(ckpt, use_ema=use_ema, vae=work / "vae" / "vae.ckpt"),
    )
    print(f"bundle: {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB, {a.weights} weights)")
    return out


def far_steps(work: Path) -> int | None:
    """Optimiser steps of the evaluated checkpoint (from its saved args)."""
    from training.safe_load import safe_torch_load

    ckpt = safe_torch_load(work / "far" / "checkpoint-last.pth", allowed_globals=[argparse.Namespace])
    return getattr(ckpt.get("args"), "far_sdk_step", None)


STAGES = {"vae": stage_vae, "latents": stage_latents, "text": stage_text, "far": stage_far, "eval": stage_eval}
OUTPUTS = {"vae": "vae/vae.ckpt", "latents": "latents.npz", "text": "text_latents.npz", "far": "far.json", "eval": None}
EXTRA = {"bundle": stage_bundle}  # run by name only (--stage bundle)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=list(STAGES) + list(EXTRA) + ["all"], default="all")
    ap.add_argument(
        "--bundle-out", type=Path, default=ROOT / "engines" / "far-t2i-demo", help="bundle stage: the bundle to write"
    )
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "t2i-demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--samples", type=int, default=4, help="posterior samples per training image")
    ap.add_argument("--vocab", type=int, default=1000, help="BPE vocabulary size (at most; 140 captions give ~375)")
    ap.add_argument("--text-steps", type=int, default=200, help="text-encoder pre-training steps")
    ap.add_argument("--far-steps", type=int, default=2500)
    ap.add_argument("--far-lr", type=float, default=1.5e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--mul", type=int, default=1, help="diffusion batch multiplier (main_far_t2i.py: 1)")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--high-t", type=float, default=0.15, help="TrainConfig.high_t_fraction")
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--cfg", type=float, default=3.0, help="eval: constant guidance scale")
    ap.add_argument("--inner-steps", type=int, default=15, help="eval: DDPM steps per outer step (the 'fast' preset)")
    ap.add_argument("--x0-clip", type=float, default=4.0, help="eval: x0 clamp (as the class-conditional demo bundle)")
    ap.add_argument("--per-prompt", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=None, help="eval: only this many held-out prompts, spread evenly")
    ap.add_argument("--eval-name", default="eval.json")
    ap.add_argument(
        "--weights", choices=["ema", "live"], default="ema", help="eval: the checkpoint's EMA or live weights"
    )
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.stage in EXTRA:
        EXTRA[a.stage](a, a.work)
        return
    for name, fn in STAGES.items():
        if a.stage not in ("all", name):
            continue
        if a.stage == "all" and OUTPUTS[name] and (a.work / OUTPUTS[name]).exists():
            print(f"{name}: {a.work / OUTPUTS[name]} exists, skipped")
            continue
        fn(a, a.work)


if __name__ == "__main__":
    main()
