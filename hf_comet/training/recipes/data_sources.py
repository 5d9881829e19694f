"""A user's own data for a recipe (``hf-comet train NAME --dataset PATH``): a folder saved with ``save_to_disk``
(`datasets.load_from_disk`) or a ``.json``/``.jsonl``/``.csv`` file (``datasets.load_dataset("json"|"csv",
data_files=PATH)``), with named text or image and label columns.

`read_splits` reads the file or folder into a train and a test `datasets.Dataset`; each recipe's ``load_data`` (see
`Recipe.load_data`) checks its columns and turns them into `RecipeData`. Every check runs before any training and
raises `RecipeArgumentError` naming the bad value and what is allowed. Nothing is written next to the user's data:
splitting and column conversion stay in memory (``load_dataset`` keeps its usual cache in ``HF_DATASETS_CACHE``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow

from ...io import UserError, check_json_file_depth
from .base import RecipeArgumentError

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv"}
"""File suffixes ``--dataset`` reads, and the ``datasets`` builder that reads each."""

TEST_FRACTION = 0.2
"""Share of the rows held out for testing when the data has no test (or validation) split."""

ALLOWED = "a folder saved with Dataset.save_to_disk or DatasetDict.save_to_disk, or a .json, .jsonl or .csv file"


def read_splits(path: str | Path, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The train and test splits of the data at ``path``. A saved `datasets.DatasetDict` gives its ``train`` split
    and its ``test`` (else ``validation``) split; a single dataset (a saved `datasets.Dataset`, a file, a dict with
    only one split) is shuffled with ``seed`` and its first `TEST_FRACTION` (rounded up) held out for testing."""
    location = Path(path)
    if not location.exists():
        raise RecipeArgumentError(f"--dataset {str(path)!r} does not exist; give {ALLOWED}.")
    if location.is_dir():
        try:
            loaded = datasets.load_from_disk(str(location))
        except FileNotFoundError as error:
            raise RecipeArgumentError(
                f"--dataset {str(path)!r} is a folder not saved by save_to_disk ({error}); give {ALLOWED}."
            ) from None
        except (OSError, ValueError, TypeError, KeyError, RecursionError, pyarrow.ArrowException) as error:
            raise RecipeArgumentError(
                f"--dataset {str(path)!r} is a damaged save_to_disk folder ({type(error).__name__}: {error}); save it "
                "again with save_to_disk."
            ) from None
        _check_tables(loaded, path)
    else:
        builder = FILE_BUILDERS.get(location.suffix.lower())
        if builder is None:
            raise RecipeArgumentError(
                f"--dataset {str(path)!r}: files ending in {location.suffix or '(no suffix)'!r} are not read; give {ALLOWED}."
            )
        if location.stat().st_size == 0:
            raise RecipeArgumentError(f"--dataset {str(path)!r} is empty; a train and a test row at least.")
        if builder == "json":  # before Arrow's JSON reader, which a deeply nested file crashes
            try:
                check_json_file_depth(location, f"--dataset {str(path)!r}")
            except UserError as error:
                raise RecipeArgumentError(str(error)) from None
        try:
            loaded = datasets.load_dataset(builder, data_files=str(location))
        except StopIteration:  # datasets' json builder on a file with no rows
            raise RecipeArgumentError(f"--dataset {str(path)!r} has no rows; a train and a test row at least.") from None
        except (
            ValueError, TypeError, OSError, RecursionError, pyarrow.ArrowException,
            datasets.exceptions.DatasetGenerationError,
        ) as error:  # fmt: skip
            cause = error.__cause__ or error
            raise RecipeArgumentError(f"--dataset {str(path)!r} is not a readable {builder} file: {cause}") from None
    if isinstance(loaded, datasets.DatasetDict):
        held_out = next((name for name in ("test", "validation") if name in loaded), None)
        if "train" in loaded and held_out is not None:
            return _non_empty(loaded["train"], path, "train"), _non_empty(loaded[held_out], path, held_out)
        if len(loaded) != 1:
            raise RecipeArgumentError(
                f"--dataset {str(path)!r} has the splits {', '.join(loaded)}; give a train split and a test or "
                "validation split, or a single split (then 20% of it is held out)."
            )
        loaded = next(iter(loaded.values()))
    if len(loaded) < 2:
        raise RecipeArgumentError(f"--dataset {str(path)!r} has {len(loaded)} row(s); a train and a test row at least.")
    # Dataset.train_test_split's shuffle, with the index mappings kept in memory (it would write them as cache files
    # next to the data, i.e. into a user's saved folder)
    order = np.random.default_rng(seed).permutation(len(loaded)).tolist()
    n_test = math.ceil(TEST_FRACTION * len(loaded))
    return loaded.select(order[n_test:], keep_in_memory=True), loaded.select(order[:n_test], keep_in_memory=True)


