"""The ServerApp that ``flwr run`` starts for the engine.

It runs the scenario file the engine wrote and hands any error back through a file: the
ServerApp's process is Flower's, not privfl's.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import http_grid

from privfl.config import scenario_from_json
from privfl.deployment.grid import PollingGrid
from privfl.errors import UserError
from privfl.node import shorten_object_retries
from privfl.secagg.identity import load_roster

server_app = ServerApp()


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    # Imported in the ServerApp's process only: privfl.server loads torch.
    from privfl.server import run_federation

    shorten_object_retries(http_grid)
    cfg = context.run_config
    error_file = Path(str(cfg["error-file"]))
    try:
        scenario = scenario_from_json(Path(str(cfg["scenario-file"])).read_text())
        roster_file = str(cfg.get("roster-file", ""))
        run_federation(
            PollingGrid(grid),
            scenario,
            Path(str(cfg["out-dir"])),
            progress=False,
            roster=load_roster(roster_file) if roster_file else None,
        )
    except BaseException as exc:
        # The engine reads this back: the ServerApp's process is not privfl's own.
        error_file.write_text(
            json.dumps(
                {
                    "type": type(exc).__name__,
                    "user_error": isinstance(exc, UserError),
                    "message": str(exc),
                    "traceback": traceback.format_exc(),
                }
            )
        )
        raise
