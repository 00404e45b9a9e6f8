"""Add the optional ``vae_encoder`` graph (image-to-image) to an existing bundle from an encoder weights file.

    .venv/bin/python scripts/add_vae_encoder.py engines/far-demo --encoder build/vae_encoder.safetensors

Every other file stays byte-identical; the manifest gains the graph and the two new files. Idempotent
(:mod:`export.vae_encoder`). The encoder file: ``encoder.*`` + ``quant_conv.*`` tensors of the bundle's VAE config,
e.g. from ``python -m training.encoder_fit BUNDLE --out FILE`` (a bundle whose weights keep only the decoder).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--encoder", type=Path, required=True, help="the encoder's safetensors file")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from export.vae_encoder import add_vae_encoder

    print(json.dumps({"bundle": str(a.bundle), **add_vae_encoder(a.bundle, a.encoder)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
