"""``gclip download``: fetch weights on a connected machine into a file gclip loads offline with the right settings.

Any kind of weights, one way: a CLIP (an open_clip model and pretrained tag), a second model
(:data:`~gclip.backbones.second_models.SECOND_MODELS`: DINO, DINOv2, MAE through timm) or a SAM (SAM's published
checkpoints, for the mask generator and the image encoder alike). Each is written to ``DIR/<name>[.<tag>].pt`` with a
sidecar ``DIR/<file>.json`` (:func:`gclip.backbones.weights.write_weights`: what the weights are, the activation and
normalisation they need, their SHA-256); loaders read the sidecar, so ``--pretrained DIR/ViT-L-14.openai.pt`` needs no
``--model`` or ``--quick-gelu``. Without ``--to`` the file goes to gclip's weights folder, where the loaders find it by
name: ``gclip download ViT-B-16 openai`` makes ``--pretrained openai`` work offline. A model whose tokenizer comes
from the Hugging Face hub (SigLIP, SigLIP 2) gets its tokenizer files too (``DIR/<file stem>.tokenizer/``, named in
the sidecar), so the file alone also embeds class names offline.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ConfigError, WeightsError
from .weights import download_filename, hub_reachable, read_checkpoint, weights_dir, write_weights

__all__ = ["SAM_URLS", "download", "downloadable"]

SAM_URLS = {
    "sam_vitb": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "sam_vitl": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "sam_vith": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "sam2_hiera_t": "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_tiny.pt",
    "sam2_hiera_s": "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_small.pt",
    "sam2_hiera_b+": "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_base_plus.pt",
    "sam2_hiera_l": "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_large.pt",
    "sam2.1_hiera_t": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_tiny.pt",
    "sam2.1_hiera_s": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_small.pt",
    "sam2.1_hiera_b+": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_base_plus.pt",
    "sam2.1_hiera_l": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt",
}
"""SAM's and SAM 2's published checkpoints, by gclip's name (mask generators; SAM's also the second model)."""


def downloadable() -> dict[str, list[str]]:
    """What ``gclip download`` fetches: ``{"second": [...], "sam": [...]}`` (CLIPs: any open_clip model with a tag)."""
    from .second_models import SECOND_MODELS

    second = sorted(n for n, s in SECOND_MODELS.items() if s.family != "sam" and s.tag)
    return {"second": second, "sam": sorted(SAM_URLS)}


def _failed(what: str, error: Exception, host: str) -> WeightsError:
    reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    return WeightsError(
        f"download of {what} failed ({type(error).__name__}{': ' + reason if reason else ''}): check that this "
        f"machine reaches {host}, or run `gclip download` on one that does and copy the folder"
    )


def _reach(what: str, host: str) -> None:
    if not hub_reachable(host):
        raise WeightsError(
            f"cannot download {what}: {host} is unreachable from here: run `gclip download` on a connected machine "
            "and copy the file it writes (and its .json) here"
        )


def _clip(name: str, tag: str | None, folder: Path) -> Path:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    tag = tag or ("openai" if "openai" in tags else (tags[0] if tags else None))
    cfg = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    if not cfg:
        raise ConfigError(f"{name} has no pretrained tag {tag!r}: choose one of {', '.join(tags) or 'none'}")
    what = f"CLIP {name}/{tag}"
    _reach(what, "huggingface.co")
    try:
        model = open_clip.create_model(name, pretrained=tag, device="cpu")
    except Exception as e:  # noqa: BLE001 - any failure of the fetch: one line
        raise _failed(what, e, "huggingface.co") from e
    meta: dict[str, Any] = {
        "kind": "clip",
        "name": f"{name}/{tag}",
        "model": name,
        "tag": tag,
        "quick_gelu": bool(cfg.get("quick_gelu", False)) or name.endswith("-quickgelu"),
        "mean": list(cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN),
        "std": list(cfg.get("std") or open_clip.OPENAI_DATASET_STD),
        "source": cfg.get("hf_hub") or cfg.get("url", ""),
    }
    filename = download_filename(name, tag)
    tokenizer = _tokenizer(name, folder, filename.removesuffix(".pt"))
    if tokenizer:
        meta["tokenizer"] = tokenizer
    return write_weights(folder, filename, meta, state=model.state_dict())


def _tokenizer(name: str, folder: Path, stem: str) -> str | None:
    """For a model whose tokenizer comes from the Hugging Face hub (SigLIP, SigLIP 2): its files saved into
    ``folder/<stem>.tokenizer/`` (through a temporary folder), returning that folder's name for the sidecar; a model
    with open_clip's built-in tokenizer needs none (``None``)."""
    from .tokenizer import hf_tokenizer, hub_tokenizer_name

    repo = hub_tokenizer_name(name)
    if repo is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{stem}.tokenizer"
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder))
    try:
        try:
            hf_tokenizer(name, repo).save_pretrained(tmp)
        except Exception as e:  # noqa: BLE001 - any failure of the fetch: one line
            raise _failed(f"tokenizer {repo}", e, "huggingface.co") from e
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest.name


