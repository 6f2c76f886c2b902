"""The documentation holds together: the README is a front page, every relative link and anchor of README.md and
docs/*.md resolves, and what docs/pretraining.md says about the configuration is what the code does (the YAML and
``--set`` examples load, the defaults in its key table are the defaults, and what it says of a repeated ``--set``).
The own-data examples are run by tests/package/test_readme_own_data.py."""
import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

from helpers import REPO_ROOT
from med3dinsight_plugin import schema
from med3dinsight_plugin.cli import build_parser
from med3dinsight_plugin.pretrain.config import PretrainConfig, load_config

ROOT = REPO_ROOT
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PRETRAINING = ROOT / "docs" / "pretraining.md"


def _without_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _blocks(path: Path, language: str):
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


def test_readme_is_a_front_page_with_an_index_of_the_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    assert (ROOT / "docs" / "README.md").is_file()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme or page.name == "README.md", f"the README does not link {page.name}"


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _without_code(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path) if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", _without_code(dest.read_text(encoding="utf-8")), re.M)
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_pretraining_page_examples_load():
    for block in _blocks(PRETRAINING, "yaml"):
        values = yaml.safe_load(block)
        load_config(None, [f"{s}.{k}={v}" for s, keys in values.items() for k, v in keys.items()])
    for block in _blocks(PRETRAINING, "bash"):
        for command in block.replace("\\\n", " ").splitlines():
            if "--set" not in command or "..." in command:
                continue
            args = shlex.split(command.replace("$DATA", "data"), comments=True)
            args = args[:args.index(">")] if ">" in args else args  # the shell's redirection is not an argument
            parsed = build_parser().parse_args(args[1:])
            load_config(None, parsed.set)


def _cells(text: str) -> list:
    """A table cell's comma-separated items (commas inside brackets or braces do not separate)."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    return items + [current.strip()]


def test_pretraining_key_table_gives_every_key_of_the_schema_and_its_default():
    """The rows of "Every key" name every key the schema declares (a row may name several: `a.b`, `.c` is a.c) and
    give each one's default (none = null; one default for all of a row's keys, or one per key)."""
    defaults = {e.key: e.value for e in schema.entries(PretrainConfig) if e.rules.kind != "section"}
    section = PRETRAINING.read_text(encoding="utf-8").split("## Every key", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for names, default in re.findall(r"^\| (`[^|]+) \| ([^|]+) \|", section, re.M):
        keys = []
        for key in re.findall(r"`([\w.]+)`", names):
            keys.append(keys[-1].rsplit(".", 1)[0] + key if key.startswith(".") else key)
        texts = _cells(default)
        texts = texts * len(keys) if len(texts) == 1 else texts
        assert len(texts) == len(keys), f"docs/pretraining.md: the row of {names} gives {default.strip()}"
        documented.update(zip(keys, texts))
    assert sorted(documented) == sorted(defaults), "docs/pretraining.md's key table and the schema differ: " \
        f"{sorted(set(documented) ^ set(defaults))}"
    for key, text in documented.items():
        text = text.strip("`")
        expected = None if text == "none" else {"true": True, "false": False}.get(text, text)
        if isinstance(expected, str):
            try:
                expected = ast.literal_eval(expected)
            except (ValueError, SyntaxError):
                pass
        assert defaults[key] == expected, f"docs/pretraining.md says {key} defaults to {text}, the code has " \
                                          f"{defaults[key]!r}"


def test_what_the_pretraining_page_says_of_a_repeated_set():
    """docs/pretraining.md says that every --set counts and a later value of a key wins; the CLI does so."""
    from med3dinsight_plugin.pretrain.config import load_config

    kept = build_parser().parse_args(["pretrain", "--set", "train.steps=20", "--set", "model.psat=small",
                                      "train.steps=30"]).set
    assert kept == ["train.steps=20", "model.psat=small", "train.steps=30"]
    config = load_config(None, kept)
    assert (config.train.steps, config.model.psat) == (30, "small")
    assert "`--set` may be repeated and every one counts" in PRETRAINING.read_text(encoding="utf-8")


@pytest.mark.slow
def test_the_readme_monai_example_runs(tmp_path):
    """The README's MONAI block, run as written on the CPU with a smaller network, volume and schedule: it loads a
    pretrained SwinUNETR checkpoint into MONAI's own SwinUNETR, prints the load report and trains."""
    import subprocess
    import sys

    from med3dinsight_plugin import build_backbone, save_pretrained

    block = next(b for b in _blocks(ROOT / "README.md", "python") if "Med3DInsightSupervisedTrainer" in b)
    for old, new in (('"cuda"', '"cpu"'), ("max_epochs=100", "max_epochs=1"), ("96, 96, 96", "64, 64, 64"),
                     ("feature_size=48", "feature_size=12"), ("frozen_encoder_epochs=5", "frozen_encoder_epochs=0")):
        assert old in block, f"the README's MONAI example no longer contains {old!r}: update this test"
        block = block.replace(old, new)
    (tmp_path / "runs" / "swin").mkdir(parents=True)
    save_pretrained(build_backbone("swin_unetr", patch_size=(64, 64, 64), feature_size=12),
                    tmp_path / "runs" / "swin" / "med3dinsight.safetensors")
    r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "100.0 %" in r.stdout or "loaded" in r.stdout, r.stdout
