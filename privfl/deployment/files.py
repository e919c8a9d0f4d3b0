"""What the engine writes for its processes: policy TOML, ``--node-config``, app pyproject.

A party's policy is the validated scenario as TOML; a SuperNode's ``--node-config`` names
its own files; the app that ``flwr run`` submits names the ServerApp of
:mod:`privfl.deployment.serverapp` (through the package's re-export) and privfl's ClientApp.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from privfl.config import Scenario
from privfl.deployment.errors import DeploymentError


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def scenario_toml(scenario: Scenario) -> str:
    """The validated scenario as a TOML file a party can hold as its policy."""
    lines: list[str] = []

    def table(name: str, body: Mapping[str, Any]) -> None:
        lines.append(f"[{name}]")
        subs = []
        for key, value in body.items():
            if isinstance(value, Mapping):
                subs.append((f"{name}.{key}", value))
            elif value is not None:  # None is every such key's default
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
        for sub_name, sub in subs:
            table(sub_name, sub)

    for section, body in scenario.to_dict().items():
        table(section, body)
    return "\n".join(lines)


def _app_pyproject() -> str:
    return "\n".join(
        [
            "[build-system]",
            'requires = ["setuptools>=70"]',
            'build-backend = "setuptools.build_meta"',
            "",
            "[project]",
            'name = "privfl-deployment"',
            'version = "1.0.0"',
            'description = "privfl scenario on the deployment engine"',
            'license = "Apache-2.0"',
            "dependencies = []",
            "",
            "[tool.flwr.app]",
            'publisher = "privfl"',
            'fab-include = ["README.md"]',
            "",
            "[tool.flwr.app.components]",
            'serverapp = "privfl.deployment:server_app"',
            'clientapp = "privfl.app:client_app"',
            "",
            "[tool.flwr.app.config]",
            'scenario-file = ""',
            'out-dir = ""',
            'error-file = ""',
            'roster-file = ""',
            "",
        ]
    )


def node_config(values: Mapping[str, Any]) -> str:
    """A ``--node-config`` string: ``key="value"`` pairs separated by spaces."""
    parts = []
    for key, value in values.items():
        text = str(value)
        if any(q in text for q in "\"'"):
            raise DeploymentError(f"node config {key}: quotes are not allowed in {text!r}")
        parts.append(f"{key}={value}" if isinstance(value, int) else f'{key}="{text}"')
    return " ".join(parts)
