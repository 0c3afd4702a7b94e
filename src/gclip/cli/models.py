"""``gclip models``: the methods, the backbone presets, and the other open_clip ViT models gclip can run."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list methods and supported backbones")
    p.add_argument("--all", action="store_true", help="also list every other open_clip ViT with pretrained tags")
    p.add_argument("--markdown", action="store_true", help="print the methods as the docs' markdown table")
    p.set_defaults(func=run)


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def methods_markdown() -> str:
    """The methods table of the README and the docs, from the registry."""
    from ..methods import SECOND_MODEL_OPTIONS, list_methods, method_class, methods_with_option

    names = list_methods()
    lines = [
        f"{len(names)} methods run through the one engine; each is one file in `gclip/methods/`. Notation: `x` is",
        "the input of the last block, `q, k, v` come from its `ln_1(x)`, and `s = head_dim ** -0.5`.",
        "",
        "| method | what it changes | last block: attention per head | residual + FFN of the last block "
        "| protocol | needs besides CLIP |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        cls = method_class(name)
        needs = [f"`--{o.replace('_', '-')}`" for o in SECOND_MODEL_OPTIONS if name in methods_with_option(o)]
        row = [f"`{name}`", *cls.table_row, f"`{cls.protocol}`", ", ".join(needs) or "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "markdown", False):
        print(methods_markdown())
        return 0
    import open_clip

    from ..backbones.presets import list_presets
    from ..methods import get_method, list_methods

    print("methods:")
    for name in list_methods():
        print(f"  {name:10s} {get_method(name).summary}")
    from ..backbones.second_models import SECOND_MODELS
    from ..methods import methods_with_second_models

    print(f"\nsecond models (--proxy NAME --proxy-checkpoint PATH, for {', '.join(methods_with_second_models())};")
    print("`gclip download NAME` fetches their weights, `gclip download MODEL TAG` a CLIP's, for an offline machine):")
    for name, spec in sorted(SECOND_MODELS.items()):
        source = "segment-anything sam_model_registry" if spec.family == "sam" else "timm"
        weights = f" ({spec.tag} weights)" if spec.tag else ""
        if spec.gated:
            weights = " (gated weights: a local file, authors' or timm's layout)"
        print(f"  {name:18s} {source} {spec.arch}{weights}")
    print("\nbackbone presets (--model NAME --pretrained TAG):")
    presets = list_presets()
    for p in presets:
        settings = ", ".join(f"{k}={v}" for k, v in p.settings.items())
        print(
            f"\n  {p.name}  --model {p.model}  "
            f"(patch {p.patch_size}, {p.depth} blocks, width {p.width}, {p.image_size} px)"
        )
        print(f"    settings: {settings}; {p.notes}")
        if p.tokenizer:
            print(f"    tokenizer: huggingface.co/{p.tokenizer} (offline: --tokenizer DIR or --text-embeddings FILE)")
        for t in p.tags:
            gelu = "QuickGELU" if t.quick_gelu else "GELU"
            extra = "" if t.resize_mode == "shortest" else f", resize {t.resize_mode}"
            print(f"    {t.tag:24s} {t.family:9s} {gelu:9s} mean {_fmt(t.mean)} std {_fmt(t.std)}{extra}")
    if getattr(args, "all", False):
        print("\nother open_clip ViT models with pretrained tags:")
        known = {p.model for p in presets}
        for name in open_clip.list_models():
            tags = open_clip.list_pretrained_tags_by_model(name)
            if name.startswith("ViT-") and tags and name.removesuffix("-quickgelu") not in known:
                print(f"  {name:24s} {', '.join(tags)}")
    else:
        print("\n(any other open_clip ViT loads too: `gclip models --all` lists them)")
    return 0
