"""Small real datasets that ship with our dependencies, for demos, recipes and tests (no download ever)."""

from __future__ import annotations

import numpy as np
import torch


def digits_images(test_fraction: float = 0.2, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """scikit-learn's bundled handwritten digits (1,797 8×8 images, 10 classes) as ``pixel_values`` (N, 1, 8, 8)
    scaled to [0, 1] and ``labels``, split into train and test with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return {"pixel_values": pixels[train], "labels": labels[train]}, {
        "pixel_values": pixels[test],
        "labels": labels[test],
    }


def english_text_bytes() -> np.ndarray:
    """The English text of CPython's bundled documentation topics (``pydoc_data.topics``, ~465 KB) as uint8 bytes.

    Byte-level: a vocabulary of 256 needs no tokenizer and no download.
    """
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def english_text_split(every: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """`english_text_bytes` split by topic: every ``every``-th topic (sorted keys) is held out for validation, so the
    two parts share no topic. Returns ``(train_bytes, validation_bytes)``."""
    from pydoc_data import topics

    keys = sorted(topics.topics)
    train = "\n\n".join(topics.topics[k] for i, k in enumerate(keys) if i % every)
    held_out = "\n\n".join(topics.topics[k] for i, k in enumerate(keys) if not i % every)
    as_bytes = lambda text: np.frombuffer(text.encode("utf-8"), dtype=np.uint8)  # noqa: E731
    return as_bytes(train), as_bytes(held_out)


def byte_windows(data: np.ndarray, seq_len: int, num: int, seed: int) -> torch.Tensor:
    """``num`` random windows of ``seq_len`` bytes from ``data`` as a (num, seq_len) long tensor."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(data) - seq_len, size=num)
    return torch.from_numpy(np.stack([data[s : s + seq_len] for s in starts]).astype(np.int64))


DOCSTRING_TOPICS: dict[str, tuple[str, ...]] = {
    "text processing": ("string", "re", "textwrap", "difflib", "html", "html.parser", "codecs", "unicodedata", "shlex", "csv"),
    "internet and email": (
        "http.client", "http.server", "http.cookies", "urllib.request", "urllib.parse", "email.message",
        "email.utils", "email.parser", "smtplib", "ftplib", "socketserver", "mailbox", "imaplib", "poplib",
    ),
    "numbers and math": ("math", "cmath", "statistics", "decimal", "fractions", "random", "numbers", "operator"),
    "files and directories": (
        "os", "shutil", "pathlib", "tarfile", "zipfile", "tempfile", "glob", "filecmp", "fnmatch", "io", "os.path",
        "stat",
    ),
}  # fmt: skip
"""Topic label -> standard-library modules whose docstrings carry that label."""


def stdlib_docstrings(min_chars: int = 40) -> tuple[list[str], list[int], list[str]]:
    """A real labelled text task that ships with Python: the docstrings of the public functions, classes and methods
    of standard-library modules, labelled by the topic of their module (`DOCSTRING_TOPICS`, 4 classes, ~1,100
    texts). Returns ``(texts, labels, label_names)``, deduplicated and in a deterministic order; a docstring found
    under two topics is dropped."""
    import importlib
    import inspect

    label_names = list(DOCSTRING_TOPICS)
    found: dict[str, set[int]] = {}
    for label, modules in enumerate(DOCSTRING_TOPICS.values()):
        for module_name in modules:
            module = importlib.import_module(module_name)
            for name, obj in sorted(vars(module).items()):
                if name.startswith("_"):
                    continue
                owner = getattr(obj, "__module__", None)
                if owner is not None and owner != module.__name__ and not inspect.isbuiltin(obj):
                    continue  # re-exported from elsewhere
                candidates = [obj]
                if inspect.isclass(obj):
                    candidates += [v for k, v in sorted(vars(obj).items()) if not k.startswith("_")]
                for candidate in candidates:
                    if not (inspect.isroutine(candidate) or inspect.isclass(candidate)):
                        continue
                    doc = inspect.getdoc(candidate)
                    if doc and len(doc) >= min_chars:
                        found.setdefault(doc, set()).add(label)
    texts, labels = [], []
    for doc in sorted(found):
        if len(found[doc]) == 1:
            texts.append(doc)
            labels.append(next(iter(found[doc])))
    return texts, labels, label_names


def encode_bytes(
    texts: list[str], seq_len: int, prefix: int | None = None, pad: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes of each text, truncated to ``seq_len`` (after an optional ``prefix`` token id) and right-padded with
    ``pad``: ``(input_ids, attention_mask)`` as (N, seq_len) long tensors."""
    ids = torch.full((len(texts), seq_len), pad, dtype=torch.long)
    mask = torch.zeros(len(texts), seq_len, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = ([prefix] if prefix is not None else []) + list(text.encode("utf-8"))[: seq_len - (prefix is not None)]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return ids, mask
