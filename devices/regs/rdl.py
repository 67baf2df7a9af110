"""SystemRDL in, a register map out, through PeakRDL's ``systemrdl-compiler``.

:func:`load_rdl` compiles and elaborates a SystemRDL 2.0 file and turns its top
``addrmap`` into a :class:`~vfiouser.devices.regs.RegisterMap`: register files,
nested address maps and arrays become hierarchical names (``rf[1].ctrl``, with
``rf.ctrl`` naming every element for hooks), aliases share their primary's
storage, and each field keeps what SystemRDL says of it:

=================  ================================================================
honoured           ``sw``, ``hw``, ``reset``, ``onread`` (``rclr``, ``rset``),
                   ``onwrite`` (``woclr``, ``woset``, ``wot``, ``wzc``, ``wzs``, ``wzt``,
                   ``wclr``, ``wset``), ``intr`` (level, sticky or ``nonsticky``) with
                   ``enable``/``mask``, ``stickybit``/``sticky``, ``regwidth`` and
                   ``accesswidth``, arrays, ``alias``
documentation      ``name``, ``desc`` (in the register table), ``donttest``,
                   ``dontcompare``, ``ispresent`` (the compiler drops absent parts)
refused            everything else: counters, ``hwset``/``hwclr``, ``swmod``/``swacc``,
                   ``singlepulse``, write-once ``sw``, edge interrupts, ``halt*``,
                   ``ruser``/``wuser``, ``external`` registers, memories, signals,
                   ``bigendian``, ``rsvdset``, user-defined properties...
=================  ================================================================

A refused feature is a :class:`RdlUnsupported` error naming the property and
where it is set: never a register that silently behaves otherwise than its
description. Python hooks attach to the map's live blocks by the same
hierarchical names (relative to the top address map).

IP-XACT (1685-2009 or 1685-2014) comes in the same way: a file whose name ends
in ``.xml`` is read with PeakRDL's importer (``peakrdl-ipxact``) into the same
compiler, and each of its address blocks becomes a register file of the top
map (IP-XACT has no interrupt fields).

``systemrdl-compiler`` and ``peakrdl-ipxact`` are an optional dependency
(``pip install 'vfiouser[rdl]'``); without them :func:`load_rdl` raises
:class:`RdlUnavailable` saying so.
"""

from __future__ import annotations

import os
import re

from .access import RO, RSVD, RW, WO, Field, RegisterDefinitionError
from .block import RegisterMap
from .register import Register, template_of

