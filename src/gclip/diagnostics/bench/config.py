"""What to benchmark: the configuration, its inputs and its model."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...engines.spec import SegmenterSpec
from ...errors import ConfigError


@dataclass
class BenchConfig:
    """What to benchmark (the fields of ``gclip bench``)."""

    model: str = "ViT-B-16"
    pretrained: str | None = None
    random_weights: bool = True
    quick_gelu: bool | None = None
    tokenizer: str | None = None
    method: str = "gclip"
    method_options: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    device: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    classes: Any = "voc21"
    templates: str = "openai_imagenet_80"
    images: str = "sample"
    synthetic: tuple[int, int] | None = None
    count: int = 16
    batch_images: int = 8
    workers: int | None = None
    warmup: int = 1
    reference: bool = True
    reference_count: int | None = None
    compile: bool = False
    seed: int = 0
    model_configs: list[str] = field(default_factory=list)


def bundled_vocabulary(name: str) -> Path | None:
    """A bundled ClearCLIP class file by dataset name (``voc21``, ``ade20k``, ``coco_stuff`` ...)."""
    from importlib import resources

    path = resources.files("gclip") / "data" / "classes" / "clearclip" / f"cls_{name}.txt"
    return Path(str(path)) if path.is_file() else None


def sample_images(root: str | None = None) -> list[Path]:
    """VOC images of the real sample (``$GCLIP_SAMPLE_DATA`` or ``../shared/data``)."""
    repo = Path(__file__).resolve().parents[4]
    candidates = [root, os.environ.get("GCLIP_SAMPLE_DATA"), "../shared/data", str(repo.parent / "shared" / "data")]
    for cand in candidates:
        folder = Path(cand) / "VOCdevkit" / "VOC2012" / "JPEGImages" if cand else None
        if folder is not None and folder.is_dir():
            return sorted(folder.glob("*.jpg"))
    raise ConfigError(
        "the real sample (../shared/data or $GCLIP_SAMPLE_DATA) is not here: use --images DIR or --synthetic WxH"
    )


def load_inputs(config: BenchConfig) -> tuple[list[Any], str]:
    """The benchmark's inputs (paths, or JPEG-encoded synthetic images) and a description of them."""
    if config.synthetic is not None:
        from PIL import Image

        h, w = config.synthetic
        rng = np.random.default_rng(config.seed)
        inputs = []
        for _ in range(config.count):
            small = rng.integers(0, 256, size=(max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.BILINEAR)  # smooth, photo-like JPEG cost
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            inputs.append(buf.getvalue())
        return inputs, f"{config.count} synthetic {w}x{h} JPEGs"
    if config.images == "sample":
        paths = sample_images()
        source = "the real VOC2012 sample"
    else:
        folder = Path(config.images)
        if not folder.is_dir():
            raise ConfigError(f"--images {folder}: not a folder (give a folder of images, 'sample', or --synthetic)")
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"))
        source = str(folder)
    if not paths:
        raise ConfigError(f"no images found in {config.images}")
    paths = paths[: config.count]
    return paths, f"{len(paths)} images from {source}"


def recipe(config: BenchConfig) -> SegmenterSpec:
    """The :class:`~gclip.engines.SegmenterSpec` of a configuration (classes not set: the benchmark times that)."""
    return SegmenterSpec(
        model=config.model,
        pretrained=config.pretrained,
        method=config.method,
        method_options=config.method_options,
        precision=config.precision,
        device=config.device,
        quick_gelu=config.quick_gelu,
        tokenizer=config.tokenizer,
        templates=config.templates,
        settings=config.settings,
        random_seed=config.seed if config.random_weights else None,
        model_configs=config.model_configs,
        compile=config.compile,
    )


def build_segmenter(config: BenchConfig):
    """The Segmenter of a configuration, its model loaded (classes not set yet)."""
    return recipe(config).build()


def resolve_classes(spec: Any) -> Any:
    if isinstance(spec, str) and bundled_vocabulary(spec) is not None:
        return bundled_vocabulary(spec)
    return spec
