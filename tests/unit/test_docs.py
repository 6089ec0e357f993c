"""Every command the README and docs/ show, read from their ```bash blocks: a `lipdd` command
parses and its values validate, a `dvc exp run -S KEY=...` names a key of params.yaml, a `make`
target exists, a script it runs is in the repository. The commands themselves run in the
scenario tests (the pipeline, sweeps, hosts, logins); this keeps the pages in step with them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from lipdd import cli, config

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOOLS = {"make", "dvc", "lipdd", "git", "source", "mlflow", "export", "pip", "torchrun"}


def commands(page: Path) -> list[list[str]]:
    """Each shell command of the page's bash blocks, as words: continuation lines joined, comments
    and VAR=value prefixes dropped, $VAR replaced by the block's own assignment of it."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        text = block.replace("\\\n", " ")
        assigned = dict(re.findall(r'^(\w+)="([^"]*)"', text, re.M | re.S))
        for line in re.sub(r'^\w+="[^"]*"\n?', "", text, flags=re.M | re.S).splitlines():
            line = re.sub(r"(^|\s)#.*", "", line).strip()
            for name, value in assigned.items():
                line = line.replace(f"${name}", value)
            for part in filter(None, (p.strip() for p in line.split("&&"))):
                words = shlex.split(part)
                while words and re.fullmatch(r"\w+=\S*", words[0]):
                    words = words[1:]
                if words:
                    found.append(words)
    return found


def params_keys() -> set[str]:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return {k for k in raw if k != "stats"} | {f"stats.{k}" for k in raw["stats"]}


def check(words: list[str]) -> None:
    tool = Path(words[0]).name
    if "-m" in words and words[words.index("-m") + 1] == "lipdd":  # torchrun ... -m lipdd ...
        words, tool = ["lipdd", *words[words.index("-m") + 2 :]], "lipdd"
    if words[:2] == ["lipdd", "sweep"]:  # its flags parse, its -S keys are params.yaml's
        args = cli.build_sweep_parser().parse_args(words[2:])
        assert {a.split("=", 1)[0] for a in args.set} <= params_keys(), args.set
    elif tool == "lipdd":
        args = cli.build_parser().parse_args(words[1:])
        overrides = {k: v for k, v in vars(args).items() if k not in ("command", "params")}
        params = str(ROOT / args.params) if args.params else None
        config.build(overrides, params_file=params, environ={}, registries=cli.registries())
    elif tool in ("python", "bash"):  # a script of the repository
        assert (ROOT / words[1]).is_file(), words
    elif tool == "sbatch":  # the command it wraps, an array task's arithmetic read as 0
        wrapped = words[words.index("--wrap") + 1]
        check(shlex.split(re.sub(r"\\?\$\(\([^)]*\)\)", "0", wrapped)))
    elif tool == "make":
        targets = re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert set(words[1:]) <= set(targets), words
    elif words[:3] == ["dvc", "exp", "run"]:
        keys = [words[i + 1].split("=", 1)[0] for i, w in enumerate(words) if w == "-S"]
        assert set(keys) <= params_keys(), set(keys) - params_keys()
    else:
        assert tool in TOOLS, words


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_of_the_page_is_real(page):
    found = commands(page)
    for words in found:
        check(words)


def test_the_readme_shows_both_quick_start_commands_and_fits_a_screen():
    text = (ROOT / "README.md").read_text()
    assert ["make", "repro"] in commands(ROOT / "README.md")
    assert ["make", "test"] in commands(ROOT / "README.md")
    assert len(text.splitlines()) <= 250


def test_a_wrong_command_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\nlipdd train --no-such-flag\n```\n")
    with pytest.raises(SystemExit):
        check(commands(page)[0])
    page.write_text("```bash\ndvc exp run -S widht=3\n```\n")
    with pytest.raises(AssertionError):
        check(commands(page)[0])
