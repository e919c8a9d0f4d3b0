"""Flower's deployment engine on this machine: ``privfl run SCENARIO --engine deployment``.

:func:`run_deployment` starts a ``flower-superlink`` and, for every party, a SuperNode
(``python -m privfl.node supernode``, Flower's ``flower-supernode`` with a short idle
poll) and the process that runs its ClientApp (``python -m privfl.node clientapp``), all
as separate processes on 127.0.0.1 with ports chosen at run time. It submits the
scenario with ``flwr run`` and waits for the ServerApp to write results.json into the
output folder, exactly as the simulation engine does. Every process it started is
stopped by its PID and process group when the run ends, fails or is interrupted; a
watchdog (:mod:`privfl.reaper`) and a parent-death signal cover a ``kill -9`` of privfl.

Each SuperNode gets its own ``--node-config``: its ``partition-id``, its ``policy`` (its
own copy of the scenario, written to its own folder), ``data-root`` and an
``identity-key`` of its own with the federation's ``roster`` (generated here, as
``privfl keys`` would). The parties never read their defenses or data from the server.
``tls=True`` serves the SuperLink over TLS with a certificate authority made here with
``cryptography``, and the SuperLink admits only the SuperNodes whose public keys were
registered (SuperNode authentication).

Flower's state (``FLWR_HOME``) lives in a private temporary folder; telemetry, update
checks and runtime dependency installation are off.

Submodules, by role (every public name is re-exported here):

- :mod:`~privfl.deployment.run`: :func:`run_deployment` and ``flwr run``'s results or error.
- :mod:`~privfl.deployment.processes`: :class:`Cluster` and :class:`Process` (start, watch,
  stop; ports, logs, Flower's environment), the launch of the SuperLink and the parties'
  SuperNodes and ClientApp runners, :class:`DeploymentRun`.
- :mod:`~privfl.deployment.files`: :func:`scenario_toml` (a party's policy),
  :func:`node_config` and the pyproject.toml of the submitted app.
- :mod:`~privfl.deployment.certificates`: the run's CA, the SuperLink's certificate and
  the SuperNodes' authentication keys.
- :mod:`~privfl.deployment.grid`: :class:`PollingGrid`, the ServerApp's polling for replies.
- :mod:`~privfl.deployment.serverapp`: ``server_app``, the ServerApp ``flwr run`` starts.
- :mod:`~privfl.deployment.errors`: :class:`DeploymentError`.
"""

from privfl.deployment.certificates import Certificates, make_certificates, make_node_auth_key
from privfl.deployment.errors import DeploymentError
from privfl.deployment.files import node_config, scenario_toml
from privfl.deployment.grid import PollingGrid
from privfl.deployment.processes import (
    CONNECTION,
    FLOWER_ENV,
    START_TIMEOUT_S,
    STOP_GRACE_S,
    Cluster,
    DeploymentRun,
    Process,
    free_port,
)
from privfl.deployment.run import run_deployment
from privfl.deployment.serverapp import server_app

__all__ = [
    "CONNECTION",
    "FLOWER_ENV",
    "START_TIMEOUT_S",
    "STOP_GRACE_S",
    "Certificates",
    "Cluster",
    "DeploymentError",
    "DeploymentRun",
    "PollingGrid",
    "Process",
    "free_port",
    "make_certificates",
    "make_node_auth_key",
    "node_config",
    "run_deployment",
    "scenario_toml",
    "server_app",
]