def _check_tables(loaded: datasets.Dataset | datasets.DatasetDict, path) -> None:
    """Read every column chunk of a folder loaded from disk once (Arrow memory-maps it and would otherwise fail only
    mid-training on a truncated or damaged ``.arrow`` file)."""
    splits = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
    for split in splits:
        try:
            split.data.table.validate(full=True)
        except (OSError, ValueError, pyarrow.ArrowException) as error:
            raise RecipeArgumentError(
                f"--dataset {str(path)!r} holds a damaged Arrow file ({error}); save it again with save_to_disk."
            ) from None


def _non_empty(dataset: datasets.Dataset, path, split: str) -> datasets.Dataset:
    if len(dataset) == 0:
        raise RecipeArgumentError(f"--dataset {str(path)!r}: the {split} split is empty.")
    return dataset


def require_column(
    splits: tuple[datasets.Dataset, ...], column: str, flag: str, recipe: str, kind: str, path: str
) -> None:
    """Refuse data whose splits lack ``column`` (given with ``flag`` or the recipe's default)."""
    for dataset in splits:
        if column not in dataset.column_names:
            raise RecipeArgumentError(
                f"--dataset {path!r} has no {kind} column {column!r} (its columns: {', '.join(dataset.column_names)}); "
                f"recipe {recipe} needs one: name it with {flag}."
            )


