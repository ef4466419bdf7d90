"""docs/architecture.md is the code map: it names every module of both packages (and only modules that exist), and
its order of rooms is the order the imports actually run in (downward, but for the two late imports it names)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"
# the two upward imports the page names, each inside a function: (importing module, room imported)
LATE_UPWARD = {("cusprun/core/models.py", "commands"), ("cusprun_kernels/cache.py", "core")}


def modules() -> set[str]:
    """Every module of both packages; a subpackage's __init__.py is its room's docstring, not a module."""
    found = set(ROOT.glob("cusprun/**/*.py")) | set(ROOT.glob("cusprun_kernels/*.py"))
    return {str(p.relative_to(ROOT)) for p in found
            if p.name != "__init__.py" or p.parent.name in ("cusprun", "cusprun_kernels")}


def rooms() -> list[list[str]]:
    """The page's order of rooms, top first: [["commands"], ["evaluation"], ["experts", "engine", ...], ...]."""
    match = re.search(r"<!-- rooms -->\n```text\n(.*?)\n```", PAGE.read_text())
    assert match, "docs/architecture.md lost its order of rooms"
    return [[name.split()[0] for name in level.split(",")] for level in match.group(1).split(" > ")]


def room_of(module: str) -> str:
    """'cusprun.engine.api' -> 'engine'; 'cusprun.score' and 'cusprun' -> 'commands'; 'cusprun_kernels.x' -> itself."""
    parts = module.split(".")
    if parts[0] == "cusprun_kernels":
        return "cusprun_kernels"
    if len(parts) > 1 and (ROOT / "cusprun" / parts[1]).is_dir():
        return parts[1]
    return "commands"


def imports(module: str, source: str) -> list[tuple[str, bool]]:
    """(absolute module imported, whether at module level) for every cusprun/cusprun_kernels import in the source
    of ``module`` (a path such as 'cusprun/engine/api.py'), relative imports resolved, those in functions included."""
    name = ".".join(Path(module).with_suffix("").parts)
    package = name.removesuffix(".__init__") if module.endswith("__init__.py") else name.rsplit(".", 1)[0]
    tree = ast.parse(source)
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            source_module = base + ([node.module] if node.module else [])
            targets = [".".join(source_module + [alias.name]) for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        out += [(t, id(node) in top) for t in targets if t.split(".")[0] in ("cusprun", "cusprun_kernels")]
    return out


def test_code_map_names_every_module():
    named = set(re.findall(r"`((?:cusprun|cusprun_kernels)/[A-Za-z_/]+\.py)`", PAGE.read_text()))
    actual = modules()
    assert actual - named == set(), f"modules missing from docs/architecture.md: {sorted(actual - named)}"
    assert named - actual == set(), f"docs/architecture.md names modules that do not exist: {sorted(named - actual)}"


def test_every_room_is_on_the_page_once():
    listed = [room for level in rooms() for room in level]
    actual = {p.name for p in (ROOT / "cusprun").iterdir() if (p / "__init__.py").is_file()}
    assert sorted(listed) == sorted(actual | {"commands", "cusprun_kernels"})


def test_imports_run_downward():
    level = {room: i for i, names in enumerate(rooms()) for room in names}
    upward = []
    for module in sorted(modules() | {str(p.relative_to(ROOT)) for p in ROOT.glob("cusprun/*/__init__.py")}):
        here = room_of(".".join(Path(module).with_suffix("").parts))
        for target, at_top in imports(module, (ROOT / module).read_text()):
            there = room_of(target)
            if there == here or level[there] > level[here]:
                continue
            if (module, there) in LATE_UPWARD and not at_top:
                continue
            upward.append(f"{module} -> {target}")
    assert upward == [], f"imports that run up or sideways: {upward}"


def test_the_checker_resolves_late_and_relative_imports():
    """The walk above sees imports inside functions and resolves relative ones (else it could not fail)."""
    source = "import torch\nfrom . import files\n\n\ndef f():\n    from .. import engine\n    import cusprun_kernels\n"
    assert sorted(imports("cusprun/core/m.py", source)) == [
        ("cusprun.core.files", True), ("cusprun.engine", False), ("cusprun_kernels", False)]
    assert [room_of(m) for m in ("cusprun.engine", "cusprun.__version__", "cusprun_kernels.gram")] == [
        "engine", "commands", "cusprun_kernels"]
