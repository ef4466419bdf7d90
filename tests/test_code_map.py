"""The README's code map names every module of both packages, and only modules that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_map() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Code map")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_code_map_matches_the_modules():
    section = code_map()
    named = set(re.findall(r"`((?:cusprun|cusprun_kernels)/[A-Za-z_]+\.py)`", section))
    actual = {str(p.relative_to(ROOT)) for pkg in ("cusprun", "cusprun_kernels") for p in (ROOT / pkg).glob("*.py")
              if p.name != "__init__.py"}
    assert actual - named == set(), f"modules missing from the README's code map: {sorted(actual - named)}"
    assert named - actual == set(), f"the code map names modules that do not exist: {sorted(named - actual)}"
