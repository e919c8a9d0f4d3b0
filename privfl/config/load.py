"""Reading a scenario: from a TOML file, a shipped scenario's name, or a message."""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Iterable
from pathlib import Path

from privfl.config.codec import apply_overrides
from privfl.config.errors import ScenarioError
from privfl.config.scenario import Scenario

# Config key under which every server message carries the resolved scenario (JSON).
SCENARIO_KEY = "privfl.scenario"


@functools.lru_cache(maxsize=8)
def scenario_from_json(text: str) -> Scenario:
    """:meth:`Scenario.from_json`, parsed once per distinct text: parties receive the
    scenario in every message and validating it costs milliseconds; a Scenario is
    frozen, so sharing one is safe."""
    return Scenario.from_json(text)


def load_scenario(path: str | Path, overrides: Iterable[str] = ()) -> Scenario:
    """Read, override and validate a scenario TOML file."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"scenario file {str(path)!r} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML ({exc})") from exc
    apply_overrides(raw, overrides)
    return Scenario.from_dict(raw)


def scenario_dir() -> Path:
    """Folder of the scenarios shipped with privfl (checkout or installed package)."""
    here = Path(__file__).resolve().parent.parent  # privfl/
    # Installed: privfl/scenarios/. A checkout keeps them beside privfl/, next to
    # pyproject.toml (so an unrelated scenarios/ in site-packages is never picked).
    if (here / "scenarios").is_dir():
        return here / "scenarios"
    if (here.parent / "scenarios").is_dir() and (here.parent / "pyproject.toml").is_file():
        return here.parent / "scenarios"
    raise FileNotFoundError(
        f"privfl's scenarios folder was not found (looked in {here / 'scenarios'} and "
        f"{here.parent / 'scenarios'}); reinstall privfl"
    )


def resolve_scenario_path(name: str | Path) -> Path:
    """A path as given, or the name of a shipped scenario (with or without .toml)."""
    p = Path(name)
    if p.is_file():
        return p
    stem = p.name.removesuffix(".toml")
    shipped = scenario_dir() / f"{stem}.toml"
    if shipped.is_file():
        return shipped
    raise ScenarioError(
        f"scenario {str(name)!r} not found as a file nor among the shipped ones "
        f"({', '.join(sorted(q.stem for q in scenario_dir().glob('*.toml')))})"
    )