__all__ = ["load_rdl", "RdlError", "RdlUnavailable", "RdlUnsupported", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'vfiouser[rdl]' (or: pip install systemrdl-compiler peakrdl-ipxact)"

#: Field properties whose meaning the register layer implements.
_FIELD_HONOURED = {"sw", "hw", "reset", "onread", "onwrite", "intr", "intr type", "stickybit", "sticky",
                   "enable", "mask", "fieldwidth"}
#: Properties that document or only shape the layout (the compiler resolves them).
_INFORMATIONAL = {"name", "desc", "donttest", "dontcompare", "ispresent"}
_REG_HONOURED = {"regwidth", "accesswidth"}
_BLOCK_HONOURED = {"alignment", "addressing", "littleendian", "lsb0", "msb0"}

_ACCESS = {"rw": RW, "r": RO, "w": WO, "na": RSVD}
_INDEXES = re.compile(r"\[(\d+)\]")


class RdlError(RegisterDefinitionError):
    """A SystemRDL file that could not be compiled (the compiler's messages are in the text)."""


class RdlUnavailable(RdlError):
    """``systemrdl-compiler`` is not installed."""


class RdlUnsupported(RdlError):
    """The SystemRDL description uses something the register layer does not implement yet."""


def _compiler():
    try:
        from systemrdl import RDLCompiler
        from systemrdl.messages import MessagePrinter
    except ImportError as exc:
        raise RdlUnavailable(f"reading SystemRDL needs systemrdl-compiler, which is not installed: "
                             f"{INSTALL_HINT}") from exc

    class Collect(MessagePrinter):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def print_message(self, severity, text, src_ref) -> None:
            where = ""
            if src_ref is not None and getattr(src_ref, "filename", None):
                where = f"{src_ref.filename}:{src_ref.line}: " if getattr(src_ref, "line", None) else \
                    f"{src_ref.filename}: "
            self.lines.append(f"{where}{severity.name.lower()}: {text}")

    printer = Collect()
    return RDLCompiler(message_printer=printer), printer


def _ipxact_importer(compiler):
    try:
        from peakrdl_ipxact import IPXACTImporter
    except ImportError as exc:
        raise RdlUnavailable(f"reading IP-XACT needs peakrdl-ipxact, which is not installed: {INSTALL_HINT}") from exc
    return IPXACTImporter(compiler)


def _unsupported(node, what: str) -> RdlUnsupported:
    src = node.inst_src_ref
    where = f" ({src.filename}:{src.line})" if src is not None and getattr(src, "line", None) else ""
    return RdlUnsupported(f"{node.get_path()}: {what} is not supported by vfiouser's register layer yet{where}")


def _check_properties(node, honoured: set[str]) -> None:
    for prop in node.list_properties(include_native=True, include_udp=True):
        if prop not in honoured and prop not in _INFORMATIONAL:
            if prop == "intr type":
                continue
            raise _unsupported(node, f"property {prop!r}")


def _field(node, top) -> Field:
    _check_properties(node, _FIELD_HONOURED)
    sw = node.get_property("sw").name
    hw = node.get_property("hw").name
    if sw not in _ACCESS:
        raise _unsupported(node, f"sw={sw} (write-once)")
    if hw not in _ACCESS:
        raise _unsupported(node, f"hw={hw}")
    onread = node.get_property("onread")
    onwrite = node.get_property("onwrite")
    if onread is not None and onread.name == "ruser":
        raise _unsupported(node, "onread=ruser")
    if onwrite is not None and onwrite.name == "wuser":
        raise _unsupported(node, "onwrite=wuser")
    reset = node.get_property("reset")
    if reset is not None and not isinstance(reset, int):
        raise _unsupported(node, "a reset value that is a reference")
    intr = bool(node.get_property("intr"))
    if intr and node.get_property("intr type").name != "level":
        raise _unsupported(node, f"a {node.get_property('intr type').name} interrupt (level only)")
    if intr:
        sticky = bool(node.get_property("stickybit"))
    else:
        sticky = bool(node.get_property("sticky")) or bool(node.get_property("stickybit"))
    refs = {}
    for prop in ("enable", "mask"):
        ref = node.get_property(prop) if intr else None
        if ref is not None:
            if not hasattr(ref, "lsb"):
                raise _unsupported(node, f"{prop} referring to something other than a field")
            refs[prop] = ref.get_rel_path(top)
    doc = node.get_property("desc") or node.get_property("name") or ""
    if doc == node.inst_name:
        doc = ""
    return Field(node.inst_name, (node.msb, node.lsb), sw=_ACCESS[sw], hw=_ACCESS[hw], reset=reset or 0,
                 onread=onread.name if onread is not None else None,
                 onwrite=onwrite.name if onwrite is not None else None, intr=intr, sticky=sticky,
                 enable=refs.get("enable"), mask=refs.get("mask"), doc=" ".join(doc.split()))


def _register(node, top) -> Register:
    _check_properties(node, _REG_HONOURED)
    if node.external:
        raise _unsupported(node, "an external register")
    width = node.get_property("regwidth")
    if width not in (8, 16, 32, 64):
        raise _unsupported(node, f"regwidth={width} (8, 16, 32 or 64)")
    path = node.get_rel_path(top)
    alias_of = node.alias_primary.get_rel_path(top) if node.is_alias else None
    doc = node.get_property("desc") or node.get_property("name") or ""
    if doc == node.inst_name:
        doc = ""
    fields = [_field(f, top) for f in node.fields()]
    reg = Register(path, node.absolute_address - top.absolute_address, width, fields, doc=" ".join(doc.split()),
                   alias_of=alias_of)
    reg.template = template_of(path)
    reg.index = tuple(int(i) for i in _INDEXES.findall(path))
    return reg


def load_rdl(path: str | os.PathLike, *, top: str | None = None, includes: list[str] | None = None) -> RegisterMap:
    """Compile the SystemRDL file ``path`` (or import the IP-XACT file, ``*.xml``) and return
    its top address map (``top``: which one, by type name; default the last defined) as a
    :class:`RegisterMap`."""
    from systemrdl.node import AddrmapNode, MemNode, RegfileNode, RegNode, SignalNode

    compiler, printer = _compiler()
    from systemrdl import RDLCompileError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RdlError(f"no SystemRDL file at {path}")
    try:
        if path.lower().endswith(".xml"):
            _ipxact_importer(compiler).import_file(path)
        else:
            compiler.compile_file(path, incl_search_paths=includes)
        root = compiler.elaborate(top_def_name=top)
    except RDLCompileError as exc:
        detail = "\n".join(printer.lines) or str(exc)
        raise RdlError(f"{path} does not compile:\n{detail}") from None
    except ValueError as exc:  # the IP-XACT importer's complaints about a file
        raise RdlError(f"{path} cannot be imported: {exc}") from None
    top_node = root.top
    _check_properties(top_node, _BLOCK_HONOURED)
    if top_node.get_property("bigendian"):
        raise _unsupported(top_node, "bigendian")
    registers = []
    for node in top_node.descendants(unroll=True):
        if isinstance(node, RegNode):
            registers.append(_register(node, top_node))
        elif isinstance(node, MemNode):
            raise _unsupported(node, "a mem component")
        elif isinstance(node, SignalNode):
            raise _unsupported(node, "a signal")
        elif isinstance(node, (AddrmapNode, RegfileNode)):
            _check_properties(node, _BLOCK_HONOURED)
    if not registers:
        raise RdlError(f"{path}: the address map {top_node.inst_name} has no registers")
    desc = top_node.get_property("desc") or top_node.get_property("name") or ""
    return RegisterMap(registers, name=top_node.inst_name, size=top_node.size, doc=" ".join(desc.split()))
