"""imgcls: decode + resize a synthetic image -> MobileNetV2-class classifier -> top-k."""

from __future__ import annotations

from typing import Any

import numpy as np

from sair import gpu_emulation

from . import torch_models
from ._common import (
    decode_blocks,
    digest,
    fixed_weights,
    normalise,
    opt_int,
    pl_int,
    resize_bilinear,
    softmax,
    synthetic_image,
)

N_CLASSES = 1000
DIGEST = 8  # 8 x 8 x 3 block means travel to the model stage


def make_payload(rng: np.random.Generator, index: int) -> dict[str, Any]:
    return {"seed": int(rng.integers(0, 2**31 - 1)), "height": 240, "width": 320}


def preprocess(payload: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """'Decode' (8x8 block transform), resize to the model's input, normalise."""
    img = synthetic_image(pl_int(payload, "seed"), pl_int(payload, "height", 240),
                          pl_int(payload, "width", 320))  # fmt: skip
    decoded = decode_blocks(img, opt_int(options, "decode_passes", 1))
    size = opt_int(options, "input_size", 224)
    tensor = normalise(resize_bilinear(decoded, size, size))
    return {"seed": payload["seed"], "pixels": digest(tensor, DIGEST)}


def classify(payload: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The model: `launches` GPU kernel launches (MobileNetV2 ~ 60), then a linear head."""
    if torch_models.use_torch():  # a real model (PyTorch on CUDA, or forced)
        return torch_models.classify(payload, options)
    gpu_emulation.device().launch(opt_int(options, "launches", 60))
    x = np.asarray(payload["pixels"], dtype=np.float32)
    logits = x @ fixed_weights(x.size, N_CLASSES, 1)
    return {"seed": payload["seed"], "logits": [round(float(v), 4) for v in logits]}


classify.sair_warmup = torch_models.warmup_hook("imgcls")  # type: ignore[attr-defined]


def topk(payload: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Softmax and the k best classes."""
    k = opt_int(options, "k", 5)
    probs = softmax(np.asarray(payload["logits"], dtype=np.float64))
    best = np.argsort(probs)[::-1][:k]
    return {
        "classes": [int(c) for c in best],
        "scores": [round(float(probs[c]), 6) for c in best],
    }
