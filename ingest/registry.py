"""Channel adapters, found by name through the ``switchboard.adapters`` entry points.

The built-in adapters are registered in this project's ``pyproject.toml`` the same
way a separate package registers its own::

    [project.entry-points."switchboard.adapters"]
    telegram = "switchboard_telegram:TelegramAdapter"

An adapter class has a ``name`` equal to its entry point's name, a
``settings_class`` (the pydantic model of its configuration), a one-line
``summary`` and ``enabled_in(settings)``. Loading never raises: a broken adapter
is listed with what is wrong, and :func:`get` turns that into a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

GROUP = "switchboard.adapters"
REQUIRED = ("name", "settings_class", "summary", "enabled_in")


class AdapterError(Exception):
    """An adapter that is not installed, or installed but unusable."""


@dataclass(frozen=True)
class AdapterInfo:
    """One registered adapter: where it comes from and whether it loaded."""

    name: str
    target: str  # "module:Class", as registered
    package: str | None  # the installed distribution that registered it
    adapter: Any = None  # the class, when it loaded
    error: str | None = None


def load(entry: EntryPoint) -> AdapterInfo:
    """Import one entry point and check it is an adapter; never raises."""
    package = entry.dist.name if entry.dist is not None else None
    info = AdapterInfo(entry.name, entry.value, package)
    try:
        adapter = entry.load()
    except Exception as exc:  # noqa: BLE001 - any import failure is reported, not raised
        return AdapterInfo(**{**vars(info), "error": f"cannot import: {exc!r}"})
    missing = [attribute for attribute in REQUIRED if not hasattr(adapter, attribute)]
    if missing:
        error = f"{entry.value} is not an adapter: it has no {', '.join(missing)}"
    elif adapter.name != entry.name:
        error = f"registered as {entry.name!r}, but the class is named {adapter.name!r}"
    else:
        error = None
    return AdapterInfo(entry.name, entry.value, package, adapter if error is None else None, error)


def discover() -> dict[str, AdapterInfo]:
    """Every installed adapter by name, loaded (broken ones carry their error)."""
    found: dict[str, AdapterInfo] = {}
    for entry in entry_points(group=GROUP):
        info = load(entry)
        if info.name in found:  # two packages claim one name: neither is trusted
            first = found[info.name]
            info = AdapterInfo(
                info.name,
                info.target,
                info.package,
                error=f"registered twice: {first.target} ({first.package}) and "
                f"{info.target} ({info.package})",
            )
        found[info.name] = info
    return dict(sorted(found.items()))


def get(name: str, adapters: dict[str, AdapterInfo] | None = None) -> Any:  # noqa: ANN401
    """The adapter class registered as ``name``; AdapterError if unknown or broken."""
    adapters = discover() if adapters is None else adapters
    info = adapters.get(name)
    if info is None:
        installed = ", ".join(adapters) or "none"
        raise AdapterError(f"unknown adapter {name!r} (installed: {installed})")
    if info.error is not None:
        raise AdapterError(f"adapter {name!r} from {info.package or '?'} is broken: {info.error}")
    return info.adapter
