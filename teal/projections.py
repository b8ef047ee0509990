"""The one specification of a transformer block's TEAL projections.

TEAL (arXiv 2408.14690, Section 3) sparsifies the input of every linear projection of a
block. Seven projections read four distinct inputs; projections that read the same input
are one fused module (one weight buffer, one kernel pass over the kept input channels):

    input     module (path in a block)   projections                  epilogue   TP split
    attn_in   attention.qkv              q_proj, k_proj, v_proj       -          column
    attn_out  attention.o_proj           o_proj                       -          row
    mlp_in    feed_forward.gate_up       gate_proj, up_proj           SwiGLU     column
    mlp_mid   feed_forward.down_proj     down_proj                    -          row

Column-parallel projections split their output features across tensor-parallel ranks, so
every rank sees the whole input and the same TEAL mask; row-parallel ones split their input
features, each rank thresholds its own shard (Megatron-LM, arXiv 1909.08053).

Everything here is data about names and widths: the model builds its modules from it,
calibration and thresholds use its input and projection names and order, the greedy
allocation its projection order and parameter counts, tensor parallelism its split styles,
and the checkpoint format its state-dict keys (``<block>.<owner>.<projection>.weight``, in
nn.Linear (out_features, in_features) shape, whatever the in-memory fusion).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["ProjectionSpec", "InputSpec", "PROJECTION_SPECS", "INPUT_SPECS", "PROJECTIONS",
           "INPUTS", "INPUT_OF", "SPEC_OF", "INPUT_SPEC_OF", "projection_shapes",
           "build_input_module", "input_module", "block_projections", "model_projections",
           "model_projection"]


@dataclass(frozen=True)
class ProjectionSpec:
    """One projection of a block.

    Attributes:
        name: the projection's name, e.g. "q_proj" (also its state-dict key component).
        input: the name of the input it reads (an `InputSpec.name`, e.g. "attn_in").
        owner: the block sub-module whose state-dict keys hold it ("attention" or
            "feed_forward"), e.g. ``layers.0.attention.q_proj.weight``.
        parallel: "column" (output features split across tensor-parallel ranks) or "row"
            (input features split, partial outputs summed).
    """

    name: str
    input: str
    owner: str
    parallel: str


@dataclass(frozen=True)
class InputSpec:
    """One projection input of a block and the fused module of the projections reading it.

    Attributes:
        name: "attn_in", "attn_out", "mlp_in" or "mlp_mid".
        owner: block sub-module holding the fused module ("attention" or "feed_forward").
        module: attribute name of the fused module in `owner` ("qkv", "o_proj", ...).
        projections: the projections reading this input, in output-column order.
        gated: the module's output is silu(first) * second (SwiGLU), not the concatenation.
        parallel: tensor-parallel split style shared by its projections.
    """

    name: str
    owner: str
    module: str
    projections: tuple
    gated: bool
    parallel: str

    @property
    def path(self) -> str:
        """Module path inside a block, e.g. "attention.qkv"."""
        return f"{self.owner}.{self.module}"


INPUT_SPECS = (
    InputSpec("attn_in", "attention", "qkv", ("q_proj", "k_proj", "v_proj"), False, "column"),
    InputSpec("attn_out", "attention", "o_proj", ("o_proj",), False, "row"),
    InputSpec("mlp_in", "feed_forward", "gate_up", ("gate_proj", "up_proj"), True, "column"),
    InputSpec("mlp_mid", "feed_forward", "down_proj", ("down_proj",), False, "row"),
)
PROJECTION_SPECS = tuple(ProjectionSpec(p, i.name, i.owner, i.parallel)
                         for i in INPUT_SPECS for p in i.projections)

INPUTS = tuple(i.name for i in INPUT_SPECS)
PROJECTIONS = tuple(p.name for p in PROJECTION_SPECS)
INPUT_OF = {p.name: p.input for p in PROJECTION_SPECS}
SPEC_OF = {p.name: p for p in PROJECTION_SPECS}
INPUT_SPEC_OF = {i.name: i for i in INPUT_SPECS}


def _get(config: Any, key: str) -> int:
    value = config[key] if isinstance(config, Mapping) else getattr(config, key)
    return int(value)


def projection_shapes(config: Any) -> dict:
    """{projection: (in_features, out_features)} of one block.

    Args:
        config: a `model.ModelArgs` or its dict, with dim, n_head, n_local_heads (KV heads),
            head_dim and intermediate_size.
    """
    d, hd = _get(config, "dim"), _get(config, "head_dim")
    q, kv = _get(config, "n_head") * hd, _get(config, "n_local_heads") * hd
    f = _get(config, "intermediate_size")
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


# --------------------------------------------------------------------------- modules
def build_input_module(input_name: str, config: Any, device=None, dtype=None):
    """The fused `teal.SparseLinear` of one input of a block (e.g. "attn_in" -> q/k/v), with
    the widths of `config` (a `model.ModelArgs` or its dict)."""
    from teal.sparse_linear import SparseLinear
    spec = INPUT_SPEC_OF[input_name]
    shapes = projection_shapes(config)
    k = shapes[spec.projections[0]][0]
    return SparseLinear(k, [shapes[p][1] for p in spec.projections], names=spec.projections,
                        gated=spec.gated, device=device, dtype=dtype)


def input_module(block, input_name: str):
    """The fused module of `input_name` in a transformer block (by its `InputSpec.path`)."""
    spec = INPUT_SPEC_OF[input_name]
    return getattr(getattr(block, spec.owner), spec.module)


def block_projections(block) -> dict:
    """{projection name: `teal.sparse_linear.Projection`} of a block, in `PROJECTIONS` order."""
    out = {}
    for spec in INPUT_SPECS:
        module = input_module(block, spec.name)
        for i, name in enumerate(spec.projections):
            out[name] = module.projection(i)
    return out


def model_projections(model):
    """Yield (layer index, projection name, Projection) for every projection of `model`
    (anything with a `layers` list of blocks), layer by layer in `PROJECTIONS` order."""
    for layer, block in enumerate(model.layers):
        for name, proj in block_projections(block).items():
            yield layer, name, proj


def model_projection(model, layer: int, name: str):
    """The Projection `name` (e.g. "q_proj") of block `layer`."""
    spec = SPEC_OF[name]
    return input_module(model.layers[layer], spec.input).projection(name)
