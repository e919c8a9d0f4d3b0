"""The Flower App entry points named in pyproject.toml (``flwr run .``)."""

from privfl.clients.app import app as client_app
from privfl.server import server_app

__all__ = ["client_app", "server_app"]
