"""textgen: prompt preparation -> autoregressive decode (cost grows with output) -> detokenise."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from sair import gpu_emulation

from . import torch_models
from ._common import VOCAB_WORDS, opt_int, pl_int, synthetic_text, wordpiece

EOS = 3  # [SEP] ends generation
BLOCKLIST = re.compile(r"\b(terrible|bad)\b")
TEMPLATE = "system: answer briefly and politely. user: {prompt} assistant:"


def make_payload(rng: np.random.Generator, index: int) -> dict[str, Any]:
    # Output lengths vary widely, as in chat traffic: this is what makes decode time vary.
    return {
        "seed": int(rng.integers(0, 2**31 - 1)),
        "prompt_words": int(rng.integers(20, 120)),
        "max_new_tokens": int(rng.integers(8, 64)),
    }


def prepare(payload: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Fill the chat template and tokenise the prompt."""
    prompt = synthetic_text(pl_int(payload, "seed"), pl_int(payload, "prompt_words", 60))
    ids: list[int] = []
    for _ in range(opt_int(options, "passes", 4)):
        ids = wordpiece(TEMPLATE.format(prompt=prompt), opt_int(options, "max_prompt", 256))
    ids = [i for i in ids if i != 0]
    return {"seed": payload["seed"], "ids": ids,
            "max_new_tokens": pl_int(payload, "max_new_tokens", 32)}  # fmt: skip


def decode(payload: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Prefill (prompt in chunks), then one forward per new token: launches grow with output."""
    if torch_models.use_torch():  # a real model (PyTorch on CUDA, or forced)
        return torch_models.decode(payload, options)
    dev = gpu_emulation.device()
    per_forward = opt_int(options, "layers", 6) * opt_int(options, "kernels_per_layer", 4)
    prompt = payload["ids"]
    chunks = max(1, -(-len(prompt) // opt_int(options, "prefill_chunk", 64)))
    dev.launch(per_forward * chunks)
    rng = np.random.default_rng(pl_int(payload, "seed"))
    n_vocab = 4 + len(VOCAB_WORDS)
    out: list[int] = []
    for _ in range(pl_int(payload, "max_new_tokens", 32)):
        dev.launch(per_forward)
        token = int(rng.integers(4, n_vocab))
        if rng.random() < 0.01:
            break
        out.append(token)
    return {"ids": out}


decode.sair_warmup = torch_models.warmup_hook("textgen")  # type: ignore[attr-defined]


def detokenise(payload: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """Map ids to words, join, and filter blocked words."""
    words = [VOCAB_WORDS[(i - 4) % len(VOCAB_WORDS)] for i in payload["ids"]]
    text = " ".join(words)
    filtered, hits = BLOCKLIST.subn("***", text)
    return {"n_tokens": len(words), "filtered": hits, "chars": len(filtered)}
