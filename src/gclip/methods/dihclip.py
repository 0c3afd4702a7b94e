"""DIH-CLIP (ICCV 2025, duan-song/DiH-CLIP): Selective Head Attention, the heads chosen by the entropy of their
attention maps, on SC-CLIP's affinity-calibrated last block (without SC-CLIP's anomaly repair).

Selective Head Attention (SHA) ranks the heads of a block by the entropy of their attention maps (the whole map,
``-sum p log2(p + eps)``) and keeps the ``topk_sha`` lowest; each kept head's map is applied to ALL the value
channels (not only its own), and the results are summed and projected. It is used twice:

- in the prior block (``pre_adjust_idx``): the heads are ranked by their ordinary ``softmax(q kᵀ s)`` maps, the
  kept heads apply ``softmax(k kᵀ s)``; the block's output plus this projected sum gives the similarity prior and
  the pre-aggregation of the last block's input;
- in the last block (run twice, as SC-CLIP: on the pre-aggregated tokens of block L-2 and on the sum of the
  outputs of blocks ``[multi_start_idx, multi_end_idx)``): each head's map is ``½(P + softmax(k kᵀ s))`` with ``P``
  the masked-softmax similarity prior, the kept heads' maps are applied to all channels and the sum is divided by
  the number of heads before the projection; ``res_cls`` times the CLS token is added, and both passes are smoothed
  by the affinity of block ``post_adjust_idx``'s output.

Numbers of blocks are for a 12-block ViT and are moved to the same relative depth on others (the authors' commented
ViT-L/14 config uses 16, 6, [8, 19) and ``res_cls=0.1``: set them as options).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbones.base import Backbone
from ..errors import ConfigError
from ._purify import AffinityBlocks, aggregate, cosine_affinity, masked_softmax, threshold
from .base import BlockChange, Method, Trace, attention_map, register


@register
@dataclass
class DihClip(Method):
    """DIH-CLIP's options (the names of its code; block indices for 12 blocks).

    Attributes:
        pre_adjust_idx: block whose output (plus its Selective Head Attention) gives the similarity prior of the
            last block's attention and the pre-aggregation of its input.
        post_adjust_idx: block whose output gives the affinity that smooths the last block's outputs.
        multi_start_idx, multi_end_idx: outputs of blocks ``[start, end)`` are summed for the multi-level pass.
        res_cls: weight of the CLS token added back after the last block's attention.
        beta: affinities below it are dropped from the aggregations.
        prior_scale: temperature of the similarity prior's masked softmax.
        topk_sha: the heads Selective Head Attention keeps (the lowest entropies; the code's ``topk_SHA``); heads
            tied with the last kept one are kept too, as in the authors' membership test.
        entropy_eps: added to the probabilities inside the entropy's logarithm.
    """

    name = "dihclip"
    protocol = "scclip"  # the authors' configs, class files and segmentor are SC-CLIP's (presets/scclip.toml)
    summary = "SC-CLIP's affinity-prior last block (no anomaly repair) with entropy-selected heads (SHA)"
    table_row = (
        "tokens after block L-2; last block run twice; a side path on block 8",
        "`Σₕ∈S ½(P + softmax(k kᵀ s))ₕ V / H`: the lowest-entropy heads `S`, each map on all channels",
        "dropped",
    )
    pre_adjust_idx: int = 8
    post_adjust_idx: int = 3
    multi_start_idx: int = 3
    multi_end_idx: int = 10
    res_cls: float = 0.3
    beta: float = 0.4
    prior_scale: float = 3.0
    topk_sha: int = 4
    entropy_eps: float = 1e-6
    _heads: tuple[tuple[int, ...], ...] = ()
    """Tests only: heads imposed on the (prior block, last block, multi-level) selections, ``()`` for one computed;
    the fidelity golden imposes the authors' choice where random weights put several heads' entropies within
    round-off of each other (tests/data/fidelity/README.md)."""

    def _blocks(self, vit: Backbone) -> AffinityBlocks:
        if self.topk_sha < 1:
            raise ConfigError(f"dihclip topk_sha must be at least 1, got {self.topk_sha}")
        return AffinityBlocks.resolve(
            "dihclip", vit.depth, self.pre_adjust_idx, self.post_adjust_idx, self.multi_start_idx, self.multi_end_idx
        )

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        blocks = self._blocks(vit)
        keep = blocks.keep(vit.depth) | {blocks.pre}  # the prior block's input: its Selective Head Attention
        return {i: BlockChange(keep=True) for i in keep}

    def features(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        blocks, last = self._blocks(vit), vit.depth - 1
        p = vit.prefix_tokens
        pre = blocks.output(blocks.pre, vit.depth, x, trace.inputs) + self._prior_heads(
            vit, blocks.pre, trace.inputs[blocks.pre]
        )
        post = blocks.output(blocks.post, vit.depth, x, trace.inputs)
        multi_sum = blocks.multi_sum(vit.depth, x, trace.inputs)
        sim = cosine_affinity(pre[:, p:])
        prior = masked_softmax(sim, self.prior_scale)
        smooth = threshold(cosine_affinity(post[:, p:]), self.beta)
        pooled = aggregate(threshold(sim, self.beta), x[:, p:])
        main = self._last_heads(vit, last, pooled, prior, 1) + self.res_cls * vit.cls(x)[:, None]
        deep = self._last_heads(vit, last, multi_sum[:, p:], prior, 2) + self.res_cls * vit.cls(multi_sum)[:, None]
        out = aggregate(smooth, main) + aggregate(smooth, deep)
        feats = vit.project(out)
        return feats.reshape(feats.shape[0], trace.grid[0], trace.grid[1], -1)

    def entropies(self, maps: torch.Tensor) -> torch.Tensor:
        """``(B, H, N, N)`` attention maps -> ``(B, H)`` entropies ``-sum p log2(p + eps)`` of each whole map."""
        flat = maps.float().flatten(2)
        return -(flat * torch.log2(flat + self.entropy_eps)).sum(dim=-1)

    def selected_heads(self, maps: torch.Tensor, which: int = 0) -> torch.Tensor:
        """``(B, H, N, N)`` attention maps -> ``(B, H)`` mask of the heads Selective Head Attention keeps: the
        entropy at most the ``topk_sha``-th lowest. ``which``: 0 the prior block, 1 the last block, 2 its
        multi-level pass (for ``_heads``)."""
        if len(self._heads) > which and self._heads[which]:
            keep = torch.zeros(maps.shape[:2], dtype=torch.bool, device=maps.device)
            return keep.index_fill(1, torch.tensor(self._heads[which], device=maps.device), True)
        entropy = self.entropies(maps)
        k = min(self.topk_sha, entropy.shape[-1])
        return entropy <= torch.sort(entropy, dim=-1).values[:, k - 1 : k]

    def _prior_heads(self, vit: Backbone, index: int, tokens: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s Selective Head Attention on its input: heads ranked by ``softmax(q kᵀ s)``, the kept
        ones apply ``softmax(k kᵀ s)`` (all tokens, prefix included)."""
        q, k, v = vit.qkv(index, tokens)
        keep = self.selected_heads(attention_map(q, k))
        return on_all_channels(vit, index, attention_map(k, k), keep, v, 1.0)

    def _last_heads(
        self, vit: Backbone, index: int, tokens: torch.Tensor, prior: torch.Tensor, which: int
    ) -> torch.Tensor:
        """The last block's Selective Head Attention on ``(B, P, D)`` patch tokens: maps ``½(prior + softmax(k kᵀ
        s))`` per head, the kept ones on all channels, divided by the number of heads."""
        _, k, v = vit.qkv(index, tokens)
        maps = 0.5 * (prior[:, None].float() + attention_map(k, k))
        return on_all_channels(vit, index, maps, self.selected_heads(maps, which), v, 1.0 / v.shape[1])


def on_all_channels(
    vit: Backbone, index: int, maps: torch.Tensor, keep: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """The kept heads' ``(B, H, N, N)`` maps (``keep``: ``(B, H)`` mask) each applied to all the ``(B, H, N, d)``
    value channels, summed, times ``scale``, through block ``index``'s output projection: ``(B, N, D)``."""
    b, h, n, d = v.shape
    values = v.transpose(1, 2).reshape(b, n, h * d).to(maps.dtype)
    mixed = torch.einsum("bh,bhnm->bnm", keep.to(maps.dtype), maps) @ values
    return vit.out_proj(index, (mixed * scale).to(v.dtype))
