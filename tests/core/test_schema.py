"""The declarative schema (med3dinsight_plugin.schema): every rule kind, the one-line messages, text-read and exact
values, the nested merge with did-you-mean hints, checking a mapping in place, and the key listing."""
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import pytest

from med3dinsight_plugin import schema
from med3dinsight_plugin.errors import Med3DInsightError
from med3dinsight_plugin.schema import ABSENT, REQUIRED, Rules, rule, setting


class Bad(Med3DInsightError):
    pass


TEXT = schema.Source("run.yaml", Bad)
EXACT = schema.Source("f.json", Bad, exact=True, template="{source}: '{key}' must be {expected}, {got}",
                      key_limit=None, value_limit=20)


def _message(value, rules, source=TEXT, key="k"):
    with pytest.raises(Bad) as e:
        schema.check(value, rules, key, source)
    return str(e.value)


@dataclass
class Inner:
    """A nested section."""
    rate: float = setting(0.5, "a rate", kind="float", above=0.0, below=1.0)
    names: List[str] = setting(["a"], "some names", kind="strs")


@dataclass
class Outer:
    """The top section."""
    steps: int = setting(10, "how many steps", kind="int", min=0)
    mode: str = setting("fast", "fast or slow", kind="str", choices=("fast", "slow"))
    size: Optional[List[int]] = setting(None, "a size", kind="ints", length=3, min=1, nullable=True)
    extra: Dict[str, Any] = setting({}, "free arguments", kind="dict")
    inner: Inner = setting(Inner, "the inner section")
    learning_rate: float = setting(1e-3, "a learning rate", kind="float", min=0.0)


# ------------------------------------------------------------------------------------------------------ each rule

@pytest.mark.parametrize("value, rules, expected", [
    ("x", rule("str"), "x"),
    ("slow", rule("str", choices=("fast", "slow")), "slow"),
    (True, rule("bool"), True),
    ("3", rule("int", min=0), 3),  # numeric text (YAML reads 3e-4 as a string)
    (4.0, rule("int"), 4),  # an integral float is an integer
    ("3e-4", rule("float", min=0.0), 3e-4),
    (0.5, rule("float", above=0.0, below=1.0), 0.5),
    ((1, 2, 3), rule("ints", length=3, min=1), [1, 2, 3]),  # a tuple is a list, elements converted
    (["1", 2.0], rule("floats", length=2), [1.0, 2.0]),
    ({"a": 1}, rule("dict"), {"a": 1}),
    ({"a": "b"}, rule("dict", item=Rules("str")), {"a": "b"}),
    (None, rule("int", nullable=True), None),
    (3, Rules("either", options=(rule("int", min=1), rule("ints", length=3))), 3),
    ([1, 2, 3], Rules("either", options=(rule("int", min=1), rule("ints", length=3))), [1, 2, 3]),
    (object, rule("any"), object),
])
def test_good_values_pass_and_text_is_converted(value, rules, expected):
    assert schema.check(value, rules, "k", TEXT) == expected


@pytest.mark.parametrize("value, rules, expected", [
    ("abc", rule("int", min=0), "an integer >= 0"),
    (True, rule("int"), "an integer"),  # a bool is no number
    (2.5, rule("int", min=1), "an integer >= 1"),
    (float("inf"), rule("float"), "a number"),  # text-read numbers are finite
    (7, rule("int", min=0, max=5), "an integer in [0, 5]"),
    (1.0, rule("float", above=0.0, below=1.0), "a number strictly between 0 and 1"),
    ([64, 64], rule("ints", length=3, min=1, nullable=True), "a list of 3 integers >= 1 or null"),
    ([0.9, 1.0], rule("floats", length=2, min=0.0, max=0.999999), "a list of 2 numbers in [0.0, 0.999999]"),
    ([], rule("ints", nonempty=True), "a list of integers"),
    (3, rule("str"), "a string"),
    ("medium", rule("str", choices=("fast", "slow")), "one of 'fast', 'slow'"),
    ("subprocess.Popen", rule("str", startswith="torch.nn."), "a string"),
    ("maybe", rule("bool"), "true or false"),
    ([1], rule("dict"), "a mapping of argument names to values"),
    ({1: 2}, rule("dict"), "a mapping of argument names to values"),
    ({"a": 1}, rule("dict", item=Rules("str")), "a mapping of argument names to values"),
    (None, rule("int", min=1), "an integer >= 1"),
    ([1, 2], Rules("either", options=(rule("int"), rule("ints", length=3)), expected="a stride"), "a stride"),
    (5, rule("int", max=3, expected="small"), "small"),  # expected replaces the derived text
])
def test_bad_values_name_the_key_what_it_must_be_and_what_it_is(value, rules, expected):
    assert _message(value, rules) == f"'k' in run.yaml must be {expected}, got {value!r}"


