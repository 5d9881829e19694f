"""Registering hf_comet's configs and models with transformers' Auto classes at ``import hf_comet``, cheaply.

``import hf_comet`` imports neither transformers nor torch (so ``hf-comet --help`` parses in a blink): it installs
post-import hooks (`hf_comet._lazy.after_import`), and each entry is registered the moment the modules it joins have
executed (at once for those already imported; `install_auto_registration`): the configs as lazy entries of
``CONFIG_MAPPING`` when ``configuration_auto`` (``AutoConfig``) executes, and the models as lazy entries of every
``AutoModel*`` mapping once both ``modeling_auto`` and our config module (the mappings' keys are config classes) have
executed. Nothing can look up an Auto class before its module has executed, nor one of our models without one of
our config classes, so this is as eager as an import-time registration. A hook imports no transformers module
itself: one that fires inside transformers' own import chain (a config module's docstring decorator imports
``modeling_auto``) would otherwise meet half-executed modules.

The models are not imported: importing one pulls in ``transformers.modeling_utils`` (several seconds), and transformers' public
``AutoModel*.register(config_class, model_class)`` needs the class. So each Auto class's mapping gets a lazy entry
instead: ``_LazyAutoMapping`` keeps registered entries in its ``_extra_content`` dict, which every lookup reads
(``[]``, ``get``, ``in``, ``keys``/``values``/``items``; pipelines and processors also iterate its ``values()``). We
replace that dict by a `LazyClassDict`, a ``dict`` that may hold a `LazyClass` (module, class name) and imports the
class the first time the entry's value is read, then keeps the class. Anything that reads a value gets the class, as
with ``register``; reading only keys (``in``) imports nothing.

``CONFIG_MAPPING`` (``_LazyConfigMapping``) keeps registered configs in an ``_extra_content`` dict keyed by model type
too, so the configs get the same lazy entries.

Where a mapping does not look like that (another transformers, or someone else replaced ``_extra_content``), the
classes are imported and registered with the public ``register``: slower, never broken.

This module is the package's, not the checkpoints' (``modeling/`` travels as remote code and imports no hf_comet).
`AUTO_CLASSES` is the light table this reads: per model type, the config class and each Auto class's model class as
(module, class name). ``tests/test_import_graph.py`` checks it against ``FAMILY_ADAPTERS`` (the families' facts).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

from ._lazy import after_import

CONFIGURATION_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"
CONFIG_MODULE = "hf_comet.modeling.configuration_comet"
"""transformers' modules defining ``AutoConfig`` and the ``AutoModel*`` classes, and ours defining the config classes:
their execution triggers the registration."""


class FamilyClasses(NamedTuple):
    """One family's registration: its config class name and Auto class name -> (module, model class name)."""

    config_class: str
    models: dict[str, tuple[str, str]]


def _heads(module: str, **auto_classes: str) -> dict[str, tuple[str, str]]:
    return {auto_name: (f"hf_comet.modeling.{module}", class_name) for auto_name, class_name in auto_classes.items()}


AUTO_CLASSES: dict[str, FamilyClasses] = {
    "comet_gpt2": FamilyClasses(
        "CometGPT2Config",
        _heads(
            "modeling_comet_gpt2",
            AutoModel="CometGPT2Model",
            AutoModelForCausalLM="CometGPT2ForCausalLM",
            AutoModelForPreTraining="CometGPT2ForCausalLM",
            AutoModelForSequenceClassification="CometGPT2ForSequenceClassification",
            AutoModelForTokenClassification="CometGPT2ForTokenClassification",
            AutoModelForQuestionAnswering="CometGPT2ForQuestionAnswering",
        ),
    ),
    "comet_vit": FamilyClasses(
        "CometViTConfig",
        _heads(
            "modeling_comet_vit",
            AutoModel="CometViTModel",
            AutoModelForImageClassification="CometViTForImageClassification",
            AutoModelForMaskedImageModeling="CometViTForMaskedImageModeling",
        ),
    ),
    "comet_bert": FamilyClasses(
        "CometBertConfig",
        _heads(
            "modeling_comet_bert",
            AutoModel="CometBertModel",
            AutoModelForPreTraining="CometBertForPreTraining",
            AutoModelForMaskedLM="CometBertForMaskedLM",
            AutoModelForCausalLM="CometBertForCausalLM",
            AutoModelForNextSentencePrediction="CometBertForNextSentencePrediction",
            AutoModelForMultipleChoice="CometBertForMultipleChoice",
            AutoModelForQuestionAnswering="CometBertForQuestionAnswering",
            AutoModelForSequenceClassification="CometBertForSequenceClassification",
            AutoModelForTokenClassification="CometBertForTokenClassification",
            AutoModelForTextEncoding="CometBertModel",
        ),
    ),
}
"""model type -> its config class (in ``configuration_comet``) and {Auto class name: (module, model class name)}: what
``import hf_comet`` registers, without importing a model module."""


@dataclass(frozen=True)
class LazyClass:
    """A class named by module and name, imported on `load`."""

    module: str
    name: str

    def load(self) -> type:
        return getattr(importlib.import_module(self.module), self.name)


