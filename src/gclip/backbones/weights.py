"""Weights files, one way for every kind: CLIP (open_clip), the second models (timm's DINO, DINOv2, MAE; SAM's image
encoder) and SAM's mask generator.

Every loader finds its file the same way (:func:`find_weights`: the file given, else gclip's weights folder, else the
library's own cache, else a download when the network answers), reads it with :func:`read_checkpoint` (tensors
only), and fails with the same one-line errors (:func:`weights_hint`: they name the ``gclip download`` command and the
option or flag that takes a local file). ``gclip download`` writes a weights file with a JSON sidecar
(``<file>.json``: what the weights are and the settings they need, :func:`write_weights`); a loader given that file
reads its settings from the sidecar. :func:`weights_record` is what gclip's JSON outputs say about the weights used
(absolute path and SHA-256, hashed once per process and file version).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cache import cache_root
from ..errors import WeightsError

__all__ = [
    "Checkpoint",
    "check_sidecar",
    "file_sha256",
    "find_weights",
    "hub_cached",
    "hub_reachable",
    "read_checkpoint",
    "read_sidecar",
    "sidecar_path",
    "weights_dir",
    "weights_hint",
    "weights_record",
    "write_weights",
]

_HUB_HOST = "huggingface.co"
SIDECAR_FORMAT = 1


def weights_dir() -> Path:
    """gclip's one weights folder, where ``gclip download`` writes by default and every loader looks:
    ``$GCLIP_CACHE_DIR/weights`` (default ``~/.cache/gclip/weights``)."""
    return cache_root() / "weights"


def option_flag(option: str) -> str:
    """A Python option name -> its command-line flag: ``proxy_checkpoint`` -> ``--proxy-checkpoint``."""
    return "--" + option.replace("_", "-")


def weights_hint(download: str, option: str, file: str | None = None) -> str:
    """The remedy every missing-weights error ends with: the ``gclip download`` command that fetches them on a
    connected machine and the option (and flag) that takes the file it writes.

    Args:
        download: the arguments of ``gclip download`` (``"ViT-B-16 openai"``, ``"dino_vitb8"``).
        option: the Python option that takes a weights file (``pretrained``, ``proxy_checkpoint``, ...).
        file: the name of the file ``gclip download`` writes (default: from ``download``).
    """
    file = file or download_filename(*download.split())
    return (
        f"run `gclip download {download} --to DIR` on a connected machine, then pass the file it writes (DIR/{file}) "
        f"as {option}=PATH ({option_flag(option)} PATH on the command line)"
    )


def download_filename(name: str, tag: str | None = None) -> str:
    """The name ``gclip download`` gives a weights file: ``ViT-B-16.openai.pt``, ``dino_vitb8.pt``."""
    return f"{name}.{tag}.pt" if tag else f"{name}.pt"


# --- reading ----------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A weights file's tensors and what its format says about them.

    Attributes:
        state: the state dict (nested ``state_dict``/``model`` entries and ``module.`` prefixes unwrapped; OpenAI's
            ``input_resolution``/``context_length``/``vocab_size`` entries and ``attn_mask`` buffers dropped).
        jit: a TorchScript archive (OpenAI's released CLIP files are).
        openai_keys: the file held OpenAI's ``input_resolution``/``context_length``/``vocab_size`` entries (a state
            dict taken from OpenAI's own model).
    """

    state: dict[str, torch.Tensor]
    jit: bool = False
    openai_keys: bool = False


def _is_jit_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def load_checkpoint(path: str | Path, option: str = "pretrained") -> Checkpoint:
    """Read a state dict from ``.safetensors``, a torch pickle (``.pt``/``.bin``/``.pth``) or a TorchScript archive.

    Pickles are read with ``weights_only=True``: a file holding arbitrary Python objects is refused.

    Args:
        path: the file.
        option: the option (and, with dashes, the flag) that took the file: the errors name it.

    Raises:
        WeightsError: a missing, empty, unreadable file, or one without a tensor state dict (one line).
    """
    path = Path(path)
    flag = option_flag(option)
    hint = f"{flag} takes a .pt/.bin/.pth/.safetensors state dict or an OpenAI JIT archive"
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist: pass an existing file to {flag}")
    if path.stat().st_size == 0:
        raise WeightsError(f"checkpoint {path} is empty (0 bytes): download it again and pass it to {flag}")
    jit = False
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        elif _is_jit_archive(path):
            jit = True
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only load failed" in reason.lower():
            reason = "not a tensor-only torch file (corrupt, or it pickles Python objects: re-save the state_dict)"
        raise WeightsError(f"cannot read checkpoint {path}: {reason[:200]} ({hint})") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"checkpoint {path} holds no tensor state dict ({hint})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    openai_keys = all(k in obj for k in ("input_resolution", "context_length", "vocab_size"))
    for key in ("input_resolution", "context_length", "vocab_size"):
        obj.pop(key, None)
    obj = {k: v for k, v in obj.items() if not k.endswith("attn_mask")}  # buffers that scripted models save
    return Checkpoint(obj, jit, openai_keys)


def read_checkpoint(path: str | Path, option: str = "pretrained") -> tuple[dict[str, torch.Tensor], bool]:
    """:func:`load_checkpoint` as ``(state_dict, is_jit_archive)``."""
    found = load_checkpoint(path, option)
    return found.state, found.jit


# --- sidecars: what a downloaded file is --------------------------------------------------------------------------


