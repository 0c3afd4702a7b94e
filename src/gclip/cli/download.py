"""``gclip download``: fetch weights on a connected machine into a file gclip then loads offline, settings included.

  gclip download ViT-B-16 openai --to weights/     # -> weights/ViT-B-16.openai.pt (+ .json)
  gclip download dino_vitb8 --to weights/          # a second model (gclip models lists them)
  gclip download sam_vitb --to weights/            # SAM (the mask generator and the image encoder)
  gclip download sam2.1_hiera_l --to weights/      # SAM 2.1 (a mask generator; sam2_hiera_l: SAM 2)

Then pass the file: --pretrained weights/ViT-B-16.openai.pt (no --model or --quick-gelu needed),
--proxy-checkpoint weights/dino_vitb8.pt, --sam-checkpoint weights/sam_vitb.pt. Without --to the file goes to gclip's
weights folder ($GCLIP_CACHE_DIR/weights, default ~/.cache/gclip/weights), where the tags and names find it.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download",
        help="fetch weights into a file gclip loads offline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "name", metavar="MODEL", help="an open_clip model, a second model or a SAM (sam_vitb, sam2.1_hiera_l, ...)"
    )
    p.add_argument("tag", metavar="TAG", nargs="?", default=None, help="a CLIP's pretrained tag (default: openai)")
    p.add_argument("--to", metavar="DIR", default=None, help="folder (default: gclip's weights folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..backbones.download import download
    from ..backbones.weights import read_sidecar

    path = download(args.name, args.tag, args.to)
    side = read_sidecar(path) or {}
    flag = {"clip": "--pretrained", "sam": "--sam-checkpoint (or --proxy-checkpoint)"}.get(
        str(side.get("kind")), "--proxy-checkpoint"
    )
    print(f"{path} (sha256 {side.get('sha256', '?')[:16]}...): pass it with {flag} {path}")
    return 0
