"""Skipping the work of dropped MLP neurons at batch-1 decode (``mode="gate"``).

Masking multiplies dropped neurons by zero and saves nothing. In ``gate`` mode the neurons
kept for a token are decided from the gate activation alone, so the projections can be cut to
the kept neurons before they run:

* gated MLPs (Llama, Mistral, Qwen2): ``g = act(x W_gate^T)`` densely; keep the ``k`` largest
  ``|g|``; ``u = x W_up[keep]^T``; ``y = (g[keep] * u) W_down[:, keep]^T``.
* plain MLPs (Phi, GPT-2, GPT-NeoX, OPT): the activation is the gate, so it is computed densely
  and only the output projection is cut to the kept columns.

The cut path runs when a forward carries one token (batch-1 decode with a KV cache). The
output projection reads the kept rows of its transposed weight through ``embedding_bag``,
which copies nothing; to make those rows contiguous its weight is stored transposed while
skipping is installed (the same values, no extra memory; restored by
:meth:`GateExecutor.remove`). The up projection has no such primitive: its kept rows must be
copied out (``index_select``) before the matrix-vector product, which reads them twice and
writes them once. That only beats the dense product when under a third of the neurons are kept
(:data:`GATHER_UP_BELOW`, measured on 2 CPU cores); above it the up projection runs densely and
only its kept entries are used. Forwards with several tokens (prefill, batched decode) keep a
different set per token, so they compute densely and mask: that is also the reference the cut
path must equal.

Example:
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from sparse_lightning import SparseActivationModule
    >>> model = AutoModelForCausalLM.from_config(LlamaConfig(
    ...     vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2))
    >>> module = SparseActivationModule(model)
    >>> _ = module.set_sparsity(mlp=0.5, mode="gate")
    >>> with torch.no_grad():
    ...     cut = module.model(torch.tensor([[7]])).logits
    ...     module.sparsifier.gather = False  # the masked reference
    ...     masked = module.model(torch.tensor([[7]])).logits
    >>> bool((cut - masked).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_lightning.architectures import ResolvedArchitecture
from sparse_lightning.architectures.weights import input_rows, restore_layout, store_input_rows
from sparse_lightning.inference.executor import Executor, Owner, restrict
from sparse_lightning.selection import GateSelector
from sparse_lightning.units import UNIT_KINDS

#: Largest kept fraction at which the up projection's kept rows are gathered (see above).
GATHER_UP_BELOW = 1 / 3


class GateExecutor(Executor):
    """Replaces one layer's MLP computation by the gate-first path; a removable handle.

    Gated MLPs get a new ``forward`` on the MLP module; plain MLPs on the output projection
    (OPT has no MLP module). Either way the module's parameters and state dict are unchanged.

    The selector chooses the kept neurons from the gate activation (see :class:`Executor`).
    """

    def __init__(
        self,
        owner: Owner,
        architecture: ResolvedArchitecture,
        kind: str,
        layer: int,
        selector: GateSelector,
    ) -> None:
        super().__init__(owner, architecture, kind, layer, selector)
        spec = architecture.spec
        if spec.fused_gate_up:
            raise ValueError(
                f"mode='gate' decides from the gate before running up, and "
                f"{architecture.model_type} computes both in one projection "
                f"({spec.mlp_in[0]}); use mode='dynamic' (the input-sparse kernel) instead."
            )
        decoder_layer = architecture.layers[architecture.layer_of(UNIT_KINDS[kind].site, layer)]
        self.out_proj = decoder_layer.get_submodule(spec.mlp_out)
        self._relaid = store_input_rows(self.out_proj)
        if spec.mlp_gate_act is not None:
            self.gate = decoder_layer.get_submodule(spec.mlp_in[0])
            self.up = decoder_layer.get_submodule(spec.mlp_in[1])
            self.act = decoder_layer.get_submodule(spec.mlp_gate_act)
            self.target = decoder_layer.get_submodule(spec.mlp_out.rsplit(".", 1)[0])
            forward: Callable[[Tensor], Tensor] = self._gated_forward
        else:
            self.target = self.out_proj
            forward = self._plain_forward
        self._original = self.target.forward
        self.target.forward = forward  # an instance attribute shadows the class method

    def remove(self) -> None:
        """Put the original forward and weight layout back."""
        if self.target.__dict__.get("forward") is not None:
            del self.target.forward
        if self._relaid:
            restore_layout(self.out_proj)
            self._relaid = False

    # ------------------------------------------------------------------------------ paths
    def _gated_forward(self, x: Tensor) -> Tensor:
        if not self.owner.enabled:
            return self._original(x)
        rows = self.owner.sparse_rows(x)
        if rows is False:
            return self._original(x)
        g = self.act(self.gate(x))
        flat = g.reshape(-1, self.units)
        if self.owner.gather and flat.shape[0] == 1:
            index = self._kept_index(flat)
            if index.numel() < GATHER_UP_BELOW * self.units:
                up_bias = None if self.up.bias is None else self.up.bias.index_select(0, index)
                u = F.linear(x.reshape(1, -1), self.up.weight.index_select(0, index), up_bias)[0]
            else:
                u = self.up(x).reshape(-1).index_select(0, index)
            return self._cut_out_proj(index, g.reshape(-1).index_select(0, index) * u, x)
        keep = self._kept_mask(flat, rows).reshape(g.shape)
        return self.out_proj(g * self.up(x) * keep)

    def _plain_forward(self, a: Tensor) -> Tensor:
        if not self.owner.enabled:
            return self._original(a)
        rows = self.owner.sparse_rows(a)
        if rows is False:
            return self._original(a)
        flat = a.reshape(-1, self.units)
        if self.owner.gather and flat.shape[0] == 1:
            index = self._kept_index(flat)
            return self._cut_out_proj(index, flat[0].index_select(0, index), a)
        return self._original(a * self._kept_mask(flat, rows).reshape(a.shape))

    # ---------------------------------------------------------------------------- helpers
    def _kept_index(self, flat: Tensor) -> Tensor:
        """Sorted indices of the kept neurons of a single token (sorted: sequential reads)."""
        index = self.selector.keep_index(self.layer, flat[0]).sort().values
        zeroed = torch.full((), self.units - index.numel(), device=index.device)
        self.owner.count(self.kind, zeroed=zeroed, seen=self.units)
        return index

    def _kept_mask(self, flat: Tensor, rows: bool | Tensor) -> Tensor:
        keep = self.selector.keep(self.layer, flat.unsqueeze(-1))
        keep, zeroed, seen = restrict(keep, rows, flat.shape[0])
        self.owner.count(self.kind, zeroed=zeroed, seen=seen)
        return keep.to(flat.dtype)

    def _cut_out_proj(self, index: Tensor, weights: Tensor, like: Tensor) -> Tensor:
        """``sum_i weights_i * W_out[:, index_i] + bias`` reading only the kept rows."""
        rows = input_rows(self.out_proj)
        y = F.embedding_bag(
            index.unsqueeze(0), rows, per_sample_weights=weights.unsqueeze(0), mode="sum"
        )
        if self.out_proj.bias is not None:
            y = y + self.out_proj.bias
        return y.reshape(*like.shape[:-1], rows.shape[1]).to(like.dtype)
