"""The prompts the captioner asks with: the default templates (:data:`DEFAULT_PROMPTS`, per modality and plane),
templates from a JSON or YAML file (:func:`load_prompts`), the check that a template uses only the plain fields of
:data:`PROMPT_FIELDS` (``str.format`` would otherwise follow attribute and index chains), and the prompt of one slice
(:func:`prompt_for`). yaml is imported inside :func:`load_prompts`.
"""
from __future__ import annotations

import json
import os
import re
import string
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

from ..planes import PLANES, plane_id
from .vlm import VLMError, _first_line

MODALITY_NAMES = {"ct": "CT", "mri": "MRI"}
PROMPT_FIELDS = ("plane", "modality", "position", "case")
_ASK = ("Describe it concisely in radiology-report style (1-3 sentences): the anatomy visible and any abnormality, "
        "mentioning the {plane} plane.")
DEFAULT_PROMPTS = {
    "*": "This is a {plane} {modality} slice at relative position {position} along the {plane} axis. " + _ASK,
    "ct.*": "This is a {plane} CT slice (relative position {position}). Name the organs, bones and vessels "
            "visible and any lesion, fluid or density abnormality. " + _ASK,
    "mri.*": "This is a {plane} MRI slice (relative position {position}). Name the structures visible and any "
             "signal abnormality or lesion. " + _ASK,
}


class _Position(float):
    """Relative position that prints as ``0.42`` in ``{position}`` but still honours ``{position:.3f}``."""

    def __format__(self, spec: str) -> str:
        return float.__format__(self, spec or ".2f")

    def __str__(self) -> str:
        return format(self)


_SAMPLE = {"plane": "axial", "modality": "CT", "position": _Position(0.5), "case": "case_0"}
# a plain format spec: [[fill]align][sign][z][#][0][width][grouping][.precision][type], widths below 100
_PLAIN_SPEC = re.compile(r"(?:[^{}]?[<>=^])?[-+ ]?z?#?0?\d{0,2}[,_]?(?:\.\d{1,2})?[bcdeEfFgGnosxX%]?\Z")
_FIELDS_HINT = f"the fields are {', '.join('{' + f + '}' for f in PROMPT_FIELDS)}, optionally with a plain format " \
               f"such as {{position:.3f}} (write {{{{ }}}} for braces)"


