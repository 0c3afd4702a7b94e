"""Finding the images of a run: files, folders, globs, list files and webdataset tar shards.

Every input becomes an :class:`InputItem` with a ``key``: its path relative to the common root of the inputs,
without the extension (``a/x.jpg`` -> ``a/x``). Outputs are written under ``<out>/<key>.<format suffix>``, so
the output tree mirrors the input tree and ``a/x.jpg`` and ``b/x.jpg`` never collide.
"""

from __future__ import annotations

import glob
import os
import tarfile
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ImageError
from .images import DEFAULT_MAX_PIXELS, load_image

__all__ = ["IMAGE_EXTENSIONS", "InputItem", "collect_inputs", "shard_items", "parse_shard", "read_input"]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class InputItem:
    """One image to segment.

    Attributes:
        path: the image file, or the tar shard holding it.
        key: output key: relative path without extension, ``/``-separated.
        member: the tar member's name when the image lies in a webdataset shard, else ``None``.
        offset, size: where the member's bytes lie in the shard.
    """

    path: str
    key: str
    member: str | None = None
    offset: int = 0
    size: int = 0

    @property
    def name(self) -> str:
        """How the image is named in messages and in the manifest."""
        return f"{self.path}:{self.member}" if self.member else self.path


def _is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _visible(names: list[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def _folder_images(folder: str) -> list[str]:
    """The images below ``folder``, following folder links but reading each real folder once.

    A link to a folder that is already read (a loop, or a second way into the tree) is skipped and named in one
    warning; the real folders of the tree are read through their own paths, never through a link.
    """
    real: set[tuple[int, int] | None] = set()
    for parent, dirs, _ in os.walk(folder):
        dirs[:] = _visible(dirs)
        real.add(_identity(parent))
    seen = {_identity(folder)}
    skipped: list[str] = []
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        kept = []
        for d in _visible(dirs):
            path = os.path.join(parent, d)
            identity = _identity(path)
            link = os.path.islink(path)
            if identity in seen or (link and identity in real):
                skipped.append(path)
                continue
            seen.add(identity)
            kept.append(d)
        dirs[:] = kept
        found.extend(os.path.join(parent, f) for f in sorted(files) if _is_image(f) and not f.startswith("."))
    if skipped:
        names = ", ".join(f"{p} -> {os.path.realpath(p)}" for p in skipped)
        warnings.warn(
            f"skipped {len(skipped)} folder links to folders read already (a loop or a second way in): {names}",
            stacklevel=4,
        )
    return found


def _read_list(list_file: str | Path) -> list[str]:
    try:
        lines = Path(list_file).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read the list file {list_file} ({e.strerror or e})") from e
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _expand(spec: str) -> tuple[list[tuple[str, str]], bool]:
    """``[(file, root_dir)]`` for one command-line input; the flag says whether it came from a glob."""
    if os.path.isdir(spec):
        folder = os.path.abspath(spec)
        return [(f, folder) for f in _folder_images(folder)], False
    if not os.path.exists(spec) and _GLOB_CHARS & set(spec):
        matches = sorted(glob.glob(spec, recursive=True))
        if not matches:
            raise ConfigError(f"{spec!r} matches no files")
        out = []
        for m in matches:
            if os.path.isdir(m):
                out.extend(_expand(m)[0])
            elif _is_image(m):
                out.append((os.path.abspath(m), os.path.dirname(os.path.abspath(m))))
        return out, True
    path = os.path.abspath(spec)
    return [(path, os.path.dirname(path))], False


def _tar_items(shard: str) -> list[tuple[str, str, int, int]]:
    """``[(sample key, member name, offset, size)]``: the first image member of each webdataset sample."""
    try:
        with tarfile.open(shard, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
    except (OSError, tarfile.TarError) as e:
        raise ConfigError(f"cannot read the tar shard {shard} ({e})") from e
    samples: dict[str, tuple[str, int, int]] = {}
    for m in members:
        folder, base = os.path.split(m.name)
        stem, dot, ext = base.partition(".")
        key = f"{folder}/{stem}" if folder else stem
        if dot and f".{ext.lower()}" in IMAGE_EXTENSIONS and key not in samples:
            samples[key] = (m.name, m.offset_data, m.size)
    return [(key, *samples[key]) for key in sorted(samples)]


def _posix_key(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    return Path(rel).with_suffix("").as_posix() if Path(rel).suffix else Path(rel).as_posix()


def collect_inputs(
    inputs: Sequence[str | Path] = (),
    from_list: str | Path | None = None,
    wds: Sequence[str | Path] = (),
) -> list[InputItem]:
    """All images of a run, sorted by key, duplicates removed.

    Args:
        inputs: image files, folders (searched recursively for image extensions) and glob patterns
            (``"photos/**/*.jpg"``; quote them so the shell leaves them alone).
        from_list: a text file with one image path per line (relative to the current directory; blank lines
            and ``#`` comments ignored).
        wds: webdataset tar shards (files or globs); each sample's first image member is used and its key is
            ``<shard name>/<sample key>``.

    Returns:
        The items, sorted by key. Keys are relative to the common parent of the folders given and the folders
        of the files given; two inputs that would share a key keep their extensions (``x.jpg``, ``x.png``).

    Raises:
        ConfigError: a glob matches nothing, a list file or a shard cannot be read, or there is no input.

    >>> items = collect_inputs(["photos/"])  # doctest: +SKIP
    >>> items[0].key  # doctest: +SKIP
    'holiday/beach'
    """
    specs = [str(s) for s in inputs] + (_read_list(from_list) if from_list is not None else [])
    pairs: list[tuple[str, str]] = []
    for spec in specs:
        pairs.extend(_expand(spec)[0])
    files = list(dict.fromkeys(p for p, _ in pairs))
    items: list[InputItem] = []
    if files:
        root = os.path.commonpath(sorted({r for _, r in pairs}))
        keys = {f: _posix_key(f, root) for f in files}
        clashes = {k for k, n in Counter(keys.values()).items() if n > 1}
        for f in files:
            key = Path(os.path.relpath(f, root)).as_posix() if keys[f] in clashes else keys[f]
            items.append(InputItem(path=f, key=key))
    for spec in wds:
        shards = sorted(glob.glob(str(spec))) if _GLOB_CHARS & set(str(spec)) else [str(spec)]
        if not shards:
            raise ConfigError(f"{spec!r} matches no tar shards")
        for shard in shards:
            prefix = Path(shard).name.removesuffix(".tar")
            for key, member, offset, size in _tar_items(shard):
                items.append(InputItem(os.path.abspath(shard), f"{prefix}/{key}", member, offset, size))
    if not items:
        raise ConfigError("no input images: give image files, folders, globs, --from-list or --wds shards")
    counts = Counter(i.key for i in items)
    items = [replace(i, key=f"{i.key}#{n}") if counts[i.key] > 1 else i for n, i in enumerate(items)]
    return sorted(items, key=lambda i: i.key)


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``. ``"$SLURM_PROCID/$SLURM_NTASKS"`` is the usual spelling."""
    try:
        index, count = (int(v) for v in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}") from None
    if not 0 <= index < count:
        raise ConfigError(f"--shard {spec}: need 0 <= i < n")
    return index, count


def shard_items(items: Sequence[InputItem], index: int, count: int) -> list[InputItem]:
    """The ``index``-th of ``count`` interleaved shards of the key-sorted items (``items[index::count]``)."""
    return sorted(items, key=lambda i: i.key)[index::count]


def read_input(item: InputItem, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one item to ``HxWx3 uint8 RGB`` (see :func:`gclip.io.images.load_image`).

    Raises:
        ImageError: missing, unreadable, truncated or too-large image.
    """
    if item.member is None:
        return load_image(item.path, max_pixels)
    try:
        with open(item.path, "rb") as f:
            f.seek(item.offset)
            data = f.read(item.size)
    except OSError as e:
        raise ImageError(f"{item.name}: cannot read ({e.strerror or e})") from e
    return load_image(data, max_pixels, name=item.name)