def _second(name: str, folder: Path) -> Path:
    import timm

    from .second_models import SECOND_MODELS

    spec = SECOND_MODELS[name]
    if spec.gated:
        raise ConfigError(
            f"second model {name}'s weights are gated: request them at {spec.gated} (or take timm's "
            f"huggingface.co/timm/{spec.arch}.lvd1689m), then pass the file with --proxy-checkpoint"
        )
    if not spec.tag:
        raise ConfigError(f"second model {name} has no published weights to download: pass a local file instead")
    what = f"second model {name} ({spec.arch}.{spec.tag})"
    _reach(what, "huggingface.co")
    try:
        model = timm.create_model(f"{spec.arch}.{spec.tag}", pretrained=True, num_classes=0)
    except Exception as e:  # noqa: BLE001
        raise _failed(what, e, "huggingface.co") from e
    meta = {
        "kind": "second",
        "name": name,
        "arch": spec.arch,
        "tag": spec.tag,
        "source": f"timm/{spec.arch}.{spec.tag}",
    }
    return write_weights(folder, download_filename(name), meta, state=model.state_dict())


def _sam(name: str, folder: Path) -> Path:
    import torch

    url = SAM_URLS[name]
    host = url.split("/")[2]
    what = f"SAM {name}"
    _reach(what, host)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".download.tmp", dir=folder)
    os.close(fd)
    try:
        try:
            torch.hub.download_url_to_file(url, tmp, progress=True)
        except Exception as e:  # noqa: BLE001
            raise _failed(what, e, host) from e
        read_checkpoint(tmp)  # a tensor state dict, or a one-line error before anything is renamed into place
        arch = Path(url).stem.split("_")[1:3]  # vit_b; hiera_large
        meta = {"kind": "sam", "name": name, "arch": "_".join(arch), "source": url}
        return write_weights(folder, download_filename(name), meta, file=tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def download(name: str, tag: str | None = None, to: str | Path | None = None) -> Path:
    """Fetch the weights of ``name`` (and ``tag``, for a CLIP) into ``to`` (default: gclip's weights folder) as a file
    with its sidecar; returns the file's path.

    Args:
        name: an open_clip model (``"ViT-B-16"``), a second model (``"dino_vitb8"``) or a SAM (``"sam_vitb"``).
        tag: the CLIP's pretrained tag (default ``openai`` where it has one); none for the others.
        to: the folder.

    Raises:
        ConfigError: an unknown name or tag. WeightsError: the network is unreachable, or the download failed.
    """
    import open_clip

    from .second_models import SECOND_MODELS

    folder = Path(to) if to else weights_dir()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--to {folder} is a file: give a folder (a missing one is created)")
    if name in open_clip.list_models():
        return _clip(name, tag, folder)
    if tag:
        raise ConfigError(f"{name} takes no tag (only CLIPs do): `gclip download {name}`")
    if name in SAM_URLS:
        return _sam(name, folder)
    if name in SECOND_MODELS:
        return _second(name, folder)
    known = downloadable()
    raise ConfigError(
        f"unknown model {name!r}: give an open_clip model and tag (`gclip models --all`), a second model "
        f"({', '.join(known['second'])}) or a SAM ({', '.join(known['sam'])})"
    )
