"""``run_scenario``: run one scenario on Flower's simulation engine (or in-process, without
Ray), in this process.

Flower 1.42's supported entry point is ``flwr run .`` (see README), which needs an app
folder and a SuperLink. For a Python call that returns results we use
``flwr.simulation.run_simulation`` — deprecated in 1.42, but the only in-process
entry point that takes ServerApp/ClientApp objects. It lives here and nowhere else; its
one known flaw (it ignores pyproject's run config) does not matter because the scenario
travels inside the ServerApp object and the messages.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from privfl.config import Scenario, load_scenario, resolve_scenario_path
from privfl.errors import UserError
from privfl.reaper import reap_descendants

DEFAULT_SCENARIO = "three_hospitals"
ENGINES = ("simulation", "inprocess")


def resolve(scenario: str | Path | Scenario | None, overrides: Iterable[str] = ()) -> Scenario:
    """A validated scenario from a path, a shipped scenario's name, or a Scenario."""
    overrides = list(overrides)
    if isinstance(scenario, Scenario):
        return scenario.replace(overrides) if overrides else scenario
    return load_scenario(resolve_scenario_path(scenario or DEFAULT_SCENARIO), overrides)


def backend_config(scenario: Scenario) -> dict[str, Any]:
    """Flower simulation resources: CPUs per party, and a GPU share when one is used."""
    # privfl's own import (and so the CLI's start) runs this module: no torch before a run.
    import torch

    s = scenario.scenario
    wants_gpu = s.device.startswith("cuda") or (s.device == "auto" and torch.cuda.is_available())
    gpus = s.gpus_per_party if s.gpus_per_party > 0 else (1.0 / scenario.data.parties)
    return {
        "client_resources": {
            "num_cpus": s.cpus_per_party,
            "num_gpus": gpus if wants_gpu else 0.0,
        },
        "init_args": {"logging_level": logging.ERROR, "log_to_driver": False},
    }


def run_scenario(
    scenario: str | Path | Scenario | None,
    out_dir: str | Path,
    *,
    overrides: Iterable[str] = (),
    progress: bool | None = None,
    verbose: bool = False,
    engine: str = "simulation",
) -> dict[str, Any]:
    """Run a scenario end to end and return its results (also in ``out_dir/results.json``).

    Parameters
    ----------
    scenario
        A scenario file, the name of a shipped scenario, or a :class:`Scenario`;
        ``None`` runs the three-hospital default.
    out_dir
        Where results.json, report.md and figures are written (atomically).
    overrides
        ``section.key=value`` strings applied on top of the file.
    progress
        Show a per-round progress bar (default: when stderr is a terminal).
    verbose
        Keep Flower's and Ray's INFO logs.
    engine
        ``"simulation"``: Flower's simulation engine (Ray). ``"inprocess"``: the same
        ServerApp logic, ClientApp, mods and serialised messages delivered in this process
        without Ray, one party after another; for many small parties, where starting a
        thousand Ray SuperNodes costs more than the run.
    """
    # torch and Flower load when a run starts, not when privfl (or its CLI) is imported.
    from privfl.data import load_federation
    from privfl.server import make_auditor, make_server_app, model_utility_warning, run_federation
    from privfl.strategies.factory import aggregation_strategy
    from privfl.training import resolve_device

    sc = resolve(scenario, overrides)
    out = Path(out_dir).expanduser().resolve()
    # Fail on missing data or devices here, before Ray starts; and on a [strategy] the
    # server cannot build (import, keyword, constructor).
    aggregation_strategy(sc)
    resolve_device(sc.scenario.device)
    fed = load_federation(sc)
    hint = model_utility_warning(sc, fed.num_classes)
    if hint:
        warnings.warn(hint, UserWarning, stacklevel=2)

    if sc.attack.kind == "membership-inference" and sc.attack.membership.target == "single":
        return run_federation(None, sc, out, progress=progress)

    if engine not in ENGINES:
        raise UserError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    auditor = make_auditor(sc, fed.num_classes)
    roster = _public_roster(sc)
    if engine == "inprocess":
        _quiet_flower(verbose)
        return _run_inprocess(sc, out, progress=progress, auditor=auditor, roster=roster)
    outcome: list[Any] = []
    server_app = make_server_app(
        sc, out, progress=progress, on_done=outcome.append, auditor=auditor, roster=roster
    )

    # Flower and torch: kept off privfl's import, as above.
    from flwr.simulation import run_simulation

    from privfl.clients.app import make_client_app

    # Every party is handed its own copy of the scenario here, locally: its defenses
    # never come from the server's messages.
    client_app = make_client_app(sc, auditor=auditor)
    _quiet_flower(verbose)
    # Ray's agents outlive a killed run unless something stops them.
    with reap_descendants(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=sc.data.parties,
            backend_config=backend_config(sc),
            verbose_logging=verbose,
        )
    if not outcome:
        raise RuntimeError(
            "the Flower simulation ended without running privfl's ServerApp; "
            "rerun with verbose=True (privfl run -v) for Flower's log"
        )
    if isinstance(outcome[0], BaseException):
        raise RuntimeError(f"scenario {sc.scenario.name!r} failed: {outcome[0]}") from outcome[0]
    return json.loads((out / "results.json").read_text())


def _public_roster(sc: Scenario) -> Mapping[int, bytes] | None:
    """The simulated federation's public roster, handed to the server as a deployment's
    operator would: masking parties on it need not register their keys."""
    if sc.defense.secure_aggregation != "masking":
        return None
    from privfl.clients.policy import simulation_roster

    return simulation_roster(sc.data.parties)


def _run_inprocess(
    sc: Scenario,
    out: Path,
    *,
    progress: bool | None,
    auditor: Any,
    roster: Mapping[int, bytes] | None = None,
) -> dict[str, Any]:
    # Flower and torch: kept off privfl's import, as in run_scenario.
    from privfl.clients.app import make_client_app
    from privfl.flower.loopback import LoopbackGrid
    from privfl.server import run_federation

    # Node ids are arbitrary to the protocol; offset so that none is 0 (the server's).
    grid = LoopbackGrid(
        make_client_app(sc, auditor=auditor), {1000 + p: p for p in range(sc.data.parties)}
    )
    run_federation(grid, sc, out, progress=progress, auditor=auditor, roster=roster)
    # What results.json holds, as the simulation engine returns it.
    return json.loads((out / "results.json").read_text())


def _quiet_flower(verbose: bool) -> None:
    # run_simulation's deprecation notice is logged at WARNING; -v shows everything.
    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("flwr").setLevel(level)
