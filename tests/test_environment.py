"""The pins live in requirements*.txt and are mirrored in environment.yml; they must agree."""

import re
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^\s*-?\s*([A-Za-z0-9_.\-]+)==([^\s#]+)")


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m and not line.lstrip().startswith("#"):
            out[m.group(1).lower()] = m.group(2)
    return out


def test_environment_yml_matches_requirements():
    req = pins(ROOT / "requirements.txt") | pins(ROOT / "requirements-nodeps.txt")
    env = pins(ROOT / "environment.yml")
    assert req, "no pins found in requirements.txt"
    assert env == req, f"environment.yml and requirements*.txt disagree: {set(env.items()) ^ set(req.items())}"


def test_requirements_are_exact_pins():
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert PIN.match(line), f"not an exact pin: {line!r} (an unpinned torch pulls a multi-GB CUDA build)"


def test_installed_versions_match_pins():
    for name, pinned in pins(ROOT / "requirements.txt").items():
        installed = version(name)
        assert installed.split("+")[0] == pinned, f"{name}: installed {installed}, pinned {pinned}"