def test_exact_values_are_taken_as_they_are():
    """From JSON nothing is converted: no numeric text, no tuples, no integral floats; ints count as floats."""
    assert schema.check(3, rule("float", above=0), "k", EXACT) == 3
    for value, rules in (("3", rule("int")), (3.0, rule("int")), ((1, 2, 3), rule("ints", length=3)),
                         (True, rule("int"))):
        assert "must be" in _message(value, rules, EXACT)
    values = [1, 2, 3]
    assert schema.check(values, rule("ints", length=3), "k", EXACT) is values  # kept, not copied


def test_missing_and_long_values_and_keys_are_one_line():
    assert _message(ABSENT, rule("int", required=True, expected="a positive integer"), EXACT) == \
        "f.json: 'k' must be a positive integer, it is missing"
    assert schema.check(ABSENT, rule("int"), "k", EXACT) is ABSENT  # an optional key may be absent
    text = _message("x" * 500, rule("int"), key="a." * 100)
    assert "\n" not in text and len(text) < 200 and "..." in text
    assert _message(list(range(100)), rule("int"), EXACT).endswith("got [0, 1, 2, 3, 4, 5...")


def test_setting_declares_defaults_rules_and_one_line_help():
    field = Outer.__dataclass_fields__["size"]
    assert schema.rules_of(field) == schema.rules_of(Outer, "size")
    assert schema.rules_of(Outer, "size").item == Rules("int", min=1) and schema.rules_of(Outer, "size").length == 3
    assert Outer().extra is not Outer().extra  # mutable defaults are copied
    assert schema.rules_of(Outer, "inner").kind == "section" and isinstance(Outer().inner, Inner)
    with pytest.raises(ValueError, match="one-line help"):
        setting(1, "two\nlines", kind="int")
    with pytest.raises(ValueError, match="one-line help"):
        setting(1, kind="int")
    with pytest.raises(ValueError, match="unknown schema kind"):
        setting(1, "x", kind="integer")
    assert schema.rules_of(Outer, "steps").required is False and rule("int", required=True).required


# ------------------------------------------------------------------------------------------------------- merging

def test_merge_sets_nested_sections_and_updates_dicts_entry_by_entry():
    obj = Outer()
    schema.merge(obj, {"steps": "20", "inner": {"rate": 0.25}, "extra": {"a": {"b": 1}}}, TEXT)
    schema.merge(obj, {"extra": {"a": {"c": 2}, "d": 3}, "size": [8, 8, 8]}, TEXT)
    assert (obj.steps, obj.inner.rate, obj.inner.names, obj.size) == (20, 0.25, ["a"], [8, 8, 8])
    assert obj.extra == {"a": {"b": 1, "c": 2}, "d": 3}


@pytest.mark.parametrize("values, message", [
    ({"stpes": 1}, "unknown key 'stpes' in run.yaml; did you mean 'steps'?"),  # the closest sibling
    ({"learning": 1}, "unknown key 'learning' in run.yaml; did you mean 'learning_rate'?"),  # an abbreviation
    ({"steps_total": 1}, "unknown key 'steps_total' in run.yaml; did you mean 'steps'?"),  # an extension
    ({"inner": {"steps": 1}}, "unknown key 'inner.steps' in run.yaml; did you mean 'steps'?"),  # another section
    ({"inner": {"zzz": 1}}, "unknown key 'inner.zzz' in run.yaml; expected one of: inner.rate, inner.names"),
    ({"inner": {"rat": 1}}, "unknown key 'inner.rat' in run.yaml; did you mean 'inner.rate'?"),
    ({1: 2}, "unknown key '1' in run.yaml; expected one of: steps, mode, size, extra, inner, learning_rate"),
    ({"inner": 3}, "'inner' in run.yaml must be a mapping of keys (rate, names), got 3"),
    ({"inner": {"rate": 1}}, "'inner.rate' in run.yaml must be a number strictly between 0 and 1, got 1"),
    ({"mode": "medium"}, "'mode' in run.yaml must be one of 'fast', 'slow', got 'medium'"),
])
def test_merge_refuses_unknown_keys_with_a_hint_and_bad_values(values, message):
    with pytest.raises(Bad) as e:
        schema.merge(Outer(), values, TEXT)
    assert str(e.value) == message


