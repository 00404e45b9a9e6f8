"""The official FAR-T2I prompt path (Qwen2-VL's language model) -> ``text_encoder.onnx``, checked with transformers.

The graph is the official path after tokenisation (training.text_encoder.encode_prompts with the official system
prompt): input_ids [B, S + T] int64 and attention_mask [B, S + T] int64 — the S system-prompt ids (mask 1) then
the prompt's T = 300 ids (padded with the pad id, mask id != pad) — -> hidden_states [B, T, H] float32, the last
hidden state without the S system rows. S and T are fixed for a bundle (the system prompt is), the batch is
dynamic. The tokenisation itself travels as data: Qwen2-VL's own ``tokenizer.json`` and the manifest's
``text.encoder`` (system prompt, pad id, padding side, lengths), so far_sdk.text rebuilds the exact ids with
the ``tokenizers`` library alone.

Weight storage (``weight_dtype``): "float32", or "float16" / "bfloat16": the model's parameters are rounded to
that type **in place** before tracing (the validated reference is the rounded model), then every initializer
that is exactly representable in it is stored so, behind a Cast to float32; the graph computes in float32 and
its output is float32. A graph over ``external_data_threshold`` bytes keeps its weights in
``text_encoder.onnx.data`` (protobuf cannot hold 2 GiB).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from far_sdk.bundle.graphs import GraphSpec, text_encoder_spec
from far_sdk.bundle.schema import ENCODER_WEIGHT_DTYPES
from far_sdk.errors import ExportError, InvalidArgumentError
from training.text_encoder import prompt_inputs

from .onnx_graphs import check_graph

logger = logging.getLogger(__name__)

TEXT_ENCODER_FILE = "text_encoder.onnx"
TOKENIZER_FILE = "tokenizer.json"
#: Graphs over this many bytes keep their weights in one ``text_encoder.onnx.data`` (Qwen2-VL's 1.5B language
#: model: 6.2 GB in float32, 3.1 GB in float16).
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
#: Largest accepted |onnx - transformers| / max |transformers| of the hidden states.
MAX_REL = 1e-4
WeightDtype = str  # one of far_sdk.bundle.schema.ENCODER_WEIGHT_DTYPES
WEIGHT_DTYPES: tuple[str, ...] = ENCODER_WEIGHT_DTYPES
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
#: Prompts the graph is validated on: short, accents, CJK, emoji, empty, longer than 300 tokens (truncated).
PROBE_PROMPTS = (
    "a cat sleeping on a sunny windowsill",
    "café crème brûlée, a still life",
    "一只在窗台上睡觉的猫",
    "a red fox 🦊 in the snow",
    "",
    "an astronaut riding a horse, " * 80,
)
_MIN_CAST_ELEMENTS = 1024  # smaller initializers (norm scales, biases of tiny layers) stay float32


class PromptGraph(nn.Module):
    """(input_ids, attention_mask) [B, S + T] -> the last hidden state's prompt rows [B, T, H] float32."""

    def __init__(self, model: nn.Module, n_system: int):
        super().__init__()
        self.model, self.n_system = model, int(n_system)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[-1][:, self.n_system :].float()  # (B, T, H)


def _inputs(encoder: Any, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    ids, mask, n_sys = prompt_inputs(encoder.tokenizer, prompts, encoder.max_length, encoder.system_prompt)
    return ids.numpy().astype(np.int64), mask.numpy().astype(np.int64), n_sys


def round_weights(model: nn.Module, weight_dtype: str) -> None:
    """Round the model's floating-point parameters to ``weight_dtype`` in place (they stay float32 tensors)."""
    if weight_dtype == "float32":
        return
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(p.to(_TORCH_DTYPES[weight_dtype]).float())


def store_weights_as(model: Any, weight_dtype: str) -> int:
    """Store every float32 initializer of the ONNX ``model`` that ``weight_dtype`` holds exactly as that type
    behind a Cast to float32 (same values: the graph computes as before); returns how many were converted."""
    if weight_dtype == "float32":
        return 0
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415 - export-time dependency

    target = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}[weight_dtype]
    graph, casts, n = model.graph, [], 0
    for init in list(graph.initializer):
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < _MIN_CAST_ELEMENTS:
            continue
        arr = np.array(numpy_helper.to_array(init))  # a writable copy
        low = torch.from_numpy(arr).to(_TORCH_DTYPES[weight_dtype])
        if not torch.equal(low.float(), torch.from_numpy(arr)):
            continue  # e.g. a constant folded from several weights: kept float32
        stored = f"{init.name}__{weight_dtype}"
        new = TensorProto(name=stored, data_type=target, dims=list(init.dims))
        new.raw_data = low.view(torch.int16).numpy().tobytes()
        graph.initializer.remove(init)
        graph.initializer.append(new)
        casts.append(helper.make_node("Cast", [stored], [init.name], to=TensorProto.FLOAT, name=f"cast_{stored}"))
        n += 1
    for node in reversed(casts):
        graph.node.insert(0, node)
    return n


