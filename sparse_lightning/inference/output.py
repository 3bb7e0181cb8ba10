"""The output projection (lm_head) with a sparse input and its top candidates recomputed exactly.

The lm_head is the largest single weight a decode step streams (21% of SmolLM2-135M's bytes,
28% of Qwen2.5-0.5B's) and the most sensitive input to drop channels from: alone, dropping
half of its input channels per token keeps the dense top-1 token only 76% of the time on
SmolLM2. But the logits that decide the next token are few. So a decode step here

1. computes approximate logits from each token's ``keep`` input channels of largest magnitude
   (the compiled kernel reads only those rows of the weight stored transposed), then
2. recomputes the ``candidates`` largest approximate logits exactly, adding the dropped
   channels' weights of those columns to them, and writes them over the approximations.

Both run in one compiled op (``input_sparse_logits``), whose threads find the candidates among
the columns they have just summed and prefetch the scattered candidate weights.

Greedy decoding then picks the dense model's token whenever it is among the candidates (the
approximation only has to rank it in the top ``candidates``), and the distribution differs from
dense only in the tail's logits, which KL measures. The weight is stored transposed once (a tied
input embedding reads the same storage through a view), and :meth:`OutputExecutor.remove` puts
the original layout back, bit for bit. Forwards with several tokens (a prompt) run dense;
teacher forcing masks the input and recomputes the candidates from the dense logits: the
reference the kernel path must equal.

Example:
    >>> module = SparseActivationModule.from_pretrained(  # doctest: +SKIP
    ...     model, "checkpoints/run.safetensors", budget=0.2, lm_head=0.5)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparse_lightning.inference.executor import restrict
from sparse_lightning.kernels import load_logits
from sparse_lightning.kernels.ops import top_k_channels
from sparse_lightning.selection.selectors import kept_count

#: The realized-sparsity key of the lm_head input (beside the unit kinds).
KIND = "lm_head"
#: Bytes read per candidate weight: each sits in its own cache line of the transposed weight.
CACHE_LINE = 64


def candidate_macs(candidates: int, dropped: float, element_size: int) -> int:
    """Weight reads of the exact recomputation, in multiply-adds of the element size: one
    cache line per candidate weight of each of the ``dropped`` input channels (the kept ones
    are in the approximation already), since a candidate's weights are a column of the
    transposed layout, not a contiguous row."""
    return round(candidates * dropped * max(1, CACHE_LINE // element_size))


class OutputExecutor:
    """Sparse-input lm_head with exact candidates; see the module docstring.

    Args:
        owner: the :class:`~sparse_lightning.inference.sparsifier.Sparsifier` (its
            ``enabled``, ``gather``, :meth:`output_rows` and ``count``).
        head: the model's output projection (``model.get_output_embeddings()``), a
            ``nn.Linear``.
        level: the fraction of input channels dropped per token, in ``[0, 1)``.
        candidates: logits recomputed exactly per token (at least 1).
    """

    def __init__(self, owner, head: nn.Module, level: float, candidates: int) -> None:
        if not isinstance(head, nn.Linear):
            raise TypeError(
                f"lm_head sparsity needs an nn.Linear output projection, got "
                f"{type(head).__name__}; leave lm_head=0 for this model."
            )
        self.owner, self.head = owner, head
        self.units = head.in_features
        self.keep = kept_count(self.units, level)
        self.candidates = min(candidates, head.out_features)
        self.op = load_logits()
        with torch.no_grad():
            self.weight_t = head.weight.t().contiguous()
            head.weight.data = self.weight_t.t()  # a tied embedding reads the same storage
        self.bias = None if head.bias is None else head.bias.detach()
        self._original = head.forward
        head.forward = self._forward

    def remove(self) -> None:
        """Put the original forward and weight layout back (the same values, bit for bit)."""
        if self.head.__dict__.get("forward") is not None:
            del self.head.forward
        self.head.weight.data = self.head.weight.data.contiguous()

    def _forward(self, x: Tensor) -> Tensor:
        if not self.owner.enabled:
            return self._original(x)
        rows = self.owner.output_rows(x)
        if rows is False:
            return self._original(x)
        tokens = x.numel() // x.shape[-1]
        if self.owner.gather and tokens == 1 and rows is True and not x.requires_grad:
            return self._decode(x)
        dense = self._original(x)
        flat = x.reshape(tokens, self.units)
        keep, zeroed, seen = restrict(top_k_channels(flat, self.keep), rows, tokens)
        self.owner.count(KIND, zeroed=zeroed, seen=seen)
        approx = self._original((flat * keep.to(x.dtype)).reshape(x.shape))
        index = approx.topk(self.candidates, dim=-1).indices
        exact = approx.scatter(-1, index, dense.gather(-1, index))
        if rows is True:
            return exact
        return torch.where(rows.reshape(*x.shape[:-1], 1), exact, dense)

    def _decode(self, x: Tensor) -> Tensor:
        """One token: approximate logits and exact candidates, in one call of the kernel."""
        if not torch.compiler.is_compiling():
            self.owner.count(KIND, zeroed=torch.tensor(self.units - self.keep), seen=self.units)
        return self.op(x, self.weight_t, self.keep, self.candidates, self.bias)