def test_suggest_prefers_stems_then_other_sections_then_close_matches():
    everything = ["train.lr", "train.steps", "data.seed", "data.source"]
    assert schema.suggest("lr_rate", ["lr", "steps"], "train.", everything) == "train.lr"
    assert schema.suggest("seed", ["lr", "steps"], "train.", everything) == "data.seed"
    assert schema.suggest("stepz", ["lr", "steps"], "train.", everything) == "train.steps"
    assert schema.suggest("sourc", ["lr", "steps"], "train.", everything) == "data.source"
    assert schema.suggest("qqq", ["lr", "steps"], "train.", everything) is None


# ------------------------------------------------------------------------------------------ checking in place

@dataclass
class Head:
    version: int = setting(REQUIRED, "the version", kind="int", min=1, expected="a positive integer")
    body: Inner = setting(Inner, "the body", required=True, expected="an object")
    note: Optional[str] = setting(None, "a note", kind="str", expected="a string")


def test_check_fields_checks_declared_keys_in_order_and_leaves_the_rest():
    values = {"version": 2, "body": {"rate": 0.5, "other": [1]}, "free": object()}
    schema.check_fields(values, Head, EXACT)  # undeclared keys are free; nothing is changed
    assert values["body"] == {"rate": 0.5, "other": [1]}
    for bad, message in (({"body": {}}, "'version' must be a positive integer, it is missing"),
                         ({"version": 1}, "'body' must be an object, it is missing"),
                         ({"version": 1, "body": []}, "'body' must be an object, got []"),
                         ({"version": 1, "body": {"rate": 2}}, "'body.rate' must be a number strictly between 0 "
                                                               "and 1, got 2"),
                         ({"version": 1, "body": {}, "note": None}, "'note' must be a string, got None")):
        with pytest.raises(Bad) as e:
            schema.check_fields(bad, Head, EXACT)
        assert str(e.value) == f"f.json: {message}"


def test_check_fields_refines_rules_and_runs_cross_field_checks_where_they_belong():
    calls = []

    def after_rate(values, source):
        calls.append(("rate", dict(values)))

    def after_body(values, source):
        calls.append(("body", values["version"]))
        source.fail("body.rate", "below the version", values["body"]["rate"])

    values = {"version": 3, "body": {"rate": 0.5, "names": ["x"]}}
    with pytest.raises(Bad, match=r"f.json: 'body.rate' must be below the version, got 0.5"):
        schema.check_fields(values, Head, EXACT, then={"body.rate": after_rate, "body": after_body})
    assert calls == [("rate", {"rate": 0.5, "names": ["x"]}), ("body", 3)]  # the section's keys first
    with pytest.raises(Bad, match=r"'body.names' must be one of x, y, got \['z'\]"):
        schema.check_fields({"version": 1, "body": {"names": ["z"]}}, Head, EXACT,
                            refine={"body.names": {"item": Rules("str", choices=("x", "y")),
                                                   "expected": "one of x, y"}})


# --------------------------------------------------------------------------------------------------- listing

def test_entries_list_every_key_nested_with_its_value_and_help():
    listed = schema.entries(Outer)
    assert [e.key for e in listed] == ["steps", "mode", "size", "extra", "inner", "inner.rate", "inner.names",
                                       "learning_rate"]
    assert [e.value for e in listed if e.rules.kind != "section"] == [10, "fast", None, {}, 0.5, ["a"], 1e-3]
    assert all(e.rules.help and "\n" not in e.rules.help for e in listed)
    obj = Outer(steps=3)
    obj.inner.rate = 0.1
    assert {e.key: e.value for e in schema.entries(obj)}["inner.rate"] == 0.1
    assert schema.keys(obj) == [e.key for e in listed]
    assert [e.value for e in schema.entries(Head)][:1] == [REQUIRED]


def test_the_schema_imports_only_the_standard_library():
    code = ("import sys; import med3dinsight_plugin.schema; "
            "print(sorted(m for m in ('torch', 'numpy', 'yaml', 'pydantic') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
