"""Generation at scale, built on :class:`far_sdk.Generator`: :mod:`~far_sdk.scale.serve` (HTTP on Ray Serve),
:mod:`~far_sdk.scale.dataset` (ADM ``.npz`` shards, resumable) and :mod:`~far_sdk.scale.evaluation` (FID, IS,
precision/recall through torch-fidelity)."""