@lru_cache(maxsize=256)
def _template_problem(template: str) -> Optional[str]:
    """Why ``template`` is not a safe prompt template (None if it is).

    Only the documented fields, by plain name: ``str.format`` would otherwise follow attribute and index chains
    (``{position.__format__.__globals__[os].environ}`` reads the process environment into a prompt).
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        return f"bad template ({_first_line(e)})"
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in PROMPT_FIELDS:
            shown = field if len(field) <= 40 else field[:37] + "..."
            if field.split(".")[0].split("[")[0] in PROMPT_FIELDS:
                return f"field {{{shown}}} uses attribute or index access, which is not allowed"
            return f"unknown field {{{shown}}}"
        if conversion not in (None, "s", "r", "a"):
            return f"unknown conversion !{conversion} in {{{field}}}"
        if spec and not _PLAIN_SPEC.match(spec):
            return f"format spec {spec!r} of {{{field}}} is not a plain one (no nested fields, width below 100)"
    try:
        template.format(**_SAMPLE)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
        return f"bad template ({_first_line(e)})"
    return None


def _check_templates(prompts: dict, where: str) -> None:
    for key, template in prompts.items():
        if not isinstance(template, str):
            raise VLMError(f"{where}: the template of {key!r} must be a string")
        problem = _template_problem(template)
        if problem:
            raise VLMError(f"{where}: {problem} in the template of {key!r}; {_FIELDS_HINT}")


def _check_key(key) -> bool:
    if not isinstance(key, str) or key.count(".") > 1 or (key != "*" and "." not in key):
        return False
    if key == "*":
        return True
    modality, plane = key.split(".")
    return modality in (*MODALITY_NAMES, "*") and plane in (*PLANES, "*")


def load_prompts(path: Union[str, os.PathLike]) -> dict:
    """Prompt templates from a JSON or YAML file, merged over :data:`DEFAULT_PROMPTS`.

    Keys are ``"{modality}.{plane}"``, ``"{modality}.*"``, ``"*.{plane}"`` or ``"*"`` (modality ``ct``/``mri``);
    values are ``str.format`` templates with fields ``{plane}``, ``{modality}``, ``{position}``, ``{case}`` by plain
    name (no attribute or index access: it could read module globals), optionally with a plain format spec
    (``{position:.3f}``).

    Returns:
        dict with a template for each ``"{modality}.{plane}"``: the file's most specific key for it, else the
        default's (any key of the file beats every default key).

    Raises:
        VLMError: unreadable file, unknown key, non-string template, unknown field, attribute/index access or
            a format spec that is not plain.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise VLMError(f"cannot read prompts file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise VLMError(f"prompts file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ImportError:
        raise VLMError(f"reading the YAML prompts file {path} needs PyYAML: pip install pyyaml") from None
    except Exception as e:  # json / yaml syntax errors have no common base class
        raise VLMError(f"prompts file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: "
                       f"{_first_line(e)}") from None
    if not isinstance(data, dict):
        raise VLMError(f"prompts file {path} must hold a mapping of keys like 'ct.axial' to templates")
    for key, template in data.items():
        if not _check_key(key):
            raise VLMError(f"prompts file {path}: unknown key {key!r}; use 'ct.axial', 'mri.*', '*.coronal' or "
                           f"'*' (modality ct/mri, plane axial/coronal/sagittal)")
    _check_templates(data, f"prompts file {path}")
    # Expanded to every modality.plane so that any user key beats every default one: a user "*.sagittal" must not
    # be shadowed by the more specific default "ct.*".
    merged = {}
    for m in MODALITY_NAMES:
        for p in PLANES:
            mine = _lookup(data, m, p)
            merged[f"{m}.{p}"] = mine if mine is not None else _lookup(DEFAULT_PROMPTS, m, p)
    return merged


def _lookup(prompts: dict, modality: str, plane: str) -> Optional[str]:
    """The most specific template of ``prompts`` for ``modality``/``plane`` (``m.p``, ``m.*``, ``*.p``, ``*``)."""
    for key in (f"{modality}.{plane}", f"{modality}.*", f"*.{plane}", "*"):
        if key in prompts:
            return prompts[key]
    return None


def prompt_for(prompts: Optional[dict], modality: str, plane: Union[str, int], **fields) -> str:
    """The prompt for one slice: the most specific template of ``prompts`` filled in.

    Args:
        prompts: templates as from :func:`load_prompts` (None: :data:`DEFAULT_PROMPTS`).
        modality: ``"ct"`` or ``"mri"``.
        plane: plane name or id.
        fields: ``position`` (float, printed as ``0.42``) and ``case``; a template using anything but the
            plain fields of :data:`PROMPT_FIELDS` is refused.
    """
    prompts = DEFAULT_PROMPTS if prompts is None else prompts
    mod = str(modality).strip().lower()
    if mod not in MODALITY_NAMES:
        raise VLMError(f"unknown modality {modality!r}: expected one of {sorted(MODALITY_NAMES)}")
    name = PLANES[plane_id(plane)]
    template = _lookup(prompts, mod, name)
    if template is None:
        raise VLMError(f"no prompt template for {mod}.{name} and no '*' fallback")
    problem = _template_problem(template) if isinstance(template, str) else "not a string"
    if problem:
        raise VLMError(f"prompt template for {mod}.{name}: {problem}; {_FIELDS_HINT}")
    if "position" in fields:
        fields["position"] = _Position(fields["position"])
    fields.setdefault("case", "")
    return template.format(plane=name, modality=MODALITY_NAMES[mod], **fields)