def _declare_io(model: Any, spec: GraphSpec) -> None:
    """The graph's inputs and outputs get exactly the spec's shapes (the tracer names the sliced T axis)."""
    by_name = {t.name: t for t in spec.inputs + spec.outputs}
    for v in [*model.graph.input, *model.graph.output]:
        if v.name in by_name:
            dims = v.type.tensor_type.shape.dim
            del dims[:]
            for d in by_name[v.name].shape:
                dim = dims.add()
                if isinstance(d, str):
                    dim.dim_param = d
                else:
                    dim.dim_value = d


def trace_text_encoder(
    module: nn.Module, ids: np.ndarray, mask: np.ndarray, path: Path, opset: int, what: str = "Qwen2-VL"
) -> None:
    """Trace a text encoder (token ids + attention mask -> hidden states, batch dynamic) to ONNX at ``path``."""
    axes = {"input_ids": {0: "B"}, "attention_mask": {0: "B"}, "hidden_states": {0: "B"}}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (torch.from_numpy(ids), torch.from_numpy(mask)),
                str(path),
                input_names=["input_ids", "attention_mask"],
                output_names=["hidden_states"],
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as e:
        raise ExportError(f"torch.onnx.export of the {what} text encoder failed: {type(e).__name__}: {e}") from e


def _save(model: Any, final: Path, threshold: int) -> list[str]:
    import onnx  # noqa: PLC0415 - export-time dependency

    # the weights' bytes (ByteSize() fails on a message over 2 GiB); the graph itself is ~130 kB plus 5 kB a layer
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size <= threshold:
        onnx.save_model(model, str(final))
        return [final.name]
    data = final.name + ".data"
    logger.info("text encoder: %.2f GB of weights: writing them to %s", size / 1e9, data)
    onnx.save_model(
        model, str(final), save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024
    )
    return [final.name, data]


def _check_tokenizer_file(encoder: Any, path: Path) -> None:
    """The copied tokenizer.json, read by ``tokenizers`` alone (as far_sdk does), must give transformers' ids."""
    from tokenizers import Tokenizer  # noqa: PLC0415 - text-encoder dependency: loaded when used

    raw = Tokenizer.from_file(str(path))
    raw.no_padding()  # as far_sdk.text reads it
    raw.no_truncation()
    for text in (*PROBE_PROMPTS, encoder.system_prompt or ""):
        want = list(encoder.tokenizer(text, add_special_tokens=True).input_ids)
        got = raw.encode(text, add_special_tokens=True).ids
        if got != want:
            raise ExportError(
                f"{path.name} read by the tokenizers library gives other token ids than the transformers tokenizer "
                f"for {text[:40]!r} ({len(got)} vs {len(want)} ids, first {got[:6]} vs {want[:6]}): the directory's "
                "tokenizer files disagree"
            )


def validate(encoder: Any, path: Path, batch_sizes: tuple[int, ...] = (1, 3)) -> dict[str, Any]:
    """onnxruntime (CPU) on ``path`` vs transformers (``encoder.encode``) on :data:`PROBE_PROMPTS`; ExportError
    beyond :data:`MAX_REL`."""
    import onnxruntime as ort  # noqa: PLC0415 - the backend's runtime: loaded when chosen

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception classes
        raise ExportError(f"onnxruntime cannot load the exported text encoder: {e}") from e
    worst_abs = worst_rel = 0.0
    probes, start = list(PROBE_PROMPTS), 0
    for n in batch_sizes:
        prompts = [probes[(start + i) % len(probes)] for i in range(n)]
        start += n
        ids, mask, _ = _inputs(encoder, prompts)
        got = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        want = encoder.encode(prompts).detach().cpu().numpy()
        if got.shape != want.shape or not np.isfinite(got).all():
            raise ExportError(
                f"the exported text encoder gives {got.shape} (finite: {np.isfinite(got).all()}), "
                f"transformers {want.shape}"
            )
        err = float(np.abs(got.astype(np.float64) - want).max())
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / max(float(np.abs(want).max()), 1e-30))
    if not worst_rel <= MAX_REL:
        raise ExportError(
            f"the exported text encoder disagrees with transformers (max rel {worst_rel:.3g} > {MAX_REL}); nothing "
            "was written"
        )
    return {"max_abs": worst_abs, "max_rel": worst_rel, "batch_sizes": list(batch_sizes)}


