"""Random-weight models with planted GCLIP structure: high-norm tokens from a chosen block on, and an
abnormal FFN output channel, both written into the weights (so a planted checkpoint works from the CLI).

How the tokens are planted: a marker channel ``k`` is zero in every token except the chosen patch positions
(through the position embedding), and no block before ``block`` writes into it. In ``block``, one FFN hidden
unit reads the marker and, only on the marked tokens, writes a large value into residual channel ``channel``
(the way an FFN makes "register" tokens in trained ViTs). The residual stream then carries it to the end.
That hidden unit makes row ``channel`` of ``block``'s ``mlp.c_proj.weight`` abnormal too; ``channel_blocks``
get the same row scaled up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PLANT_MODEL = "gclip-plant-test"  # tests/configs: 6 blocks, width 64, patch 8, 64 px (8x8 patches)


@torch.no_grad()
def plant(
    clip: torch.nn.Module,
    block: int,
    positions: Sequence[int],
    channel: int,
    channel_blocks: Sequence[int] = (),
    marker: int = 0,
    channel_scale: float = 6.0,
) -> torch.nn.Module:
    """Plant the structure into ``clip`` (an open_clip CLIP) in place and return it.

    Args:
        block: the block whose output first holds the high-norm tokens.
        positions: patch indices (row-major, 0-based, CLS excluded) of the high-norm tokens.
        channel: the residual channel carrying their norm, and the abnormal FFN output channel.
        channel_blocks: other blocks whose FFN output row ``channel`` is scaled by ``channel_scale``.
        marker: the residual channel used as the marker (must differ from ``channel``).
    """
    v = clip.visual
    blocks = v.transformer.resblocks
    scale = (v.conv1.out_channels / 64) ** 0.5  # token norms grow with sqrt(width)
    v.conv1.weight[marker] = 0
    v.class_embedding[marker] = 0
    v.positional_embedding[:, marker] = 0
    for p in positions:
        v.positional_embedding[1 + p, marker] = 8.0
    v.ln_pre.weight[marker], v.ln_pre.bias[marker] = 2.0, 0.0
    for i in range(block):
        for lin in (blocks[i].attn.out_proj, blocks[i].mlp.c_proj):
            lin.weight[marker] = 0
            lin.bias[marker] = 0
    b = blocks[block]
    b.ln_2.weight[marker], b.ln_2.bias[marker] = 1.0, 0.0
    unit = 0
    b.mlp.c_fc.weight[unit] = 0
    b.mlp.c_fc.weight[unit, marker] = 10.0
    b.mlp.c_fc.bias[unit] = -20.0
    b.mlp.c_proj.weight[:, unit] = 0
    b.mlp.c_proj.weight[channel, unit] = 10.0 * scale
    for i in channel_blocks:
        blocks[i].mlp.c_proj.weight[channel] *= channel_scale
    return clip


def planted_model(seed: int = 0, **kwargs) -> torch.nn.Module:
    """A random-weight :data:`PLANT_MODEL` (gclip's deterministic init) with :func:`plant` applied."""
    import open_clip

    from gclip.testing import random_state_dict

    clip = open_clip.create_model(PLANT_MODEL, pretrained=None)
    clip.load_state_dict(random_state_dict(clip, seed))
    return plant(clip.eval(), **kwargs)


if __name__ == "__main__":  # makes docs/inspect.png: python tests/_planted.py docs/inspect.png
    import sys
    import tempfile
    from pathlib import Path

    import open_clip

    from gclip.backbones.models import load_model
    from gclip.diagnostics.inspect import inspect_backbone
    from gclip.diagnostics.plots import summary_figure
    from gclip.testing import random_state_dict

    clip = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)
    clip.load_state_dict(random_state_dict(clip, 0))
    plant(clip.eval(), block=6, positions=[17, 40, 150], channel=100, channel_blocks=[7, 8, 9, 10])
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(clip.state_dict(), Path(tmp) / "planted.pt")
        model = load_model("ViT-B-16", str(Path(tmp) / "planted.pt"), device="cpu", quick_gelu=True)
    report = inspect_backbone(model)
    print(report.format())
    summary_figure(model, report, sys.argv[1] if len(sys.argv) > 1 else "inspect.png", patch=(7, 7))
