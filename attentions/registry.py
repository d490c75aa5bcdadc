"""The registry: the only way the harness builds an attention mechanism.

Built-in mechanisms register themselves with ``@register("name")``. Third-party packages plug in through
the entry-point group ``attnbench.attentions``; each entry point names either a mechanism class (registered
under the entry point's name) or a module whose import registers its mechanisms::

    [project.entry-points."attnbench.attentions"]
    my_attention = "my_package.my_attention:MyAttention"
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from .base import AttentionMechanism

ENTRY_POINT_GROUP = "attnbench.attentions"

_REGISTRY: dict[str, type[AttentionMechanism]] = {}
_entry_points_loaded = False

# Arguments every mechanism takes positionally; everything else in its constructor is an option.
_CORE_ARGUMENTS = ("dim", "num_heads")


def register(name: str) -> Callable[[type[AttentionMechanism]], type[AttentionMechanism]]:
    """Class decorator: make ``cls`` buildable as ``create(name, dim=..., num_heads=...)``."""

    def decorator(cls: type[AttentionMechanism]) -> type[AttentionMechanism]:
        if not (isinstance(cls, type) and issubclass(cls, AttentionMechanism)):
            raise TypeError(f"@register({name!r}) needs a subclass of AttentionMechanism, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"attention {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        for argument in _CORE_ARGUMENTS:
            if argument not in inspect.signature(cls.__init__).parameters:
                raise TypeError(f"{cls.__qualname__}.__init__ must take {argument!r}")
        _REGISTRY[name] = cls
        return cls

    return decorator


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry_point.load()
            if isinstance(loaded, type) and entry_point.name not in _REGISTRY:
                register(entry_point.name)(loaded)
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # a broken plug-in (sys.exit on import too) must not take the others down
            reason = (f"sys.exit({error.code!r})" if isinstance(error, SystemExit)
                      else f"{type(error).__name__}: {error}")
            warnings.warn(
                f"attention plug-in {entry_point.name!r} ({entry_point.value}) failed to load: {reason}",
                stacklevel=2,
            )


def get(name: str) -> type[AttentionMechanism]:
    """The class registered as ``name``; a ValueError listing the registered names if there is none."""
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attention {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def options(name: str) -> dict[str, Any]:
    """The options of mechanism ``name`` (constructor arguments besides dim and num_heads) with defaults."""
    parameters = inspect.signature(get(name).__init__).parameters
    return {
        option: parameter.default
        for option, parameter in parameters.items()
        if option != "self" and option not in _CORE_ARGUMENTS
    }


def create(name: str, dim: int, num_heads: int, **kwargs: Any) -> AttentionMechanism:
    """Build mechanism ``name``; a ValueError lists the valid options when ``kwargs`` holds an unknown one."""
    for argument, value in (("dim", dim), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"attention {name!r}: {argument} must be a positive integer, got {value!r}")
    cls = get(name)
    valid = options(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for attention {name!r}; valid options: {', '.join(valid)}"
        )
    return cls(dim=dim, num_heads=num_heads, **kwargs)


def available() -> dict[str, str]:
    """Registered names, sorted, each with the first line of its class docstring."""
    _load_entry_points()
    return {name: (inspect.getdoc(cls) or "").partition("\n")[0] for name, cls in sorted(_REGISTRY.items())}
