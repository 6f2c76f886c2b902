"""One small declarative schema for nested settings: typed dataclass fields that carry their rules and their meaning.

A section is a dataclass whose fields are declared with :func:`setting` (a value with its rules and a one-line help,
or a nested section); its rules are a :class:`Rules`. Reading values against it:

- :func:`check` validates one value against its field's rules (coercing numeric text such as ``3e-4`` when the values
  come from a text source) and raises the caller's error class with a one-line message; :class:`Source` says which
  class, how the message reads, and whether values are text-read (YAML, ``--set``) or exact (a JSON header);
- :func:`merge` sets a section's fields from a nested dict, refusing unknown keys with a did-you-mean hint;
- :func:`check_fields` checks the declared keys of a mapping that is kept as it is (a file's JSON header), the
  required ones present;
- :func:`entries` lists every key, nested, with its value (the default, on a fresh section) and its help.

Standard library only: the torch-free core imports it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, NamedTuple, NoReturn, Optional, Tuple, Type

from .errors import cut, short_repr

__all__ = ["ABSENT", "REQUIRED", "Entry", "Rules", "Source", "check", "check_fields", "cut", "describe", "entries",
           "keys", "merge", "rule", "rules_of", "setting", "suggest"]


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


REQUIRED: Any = _Marker("REQUIRED")  # setting(REQUIRED, ...): the key has no default and must be present
ABSENT: Any = _Marker("ABSENT")  # a key that is not there (check's value; Source.fail says "it is missing")

_KEY = "med3dinsight.schema"  # where a dataclass field keeps its Rules (dataclasses.Field.metadata)
_KINDS = ("str", "bool", "int", "float", "dict", "list", "either", "any", "section")
_PLURAL_KINDS = {"ints": "int", "floats": "float", "strs": "str"}  # list shorthands: element rules go to the item
_ITEM_RULES = ("min", "max", "above", "below", "choices", "startswith")


@dataclass(frozen=True)
class Rules:
    """What one key accepts, and what it means.

    ``kind``: ``str``, ``bool``, ``int``, ``float``, ``dict`` (string keys; ``item`` rules its values), ``list``
    (``item`` rules its elements; ``length`` exact, ``nonempty``), ``either`` (any of ``options``), ``any``, or
    ``section`` (a nested dataclass, ``section``). ``min``/``max`` are inclusive bounds, ``above``/``below``
    exclusive ones; ``choices`` and ``startswith`` restrict strings; ``nullable`` admits ``None``; ``required``: the
    key must be present (:func:`check_fields`). ``expected`` replaces the text that says what a bad value must be
    (default: :func:`describe`).
    """
    kind: str
    help: str = ""
    nullable: bool = False
    required: bool = False
    min: Optional[float] = None
    max: Optional[float] = None
    above: Optional[float] = None
    below: Optional[float] = None
    choices: Optional[Tuple[Any, ...]] = None
    startswith: Optional[str] = None
    length: Optional[int] = None
    nonempty: bool = False
    item: Optional["Rules"] = None
    options: Tuple["Rules", ...] = ()
    expected: Optional[str] = None
    section: Optional[type] = None

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"unknown schema kind {self.kind!r}; expected one of {', '.join(_KINDS)}")
        if self.kind == "list" and self.item is None:
            raise ValueError("a list's rules need the rules of its items (item=...)")

    def but(self, **changes) -> "Rules":
        """These rules with ``changes`` (e.g. choices known only when a value is read)."""
        return dataclasses.replace(self, **changes)


def rule(kind: str, **rules) -> Rules:
    """:class:`Rules` of ``kind``; ``ints``/``floats``/``strs`` are lists of that kind whose elements take the bounds,
    ``choices`` and ``startswith`` given here."""
    if kind in _PLURAL_KINDS:
        element = {k: rules.pop(k) for k in _ITEM_RULES if k in rules}
        return Rules("list", item=Rules(_PLURAL_KINDS[kind], **element), **rules)
    return Rules(kind, **rules)


def setting(default: Any = REQUIRED, help: str = "", **rules) -> Any:
    """A dataclass field declared with its rules (see :class:`Rules`; ``kind`` as in :func:`rule`) and its meaning.

    Args:
        default: the value when the key is not given; :data:`REQUIRED`: none, the key must be present; a dataclass:
            a nested section of that class (``required=True`` if it must be present).
        help: the key's meaning, one line.
        rules: ``kind=...`` and the other :class:`Rules` fields.
    """
    if not help or "\n" in help:
        raise ValueError(f"a setting needs a one-line help text, got {help!r}")
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default,
                     metadata={_KEY: Rules("section", help=help, section=default, **rules)})
    meta = {_KEY: rule(help=help, required=default is REQUIRED, **rules)}
    if isinstance(default, (list, dict)):  # mutable: every instance gets its own copy
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def rules_of(section: Any, name: Optional[str] = None) -> Any:
    """The :class:`Rules` of field ``name`` of a section (class or instance), or of a ``dataclasses.Field``; with a
    section and no name, ``{name: Rules}`` of all its fields in order."""
    if isinstance(section, dataclasses.Field):
        return section.metadata[_KEY]
    if name is None:
        return {f.name: f.metadata[_KEY] for f in dataclasses.fields(section)}
    return next(f.metadata[_KEY] for f in dataclasses.fields(section) if f.name == name)


@dataclass(frozen=True)
class Source:
    """Where values come from, and how a bad one is reported.

    ``name`` is named in messages (a file, ``--set``); ``error`` is the class raised. ``template`` is the one-line
    message of a bad or missing value (``{key}``, ``{source}``, ``{expected}``, ``{got}``: ``got VALUE`` or ``it is
    missing``), ``unknown`` that of an unknown key (``{key}``, ``{source}``, ``{hint}``). ``exact``: values are typed
    already (JSON) and taken as they are; otherwise they were read from text, and numeric strings (YAML reads
    ``3e-4`` as a string), integral floats for integers and tuples for lists are accepted and converted. Values are
    shown cut to ``value_limit`` characters, keys to ``key_limit`` (``None``: whole).
    """
    name: str
    error: Type[Exception]
    template: str = "'{key}' in {source} must be {expected}, {got}"
    unknown: str = "unknown key '{key}' in {source}{hint}"
    exact: bool = False
    value_limit: int = 80
    key_limit: Optional[int] = 80

    def show(self, key: Any) -> str:
        """``key`` as messages show it."""
        return str(key) if self.key_limit is None else cut(str(key), self.key_limit)

    def fail(self, key: str, expected: str, value: Any = ABSENT) -> NoReturn:
        """Raise ``error``: ``key`` must be ``expected`` and is ``value`` (or missing)."""
        got = "it is missing" if value is ABSENT else f"got {short_repr(value, self.value_limit)}"
        raise self.error(self.template.format(key=self.show(key), source=self.name, expected=expected, got=got))


# ------------------------------------------------------------------------------------------------------ checking

def check(value: Any, rules: Rules, key: str, source: Source) -> Any:
    """``value`` checked against ``rules`` (and converted, for a text source); :data:`ABSENT` passes through unless
    the key is required.

    Raises:
        source.error: one line naming ``key``, what it must be and what it is (:meth:`Source.fail`).
    """
    if value is ABSENT:
        if rules.required:
            source.fail(key, describe(rules), ABSENT)
        return ABSENT
    problem, result = _conform(value, rules, source.exact)
    if problem is not None:
        source.fail(key, problem, value)
    return result


def check_fields(values: Mapping[str, Any], section: type, source: Source, prefix: str = "",
                 refine: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 then: Optional[Mapping[str, Callable[[Mapping[str, Any], Source], None]]] = None) -> None:
    """Check the keys ``section`` declares in ``values``, in declaration order, recursing into nested sections; keys
    it does not declare are left alone, and nothing is converted or stored.

    Args:
        values: the mapping, e.g. a JSON header.
        section: the dataclass declaring the keys.
        source: where the values come from (usually ``exact``).
        prefix: the dotted key of ``values`` (``"backbone."``), for messages.
        refine: dotted key -> :class:`Rules` changes known only now (``{"backbone.name": {"choices": ...}}``).
        then: dotted key -> a check a schema cannot express, called with the mapping that holds the key and
            ``source`` once the key (and, for a section, its keys) passed, present or not: cross-field checks run
            where they belong in the order of the report.

    Raises:
        source.error: the first key that is missing or bad.
    """
    for name, rules in rules_of(section).items():
        key = prefix + name
        if refine and key in refine:
            rules = rules.but(**refine[key])
        value = check(values.get(name, ABSENT), rules, key, source)
        if rules.kind == "section" and isinstance(value, dict):
            check_fields(value, rules.section, source, key + ".", refine, then)
        if then and key in then:
            then[key](values, source)


def merge(obj: Any, values: Mapping[Any, Any], source: Source, prefix: str = "", root: Any = None) -> None:
    """Set the dataclass ``obj``'s fields from ``values``, recursing into sections; every value is checked.

    A ``dict`` field given a mapping is updated entry by entry (recursively), so an override reaches one entry
    without erasing the others; everything else is replaced.

    Raises:
        source.error: an unknown key (with the key it most likely meant, else the keys of that section), a section
            given something other than a mapping, or a bad value.
    """
    root = root if root is not None else obj
    declared = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if not isinstance(name, str) or name not in declared:
            match = suggest(str(name), list(declared), prefix, keys(root))
            hint = f"; did you mean '{match}'?" if match else \
                f"; expected one of: {', '.join(f'{prefix}{n}' for n in declared)}"
            raise source.error(source.unknown.format(key=source.show(key), source=source.name, hint=hint))
        current, rules = getattr(obj, name), rules_of(declared[name])
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                source.fail(key, f"a mapping of keys ({', '.join(keys(current))})", value)
            merge(current, value, source, key + ".", root)
        elif rules.kind == "dict" and isinstance(value, dict) and isinstance(current, dict):
            merged = dict(current)
            _deep_update(merged, value)
            setattr(obj, name, check(merged, rules, key, source))
        else:
            setattr(obj, name, check(value, rules, key, source))


def suggest(name: str, siblings: List[str], prefix: str, everything: List[str]) -> Optional[str]:
    """The key a misspelt ``name`` most likely meant: a sibling it extends or abbreviates (``lr_rate`` -> ``lr``),
    else the same name in another section, else the closest sibling, else the closest key anywhere."""
    lowered = name.lower()
    stems = [s for s in siblings if lowered.startswith(s + "_") or (len(lowered) >= 3 and s.startswith(lowered))]
    if stems:
        return prefix + max(stems, key=len)
    elsewhere = [k for k in everything if k.rsplit(".", 1)[-1] == lowered]
    if elsewhere:
        return elsewhere[0]
    match = difflib.get_close_matches(lowered, siblings, n=1, cutoff=0.6)
    if match:
        return prefix + match[0]
    match = difflib.get_close_matches(name, [k.rsplit(".", 1)[-1] for k in everything], n=1, cutoff=0.8)
    return next((k for k in everything if match and k.rsplit(".", 1)[-1] == match[0]), None)


def describe(rules: Rules) -> str:
    """What a value must be, as messages say it: ``expected`` if given, else e.g. ``an integer >= 1``, ``a number
    strictly between 0 and 1``, ``a list of 3 integers >= 1 or null``."""
    if rules.expected is not None:
        return rules.expected
    if rules.kind == "list":
        count = f"{rules.length} " if rules.length is not None else ""
        text = f"a list of {count}{_PLURALS.get(rules.item.kind, rules.item.kind)}{_bounds(rules.item)}"
    else:
        text = _NAMES.get(rules.kind, rules.kind) + _bounds(rules)
    return text + (" or null" if rules.nullable else "")


_NAMES = {"int": "an integer", "float": "a number", "str": "a string"}
_PLURALS = {"int": "integers", "float": "numbers", "str": "strings"}


def _bounds(rules: Rules) -> str:
    if rules.min is not None and rules.max is not None:
        return f" in [{rules.min}, {rules.max}]"
    if rules.min is not None:
        return " >= 0" if rules.min == 0 else f" >= {rules.min}"
    if rules.above is not None and rules.below is not None:
        return f" strictly between {rules.above:g} and {rules.below:g}"
    return ""


def _conform(value: Any, rules: Rules, exact: bool) -> Tuple[Optional[str], Any]:
    """``(None, the value as stored)`` when ``value`` obeys ``rules``, else ``(what it must be, None)``."""
    if value is None:
        return (None, None) if rules.nullable else (describe(rules), None)
    kind = rules.kind
    if kind == "any":
        return None, value
    if kind == "str":
        if not isinstance(value, str) or (rules.startswith is not None and not value.startswith(rules.startswith)):
            return describe(rules), None
        if rules.choices is not None and value not in rules.choices:
            return rules.expected or "one of " + ", ".join(repr(c) for c in rules.choices), None
        return None, value
    if kind == "bool":
        return (None, value) if isinstance(value, bool) else (rules.expected or "true or false", None)
    if kind in ("dict", "section"):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value) or (
                rules.item is not None and any(_conform(v, rules.item, exact)[0] for v in value.values())):
            return rules.expected or "a mapping of argument names to values", None
        return None, value
    if kind in ("int", "float"):
        number = _number(value, kind, exact)
        if number is None or not _in_range(number, rules):
            return describe(rules), None
        return None, number
    if kind == "list":
        if not isinstance(value, list if exact else (list, tuple)) or (
                rules.length is not None and len(value) != rules.length) or (rules.nonempty and not value):
            return describe(rules), None
        items = []
        for v in value:
            problem, item = _conform(v, rules.item, exact)
            if problem is not None:
                return describe(rules), None
            items.append(item)
        return None, value if exact else items
    for option in rules.options:  # either
        problem, result = _conform(value, option, exact)
        if problem is None:
            return None, result
    return describe(rules), None


def _number(value: Any, kind: str, exact: bool):
    """``value`` as an int/float, or ``None``. Exact: an int (a float also takes an int) as it is. From text: YAML
    reads ``3e-4`` (no dot) as a string, so numeric strings count, an integral float is an integer, and only finite
    numbers count."""
    if isinstance(value, bool):
        return None
    if exact:
        return value if isinstance(value, int if kind == "int" else (int, float)) else None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if kind == "int":
        return int(value) if float(value).is_integer() else None
    return float(value)


def _in_range(v, rules: Rules) -> bool:
    """``min``/``max`` are inclusive bounds, ``above``/``below`` exclusive ones."""
    return ((rules.min is None or v >= rules.min) and (rules.max is None or v <= rules.max)
            and (rules.above is None or v > rules.above) and (rules.below is None or v < rules.below))


def _deep_update(target: dict, update: Mapping) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            _deep_update(target[k], v)
        else:
            target[k] = v


# ------------------------------------------------------------------------------------------------------- listing

class Entry(NamedTuple):
    """One key of :func:`entries`: dotted ``key``, its ``value`` and its :class:`Rules` (``rules.help``)."""
    key: str
    value: Any
    rules: Rules


def entries(section: Any, prefix: str = "") -> List[Entry]:
    """Every key of a section (an instance: its values; a class: the defaults, :data:`REQUIRED` where there is none),
    depth first in declaration order, each section before its keys."""
    out = []
    for f in dataclasses.fields(section):
        rules = rules_of(f)
        if not isinstance(section, type):
            value = getattr(section, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory()
        out.append(Entry(prefix + f.name, value, rules))
        if rules.kind == "section":
            out += entries(value, f"{prefix}{f.name}.")
    return out


def keys(section: Any, prefix: str = "") -> List[str]:
    """The dotted keys of :func:`entries`."""
    return [e.key for e in entries(section, prefix)]

