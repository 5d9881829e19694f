"""Registering hf_comet's configs and models with transformers' Auto classes at ``import hf_comet``, cheaply.

The configs are registered as classes (``AutoConfig.register``; the config module is light). The models are not
imported: importing one pulls in ``transformers.modeling_utils`` (several seconds), and transformers' public
``AutoModel*.register(config_class, model_class)`` needs the class. So each Auto class's mapping gets a lazy entry
instead: ``_LazyAutoMapping`` keeps registered entries in its ``_extra_content`` dict, which every lookup reads
(``[]``, ``get``, ``in``, ``keys``/``values``/``items``; pipelines and processors also iterate its ``values()``). We
replace that dict by a `LazyClassDict`, a ``dict`` that may hold a `LazyClass` (module, class name) and imports the
class the first time the entry's value is read, then keeps the class. Anything that reads a value gets the class, as
with ``register``; reading only keys (``in``) imports nothing.

Where a mapping does not look like that (another transformers, or someone else replaced ``_extra_content``), the
model classes are imported and registered with the public ``register``: slower, never broken.

This module is the package's, not the checkpoints' (``modeling/`` travels as remote code and imports no hf_comet).
`AUTO_CLASSES` is the light table this reads: per model type, the config class and each Auto class's model class as
(module, class name). ``tests/test_import_graph.py`` checks it against ``FAMILY_ADAPTERS`` (the families' facts).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, NamedTuple

import transformers
from transformers import AutoConfig

from .modeling import configuration_comet


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


def _lazy_extra_content(auto_class: type) -> LazyClassDict | None:
    """The auto class's ``_model_mapping._extra_content`` as a `LazyClassDict` (swapped in once), or ``None`` when
    the mapping is not the ``_LazyAutoMapping`` with a plain-dict ``_extra_content`` this was written against."""
    try:
        from transformers.models.auto.auto_factory import _LazyAutoMapping
    except ImportError:
        return None
    mapping = getattr(auto_class, "_model_mapping", None)
    if not isinstance(mapping, _LazyAutoMapping):
        return None
    extra = vars(mapping).get("_extra_content")
    if type(extra) is dict:
        extra = LazyClassDict(extra)
        mapping._extra_content = extra
    return extra if isinstance(extra, LazyClassDict) else None


def register_auto_classes() -> None:
    """Register every family's config with ``AutoConfig`` and its models with their Auto classes (idempotent):
    lazily where the mapping allows it (see the module docstring), otherwise by importing the model classes."""
    for model_type, family in AUTO_CLASSES.items():
        config_class = getattr(configuration_comet, family.config_class)
        AutoConfig.register(model_type, config_class, exist_ok=True)
        for auto_name, (module, class_name) in family.models.items():
            auto_class = getattr(transformers, auto_name)
            extra = _lazy_extra_content(auto_class)
            if extra is not None:
                extra.set_lazy(config_class, module, class_name)
                if config_class in auto_class._model_mapping:  # the mapping reads the entry: done
                    continue
                dict.__delitem__(extra, config_class)
            auto_class.register(config_class, LazyClass(module, class_name).load(), exist_ok=True)


__all__ = ["AUTO_CLASSES", "FamilyClasses", "LazyClass", "LazyClassDict", "register_auto_classes"]
