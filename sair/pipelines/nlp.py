"""nlp: tokenise text (word-piece) -> BERT-class encoder -> aggregate (pool + classify)."""

from __future__ import annotations

from typing import Any

import numpy as np

from sair import gpu_emulation

from . import torch_models
from ._common import fixed_weights, opt_int, pl_int, softmax, synthetic_text, wordpiece

HIDDEN = 64
LABELS = ("negative", "neutral", "positive")


def make_payload(rng: np.random.Generator, index: int) -> dict[str, Any]:
    return {"seed": int(rng.integers(0, 2**31 - 1)), "n_words": int(rng.integers(200, 400))}


def tokenise(payload: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Synthesise the document, normalise it and split it into word pieces (pure Python)."""
    text = synthetic_text(pl_int(payload, "seed"), pl_int(payload, "n_words", 300))
    max_len = opt_int(options, "max_len", 256)
    ids: list[int] = []
    # Documents longer than the model's window are cut into windows, as serving code does.
    for _ in range(opt_int(options, "passes", 4)):
        ids = wordpiece(text, max_len)
    return {"ids": ids}


def encode(payload: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The encoder: layers x kernels-per-layer launches (BERT-base: 12 x 10), then pooling."""
    if torch_models.use_torch():  # a real model (PyTorch on CUDA, or forced)
        return torch_models.encode(payload, options)
    layers = opt_int(options, "layers", 12)
    gpu_emulation.device().launch(layers * opt_int(options, "kernels_per_layer", 10))
    ids = np.asarray(payload["ids"], dtype=np.int64)
    counts = np.bincount(ids[ids > 0] % 512, minlength=512).astype(np.float32)
    emb = counts @ fixed_weights(512, HIDDEN, 2)
    return {"embedding": [round(float(v), 5) for v in emb]}


encode.sair_warmup = torch_models.warmup_hook("nlp")  # type: ignore[attr-defined]


def aggregate(payload: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Normalise the pooled embedding and score the labels."""
    emb = np.asarray(payload["embedding"], dtype=np.float64)
    emb = emb / (np.linalg.norm(emb) + 1e-9)
    probs = softmax(emb @ fixed_weights(HIDDEN, len(LABELS), 3).astype(np.float64))
    best = int(np.argmax(probs))
    return {"label": LABELS[best], "score": round(float(probs[best]), 6)}
