"""User plug-ins named in a scenario as ``"module:Name"``.

A scenario can name a user's own strategy class (``strategy.name``), model factory
(``model.name``) or data loader (``data.dataset``) as ``"module:Name"``; the module is
imported from the working directory or ``PYTHONPATH``, like ``python -m`` would. Every
failure (a malformed spec, a module that is missing or raises while importing, a missing
attribute, keyword arguments the object does not take, an error while calling it) is a
:class:`~privfl.config.ScenarioError` naming the scenario key, so the command line prints
one line instead of a traceback.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from privfl.config import ScenarioError


def is_plugin_spec(spec: str) -> bool:
    """Whether ``spec`` names a plug-in (``"module:Name"``) rather than a built-in."""
    return ":" in spec


def _split(spec: str, key: str) -> tuple[str, str]:
    module, sep, attr = spec.partition(":")
    parts = [*module.split("."), *attr.split(".")]
    if not sep or not all(p.isidentifier() for p in parts):
        raise ScenarioError(
            f"{key}: expected 'module:Name' (for example 'my_strategy:ServerMomentum'), "
            f"got {spec!r}"
        )
    return module, attr


def load_object(spec: str, key: str) -> Any:
    """Import ``"module:Name"`` (``Name`` may be dotted) and return the object.

    The working directory is searched first, then ``sys.path`` (``PYTHONPATH``
    included), so a user's ``my_strategy.py`` next to the scenario is found whether
    privfl was started as ``privfl run`` or ``python -m privfl``.
    """
    module_name, attr = _split(spec, key)
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a missing plug-in module is "not found"; a missing import inside it is a
        # failure of the plug-in, reported as such below.
        if exc.name == module_name or module_name.startswith(f"{exc.name}."):
            raise ScenarioError(
                f"{key}: no module named {module_name!r} in the working directory "
                f"({cwd}) or on PYTHONPATH (from {spec!r})"
            ) from exc
        raise ScenarioError(
            f"{key}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    except Exception as exc:
        raise ScenarioError(
            f"{key}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            public = sorted(n for n in vars(module) if not n.startswith("_"))
            raise ScenarioError(
                f"{key}: module {module_name!r} has no attribute {attr!r} "
                f"(it defines: {', '.join(public) or 'nothing public'})"
            ) from None
    if not callable(obj):
        raise ScenarioError(f"{key}: {spec!r} is a {type(obj).__name__}, not callable")
    return obj


def check_kwargs(
    obj: Any,
    kwargs: Mapping[str, Any],
    prefix: str,
    *,
    supplied: Iterable[str] = (),
) -> None:
    """Check that ``obj`` accepts ``kwargs`` (and the ``supplied`` names privfl passes
    itself), naming the offending key as ``prefix.<name>``.

    A missing required parameter is reported too, so a user learns which key to add.
    """
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return  # builtins without a signature: calling them reports the error
    params = sig.parameters
    keywordable, takes_any = _keywords(obj, params)
    supplied = set(supplied)
    for name in kwargs:
        if name in supplied:
            raise ScenarioError(f"{prefix}.{name}: set by privfl, cannot be given here")
        if not takes_any and name not in keywordable:
            accepted = sorted(keywordable - supplied)
            raise ScenarioError(
                f"{prefix}.{name}: unknown parameter of {_name(obj)}; accepted: "
                f"{', '.join(accepted) or 'none'}"
            )
    for name, p in params.items():
        required = p.default is inspect.Parameter.empty and p.kind in _NAMED
        if required and name not in kwargs and name not in supplied:
            raise ScenarioError(f"{prefix}.{name}: required by {_name(obj)}, not given")


_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _keywords(obj: Any, params: Mapping[str, inspect.Parameter]) -> tuple[set[str], bool]:
    """The keyword names ``obj`` accepts, and whether it takes any name at all.

    A class whose ``__init__`` passes ``**kwargs`` on (a FedAvg subclass adding its own
    parameters) accepts its bases' parameters too: they are collected along the MRO
    until an ``__init__`` without ``**kwargs``.
    """
    names = {n for n, p in params.items() if p.kind in _NAMED}
    forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not (isinstance(obj, type) and forwards):
        return names, forwards
    for klass in obj.__mro__[1:]:
        if klass is object:
            return names, False
        if "__init__" not in vars(klass):
            continue
        try:
            base = inspect.signature(klass.__init__).parameters
        except (TypeError, ValueError):
            return names, True
        names |= {n for n, p in base.items() if p.kind in _NAMED and n != "self"}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in base.values()):
            return names, False
    return names, True


def call_object(obj: Any, key: str, /, *args: Any, **kwargs: Any) -> Any:
    """Call a plug-in, turning any error it raises into one naming ``key``."""
    try:
        return obj(*args, **kwargs)
    except ScenarioError:
        raise
    except Exception as exc:
        raise ScenarioError(
            f"{key}: calling {_name(obj)} failed: {type(exc).__name__}: {exc}"
        ) from exc


def _name(obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None) or type(obj).__name__
    return f"{module}:{qual}" if module else qual
