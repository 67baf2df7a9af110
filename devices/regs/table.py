"""A register map as its datasheet table, in Markdown.

One row per register (offset, name, width, access, reset value, description
with its bank, alias and "frozen while" conditions), then one row per field of
a register that has named fields. Models keep this table in their docstring and
a test checks it against the declaration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .block import RegisterMap
    from .register import Register

__all__ = ["markdown_table"]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _notes(r: Register) -> list[str]:
    notes = []
    if r.alias_of is not None:
        notes.append(f"alias of {r.alias_of}")
    if r.bank is not None:
        notes.append(f"when {r.bank!r}")
    if r.frozen_while is not None:
        frozen = r.frozen_while
        name = getattr(frozen, "__name__", None)
        notes.append(f"writes ignored while {name or repr(frozen)}")
    if r.narrow or r.wide:
        notes.append("; ".join(filter(None, (r.narrow and f"narrow access: {r.narrow}",
                                              r.wide and f"wide access: {r.wide}"))))
    return notes


def markdown_table(regmap: RegisterMap) -> str:
    """The table for ``regmap`` (see the module docstring)."""
    digits = max(2, len(f"{max(regmap.size - 1, 0):x}"))
    lines = ["| offset | register | bits | access | reset | description |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in sorted(regmap.registers, key=lambda r: (r.offset, r.path)):
        desc = "; ".join([r.doc] + _notes(r) if r.doc else _notes(r))
        if r.implicit:
            access = r.fields[0].access_text()
        else:
            access = r.sw_text()
        lines.append(f"| 0x{r.offset:0{digits}x} | {r.path} | {r.width - 1}:0 | {access} | "
                     f"{r.reset_value:#x} | {_cell(desc)} |")
        if not r.implicit:
            for f in reversed(r.fields):
                lines.append(f"|  | .{f.name} | {f.bits_text()} | {f.access_text()} | {f.reset:#x} | "
                             f"{_cell(f.doc)} |")
    return "\n".join(lines)
