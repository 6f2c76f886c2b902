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
        command = block.replace("\\\n", " ")
        if "--set" not in command or "..." in command:
            continue
        args = shlex.split(command.replace("$DATA", "data"))
        parsed = build_parser().parse_args(args[1:])
        load_config(None, parsed.set)


def test_pretraining_key_table_gives_the_defaults():
    """Each row of "Every key" whose key cell names one key gives that key's default (none = null)."""
    defaults = PretrainConfig().to_dict()
    section = PRETRAINING.read_text(encoding="utf-8").split("## Every key", 1)[1].split("\n## ", 1)[0]
    checked = 0
    for key, default in re.findall(r"^\| `([\w.]+)` \| ([^|]+) \|", section, re.M):
        value = defaults
        for part in key.split("."):
            value = value[part]
        text = default.strip().strip("`")
        expected = None if text == "none" else {"true": True, "false": False}.get(text, text)
        if isinstance(expected, str):
            try:
                expected = ast.literal_eval(expected)
            except (ValueError, SyntaxError):
                pass
        assert value == expected, f"docs/pretraining.md says {key} defaults to {text}, the code has {value!r}"
        checked += 1
    assert checked >= 20


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
