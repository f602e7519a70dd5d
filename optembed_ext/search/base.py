"""One shape for every method, and the registry the comparison harness and the command line read.

A method is a class with a name, a configuration dataclass and a schedule::

    from dataclasses import dataclass
    from optembed_ext.search import Method, MethodResult, register_method
    from optembed_ext.search.common import make_row, train_and_evaluate

    @dataclass
    class HalfConfig:
        shrink: int = 2

    @register_method
    class Half(Method):
        name = "half"
        config_class = HalfConfig
        help = "a uniform table at D / shrink"

        def build_embedding(self, feature_map, embed_dim):
            from optembed_ext.nn import UniformEmbedding
            return UniformEmbedding(feature_map, max(1, embed_dim // self.config.shrink))

        def run(self, data, model_name, settings, run_dir=None):
            emb = self.build_embedding(data.feature_map, settings.embed_dim)
            _, res = train_and_evaluate(data, model_name, emb, settings.train, model_cfg=settings.model_cfg,
                                        run_dir=run_dir)
            return MethodResult(rows=[make_row(self.name, f"1/{self.config.shrink}", res)])

Once registered, ``optembed compare --methods half`` runs it next to the others, and ``optembed half ...``
(data, model and training options plus ``--shrink``) runs it alone. The built-in methods (``uniform``,
``optembed``, ``pep``, ``autodim``, ``qr``, ``autofield``) register themselves the same way when the registry
is first read.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import ClassVar

from ..results import MethodResult
from .common import RunSettings, dataclass_from_dict

#: the built-in methods, in table order: name -> module that registers it
BUILTIN_METHODS = {
    "uniform": "optembed_ext.search.uniform",
    "optembed": "optembed_ext.search.optembed",
    "pep": "optembed_ext.search.pep",
    "autodim": "optembed_ext.search.autodim",
    "qr": "optembed_ext.search.qr",
    "autofield": "optembed_ext.search.autofield",
}

_REGISTRY: dict[str, type["Method"]] = {}
_BUILTINS_LOADED = False


class Method:
    """Base class of a compression method on the shared trainer.

    Class attributes:
        name: registry key, ``compare``'s method name and (unless ``command`` says otherwise) the subcommand.
        title: how messages name the method (default ``name``).
        config_class: dataclass of the method's own options (each field becomes a long option).
        help: one line for the command line and the docs.
        command: subcommand that runs the method alone; ``None`` when it has a command of its own elsewhere
            (OptEmbed's ``optembed search``).
        shared_fields: option fields that duplicate a shared training option (PEP's ``batch_size``); on the
            command line they are taken from the training options; in ``compare`` they are the shared settings
            (the fair default) unless the method mapping sets them.
        train_defaults: defaults of the shared training options for this method's own subcommand.

    An instance holds ``config`` (an instance of ``config_class``). Subclasses implement :meth:`run` and, when
    the method has one table to hand to a model, :meth:`build_embedding`.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = type(None)
    title: ClassVar[str] = ""
    help: ClassVar[str] = ""
    command: ClassVar[str | None] = ""
    shared_fields: ClassVar[tuple[str, ...]] = ()
    train_defaults: ClassVar[dict] = {}

    def __init__(self, config=None):
        if config is None:
            config = self.config_class()
        elif isinstance(config, dict):
            config = self.config_from_dict(config)
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name} config must be a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    # ------------------------------------------------------------------ construction
    @classmethod
    def config_from_dict(cls, values: dict):
        """The method's configuration from a mapping; unknown keys raise ValueError naming them."""
        return dataclass_from_dict(cls.config_class, dict(values or {}), cls.display_name())

    @classmethod
    def from_options(cls, options: dict | None, settings: RunSettings) -> "Method":
        """The method as the comparison harness builds it: ``options`` (the method's mapping in the compare
        config) over the config defaults. ``settings`` are the shared ones: the ``shared_fields`` follow them
        unless ``options`` sets them (a method whose configuration repeats every shared setting, like
        OptEmbed's, overrides this to take them from there)."""
        values = {f: None for f in cls.shared_fields}
        values.update(options or {})
        return cls(cls.config_from_dict(values))

    @classmethod
    def display_name(cls) -> str:
        return cls.title or cls.name

    @classmethod
    def subcommand(cls) -> str | None:
        return cls.name if cls.command == "" else cls.command

    # ------------------------------------------------------------------ the method
    def build_embedding(self, feature_map, embed_dim: int):
        """The (searchable) embedding module of this method for ``feature_map``."""
        raise NotImplementedError(f"{type(self).__name__} does not build a single embedding module")

    def run(self, data, model_name: str, settings: RunSettings, run_dir=None) -> MethodResult:
        """Run the whole schedule (search, retraining, ...) on ``data`` with backbone ``model_name``; write its
        trainer run folders under ``run_dir``; return one result row per trained variant."""
        raise NotImplementedError

    def to_compact(self, run_dir):
        """The physically compact model of a finished run, where the method has one."""
        raise NotImplementedError(f"{self.name} has no compact export")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self.config)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add ``cls`` to the registry under ``cls.name`` (a later registration replaces an
    earlier one of the same name)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method takes a Method subclass, got {cls!r}")
    if not cls.name or not isinstance(cls.name, str):
        raise ValueError(f"{cls.__name__}.name must be a non-empty string")
    if not dataclasses.is_dataclass(cls.config_class):
        raise TypeError(f"{cls.__name__}.config_class must be a dataclass, got {cls.config_class!r}")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    for module in BUILTIN_METHODS.values():
        importlib.import_module(module)


def registered_methods() -> dict[str, type[Method]]:
    """Every registered method, the built-in ones first (in table order), then the others in registration order."""
    _load_builtins()
    order = list(BUILTIN_METHODS) + [n for n in _REGISTRY if n not in BUILTIN_METHODS]
    return {n: _REGISTRY[n] for n in order if n in _REGISTRY}


def method_names() -> tuple[str, ...]:
    return tuple(registered_methods())


def get_method(name: str) -> type[Method]:
    methods = registered_methods()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; known: {list(methods)}")
    return methods[name]
