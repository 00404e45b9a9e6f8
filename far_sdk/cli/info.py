"""``far info``: what a bundle holds, in sections a person reads (``--json``: the whole manifest)."""

from __future__ import annotations

import argparse
import json

from far_sdk.backends.tensorrt.cache import trt_dir
from far_sdk.bundle.bundle import Bundle
from far_sdk.cli.run import add_bundle_argument
from far_sdk.cli.sampling import flag_of
from far_sdk.options import DEFAULTS, SPECS, T2I_DEFAULTS


def add_info(p: argparse.ArgumentParser) -> None:
    add_bundle_argument(p)
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the files' sha256 check (the manifest's own digest is always checked)",
    )


def _section(title: str, rows: list[tuple[str, object]]) -> None:
    print(f"\n{title}")
    for key, value in rows:
        print(f"  {key:<24}{value}")


def _short(sha: str) -> str:
    return f"{sha[:12]}…"


def _encoder_rows(text: dict) -> list[tuple[str, object]]:
    """The bundled text encoder: its type, shapes, the wrapping of a prompt (the template) and its validation."""
    enc, T, D = text["encoder"], text["max_length"], text["hidden_size"]
    kind = enc.get("kind", "small")
    about = [enc.get("model_type"), f"{enc['num_layers']} layers" if "num_layers" in enc else None]
    about.append(f"{enc['weight_dtype']} weights" if "weight_dtype" in enc else None)
    detail = ", ".join(a for a in about if a)
    rows: list[tuple[str, object]] = [("type", f"{kind}{f' ({detail})' if detail else ''}, {T} tokens x {D}")]
    system = enc.get("system_prompt")
    wrap = f"prompt cut at {T} tokens, padded {enc.get('padding_side', 'right')} with id {enc['pad_token_id']}"
    if system is not None:
        start = system[:30].replace("\n", " ")
        wrap = (
            f"system prompt: {len(system)} characters, {enc.get('system_length')} tokens ({start!r}…), then the " + wrap
        )
    rows.append(("template", wrap))
    rows.append(("files", " + ".join(f for f in (enc["file"], enc.get("external_data"), enc["tokenizer"]) if f)))
    val = enc.get("validation")
    if val:
        rows.append(("validation", f"max rel error vs transformers {val['max_rel']:.2e}"))
    return rows


