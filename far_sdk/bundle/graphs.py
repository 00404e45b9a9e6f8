"""The graph spec: names, inputs and outputs of the three graphs in a bundle.

One spec shared by export (ONNX input/output names, dynamic axes), engine building (optimisation
profiles over the batch axis) and every backend (buffer allocation, feeds). Shapes use ``"B"``
for the dynamic batch axis and integers for fixed sizes; symbolic model sizes are filled from the
manifest's model config by :func:`graph_specs`.

- ``transformer``: tokens [N, L, C], class_ids [N] (id ``num_classes`` = the null/unconditional
  class, i.e. ``fake_latent``), level [1] -> cond [N, L, W]: the per-token adaLN condition of the
  diffusion MLP, ``cond_embed(z) + index_cond_embed(level)``, computed once per outer step.
  A model built for masking (manifest ``model.mask``; it samples in mask mode only) also takes
  mask [N, L] float32 (1 = the token is dropped by the encoder and refilled with ``mask_token`` by
  the decoder; 0 = kept), last.
  A text-conditioned bundle (FAR-T2I; manifest ``conditioning: "text"``) takes context [N, T, D_text] (text
  hidden states) and null [N] float32 (1 = the unconditional CFG row: the graph puts its learned null context
  ``fake_latent`` in place of ``context_embed(context)``) instead of class_ids; it always takes the mask.
- ``denoiser``: one whole guided DDPM step (or DDIM step: other coefficients in ``step``, see
  far_sdk.maths.diffusion.DDIMTables). x [B, L, C] (conditional half), noise [B, L, C],
  cond [2, B, L, W] (conditional rows first), step [10] (the columns of :class:`far_sdk.maths.diffusion.Step`) ->
  x_prev [B, L, C].
- ``denoiser_fewstep`` (optional): the denoiser's signature, a distilled student's weights (1, 2 or 4 steps).
- ``vae_decoder``: latents [B, C, H, W] (sampler scale; the graph divides by the latent scale)
  -> image [B, 3, 16 H, 16 W] in about [-1, 1].
- ``vae_encoder`` (optional: :data:`OPTIONAL_GRAPHS`; image-to-image): image [B, 3, S, S] float32 in [-1, 1]
  (the host converts uint8 pixels, :mod:`far_sdk.pipeline.img2img`) -> mean, std [B, C, H, W]: the VAE posterior's
  mean and standard deviation at the sampler's scale (both multiplied by the latent scale), so mean + std * eps is
  a posterior sample. Its weights (``encoder.*``, ``quant_conv.*``) are the bundle's :data:`VAE_ENCODER_WEIGHTS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from far_sdk.maths.diffusion import Step

GRAPH_NAMES = ("transformer", "denoiser", "vae_decoder")
#: The VAE encoder (image-to-image): optional, old bundles load without it.
VAE_ENCODER = "vae_encoder"
#: The VAE encoder's weights in a bundle that has the graph (for backend="torch" and re-exports).
VAE_ENCODER_WEIGHTS = "vae_encoder.safetensors"
#: A distilled few-step student of the denoiser (``far-export fewstep``; manifest ``fewstep``): the denoiser's
#: inputs and outputs (:func:`fewstep_spec`), run with :mod:`far_sdk.maths.distilled`'s step rows.
DENOISER_FEWSTEP = "denoiser_fewstep"
#: Graphs a bundle may list besides :data:`GRAPH_NAMES` (each checked against its spec when present); older
#: bundles have none of them.
OPTIONAL_GRAPHS: tuple[str, ...] = (VAE_ENCODER, DENOISER_FEWSTEP)
#: A text bundle's optional fourth graph (manifest ``text.encoder``): see :func:`text_encoder_spec`.
TEXT_ENCODER = "text_encoder"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: tuple  # ints, or "B" / "N" for the dynamic batch axis

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's ``dynamic_axes`` for this graph."""
        axes = {}
        for t in self.inputs + self.outputs:
            dyn = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if dyn:
                axes[t.name] = dyn
        return axes

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}


def graph_specs(
    *,
    seq_len: int,
    token_channels: int,
    mlp_width: int,
    grid_size: int,
    image_size: int,
    masked: bool = False,
    text: tuple[int, int] | None = None,
) -> dict[str, GraphSpec]:
    """The graphs' specs (the three of every bundle and the optional ones); ``masked``: the transformer takes the
    mask (a model built with mask=True);
    ``text`` = (max text length T, text hidden size): a text-conditioned transformer (context, null)."""
    L, C, W, G = seq_len, token_channels, mlp_width, grid_size
    f32 = "float32"
    if text is not None:
        cond_in = (TensorSpec("context", f32, ("N", int(text[0]), int(text[1]))), TensorSpec("null", f32, ("N",)))
    else:
        cond_in = (TensorSpec("class_ids", "int64", ("N",)),)
    tf_inputs = (TensorSpec("tokens", f32, ("N", L, C)), *cond_in, TensorSpec("level", f32, (1,)))
    if masked:
        tf_inputs += (TensorSpec("mask", f32, ("N", L)),)
    return {
        "transformer": GraphSpec("transformer", tf_inputs, (TensorSpec("cond", f32, ("N", L, W)),)),
        "denoiser": GraphSpec(
            "denoiser",
            (
                TensorSpec("x", f32, ("B", L, C)),
                TensorSpec("noise", f32, ("B", L, C)),
                TensorSpec("cond", f32, (2, "B", L, W)),
                TensorSpec("step", f32, (len(Step),)),
            ),
            (TensorSpec("x_prev", f32, ("B", L, C)),),
        ),
        "vae_decoder": GraphSpec(
            "vae_decoder",
            (TensorSpec("latents", f32, ("B", C, G, G)),),
            (TensorSpec("image", f32, ("B", 3, image_size, image_size)),),
        ),
        VAE_ENCODER: GraphSpec(
            VAE_ENCODER,
            (TensorSpec("image", f32, ("B", 3, image_size, image_size)),),
            (TensorSpec("mean", f32, ("B", C, G, G)), TensorSpec("std", f32, ("B", C, G, G))),
        ),
    }


def fewstep_spec(specs: dict[str, GraphSpec]) -> GraphSpec:
    """The few-step student's graph: the denoiser's signature (``specs`` from :func:`graph_specs`) under its name."""
    return GraphSpec(DENOISER_FEWSTEP, specs["denoiser"].inputs, specs["denoiser"].outputs)


def text_encoder_spec(max_length: int, hidden_size: int, system_length: int = 0) -> GraphSpec:
    """The bundled text encoder: input_ids, attention_mask [B, S + T] int64 (S system-prompt ids, then the T
    prompt ids) -> hidden_states [B, T, H] float32 (the prompt rows of the last hidden state)."""
    n = int(system_length) + int(max_length)
    return GraphSpec(
        TEXT_ENCODER,
        (TensorSpec("input_ids", "int64", ("B", n)), TensorSpec("attention_mask", "int64", ("B", n))),
        (TensorSpec("hidden_states", "float32", ("B", int(max_length), int(hidden_size))),),
    )
