"""privfl: privacy attacks and defenses in federated learning, on Flower.

Runs are offline by default: Flower's telemetry, update check and runtime dependency
installation are switched off unless the user sets the variables themselves.
"""

from __future__ import annotations

import os

# Offline by default; a user who exports these explicitly keeps their own values. Set at
# import because Flower reads them once, when it is imported, which every privfl entry
# point (CLI, run_scenario, the Flower App) does after importing this package.
for _key, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
):
    os.environ.setdefault(_key, _value)

__version__ = "0.1.0"

from privfl.runner import run_scenario  # noqa: E402

__all__ = ["__version__", "run_scenario"]
