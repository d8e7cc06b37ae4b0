"""The README and docs/ run as written and name only things that exist.

Convention (README, "Contributing"): a fenced block whose info string is exactly `python` is
runnable. The runnable blocks of one page run in order, in one namespace, in a temporary
directory that holds a copy of configs/. Blocks marked `python notest`, `bash`, `text`, `yaml`, …
are shown, never run. On every page, in blocks and prose alike:
- each `configs/…` path and each backticked repository path (`align_jax/…`, `experiments/…`,
  `tests/…`, `notebooks/…`, `docs/…`) exists;
- each `--flag` given to `align-jax <command>` is in that command's `--help`, and each flag given
  to an experiment (`python -m experiments.<name>`, `python experiments/<name>.py`) is in its
  `--help`; a flag written on its own in backticks is a flag of one of those commands;
- each backticked `align_jax.<module>.<name>` imports;
- each relative link resolves, down to its `#anchor`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "experiments" / "README.md",
                *(ROOT / "docs").glob("*.md")])

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`\n]+)`")
ALIGN_JAX = re.compile(r"(?:align-jax|python3?\s+-m\s+align_jax(?:\.cli)?)\s+([a-z][\w-]*)(.*)")
EXPERIMENT = re.compile(r"python3?\s+(?:-m\s+(experiments(?:\.\w+)+)|(experiments/[\w/]+)\.py)(.*)")
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")
CONFIG_PATH = re.compile(r"(?<![\w/.])(configs/[\w./-]*\w)")
REPO_PATH = re.compile(r"^(?:align_jax|experiments|tests|notebooks|docs|configs)/[\w./-]*$")
PYTHON_NAME = re.compile(r"^(align_jax(?:\.\w+)+)(?:\(.*\))?$")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def split(text: str) -> tuple[list[tuple[str, str]], str]:
    """(fenced blocks as (info string, code), the text outside them)."""
    return [(info.strip(), code) for info, code in FENCE.findall(text)], FENCE.sub("", text)


def segments(text: str) -> list[str]:
    """Where a command may be written: every line of every fenced block and every inline code
    span."""
    blocks, prose = split(text)
    return [line for _, code in blocks for line in code.splitlines()] + INLINE.findall(prose)


def runnable(page: Path) -> list[str]:
    return [code for info, code in split(page.read_text())[0] if info == "python"]


def command_tail(tail: str) -> str:
    """The arguments of one command: up to a comment or the next command."""
    return re.split(r"\s#|;|&&|\|", tail, maxsplit=1)[0]


def help_flags(help_text: str) -> set[str]:
    return set(FLAG.findall(help_text))


@functools.cache
def align_jax_flags(command: str) -> set[str] | None:
    """The flags `align-jax <command> --help` lists, or None when there is no such command."""
    out = subprocess.run([sys.executable, "-m", "align_jax", command, "--help"], check=False,
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    return help_flags(out.stdout) if out.returncode == 0 else None


@functools.cache
def experiment_flags(module: str) -> set[str] | None:
    """The flags an experiment script's `--help` lists (its `main(["--help"])`, in this process),
    or None when there is no such module. A script whose optional dependencies are not installed
    (the benchmarks need the `bench` extra) is read instead: the flags its parsers add."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return None
    try:
        main = importlib.import_module(module).main
    except ImportError:
        source = Path(spec.origin).read_text()
        if "report.argument_parser" in source:
            source += (ROOT / "experiments" / "report.py").read_text()
        return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(["--help"])
        except SystemExit:  # argparse exits after printing the help
            pass
    return help_flags(out.getvalue())


def command_mentions(text: str) -> list[tuple[str, set[str] | None, list[str]]]:
    """(command as written, the flags its parser has or None, the flags the docs give it)."""
    found = []
    for segment in segments(text):
        for match in ALIGN_JAX.finditer(segment):
            command, tail = match.group(1), command_tail(match.group(2))
            given = FLAG.findall(tail)
            if given:  # a command named without flags is prose (e.g. a heading about it)
                found.append((f"align-jax {command}", align_jax_flags(command), given))
        for match in EXPERIMENT.finditer(segment):
            module = match.group(1) or match.group(2).replace("/", ".")
            found.append((module, experiment_flags(module),
                          FLAG.findall(command_tail(match.group(3)))))
    return found


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6} (.+)$", split(page.read_text())[1], flags=re.MULTILINE):
        slug = github_anchor(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def check_readme(scope: dict, tmp_path: Path):
    assert (tmp_path / "runs" / "quickstart" / "model" / "model.safetensors").is_file()
    assert scope["metrics"]["loss"] < 3.0


def check_data(scope: dict, tmp_path: Path):
    assert scope["batch"].chosen.ids_BxT.shape == (8, 64) and scope["state"].step == 1


EXPECTED = {"README.md": check_readme, "docs/data.md": check_data}  # beyond running without error


def test_pages_exist_and_readme_is_short():
    assert (ROOT / "README.md").stat().st_size <= 10 * 1024
    assert {"losses", "training", "online_rl", "models", "data", "scaling", "benchmarks"} <= {
        p.stem for p in PAGES if p.parent.name == "docs"}
    quickstart = (ROOT / "README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert any(info == "python" for info, _ in split(quickstart)[0]), \
        "the Quickstart has no runnable block"


@pytest.mark.parametrize("name", [rel(p) for p in PAGES if runnable(p)])
def test_runnable_blocks_run(name, tmp_path, monkeypatch):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)  # what the examples write lands in the temporary directory
    scope = {"__name__": f"docs:{name}"}
    for i, code in enumerate(runnable(ROOT / name)):
        exec(compile(code, f"{name} (python block {i + 1})", "exec"), scope)  # noqa: S102
    if name in EXPECTED:
        EXPECTED[name](scope, tmp_path)


def test_config_and_repository_paths_exist():
    missing = []
    for page in PAGES:
        text = page.read_text()
        paths = set(CONFIG_PATH.findall(text))
        paths |= {s.rstrip("/") for s in INLINE.findall(split(text)[1]) if REPO_PATH.match(s)}
        missing += [f"{rel(page)}: {p}" for p in sorted(paths) if not (ROOT / p).exists()]
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)


def test_command_line_flags_exist():
    problems, known = [], set()
    for page in PAGES:
        for command, flags, given in command_mentions(page.read_text()):
            if flags is None:
                problems.append(f"{rel(page)}: no command {command!r}")
                continue
            known |= flags
            problems += [f"{rel(page)}: {command} has no flag {f}" for f in given if f not in flags]
    known |= align_jax_flags("train") or set()
    for page in PAGES:
        alone = {s for s in INLINE.findall(split(page.read_text())[1]) if FLAG.fullmatch(s)}
        problems += [f"{rel(page)}: no command takes {f}" for f in sorted(alone - known)]
    assert not problems, "\n".join(problems)


def test_python_names_exist():
    missing = []
    for page in PAGES:
        for span in set(INLINE.findall(split(page.read_text())[1])):
            match = PYTHON_NAME.match(span)
            if match is None:
                continue
            parts = match.group(1).split(".")
            for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                    break
                except ModuleNotFoundError:
                    continue
            try:
                functools.reduce(getattr, parts[cut:], obj)
            except AttributeError:
                missing.append(f"{rel(page)}: {match.group(1)}")
    assert not missing, "names that do not import:\n" + "\n".join(missing)


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in LINK.findall(split(page.read_text())[1]):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{rel(page)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{rel(page)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
