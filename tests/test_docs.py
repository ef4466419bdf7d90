"""The README and docs/ pages hold together: every relative link and image resolves (anchors included), the README
stays a front page (≤ 300 lines), and every command in their ```bash blocks names a command or script that exists,
with only flags that command accepts."""

import importlib
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The page without fenced code blocks and inline code (a link inside code is not a link)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, _ and - stay), spaces -> -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(page: Path) -> set[str]:
    """Every heading's anchor on a page, repeated headings numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.M):
        base = slug(heading)
        out.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return out


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    return broken


@cache
def flags_of(command: str) -> frozenset[str] | None:
    """The option strings ``python -m <command>`` accepts (None: no such command), from its parser where it builds
    one, else from its --help."""
    parts = command.split(".")
    module = ROOT.joinpath(*parts).with_suffix(".py") if len(parts) > 1 else ROOT / "cusprun" / "__main__.py"
    if not module.is_file():
        return None
    if len(parts) > 1 and "def build_parser" in module.read_text():
        parser = importlib.import_module(command).build_parser()
        return frozenset(s for action in parser._actions for s in action.option_strings)
    out = subprocess.run([sys.executable, "-m", command, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", out.stdout))


def command_lines(text: str) -> list[str]:
    """The logical lines of a page's ```bash blocks (continuations joined, comments dropped)."""
    lines = []
    for lang, body in FENCE.findall(text):
        if lang == "bash":
            lines += [re.sub(r"\s#.*$", "", line) for line in body.replace("\\\n", " ").splitlines()]
    return lines


def bad_commands(line: str) -> list[str]:
    """What is wrong with one command line: an unknown cusprun command, a flag it does not take, a missing script."""
    bad = []
    if (m := re.search(r"-m (cusprun[\w.]*)", line)):
        command, rest = m.group(1), line[m.end():]
        accepted = flags_of(command)
        if accepted is None:
            bad.append(f"{line.strip()}: no command {command}")
        else:
            bad += [f"{line.strip()}: {command} takes no {flag}"
                    for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest) if flag not in accepted]
    for script in re.findall(r"python (benchmarks/[\w/]+\.py)", line):
        if not (ROOT / script).is_file():
            bad.append(f"{line.strip()}: no script {script}")
    return bad


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_images_resolve(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_in_bash_blocks_exist_with_their_flags(page):
    assert [bad for line in command_lines(page.read_text()) for bad in bad_commands(line)] == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(prose((ROOT / "README.md").read_text()))}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_the_checks_can_fail(tmp_path):
    """The checkers flag what they are meant to (else a green run above would mean nothing)."""
    assert slug("Score files: `cusprun-scores/1`") == "score-files-cusprun-scores1"
    assert slug("Layers + channels (the paper's §4.5)") == "layers--channels-the-papers-45"
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[a](#top) [b](#nope) ![c](missing.png) `[d](ignored.md)` [e](https://example.org)\n")
    assert broken_links(page) == ["#nope: no heading #nope in page.md", "missing.png: no such file"]
    text = ("```bash\npython -m cusprun.prune --scores a \\\n    --ratio 0.2 --nope   # --comment-flag\n"
            "python -m cusprun.nothing --x\npython benchmarks/missing.py\npython -m cusprun --verify\n```\n")
    problems = [bad for line in command_lines(text) for bad in bad_commands(line)]
    assert len(problems) == 3 and "takes no --nope" in problems[0] and "no command cusprun.nothing" in problems[1]
    assert "no script benchmarks/missing.py" in problems[2]
