"""Every exception privfl defines shares one base, so a caller can catch privfl's own."""

import importlib
import inspect
import pkgutil

import privfl
from privfl.errors import PrivflError, UserError


def _modules():
    for info in pkgutil.walk_packages(privfl.__path__, "privfl."):
        yield importlib.import_module(info.name)
    for sub in ("strategies", "clients", "attacks"):
        pkg = importlib.import_module(f"privfl.{sub}")
        for info in pkgutil.walk_packages(pkg.__path__, f"privfl.{sub}."):
            yield importlib.import_module(info.name)


def test_every_privfl_exception_derives_from_privfl_error():
    found = {}
    for mod in _modules():
        for name, obj in vars(mod).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == mod.__name__
            ):
                found[f"{mod.__name__}.{name}"] = obj
    assert len(found) >= 10, sorted(found)
    strays = sorted(n for n, c in found.items() if not issubclass(c, PrivflError))
    assert not strays, f"exceptions outside PrivflError: {strays}"
    assert issubclass(UserError, PrivflError)