def encode_labels(
    train: datasets.Dataset, test: datasets.Dataset, column: str, path: str
) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """Add a ``labels`` column of class ids from ``column``: a `datasets.ClassLabel` keeps its names; whole numbers
    ``0..K-1`` are their own ids (names ``"0"``..), and every one of them must occur in the data (so a stray large id
    cannot build a head of a million classes); strings are numbered in sorted order. Returns the splits and the
    label names."""
    feature = train.features[column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        index = None
    else:
        values = list(train[column]) + list(test[column])
        if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
            if min(values) < 0:
                raise RecipeArgumentError(
                    f"--dataset {path!r}: label column {column!r} holds {min(values)}; labels are 0, 1, ..."
                )
            present = set(values)
            if len(present) != max(values) + 1:
                missing = max(values) + 1 - len(present)
                raise RecipeArgumentError(
                    f"--dataset {path!r}: label column {column!r} holds ids up to {max(values)} but {missing} of the "
                    f"ids 0..{max(values)} never occur; integer labels are 0..K-1 with every class present (or give "
                    "the labels as strings)."
                )
            names = [str(i) for i in range(max(values) + 1)]
            index = None
        elif all(isinstance(v, str) for v in values):
            names = sorted(set(values))
            index = {name: i for i, name in enumerate(names)}
        else:
            bad = next(v for v in values if not isinstance(v, int | str) or isinstance(v, bool))
            raise RecipeArgumentError(
                f"--dataset {path!r}: label column {column!r} holds {bad!r}; labels are whole numbers 0, 1, ... or strings."
            )
    if len(names) < 2:
        raise RecipeArgumentError(f"--dataset {path!r}: label column {column!r} has {len(names)} class; 2 at least.")
    if index is None:
        labels = lambda batch: {"labels": [int(v) for v in batch[column]]}  # noqa: E731
    else:
        labels = lambda batch: {"labels": [index[v] for v in batch[column]]}  # noqa: E731
    features = {"labels": datasets.Value("int64")}
    train, test = (
        split.map(labels, batched=True, keep_in_memory=True, features=datasets.Features({**split.features, **features}))
        for split in (train, test)
    )
    return train, test, names


def check_texts(splits: tuple[datasets.Dataset, ...], column: str, path: str) -> None:
    """Refuse a text column that holds anything but strings."""
    for dataset in splits:
        feature = dataset.features[column]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise RecipeArgumentError(
                f"--dataset {path!r}: text column {column!r} holds {feature}, not strings; name a text column with "
                "--text-column (an image recipe is vit_digits)."
            )


def pixel_array(value: Any, column: str, path: str) -> np.ndarray:
    """One image of the image column as a float32 (channels, side, side) array. An image is a nested list
    ``[channels][height][width]`` or ``[height][width]`` (grayscale), or a flat list or a string of space- or
    comma-separated numbers of a square grayscale image (``side * side`` values, row by row). Values are used as
    given (scale them to [0, 1])."""
    try:
        if isinstance(value, str):
            array = np.array(value.replace(",", " ").split(), dtype=np.float32)
        else:
            array = np.asarray(value, dtype=np.float32)
    except ValueError as error:
        raise RecipeArgumentError(
            f"--dataset {path!r}: image column {column!r} holds a value that is not numbers ({error})."
        ) from None
    if array.ndim == 1:
        side = math.isqrt(array.size)
        if side * side != array.size or side == 0:
            raise RecipeArgumentError(
                f"--dataset {path!r}: image column {column!r} holds a flat image of {array.size} values; a flat image "
                "is square grayscale (side * side values), else give nested lists [channels][height][width]."
            )
        array = array.reshape(1, side, side)
    elif array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1] != array.shape[2] or array.shape[1] == 0:
        raise RecipeArgumentError(
            f"--dataset {path!r}: image column {column!r} holds an image of shape {array.shape}; images are square: "
            "[height][width] or [channels][height][width] with height == width."
        )
    if not np.isfinite(array).all():
        raise RecipeArgumentError(f"--dataset {path!r}: image column {column!r} holds NaN or infinite pixel values.")
    return array


def patch_size_for(image_size: int) -> int:
    """ViT's patch size for square images of ``image_size``: the smallest divisor from 2 up that leaves at most 8 × 8
    patches (2 for the 8 × 8 digits, 4 for 28 × 28, 4 for 32 × 32)."""
    for patch in range(2, image_size + 1):
        if image_size % patch == 0 and (image_size // patch) ** 2 <= 64:
            return patch
    return 1


def to_pixel_values(
    train: datasets.Dataset, test: datasets.Dataset, column: str, path: str
) -> tuple[datasets.Dataset, datasets.Dataset, tuple[int, int, int]]:
    """Add a float32 ``pixel_values`` column (`datasets.Array3D`) from the image column; every image must have the
    shape of the first. Returns the splits and the (channels, side, side) shape."""
    if isinstance(train.features[column], datasets.Image):
        raise RecipeArgumentError(
            f"--dataset {path!r}: image column {column!r} holds encoded images (datasets.Image); store the pixel values "
            "as nested lists [channels][height][width] instead (see the README's Training section)."
        )
    shape = pixel_array(train[0][column], column, path).shape

    def convert(batch):
        arrays = [pixel_array(value, column, path) for value in batch[column]]
        for array in arrays:
            if array.shape != shape:
                raise RecipeArgumentError(
                    f"--dataset {path!r}: image column {column!r} holds images of shapes {shape} and {array.shape}; "
                    "all images must have one shape."
                )
        return {"pixel_values": arrays}

    converted = []
    for split in (train, test):
        features = datasets.Features({**split.features, "pixel_values": datasets.Array3D(shape, "float32")})
        converted.append(split.map(convert, batched=True, keep_in_memory=True, features=features))
    return converted[0], converted[1], shape
