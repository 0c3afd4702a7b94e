"""What every method shares: the interface, the registry, and attention helpers."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..backbone import DenseViT
from ..errors import ConfigError

__all__ = ["Method", "register", "get_method", "list_methods", "attend", "attention_map"]

_REGISTRY: dict[str, type[Method]] = {}


class Method:
    """A last-block variant. Subclasses are dataclasses whose fields are the method's options.

    The engine walks blocks ``0..L-2`` with the parameter :meth:`overrides` while keeping the inputs of
    :meth:`keep_blocks`, then calls :meth:`last_block`. Before a compiled forward it calls :meth:`warm`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def keep_blocks(self, vit: DenseViT) -> set[int]:
        """Blocks whose input tokens :meth:`last_block` needs (besides the last block's own input)."""
        return set()

    def overrides(self, vit: DenseViT) -> dict[int, dict[str, torch.Tensor]]:
        """Per block, parameters to use instead of the model's during the walk (never written to the model)."""
        return {}

    def warm(self, vit: DenseViT, grid: tuple[int, int]) -> None:
        """Compute eagerly what the method caches per backbone and per patch grid, so that ``torch.compile``
        traces cache hits only (a traced cache miss breaks the graph or forces a recompilation)."""
        self.keep_blocks(vit)
        self.overrides(vit)

    def last_block(
        self, vit: DenseViT, x: torch.Tensor, kept: dict[int, torch.Tensor], grid: tuple[int, int]
    ) -> torch.Tensor:
        """``(B, 1+N, D)`` tokens entering the last block (``grid`` = (rows, cols) of patches) -> ``(B, 1+N, D)``."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The method's settings as plain data (printed with and stored in results)."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Names of the registered methods, in registration order."""
    return list(_REGISTRY)


def get_method(name: str | Method, **options: Any) -> Method:
    """A method instance by name with options, e.g. ``get_method("gclip", emerging_blocks=[5, 6])``."""
    if isinstance(name, Method):
        if options:
            return dataclasses.replace(name, **options)  # type: ignore[type-var]
        return name
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(_REGISTRY)}")
    cls = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    unknown = sorted(set(options) - fields)
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"method {name!r} has no option {unknown[0]!r} (its options: {known})")
    return cls(**options)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q kᵀ d^-0.5 + bias) v`` per head with fused attention; inputs ``(B, H, N, d)``."""
    if bias is not None:
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def attention_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ d^-0.5)`` per head, ``(B, H, N, N)``, computed in fp32."""
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
