"""Every command line the README and docs/ show is accepted as a user would copy it: the Hydra
commands' (``bench.run``, ``bench.finetune``, ``bench.visualize``) overrides compose and pass the
settings checks, the other commands' options parse. A renamed setting, group, option or flag
fails here instead of on the reader's first try. Nothing is run; placeholders (``PATH``,
``<hash>``) become a temporary folder, and a comma list sweeps each of its values."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
from bench_utils import REPO, compose

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMANDS = ("bench.run", "bench.finetune", "bench.visualize")
FLAG_COMMANDS = (
    "bench.compare",
    "bench.leaderboard",
    "bench.publish",
    "bench.gpu_session",
    "bench.kernel_profile",
    "bench.report.stats",
)
CONFIG_NAMES = {"bench.run": "config", "bench.finetune": "finetune"}


def _code_lines(text: str) -> list[str]:
    """Lines of the fenced blocks, continuations (``\\``) joined, and single-line inline code."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += re.findall(r"`([^`\n]+)`", prose)
    return lines


def documented_commands(commands: tuple[str, ...] = COMMANDS) -> list[tuple[str, str, list[str]]]:
    """``(where, module, overrides)`` of every complete command line on the pages (an elided
    one, with ``...`` or ``[...]`` options, and one on a user's own config folder are left out)."""
    found = {}
    for page in PAGES:
        for line in _code_lines(page.read_text()):
            m = re.search(r"python -m (bench(?:\.\w+)+)(.*)", line)
            if m is None or m.group(1) not in commands:
                continue
            args = shlex.split(m.group(2), comments=True)
            hydra = m.group(1) in COMMANDS
            if "..." in args or any(a.startswith(("[", "hydra.searchpath")) for a in args) or (hydra and not args):
                continue  # elided, or a user's own configs (docs/adding-a-reducer.md's, tested in test_cli)
            if hydra and any(a.startswith("--") for a in args):
                continue  # --help, --cfg: Hydra's own
            found.setdefault((m.group(1), tuple(args)), f"{page.relative_to(REPO)}: {line.strip()}")
    return [(where, module, list(args)) for (module, args), where in found.items()]


COMMAND_LINES = documented_commands()
FLAG_LINES = documented_commands(FLAG_COMMANDS)


def test_the_pages_show_commands_of_every_kind():
    """The parser finds the command lines it checks (a changed page layout would make the tests
    below check nothing)."""
    assert {module for _, module, _ in COMMAND_LINES} == set(COMMANDS) and len(COMMAND_LINES) >= 25
    assert {module for _, module, _ in FLAG_LINES} == set(FLAG_COMMANDS)
    assert len(FLAG_LINES) >= 8


def _variants(overrides: list[str], tmp: Path) -> list[list[str]]:
    """The command's overrides as Hydra's compose takes them: placeholders filled, Hydra's own
    (launchers, search path) left to Hydra, and one variant per value of each comma list."""
    options = []
    for arg in overrides:
        if arg.startswith(("hydra.", "hydra/")):
            continue
        key, _, value = arg.partition("=")
        value = value.replace("<hash>", "0000").replace("PATH", str(tmp))
        values = value.split(",") if "," in value and not value.startswith("[") else [value]
        options.append([f"{key}={v}" for v in values])
    return [list(choice) for choice in itertools.product(*options)]


@pytest.mark.parametrize(("where", "module", "overrides"), COMMAND_LINES, ids=[w for w, _, _ in COMMAND_LINES])
def test_a_documented_command_composes_and_passes_the_checks(where, module, overrides, tmp_path):
    from bench.job import build_reducer_from_config
    from bench.validate import read_config, validate_settings
    from bench.visualize import compose_configs, split_methods

    for variant in _variants(overrides, tmp_path):
        if module == "bench.visualize":  # every method into one figure: its own composition
            cfgs = compose_configs(*split_methods(variant))
        else:
            cfgs = [compose(variant, CONFIG_NAMES[module])]
        for cfg in cfgs:
            if module == "bench.run":  # the others are checked by their own jobs, after their data
                validate_settings(read_config(cfg))
            build_reducer_from_config(cfg.method)


class _Parsed(Exception):
    """Raised right after a command's options parsed: the test stops before the command runs."""


@pytest.mark.parametrize(("where", "module", "args"), FLAG_LINES, ids=[w for w, _, _ in FLAG_LINES])
def test_a_documented_command_line_parses(where, module, args, monkeypatch):
    import argparse
    import importlib

    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **kw):
        parse(self, *a, **kw)  # a flag the command lacks: argparse's SystemExit(2)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_Parsed):
        importlib.import_module(module).main(args)
