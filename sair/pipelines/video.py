"""video: extract frames from a synthetic clip -> per-frame model -> temporal aggregation."""

from __future__ import annotations

from typing import Any

import numpy as np

from sair import gpu_emulation

from . import torch_models
from ._common import (
    digest,
    fixed_weights,
    normalise,
    opt_int,
    pl_int,
    resize_bilinear,
    softmax,
    synthetic_image,
)

N_ACTIONS = 16
DIGEST = 4


def make_payload(rng: np.random.Generator, index: int) -> dict[str, Any]:
    return {"seed": int(rng.integers(0, 2**31 - 1)), "frames": 32, "height": 120, "width": 160}


def extract(payload: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Decode the clip's frames, keep every `stride`-th, resize and normalise each."""
    seed = pl_int(payload, "seed")
    n_frames = pl_int(payload, "frames", 32)
    h, w = pl_int(payload, "height", 120), pl_int(payload, "width", 160)
    stride = opt_int(options, "stride", 4)
    size = opt_int(options, "input_size", 112)
    frames: list[float] = []
    for f in range(0, n_frames, stride):
        frame = synthetic_image(seed + f, h, w).astype(np.float32)
        frames.extend(digest(normalise(resize_bilinear(frame, size, size)), DIGEST))
    return {"frames": frames, "n": len(range(0, n_frames, stride))}


def per_frame(payload: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The per-frame model: `launches_per_frame` launches for every kept frame."""
    if torch_models.use_torch():  # a real model (PyTorch on CUDA, or forced)
        return torch_models.per_frame(payload, options)
    n = pl_int(payload, "n")
    gpu_emulation.device().launch(n * opt_int(options, "launches_per_frame", 40))
    x = np.asarray(payload["frames"], dtype=np.float32).reshape(n, -1)
    logits = x @ fixed_weights(x.shape[1], N_ACTIONS, 4)
    return {"logits": [round(float(v), 4) for v in logits.ravel()], "n": n}


per_frame.sair_warmup = torch_models.warmup_hook("video")  # type: ignore[attr-defined]


def temporal(payload: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Smooth per-frame scores over time and pick the clip's action and its segment."""
    n = pl_int(payload, "n")
    probs = softmax(np.asarray(payload["logits"], dtype=np.float64).reshape(n, N_ACTIONS))
    window = max(1, min(n, opt_int(options, "window", 3)))
    kernel = np.ones(window) / window
    smooth = np.stack([np.convolve(probs[:, a], kernel, mode="same") for a in range(N_ACTIONS)], 1)
    action = int(np.argmax(smooth.mean(axis=0)))
    peak = int(np.argmax(smooth[:, action]))
    return {"action": action, "peak_frame": peak, "score": round(float(smooth[peak, action]), 6)}
