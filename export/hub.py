"""Official weights by name: checkpoints and the VAE fetched from the Hugging Face Hub for ``far-export onnx``.

    far-export onnx --hub figereatfish/FAR --model far_large --out engines/far_large
    far-export onnx --checkpoint hub:figereatfish/FAR/far_large/checkpoint-last.pth@main --vae kl16.ckpt --out DIR

A ``hub:OWNER/REPO/PATH[@REVISION]`` value names one file of a Hub repository; ``--hub OWNER/REPO`` names the
checkpoint by its model (:func:`checkpoint_file`) and takes the official VAE (:data:`OFFICIAL_VAE`) unless ``--vae``
is given. Downloads go through huggingface_hub's cache (far_sdk.bundle.hub.hub_download: resume, ``HF_HUB_OFFLINE``,
``HF_TOKEN``, ``HF_ENDPOINT``); the manifest's ``source`` records each file's repository, path and the commit it
resolved to.

The official release (the FAR README, yuhuUSTC/FAR): the class-conditional models and the VAE on the model page
``figereatfish/FAR``, the text-to-image model on ``figereatfish/FAR_T2I``, its text encoder Qwen2-VL-1.5B-Instruct on
``mit-han-lab/Qwen2-VL-1.5B-Instruct``. The paths inside the repositories follow the README's folder layout (one
folder per model holding ``checkpoint-last.pth``; ``vae/kl16.ckpt``); they were not checked against the live Hub
from here (no network), so ``--hub-file`` / a ``hub:`` value overrides them.
"""

from __future__ import annotations

from pathlib import Path

from far_sdk.bundle.hub import HubFile, check_repo_id, hub_download
from far_sdk.errors import InvalidArgumentError

#: The official FAR model page and the file its VAE is in.
OFFICIAL_REPO = "figereatfish/FAR"
OFFICIAL_VAE = f"hub:{OFFICIAL_REPO}/vae/kl16.ckpt"
#: The official FAR-T2I model page and its text encoder's.
OFFICIAL_T2I_REPO = "figereatfish/FAR_T2I"
OFFICIAL_TEXT_ENCODER_REPO = "mit-han-lab/Qwen2-VL-1.5B-Instruct"
CHECKPOINT_NAME = "checkpoint-last.pth"


def checkpoint_file(model: str | None) -> str:
    """The checkpoint's path in a repository for ``--model`` (``far_large/checkpoint-last.pth``), or
    ``checkpoint-last.pth`` for a repository holding one model (FAR-T2I)."""
    return f"{model}/{CHECKPOINT_NAME}" if model else CHECKPOINT_NAME


def parse_file_spec(spec: str, option: str) -> tuple[str, str, str | None]:
    """``hub:OWNER/REPO/PATH[@REVISION]`` -> (repo_id, path, revision or None)."""
    body, _, revision = spec.removeprefix("hub:").partition("@")
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise InvalidArgumentError(f"{option} {spec}: expected hub:OWNER/REPO/PATH[@REVISION]")
    return check_repo_id("/".join(parts[:2]), option), "/".join(parts[2:]), revision or None


def fetch(value: str | Path | None, option: str) -> tuple[Path | None, HubFile | None]:
    """A ``--checkpoint`` / ``--vae`` value: a local path as it is, a ``hub:`` value downloaded
    (-> (its local path, the HubFile))."""
    if value is None or not str(value).startswith("hub:"):
        return (None if value is None else Path(value)), None
    repo_id, path, revision = parse_file_spec(str(value), option)
    f = hub_download(repo_id, path, revision, what=f"{option} file")
    return f.path, f


def hub_checkpoint(repo_id: str, model: str | None, file: str | None, revision: str | None) -> str:
    """``--hub REPO [--model M] [--hub-file PATH] [--hub-revision REV]`` as a ``hub:`` value."""
    check_repo_id(repo_id, "--hub")
    return f"hub:{repo_id}/{file or checkpoint_file(model)}" + (f"@{revision}" if revision else "")


def with_hub(source: dict, checkpoint: HubFile | None, vae: HubFile | None) -> dict:
    """The manifest's ``source`` with where each file came from on the Hub (repository, commit, path)."""
    if checkpoint is not None:
        source["hub"] = checkpoint.source()
    if vae is not None and "vae" in source:
        source["vae"]["hub"] = vae.source()
    return source
