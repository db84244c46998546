"""Model weights on the wire: one flat array per dtype, with a name/shape/dtype schema checked at both ends.

Why: Flower sends every array of an ArrayRecord as its own object (two HTTP objects each, at most
two requests at a time), so a model of about a hundred tensors paid 14 to 21 s per message phase on
loopback where the same bytes as one flat array took 3 to 6 s (measured, issue 14). Aggregation
stays elementwise on the unpacked mapping; only the transport sees the flat form.

``pack`` concatenates the arrays, in the mapping's order, into one C-contiguous 1-D array per
dtype and returns the ``Layout`` that takes them apart again. The layout travels as JSON in the
message's config record; ``unpack`` refuses flat arrays that do not fit it (missing or extra dtype
groups, wrong sizes) and ``check_matches`` refuses a mapping whose names, shapes or dtypes differ
from the ones expected, naming the first difference, so a site replying with another model's
weights is refused rather than reshaped into nonsense. A reply names the layout it was packed
with by ``Layout.digest`` (the server compares it with the layout it sent).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["Layout", "LayoutError", "pack", "unpack", "check_matches"]

#: dtypes a model's state may hold on the wire (anything else is refused, not silently cast)
WIRE_DTYPES = ("float32", "float64", "float16", "int64", "int32", "uint8", "bool")


class LayoutError(ValueError):
    """Flat arrays or a weight mapping that do not fit the expected layout."""


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of a weight mapping, in order: ``((name, shape, dtype), ...)``."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> Layout:
        entries = []
        for name, a in arrays.items():
            dtype = str(np.asarray(a).dtype)
            if dtype not in WIRE_DTYPES:
                raise LayoutError(f"array {name!r}: dtype {dtype} cannot go on the wire (expected one of {WIRE_DTYPES})")
            entries.append((str(name), tuple(int(d) for d in np.shape(a)), dtype))
        return cls(tuple(entries))

    def to_json(self) -> str:
        return json.dumps([[n, list(s), d] for n, s, d in self.entries], separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Layout:
        try:
            raw = json.loads(text)
            if not isinstance(raw, list):
                raise TypeError("not a list")
            entries = tuple((str(n), tuple(int(d) for d in s), str(t)) for n, s, t in raw)
        except (TypeError, ValueError) as e:
            raise LayoutError(f"array layout: not a list of [name, shape, dtype] ({type(e).__name__})") from None
        for n, s, t in entries:
            if t not in WIRE_DTYPES or any(d < 0 for d in s):
                raise LayoutError(f"array layout: entry {n!r} has dtype {t!r} or shape {s} that cannot be on the wire")
        if len({n for n, _, _ in entries}) != len(entries):
            raise LayoutError("array layout: a name appears twice")
        return cls(entries)

    @property
    def digest(self) -> str:
        """sha256 of ``to_json()``: how a reply says which layout it was packed with."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def sizes(self) -> dict[str, int]:
        """Elements per dtype group."""
        out: dict[str, int] = {}
        for _, shape, dtype in self.entries:
            out[dtype] = out.get(dtype, 0) + int(np.prod(shape, dtype=np.int64))
        return out


def pack(arrays: Mapping[str, np.ndarray], layout: Layout | None = None) -> tuple[dict[str, np.ndarray], Layout]:
    """``{dtype: flat 1-D array}`` and its layout. With ``layout`` given, ``arrays`` must match it
    (``check_matches``) and are packed in its order, so a reply's order is the instruction's."""
    if layout is None:
        layout = Layout.of(arrays)
    else:
        check_matches(arrays, layout)
    groups: dict[str, list[np.ndarray]] = {}
    for name, _, dtype in layout.entries:
        groups.setdefault(dtype, []).append(np.ascontiguousarray(arrays[name]).reshape(-1))
    flat = {dtype: (np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)) for dtype, parts in groups.items()}
    return flat, layout


def unpack(flat: Mapping[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """The named arrays (views into ``flat``), after checking that each dtype group has exactly
    the layout's number of elements and dtype."""
    sizes = layout.sizes()
    if set(flat) != set(sizes):
        raise LayoutError(f"flat arrays: dtype groups {sorted(flat)}, the layout expects {sorted(sizes)}")
    for dtype, n in sizes.items():
        a = np.asarray(flat[dtype])
        if a.ndim != 1 or a.size != n or str(a.dtype) != dtype:
            raise LayoutError(f"flat arrays: the {dtype} group has shape {a.shape} and dtype {a.dtype}, "
                              f"the layout expects ({n},) {dtype}")
    offsets = dict.fromkeys(sizes, 0)
    out: dict[str, np.ndarray] = {}
    for name, shape, dtype in layout.entries:
        n = int(np.prod(shape, dtype=np.int64))
        start = offsets[dtype]
        out[name] = np.asarray(flat[dtype])[start:start + n].reshape(shape)
        offsets[dtype] = start + n
    return out


def check_matches(arrays: Mapping[str, np.ndarray], layout: Layout) -> None:
    """Raise ``LayoutError`` naming the first name, shape or dtype of ``arrays`` that differs from ``layout``."""
    expected = {n: (s, d) for n, s, d in layout.entries}
    missing = [n for n in expected if n not in arrays]
    extra = [n for n in arrays if n not in expected]
    if missing or extra:
        raise LayoutError(f"weights: {len(missing)} array(s) missing (first {missing[:1]}), {len(extra)} unexpected "
                          f"(first {extra[:1]})")
    for name, (shape, dtype) in expected.items():
        a = np.asarray(arrays[name])
        if tuple(a.shape) != shape or str(a.dtype) != dtype:
            raise LayoutError(f"weights: {name!r} is {tuple(a.shape)} {a.dtype}, expected {shape} {dtype}")
