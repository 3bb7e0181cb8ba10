"""Where the units are, for the families whose config has no usable plan: one row each.

Most families need no row: :mod:`~sparse_lightning.architectures.plans` reads the module paths
from the config's pipeline and tensor-parallel plans. A row here overrides that. Module paths
are dotted, relative to the model (``layers``) or to one decoder layer (the rest). Adding a
family is at most one row here plus a tiny config in the test table (``docs/architecture.md``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module paths of one model family.

    Attributes:
        layers: path from the model to the ``ModuleList`` of decoder layers.
        attn_in: the query/key/value projections (one fused projection where the family fuses).
        attn_out: the attention output projection (its input = the heads).
        mlp_in: the projections that produce the neurons: ``(gate, up)`` or ``(fc1,)``.
        mlp_out: the MLP output projection (its input = the neurons).
        mlp_size: config attribute holding the MLP width (compaction rewrites it); ``None``
            when the config has none (compaction cannot remove neurons then).
        heads_removable: query, key and value are separate projections whose head count comes
            from the config, so compaction can remove heads by slicing.
        mlp_gate_act: path to the activation of a gated MLP, whose neurons are
            ``act(gate(x)) * up(x)`` with ``mlp_in = (gate, up)``; ``None`` for a plain MLP
            (``act(fc1(x))``). ``mode="gate"`` decides from it before running ``up``.
        fused_gate_up: the gated MLP's gate and up are one projection (``gate_up_proj``): its
            first half of output rows is the gate, the second half up.
    """

    layers: str
    attn_in: tuple[str, ...]
    attn_out: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    mlp_size: str | None = "intermediate_size"
    heads_removable: bool = True
    mlp_gate_act: str | None = None
    fused_gate_up: bool = False

    def paths(self, site: str) -> tuple[str, ...]:
        """The projections whose input is ``site`` (see :mod:`sparse_lightning.units`)."""
        value = getattr(self, site)
        return (value,) if isinstance(value, str) else value


#: ``model_type`` -> where its units are, for families the plans do not describe.
ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "gpt2": ArchitectureSpec(
        layers="transformer.h",
        attn_in=("attn.c_attn",),
        attn_out="attn.c_proj",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        mlp_size="n_inner",
        heads_removable=False,
    ),
    "opt": ArchitectureSpec(
        layers="model.decoder.layers",
        attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        attn_out="self_attn.out_proj",
        mlp_in=("fc1",),
        mlp_out="fc2",
        mlp_size="ffn_dim",
        # OPT derives head_dim from hidden_size / num_attention_heads: no head removal.
        heads_removable=False,
    ),
    "falcon": ArchitectureSpec(
        layers="transformer.h",
        attn_in=("self_attention.query_key_value",),
        attn_out="self_attention.dense",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        mlp_size="ffn_hidden_size",
        heads_removable=False,
    ),
    "stablelm": ArchitectureSpec(
        layers="model.layers",
        attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        attn_out="self_attn.o_proj",
        mlp_in=("mlp.gate_proj", "mlp.up_proj"),
        mlp_out="mlp.down_proj",
        mlp_gate_act="mlp.act_fn",
    ),
    # A hybrid: most layers are short convolutions (``conv``) with no attention site; the
    # resolver finds which layers have each site. The MLP width is derived from
    # intermediate_size (two thirds, rounded), so compaction cannot rewrite it.
    "lfm2": ArchitectureSpec(
        layers="model.layers",
        attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        attn_out="self_attn.out_proj",
        mlp_in=("feed_forward.w1", "feed_forward.w3"),
        mlp_out="feed_forward.w2",
        mlp_size=None,
    ),
}
