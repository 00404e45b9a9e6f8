"""Re-export a bundle written by an older far-sdk (an older bundle format) from its own weights.

The new bundle keeps the old one's name, latent scale, labels, sampling defaults and source record, and
its weights: every tensor of ``weights.safetensors`` is compared byte for byte (sha256 per tensor) before
the new bundle replaces anything. The graphs are traced afresh and validated as `far-export onnx` does.

    .venv/bin/python scripts/reexport_bundle.py engines/far-demo            # in place (atomic)
    .venv/bin/python scripts/reexport_bundle.py OLD --out NEW
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from far_sdk.bundle.bundle import Bundle  # noqa: E402
from far_sdk.bundle.graphs import VAE_ENCODER, VAE_ENCODER_WEIGHTS  # noqa: E402
from far_sdk.bundle.manifest import manifest_digest, parse_json  # noqa: E402
from far_sdk.bundle.schema import BUNDLE_FORMAT, DIGEST_KEY  # noqa: E402
from far_sdk.errors import BundleError  # noqa: E402


def tensor_hashes(path: Path) -> dict[str, str]:
    """sha256 of each tensor's dtype, shape and bytes in a safetensors file."""
    from safetensors.numpy import load_file

    out = {}
    for k, v in load_file(str(path)).items():
        h = hashlib.sha256(f"{v.dtype}{v.shape}".encode())
        h.update(v.tobytes())
        out[k] = h.hexdigest()
    return out


def old_bundle(path: Path) -> Bundle:
    """The bundle at ``path`` whatever its format version, after its digest and file hashes are checked."""
    m = parse_json((path / "manifest.json").read_bytes(), str(path / "manifest.json"))
    if m.get("format") != BUNDLE_FORMAT or m.get(DIGEST_KEY) != manifest_digest(m):
        raise BundleError(f"{path}: not a far bundle, or its manifest fails its digest check")
    bundle = Bundle(path, m)
    bundle.verify()
    return bundle


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="default: replace the bundle in place")
    a = ap.parse_args()
    from export.onnx_export import export_bundle
    from training.config_vae import VAEConfig
    from training.from_bundle import load_bundle_models
    from training.vae import AutoencoderKL

    old = old_bundle(a.bundle)
    m = old.manifest
    before = tensor_hashes(old.file(m["weights"]["file"]))
    far, vae = load_bundle_models(old)  # the VAE's encoder stays on the meta device: a bundle carries none
    decode = {k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    vae = AutoencoderKL(VAEConfig.from_dict(m["vae"])).eval()  # encoder: the bundle's, or a fresh init not exported
    keep_encoder = VAE_ENCODER in m["graphs"]
    if keep_encoder:  # the optional encoder (image-to-image) is carried over from vae_encoder.safetensors
        from safetensors.torch import load_file

        decode.update(load_file(str(old.file(VAE_ENCODER_WEIGHTS))))
    missing, unexpected = vae.load_state_dict(decode, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith(("decoder.", "post_quant_conv."))]
    out = a.out or a.bundle
    # files the manifest does not list (a README) are carried over; the export replaces the directory
    extras = {
        p.name: p.read_bytes()
        for p in a.bundle.iterdir()
        if p.is_file() and not p.is_symlink() and p.name not in m["files"] and p.name != "manifest.json"
    }
    export_bundle(
        far,
        vae,
        out,
        name=m["name"],
        latent_scale=m["latent_scale"],
        id2label=m.get("id2label"),
        source=m["source"],
        defaults=m["defaults"],
        overwrite=True,
        vae_encoder=keep_encoder,
    )
    for name, data in extras.items():
        if not (out / name).exists():
            (out / name).write_bytes(data)
    new = Bundle.load(out)
    after = tensor_hashes(new.file(new.manifest["weights"]["file"]))
    if before != after:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        raise SystemExit(f"weights differ after re-export: {changed[:10]}")
    print(
        json.dumps(
            {
                "bundle": str(out),
                "kept": sorted(extras),
                "format_version": new.manifest["format_version"],
                "tensors": len(after),
                "weights_identical": True,
                "sampling_modes": new.manifest["sampling_modes"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