def run_info(a: argparse.Namespace) -> int:
    b = Bundle.load(a.bundle, verify=not a.no_verify)
    m = b.manifest
    if a.json:
        print(json.dumps(m, indent=2))
        return 0
    cfg, vae = m["model"], m["vae"]
    checked = "every file checked against its sha256" if not a.no_verify else "files not checked (--no-verify)"
    print(f"{b.path}  (bundle {m['name']!r}, format {m['format_version']}; {checked})")
    print(f"  manifest sha256 {m['manifest_sha256']} (its digest and schema checked)")
    text = b.text
    if text:
        cond = f"text: [{text['max_length']} tokens x {text['hidden_size']}]"
        cond += " with a bundled text encoder (far generate --prompt)" if "encoder" in text else ", no text encoder"
    else:
        named = sorted((k, v) for k, v in b.id2label.items() if v != str(k))
        names = ", ".join(f"{k}={v}" for k, v in named[:10]) + (", ..." if len(named) > 10 else "")
        cond = f"{b.num_classes} classes" + (f" ({names})" if names else "")
    masked = cfg.get("mask")
    note = {False: " (model trained without token masking: mask mode gives worse images)"}.get(masked, "")
    if masked and not text:
        note = " (model built with mask=True: it runs mask mode only)"
    modes = ", ".join(b.sampling_modes) + note
    grid, ch = cfg["grid_size"], cfg["token_channels"]
    _section(
        "Model",
        [
            (
                "transformer",
                f"width {cfg['encoder_embed_dim']}, {cfg['encoder_depth']} encoder + {cfg['decoder_depth']} decoder "
                f"blocks, {cfg['encoder_num_heads']} heads; diffusion MLP {cfg['diffloss_d']} x {cfg['diffloss_w']}",
            ),
            ("conditioning", cond),
            ("latents", f"{grid} x {grid} tokens of {ch} channels (out.latents: [B, {ch}, {grid}, {grid}])"),
            ("images", f"{m.get('image_size')} x {m.get('image_size')} px (VAE latent scale {b.latent_scale})"),
            ("VAE decoder", f"{vae.get('ch')} channels x {vae.get('ch_mult')}, {vae.get('num_res_blocks')} res blocks"),
            ("image-to-image", "yes (vae_encoder)" if "vae_encoder" in m["graphs"] else "no: re-export the bundle"),
            ("sampling modes", modes),
        ],
    )
    given = b.defaults.given()
    built_in = T2I_DEFAULTS.over(DEFAULTS) if text else DEFAULTS  # what resolve_plan / resolve_text_plan start from
    rows = []
    for name in SPECS:
        value = given.get(name, getattr(built_in, name))
        shown = "-" if value is None else "no clipping" if value is False else value
        shown = ",".join(map(str, shown)) if isinstance(shown, tuple) else shown
        rows.append((flag_of(name), f"{shown}{'' if name in given or value is None else '   (built-in)'}"))
    _section("Sampling defaults (far generate flags; the bundle's unless marked built-in)", rows)
    if text and "encoder" in text:
        _section("Text encoder (far generate --prompt)", _encoder_rows(text))
    src = m.get("source") or {}
    rows = [("kind", src.get("kind", "unspecified"))]
    if "file" in src:
        ema = {True: ", EMA weights", False: ", live weights"}.get(src.get("use_ema"), "")
        rows.append(("checkpoint", f"{src['file']} (sha256 {_short(src['sha256'])}{ema})"))
    if "seed" in src:
        rows.append(("seed", src["seed"]))
    if "vae" in src:
        rows.append(("VAE", f"{src['vae']['file']} (sha256 {_short(src['vae']['sha256'])})"))
    for key, hub in (("checkpoint hub", src.get("hub")), ("VAE hub", (src.get("vae") or {}).get("hub"))):
        if hub:
            rows.append((key, f"{hub['repo_id']}@{hub['revision'][:12]} {hub['path']}"))
    rows.append(("made with", ", ".join(f"{k} {v}" for k, v in m.get("created_by", {}).items())))
    _section("Source", rows)
    rows = []
    for g, spec in m["graphs"].items():
        val = spec.get("validation") or {}  # None: exported without validation
        err = f"max abs error vs PyTorch {val['max_abs']:.2e}" if "max_abs" in val else "not validated"
        rows.append((g, f"{spec['file']:<22} opset {spec.get('opset')}, {err}"))
    _section("Graphs", rows)
    fs = m.get("fewstep")
    if fs is not None:  # far-export fewstep's distilled student (inner_sampler "distilled", preset "distilled")
        tr = fs.get("training", {})
        rows = [
            ("inner steps", ", ".join(map(str, fs["steps"])) + " (--preset distilled; --inner-sampler distilled)"),
            ("teacher chain", f"{fs['teacher_steps']} DDPM steps per outer step"),
            ("method", fs["method"]),
            ("student", f"{fs['student']['file']} (sha256 {_short(fs['student']['sha256'])})"),
            ("training", f"{tr.get('train_steps', '?')} steps, {tr.get('seconds', '?')} s, {tr.get('teacher', '?')}"),
        ]
    else:
        rows = [("none", "add one with far-train distill, then far-export fewstep BUNDLE")]
    _section("Few-step denoiser", rows)
    _section("Files", [(n, f"{f['size'] / 1e6:9.2f} MB  sha256 {_short(f['sha256'])}") for n, f in m["files"].items()])
    engines = trt_dir(b)  # the user's far-sdk cache, not the bundle
    plans = sorted(engines.glob("*.plan")) if engines.is_dir() else []
    _section(
        "TensorRT",
        [("plans", f"{len(plans)} built on this machine" if plans else "none (build them with far-export trt BUNDLE)")],
    )
    return 0
