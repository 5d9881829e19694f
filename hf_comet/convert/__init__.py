"""Dense GPT-2 / ViT / BERT checkpoints -> hf_comet MoE models, by an explicit state-dict mapping.

The dense model is loaded with its stock transformers class (which applies upstream renames such as ViT's legacy
names), our model is built from a config derived from it, and every non-FFN weight and the head are copied unchanged;
the FFN weights of the converted blocks are mapped into packed experts (transformers-v5-notes §1.5, §3.5: no weight
conversion is registered under our model types, so our checkpoints always save in their own layout).

Two kinds of facts meet here, each kept in one place: the family's (where the FFN sits, its layout, its width, the
stock classes we accept: `hf_comet.modeling.FamilyAdapter`, on every model as ``model.family``) and the method's
(`METHODS`, one module each; methods.md §6):

* ``comet`` (`comet.py`): the FFN is kept as it is (one group of units) and the frozen projection is added.
* ``upcycle`` (`upcycle.py`): every expert is a copy of the dense FFN.
* ``split`` (`split.py`): the FFN units are partitioned into ``num_experts`` slices (`SPLIT_METHODS`).

`deviation_report` (`report.py`) measures how far a conversion is from the dense model before training.

`sparsify` (`sparse.py`) is block-COMET fitted to the dense model on calibration data: co-activation clusters as
blocks and a least-squares router (`deviation` compares its output with the dense model's).

`import hf_comet.convert` imports none of these modules; each name loads on first use (PEP 562).
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports below only name what __getattr__ exports)

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "core": ("METHODS", "conversion_method", "convert_to_moe", "family_of_model_type", "map_dense_state_dict",
                 "stock_to_ours"),
        "method": ("ConversionError", "ConversionMethod", "hash_block"),
        "report": ("deviation_report", "probe_inputs"),
        "sparse": ("deviation", "sparsify"),
        "split": ("DEFAULT_SPLIT_METHOD", "SPLIT_METHODS", "balanced_kmeans"),
    },
)  # fmt: skip

if TYPE_CHECKING:  # for type checkers and IDEs; at run time `__getattr__` loads these
    from .core import (
        METHODS,
        conversion_method,
        convert_to_moe,
        family_of_model_type,
        map_dense_state_dict,
        stock_to_ours,
    )
    from .method import ConversionError, ConversionMethod, hash_block
    from .report import deviation_report, probe_inputs
    from .sparse import deviation, sparsify
    from .split import DEFAULT_SPLIT_METHOD, SPLIT_METHODS, balanced_kmeans
