"""The methods' published numbers (``data/published.toml``): what their papers and repositories report, as data.

``python -m gclip.docs`` writes them into the Evaluation page's tables and each method page; the means are computed
here (:meth:`Published.mean`), never copied.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from functools import cache
from importlib import resources

from ..errors import ConfigError
from .layouts import DATASETS, PAPER_ORDER

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["SEED_SETS", "Published", "published"]

SEED_SETS: tuple[str, ...] = tuple(PAPER_ORDER[:5])
"""The seed paper's five sets (no background class), the columns of the main published table."""

_KEYS = {"method", "label", "variant", "source", "backbone", "miou", "note"}


@dataclass(frozen=True)
class Published:
    """One published row.

    Attributes:
        method: the registry name of the method.
        label: what kind of publication (``"paper"``, ``"repository README"``, ``"ClearCLIP re-run"``).
        source: where the numbers are (an arXiv id, the repository's README or log).
        miou: ``{dataset: mIoU in percent}`` with gclip's dataset names, in paper order (then the other sets);
            empty when the source gives no numbers that could be read.
        variant: what sets this row apart from the method's other rows (``"on NACLIP"``, ``"no PAMR"``).
        backbone: the model and weights where not CLIP ViT-B/16 with OpenAI's weights (``""``).
        note: what the source says in words, or why it gives no numbers here.
    """

    method: str
    label: str
    source: str
    miou: dict[str, float] = field(default_factory=dict)
    variant: str = ""
    backbone: str = ""
    note: str = ""

    def title(self, name: str) -> str:
        """The row's name in a table: ``name`` (the method's), its variant and, in brackets, its label and backbone:
        ``"ResCLIP on NACLIP (repository README)"``."""
        bracket = ", ".join(x for x in (self.label, self.backbone) if x)
        return f"{_join(name, self.variant)} ({bracket})"

    def mean(self, datasets: tuple[str, ...] | list[str] = SEED_SETS) -> float | None:
        """The mean over ``datasets`` rounded to one decimal (half up, as the papers print it), ``None`` unless the
        row gives every one of them."""
        if not datasets or any(d not in self.miou for d in datasets):
            return None
        total = sum(Decimal(str(self.miou[d])) for d in datasets)
        return float((total / len(datasets)).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def _join(name: str, variant: str) -> str:
    if not variant:
        return name
    return f"{name} {variant}" if variant.startswith("on ") else f"{name}, {variant}"


def _entry(i: int, raw: dict) -> Published:
    where = f"published.toml entry {i + 1} ({raw.get('method', '?')})"
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
    missing = [k for k in ("method", "label", "source") if not raw.get(k)]
    if missing:
        raise ConfigError(f"{where}: no {missing[0]!r}")
    miou = raw.get("miou", {})
    for dataset, value in miou.items():
        if dataset not in DATASETS:
            raise ConfigError(f"{where}: unknown dataset {dataset!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
            raise ConfigError(f"{where}: {dataset} = {value!r} is not an mIoU in 0..100")
    order = [*PAPER_ORDER, *(d for d in DATASETS if d not in PAPER_ORDER)]  # the eight, then the other families
    ordered = {d: float(miou[d]) for d in order if d in miou}
    return Published(**{**raw, "miou": ordered})


def parse(text: str) -> tuple[Published, ...]:
    """The entries of a ``published.toml`` text, checked (keys, dataset names, numbers in 0..100)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"published.toml is not valid TOML: {e}") from e
    return tuple(_entry(i, raw) for i, raw in enumerate(data.get("entry", [])))


@cache
def _all() -> tuple[Published, ...]:
    return parse((resources.files("gclip") / "data" / "published.toml").read_text(encoding="utf-8"))


def published(method: str | None = None) -> tuple[Published, ...]:
    """The published rows of ``data/published.toml``, in file order; only ``method``'s when given (a method with no
    entry has none).

    Raises:
        ConfigError: the file names an unknown dataset, a number outside 0..100 or an unknown key.
    """
    rows = _all()
    return rows if method is None else tuple(r for r in rows if r.method == method)
