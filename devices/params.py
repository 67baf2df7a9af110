"""A device model's parameters: what ``vfiouser serve --param`` and ``vfiouser devices`` show.

The parameters of a model are the keyword arguments of its ``__init__``. Each has a
type, taken from its annotation, or from its default when it has no annotation
(``count=4`` is an ``int``); a parameter with neither is a string. Annotations that
allow ``None`` (``int | None``) take the other type; a union that allows ``str`` passes
the text through for the model to parse. One line of help per parameter comes from the
docstring of ``__init__`` or of the class: the built-in models name each parameter
in double back-quotes followed by a colon and the help, up to a ``;`` or the end of
the sentence, in the class docstring; the two common forms work too::

    def __init__(self, dma_mask: int = 0x0FFFFFFF, fast: bool = False):
        \"\"\"
        :param dma_mask: mask applied to every DMA address
        :param fast: skip the transfer delay
        \"\"\"

    def __init__(self, dma_mask: int = 0x0FFFFFFF, fast: bool = False):
        \"\"\"Args:
            dma_mask: mask applied to every DMA address
            fast (bool): skip the transfer delay
        \"\"\"

>>> class Demo:
...     def __init__(self, count=4, mode: str = "fast", level: float | None = None, on: bool = False):
...         '''A demo.
...
...         Args:
...             count: how many
...
...         :param on: switch it on
...         '''
>>> [(p.name, p.type.__name__, p.default, p.help) for p in parameters(Demo)]
[('count', 'int', 4, 'how many'), ('mode', 'str', 'fast', ''), ('level', 'float', None, ''), ('on', 'bool', False, 'switch it on')]
>>> convert(parameters(Demo)[0], "0x10"), convert(parameters(Demo)[3], "yes")
(16, True)
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from dataclasses import dataclass

from vfiouser.devices.errors import DefinitionError

__all__ = ["Parameter", "ParameterError", "parameters", "convert", "show_value"]

#: The types a parameter may have on the command line.
SIMPLE = (bool, int, float, str)
_BOOL_WORDS = {"1": True, "on": True, "yes": True, "true": True, "0": False, "off": False, "no": False,
               "false": False}
_NAMES = {"bool": bool, "int": int, "float": float, "str": str}


class ParameterError(DefinitionError):
    """A parameter value that does not fit the parameter's type (raised by :func:`convert`)."""


@dataclass(frozen=True)
class Parameter:
    """One parameter of a model: ``name``, ``type`` (bool, int, float or str), ``default``
    (:data:`inspect.Parameter.empty` when it must be given) and one line of ``help``."""

    name: str
    type: type
    default: object
    help: str = ""

    @property
    def required(self) -> bool:
        """Whether the parameter has no default."""
        return self.default is inspect.Parameter.empty

    def describe(self) -> str:
        """``name: type = default`` (``name: type (required)`` without a default)."""
        if self.required:
            return f"{self.name}: {self.type.__name__} (required)"
        return f"{self.name}: {self.type.__name__} = {show_value(self.default)}"


def show_value(value) -> str:
    """A default as one would type it after ``--param name=``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int) and value > 0xFFFF:
        return hex(value)
    if value is None:
        return "(none)"
    return str(value)


def _simple_type(annotation, default) -> type:
    if isinstance(annotation, str):  # an annotation that could not be evaluated: read its words
        words = [w.strip() for w in annotation.split("|")]
        members = [_NAMES[w] for w in words if w in _NAMES]
        annotation = members[0] if len(members) == 1 else (str if str in members or not members else members[0])
    if annotation in SIMPLE:
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(annotation) if m is not type(None)]
        if str in members:
            return str
        for kind in SIMPLE:
            if kind in members:
                return kind
    if annotation is inspect.Parameter.empty and type(default) in SIMPLE:
        return type(default)
    return str


def _help_lines(*docs: str | None) -> dict[str, str]:
    """``name -> help`` from ``:param name: text`` lines, ``Args:``/``Parameters:`` sections and
    a back-quoted name followed by a colon and its help (up to a ``;`` or the end of the sentence)."""
    found: dict[str, str] = {}
    for doc in docs:
        if not doc:
            continue
        text = inspect.cleandoc(doc)
        for name, help_text in re.findall(r"^\s*:param\s+(?:\w+\s+)?(\w+):\s*(.*)$", text, re.M):
            found.setdefault(name, help_text.strip())
        section = re.search(r"^(?:Args|Arguments|Parameters|Params):\s*\n((?:[ \t]+\S.*\n?)+)", text, re.M)
        if section:
            for name, help_text in re.findall(r"^[ \t]+(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", section.group(1), re.M):
                found.setdefault(name, help_text.strip())
        flat = " ".join(text.split())
        for name, help_text in re.findall(r"``(\w+)``:\s*(.+?)(?:;|\.(?=\s+[A-Z]|\s*$)|$)", flat):
            found.setdefault(name, help_text.replace("``", "").strip())
    return found


def parameters(cls: type) -> list[Parameter]:
    """The parameters of model class ``cls``, in ``__init__``'s order (see the module docstring)."""
    init = cls.__init__
    try:
        sig = inspect.signature(init, eval_str=True)
    except Exception:  # an annotation that does not evaluate: fall back to its text
        sig = inspect.signature(init)
    helps = _help_lines(init.__doc__ if init is not object.__init__ else None, cls.__doc__)
    out = []
    for name, p in sig.parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            continue
        out.append(Parameter(name, _simple_type(p.annotation, p.default), p.default, helps.get(name, "")))
    return out


def convert(param: Parameter, text: str):
    """``text`` (a ``--param`` value) as ``param``'s type; :class:`ParameterError` if it is not one.

    Integers take any base Python writes (``0x1f``, ``0o17``, ``1_000``); booleans take
    on/off, yes/no, true/false, 1/0.
    """
    kind = param.type
    if kind is bool:
        value = _BOOL_WORDS.get(text.lower())
        if value is None:
            raise ParameterError(f"parameter {param.name}: {text!r} is not on/off (use on, off, yes, no, 1 or 0)")
        return value
    if kind is int:
        try:
            return int(text, 0)
        except ValueError:
            raise ParameterError(f"parameter {param.name}: {text!r} is not an integer "
                                 f"(use decimal or 0x-prefixed hex, e.g. {param.name}=0x10)") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ParameterError(f"parameter {param.name}: {text!r} is not a number (e.g. {param.name}=1.5)") from None
    return text
