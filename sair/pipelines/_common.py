"""Shared numpy helpers of the reference pipelines (synthetic inputs, resizing, fixed weights)."""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np

_WORDS_TEXT = (
    "the a an of to in and or for with on at by from model pipeline latency request queue "
    "stage replica scale gpu cpu token kernel batch image frame video text tokenise encode "
    "decode classify aggregate detect budget cost share rho policy reward episode retrieval "
    "context action monitor telemetry bottleneck burst ramp poisson arrival service slow fast "
    "good bad great terrible excellent poor happy sad neutral positive negative review movie "
    "product delivery quality price support network server cluster node memory storage"
)
VOCAB_WORDS = tuple(_WORDS_TEXT.split())
WORD_RE = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")


def synthetic_image(seed: int, height: int, width: int) -> np.ndarray:
    """A deterministic H x W x 3 uint8 image: smooth gradients plus per-request noise."""
    rng = np.random.default_rng(seed)
    base = _gradient(height, width)
    shift = int(rng.integers(0, width))
    noise = rng.integers(0, 32, size=base.shape, dtype=np.uint8)
    out: np.ndarray = np.roll(base, shift, axis=1) // 2 + noise
    return out


@functools.lru_cache(maxsize=8)
def _gradient(height: int, width: int) -> np.ndarray:
    yy = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    xx = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    channels = [127 + 100 * np.sin(6 * xx + 4 * yy + c) for c in range(3)]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def decode_blocks(img: np.ndarray, passes: int) -> np.ndarray:
    """Stand-in for JPEG decoding: 8x8 block transform and inverse, `passes` times (real FLOPs)."""
    h, w, c = img.shape
    h8, w8 = h - h % 8, w - w % 8
    x = img[:h8, :w8].astype(np.float32)
    basis = _dct_basis()
    blocks = x.reshape(h8 // 8, 8, w8 // 8, 8, c).transpose(0, 2, 4, 1, 3)
    for _ in range(passes):
        coeffs = basis @ blocks @ basis.T
        coeffs = np.round(coeffs / 4.0) * 4.0  # quantisation, as a decoder undoes it
        blocks = basis.T @ coeffs @ basis
    out = blocks.transpose(0, 3, 1, 4, 2).reshape(h8, w8, c)
    return np.clip(out, 0, 255)


@functools.lru_cache(maxsize=1)
def _dct_basis() -> np.ndarray:
    k = np.arange(8)[:, None]
    n = np.arange(8)[None, :]
    basis = np.cos(np.pi * (2 * n + 1) * k / 16).astype(np.float32)
    basis[0] *= 1 / np.sqrt(2)
    return (basis * np.sqrt(2 / 8)).astype(np.float32)


def resize_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of an H x W x C float array (numpy only)."""
    h, w = img.shape[:2]
    ys = np.linspace(0, h - 1, out_h, dtype=np.float32)
    xs = np.linspace(0, w - 1, out_w, dtype=np.float32)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[:, None, None]
    wx = (xs - x0)[None, :, None]
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    out: np.ndarray = top * (1 - wy) + bottom * wy
    return out


def normalise(img: np.ndarray) -> np.ndarray:
    mean = np.array([123.7, 116.3, 103.5], dtype=np.float32)
    std = np.array([58.4, 57.1, 57.4], dtype=np.float32)
    out: np.ndarray = (img.astype(np.float32) - mean) / std
    return out


def digest(tensor: np.ndarray, size: int) -> list[float]:
    """A compact summary of a tensor sent to the next stage (size x size x C block means)."""
    h, w = tensor.shape[:2]
    bh, bw = h // size, w // size
    cut = tensor[: bh * size, : bw * size]
    pooled = cut.reshape(size, bh, size, bw, -1).mean(axis=(1, 3))
    return [round(float(v), 5) for v in pooled.ravel()]


@functools.lru_cache(maxsize=16)
def fixed_weights(rows: int, cols: int, seed: int) -> np.ndarray:
    """Deterministic 'trained' weights of a stage's model head."""
    rng = np.random.default_rng(seed)
    w: np.ndarray = rng.normal(0, 1 / np.sqrt(rows), (rows, cols)).astype(np.float32)
    return w


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


@functools.lru_cache(maxsize=1)
def vocab() -> dict[str, int]:
    """A word-piece vocabulary: whole words, then every prefix and '##' suffix of them."""
    pieces: dict[str, int] = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for word in VOCAB_WORDS:
        for piece in [word] + [word[:i] for i in range(1, len(word))]:
            pieces.setdefault(piece, len(pieces))
        for i in range(1, len(word)):
            pieces.setdefault("##" + word[i:], len(pieces))
    return pieces


@functools.lru_cache(maxsize=1)
def inverse_vocab() -> dict[int, str]:
    return {i: p for p, i in vocab().items()}


def synthetic_text(seed: int, n_words: int) -> str:
    rng = np.random.default_rng(seed)
    words = rng.choice(len(VOCAB_WORDS), size=n_words)
    # Glue some words together so word-piece splitting has real work to do.
    glue = rng.random(n_words) < 0.2
    parts: list[str] = []
    for w, g in zip(words, glue, strict=True):
        word = VOCAB_WORDS[int(w)]
        if g and parts:
            parts[-1] = parts[-1] + word
        else:
            parts.append(word)
    return " ".join(parts) + "."


def wordpiece(text: str, max_len: int) -> list[int]:
    """Greedy longest-match word-piece tokenisation (as BERT's tokenizer), padded to max_len."""
    table = vocab()
    ids = [table["[CLS]"]]
    for word in WORD_RE.findall(text.lower()):
        start = 0
        while start < len(word):
            end = len(word)
            piece_id = None
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                piece_id = table.get(piece)
                if piece_id is not None:
                    break
                end -= 1
            if piece_id is None:
                ids.append(table["[UNK]"])
                break
            ids.append(piece_id)
            start = end
    ids = [*ids[: max_len - 1], table["[SEP]"]]
    return ids + [0] * (max_len - len(ids))


def opt_int(options: dict[str, Any], name: str, default: int) -> int:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"option {name}={value!r} must be a number")
    return int(value)


def opt_float(options: dict[str, Any], name: str, default: float) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"option {name}={value!r} must be a number")
    return float(value)


def pl_int(payload: dict[str, Any], name: str, default: int | None = None) -> int:
    """An integer field of the payload; a clear error naming the field when it is wrong."""
    value = payload.get(name, default)
    if value is None:
        raise ValueError(f"payload field {name!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"payload field {name}={value!r} must be a number")
    return int(value)