class LazyClassDict(dict):
    """A dict whose values may be `LazyClass` entries, each imported the first time its value is read (then kept).

    Keys, ``in`` and ``len`` import nothing. Every way of reading values (``[]``, ``get``, ``values``, ``items``,
    ``pop``, ``copy``, ``dict(...)``, pickling, ``==``) returns classes, never a `LazyClass`."""

    def set_lazy(self, key: Any, module: str, name: str) -> None:
        dict.__setitem__(self, key, LazyClass(module, name))

    def is_lazy(self, key: Any) -> bool:
        """The entry of ``key`` has not been imported yet."""
        return isinstance(dict.get(self, key), LazyClass)

    def _resolve(self, key: Any, value: Any) -> Any:
        if isinstance(value, LazyClass):
            value = value.load()
            dict.__setitem__(self, key, value)
        return value

    def _resolve_all(self) -> None:
        for key in list(dict.keys(self)):
            self[key]

    def __getitem__(self, key: Any) -> Any:
        return self._resolve(key, dict.__getitem__(self, key))

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default

    def values(self):
        self._resolve_all()
        return dict.values(self)

    def items(self):
        self._resolve_all()
        return dict.items(self)

    def __iter__(self):
        # Overriding __iter__ makes ``dict(self)`` and ``{**self}`` read values through __getitem__ (CPython copies a
        # dict subclass's storage directly only when it keeps dict's own __iter__).
        return dict.__iter__(self)

    def pop(self, key: Any, *default: Any) -> Any:
        if key not in self and default:
            return default[0]
        value = self[key]
        dict.__delitem__(self, key)
        return value

    def popitem(self) -> tuple[Any, Any]:
        if not self:
            raise KeyError("popitem(): dictionary is empty")
        key = next(reversed(dict.keys(self)))
        return key, self.pop(key)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            dict.__setitem__(self, key, default)
        return self[key]

    def copy(self) -> dict:
        return dict(self.items())

    def __eq__(self, other: object) -> bool:
        self._resolve_all()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = None

    def __reduce__(self):
        return dict, (self.copy(),)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict.__repr__(self)})"


def _lazy_dict(mapping: Any, expected: type) -> LazyClassDict | None:
    """``mapping._extra_content`` as a `LazyClassDict` (swapped in once), or ``None`` when ``mapping`` is not the
    ``expected`` transformers mapping class with a plain-dict ``_extra_content`` this was written against."""
    if not isinstance(mapping, expected):
        return None
    extra = vars(mapping).get("_extra_content")
    if type(extra) is dict:
        extra = LazyClassDict(extra)
        mapping._extra_content = extra
    return extra if isinstance(extra, LazyClassDict) else None


def _lazy_extra_content(auto_class: type) -> LazyClassDict | None:
    """The Auto model class's ``_model_mapping._extra_content`` as a `LazyClassDict` (see `_lazy_dict`)."""
    try:
        from transformers.models.auto.auto_factory import _LazyAutoMapping
    except ImportError:
        return None
    return _lazy_dict(getattr(auto_class, "_model_mapping", None), _LazyAutoMapping)


_EXECUTED: set[str] = set()
"""The watched modules that have finished executing (the hooks run after a module's code, never inside it)."""


def _config_class(family: FamilyClasses) -> type:
    return getattr(importlib.import_module(CONFIG_MODULE), family.config_class)


def register_configs(configuration_auto: ModuleType | None = None) -> None:
    """Register every family's config with ``AutoConfig`` (idempotent): as the class once our config module has
    executed, else as a lazy entry (the class is imported when the entry is read), else (a ``CONFIG_MAPPING`` of
    another shape) by importing it."""
    if configuration_auto is None:
        configuration_auto = importlib.import_module(CONFIGURATION_AUTO)
    extra = _lazy_dict(getattr(configuration_auto, "CONFIG_MAPPING", None), configuration_auto._LazyConfigMapping)
    for model_type, family in AUTO_CLASSES.items():
        if CONFIG_MODULE not in _EXECUTED and extra is not None:
            extra.set_lazy(model_type, CONFIG_MODULE, family.config_class)
        else:
            configuration_auto.AutoConfig.register(model_type, _config_class(family), exist_ok=True)


def register_models(modeling_auto: ModuleType | None = None) -> None:
    """Register every family's models with their Auto classes (idempotent): lazily where the mapping allows it (see
    the module docstring), otherwise by importing the model classes."""
    if modeling_auto is None:
        modeling_auto = importlib.import_module(MODELING_AUTO)
    for family in AUTO_CLASSES.values():
        config_class = _config_class(family)
        for auto_name, (module, class_name) in family.models.items():
            auto_class = getattr(modeling_auto, auto_name)
            extra = _lazy_extra_content(auto_class)
            if extra is not None:
                extra.set_lazy(config_class, module, class_name)
                if config_class in auto_class._model_mapping:  # the mapping reads the entry: done
                    continue
                dict.__delitem__(extra, config_class)
            auto_class.register(config_class, LazyClass(module, class_name).load(), exist_ok=True)


def register_auto_classes() -> None:
    """Register every family's config and models now, importing what that needs (idempotent)."""
    for name in (CONFIGURATION_AUTO, CONFIG_MODULE, MODELING_AUTO):
        importlib.import_module(name)
        _EXECUTED.add(name)
    register_configs()
    register_models()


def _executed(name: str) -> Callable[[ModuleType], None]:
    def hook(module: ModuleType) -> None:
        _EXECUTED.add(name)
        if name == CONFIGURATION_AUTO:
            register_configs(module)
        elif {CONFIG_MODULE, MODELING_AUTO} <= _EXECUTED:  # the model mappings and their keys both exist now
            register_models(sys.modules[MODELING_AUTO])

    return hook


def install_auto_registration() -> None:
    """What ``import hf_comet`` calls: hooks that register each entry once the modules it joins have executed (see
    the module docstring), importing nothing of transformers."""
    for name in (CONFIGURATION_AUTO, CONFIG_MODULE, MODELING_AUTO):
        after_import(name, _executed(name))


__all__ = [
    "AUTO_CLASSES",
    "FamilyClasses",
    "LazyClass",
    "LazyClassDict",
    "install_auto_registration",
    "register_auto_classes",
    "register_configs",
    "register_models",
]
