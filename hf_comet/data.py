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


def byte_windows(data: np.ndarray, seq_len: int, num: int, seed: int) -> torch.Tensor:
    """``num`` random windows of ``seq_len`` bytes from ``data`` as a (num, seq_len) long tensor."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(data) - seq_len, size=num)
    return torch.from_numpy(np.stack([data[s : s + seq_len] for s in starts]).astype(np.int64))
