"""The pip requirement files must pin the same versions that poetry.lock holds."""

import re
from collections import defaultdict
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements" / "requirements.txt"
REQUIREMENTS_DEV = ROOT / "requirements" / "requirements-dev.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")
NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name):
    return name.lower().replace("_", "-").replace(".", "-")


def read_pins(path):
    """Map normalized name -> pinned version for the `name==version` lines of one file (includes not followed)."""
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-r "):
            continue
        match = PIN.match(line)
        assert match, f"{path.name}: '{raw}' is not an exact name==version pin"
        name = normalize(match.group(1))
        assert name not in pins, f"{path.name}: {name} is pinned twice"
        pins[name] = match.group(2)
    return pins


def load_toml(path):
    with open(path, "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def locked_versions():
    # a name can appear more than once in the lock, with different markers
    versions = defaultdict(set)
    for package in load_toml(ROOT / "poetry.lock")["package"]:
        versions[normalize(package["name"])].add(package["version"])
    return versions


@pytest.fixture(scope="module")
def pyproject():
    return load_toml(ROOT / "pyproject.toml")


@pytest.mark.parametrize("path", [REQUIREMENTS, REQUIREMENTS_DEV], ids=lambda p: p.name)
def test_pins_match_lock(path, locked_versions):
    pins = read_pins(path)
    assert pins, f"{path.name} pins nothing"
    for name, version in pins.items():
        assert name in locked_versions, f"{path.name}: {name} is not in poetry.lock"
        assert (
            version in locked_versions[name]
        ), f"{path.name}: {name}=={version} but poetry.lock has {sorted(locked_versions[name])}"


def test_dev_requirements_include_runtime():
    lines = [line.strip() for line in REQUIREMENTS_DEV.read_text().splitlines()]
    assert "-r requirements.txt" in lines


def test_runtime_dependencies_pinned(pyproject):
    pins = read_pins(REQUIREMENTS)
    declared = {normalize(NAME.match(spec).group(1)) for spec in pyproject["project"]["dependencies"]}
    assert declared, "pyproject.toml declares no runtime dependencies"
    assert sorted(declared - pins.keys()) == [], "runtime dependencies without a pin in requirements.txt"
    assert sorted(pins.keys() - declared) == [], "requirements.txt pins packages pyproject.toml does not declare"


def test_dev_dependencies_pinned(pyproject):
    pins = read_pins(REQUIREMENTS_DEV)
    declared = {normalize(name) for name in pyproject["tool"]["poetry"]["group"]["dev"]["dependencies"]}
    assert sorted(declared - pins.keys()) == [], "dev dependencies without a pin in requirements-dev.txt"