def export_qwen2vl_encoder(
    encoder: Any,
    bundle_dir: Path,
    opset: int,
    *,
    weight_dtype: WeightDtype = "float32",
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    validate_graph: bool = True,
) -> dict[str, Any]:
    """Write ``text_encoder.onnx`` (+ ``.data``) and Qwen2-VL's ``tokenizer.json`` into ``bundle_dir``; returns
    the manifest's ``text.encoder`` entry. ``encoder``: a :class:`training.text_encoder.Qwen2VLPromptEncoder`
    (float32, on CPU; its weights are rounded in place for a float16 / bfloat16 ``weight_dtype``)."""
    import onnx  # noqa: PLC0415 - export-time dependency

    if weight_dtype not in WEIGHT_DTYPES:
        raise InvalidArgumentError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    tok = encoder.tokenizer
    src = Path(getattr(tok, "name_or_path", "") or "") / TOKENIZER_FILE
    model = encoder.model.eval()
    bad = {(p.dtype, p.device.type) for p in model.parameters()} - {(torch.float32, "cpu")}
    if bad:
        raise ExportError(f"the text encoder has parameters of {sorted(map(str, bad))}; export needs float32 on CPU")
    round_weights(model, weight_dtype)
    ids, mask, n_sys = _inputs(encoder, list(PROBE_PROMPTS[:2]))
    spec = text_encoder_spec(encoder.max_length, encoder.hidden_size, n_sys)
    t0 = time.perf_counter()
    final = bundle_dir / TEXT_ENCODER_FILE
    scratch = Path(tempfile.mkdtemp(prefix=".text_encoder.", dir=bundle_dir))
    try:
        trace_text_encoder(PromptGraph(model, n_sys).eval(), ids, mask, scratch / TEXT_ENCODER_FILE, opset)
        graph = onnx.load(str(scratch / TEXT_ENCODER_FILE))  # also pulls in torch's per-tensor files (> 2 GiB)
        _declare_io(graph, spec)
        n_cast = store_weights_as(graph, weight_dtype)
        files = _save(graph, final, external_data_threshold)
        del graph
        check_graph(final, spec)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info(
        "text encoder: exported in %.1f s (%s; %d initializers stored as %s)",
        time.perf_counter() - t0,
        " + ".join(files),
        n_cast,
        weight_dtype,
    )
    if src.is_file():  # the directory's own file, as the hub ships it
        shutil.copyfile(src, bundle_dir / TOKENIZER_FILE)
    else:  # vocab.json + merges.txt only: the fast tokenizer transformers built from them
        tok.backend_tokenizer.save(str(bundle_dir / TOKENIZER_FILE))
    _check_tokenizer_file(encoder, bundle_dir / TOKENIZER_FILE)
    val = None
    if validate_graph:
        t0 = time.perf_counter()
        val = validate(encoder, final)
        logger.info("text encoder: validated in %.1f s: max rel %.3g", time.perf_counter() - t0, val["max_rel"])
    cfg = encoder.model.config
    text_cfg = getattr(cfg, "text_config", cfg)
    entry: dict[str, Any] = {
        "kind": "qwen2-vl",
        "file": TEXT_ENCODER_FILE,
        "tokenizer": TOKENIZER_FILE,
        "pad_token_id": int(tok.pad_token_id),
        "padding_side": str(tok.padding_side),
        "truncation_side": str(tok.truncation_side),
        "system_length": int(n_sys),
        "model_type": str(cfg.model_type),
        "num_layers": int(text_cfg.num_hidden_layers),
        "weight_dtype": weight_dtype,
        "opset": int(opset),
        **spec.to_dict(),
        "validation": val,
    }
    if encoder.system_prompt is not None:
        entry["system_prompt"] = encoder.system_prompt
    if len(files) > 1:
        entry["external_data"] = files[1]
    return entry
