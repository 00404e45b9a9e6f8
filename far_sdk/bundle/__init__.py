"""The bundle: a directory of ONNX graphs, weights and one ``manifest.json`` (read so that it cannot lie).

- :mod:`~far_sdk.bundle.bundle`: :class:`Bundle` (load, verify, accessors) and writing a bundle atomically;
- :mod:`~far_sdk.bundle.manifest`: the manifest's digest, schema and relations;
- :mod:`~far_sdk.bundle.graphs`: the graph specs (names, inputs, outputs) shared by export, engines and backends;
- :mod:`~far_sdk.bundle.weights`: ``weights.safetensors`` checked before use;
- :mod:`~far_sdk.bundle.onnx_external_data`: which files an ONNX graph reads as external data.
"""

from far_sdk.bundle.bundle import Bundle

__all__ = ["Bundle"]