def sidecar_path(path: str | Path) -> Path:
    """The JSON that ``gclip download`` writes beside a weights file: ``<file>.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    """The sidecar of the weights file ``path`` (:func:`write_weights`), ``None`` when it has none.

    Raises:
        WeightsError: a sidecar that is not a JSON object of gclip's (one line).
    """
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WeightsError(
            f"{side} (what {Path(path).name} holds) is unreadable ({e}): delete it or download again"
        ) from None
    if not isinstance(data, dict) or "kind" not in data:
        raise WeightsError(f"{side} is not gclip's description of {Path(path).name}: delete it or download again")
    return data


_KIND_WORDS = {"clip": "CLIP", "second": "second model", "sam": "SAM"}


def check_sidecar(
    path: str | Path, what: str, fits: Callable[[dict[str, Any]], bool], remedy: str
) -> dict[str, Any] | None:
    """The sidecar of ``path`` when ``fits`` accepts it (``None`` when there is none): every loader refuses a
    ``gclip download`` file of another model with the same line, ``checkpoint P holds the weights of K N, not of
    WHAT: REMEDY``."""
    side = read_sidecar(path) if Path(path).is_file() else None
    if side is None or fits(side):
        return side
    kind = _KIND_WORDS.get(str(side.get("kind")), str(side.get("kind")))
    raise WeightsError(f"checkpoint {path} holds the weights of {kind} {side.get('name')}, not of {what}: {remedy}")


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A temporary name in ``path``'s folder, renamed to ``path`` when the block ends well, removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_weights(
    folder: str | Path,
    filename: str,
    meta: dict[str, Any],
    state: dict[str, torch.Tensor] | None = None,
    file: str | Path | None = None,
) -> Path:
    """Write a weights file and its sidecar into ``folder``, each under a temporary name then renamed.

    Args:
        folder: where (created when missing).
        filename: the weights file's name (:func:`download_filename`).
        meta: what the weights are (``kind``: ``clip``, ``second`` or ``sam``; ``name``, ``tag``, settings such as
            ``quick_gelu``); the file's ``sha256`` is added.
        state: a state dict to save (torch pickle of tensors), or
        file: an already downloaded file to move into place.

    Returns:
        The weights file's path.
    """
    path = Path(folder) / filename
    try:
        with _temporary_beside(path) as tmp:
            if state is not None:
                torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
            elif file is not None:
                os.replace(file, tmp)
            else:
                raise ValueError("write_weights needs a state dict or a file")
        record = {"format": SIDECAR_FORMAT, **meta, "file": filename, "sha256": file_sha256(path)}
        with _temporary_beside(sidecar_path(path)) as tmp:
            tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as e:
        raise WeightsError(f"cannot write {path} ({e.strerror or e}): choose another folder with --to") from e
    return path


# --- hashing and the JSON record -----------------------------------------------------------------------------------

_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, computed once per process for each (absolute path, size, modification time)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def weights_record(path: str | Path | None) -> dict[str, Any] | None:
    """``{"path": absolute path, "sha256": ...}`` of a weights file (``None`` for none: random weights)."""
    if path is None or not Path(path).is_file():
        return None
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


# --- finding a file: given, gclip's folder, the library's cache, the network ---------------------------------------


def hub_reachable(host: str = _HUB_HOST, timeout: float = 3.0) -> bool:
    """Whether ``host:443`` answers within ``timeout`` seconds (DNS included); ``False`` when ``HF_HUB_OFFLINE`` or
    ``GCLIP_OFFLINE`` is set."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("GCLIP_OFFLINE"):
        return False
    ok = [False]

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                ok[0] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return ok[0]


def hub_cached(repo_id: str | None, filenames: list[str], cache_dir: str | None = None) -> str | None:
    """The first of ``filenames`` of the Hugging Face repository ``repo_id`` already in the local hub cache (no
    network), else ``None``: how CLIP tags and timm's second models look for cached weights."""
    if not repo_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for fname in filenames:
        found = try_to_load_from_cache(repo_id, fname, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def find_weights(
    what: str,
    download: str,
    option: str,
    cached: Callable[[], str | None] = lambda: None,
    fetch: Callable[[], str] | None = None,
    host: str = _HUB_HOST,
    example: str = "",
) -> str:
    """The weights file of ``what`` when none was given: gclip's weights folder (what ``gclip download`` wrote),
    else the library's cache (``cached``), else ``fetch`` when ``host`` answers.

    Args:
        what: the weights in words, for the errors (``"CLIP ViT-B-16/openai"``, ``"proxy dino_vitb8"``).
        download: the ``gclip download`` arguments that fetch them.
        option: the option that takes a local file (the errors name it and its flag).
        cached: the library's cache lookup (no network).
        fetch: downloads the file and returns its path; ``None``: the weights have no published download.
        host: the host ``fetch`` needs.
        example: the usual file's name, for an error without a download (e.g. SAM's ``sam_vit_b_01ec64.pth``).

    Raises:
        WeightsError: not found and nothing to fetch, offline, or a failed download (one line,
            :func:`weights_hint`).
    """
    mine = weights_dir() / download_filename(*download.split())
    if mine.is_file():
        return str(mine)
    found = cached()
    if found:
        return found
    hint = weights_hint(download, option)
    if fetch is None:
        usual = f" (the usual file: {example})" if example else ""
        raise WeightsError(f"no weights given for {what}{usual}: {hint}")
    if not hub_reachable(host):
        raise WeightsError(f"weights of {what} are not in the local cache and the network is unreachable: {hint}")
    try:
        return fetch()
    except Exception as e:  # noqa: BLE001 - any failure of a download: one line
        raise WeightsError(f"download of the weights of {what} failed ({type(e).__name__}): {hint}") from e
