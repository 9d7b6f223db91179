"""The GPU stages' PyTorch models (sair/pipelines/torch_models.py), run on the CPU here.

torch is not a dependency of SAIR: without it this whole file is skipped.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sair import gpu_emulation  # noqa: E402
from sair.pipelines import (  # noqa: E402
    REFERENCE_PIPELINES,
    load_spec,
    make_payload,
    torch_device_check,
    torch_models,
)
from sair.pipelines import nlp as nlp_pipeline  # noqa: E402
from sair.stack import ManagedServer  # noqa: E402
from sair.worker.logic import Handler, forward_request, load_handler  # noqa: E402
from schemas.messages import StageRequest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / "gpu_interceptor" / "build" / "libsair_intercept.so"
# Small models where the test is about behaviour, not the model's size (2 shared cores).
SMALL = {"torch_d_model": 64, "torch_layers": 2, "torch_heads": 2, "torch_width": 0.5,
         "torch_input_size": 32}  # fmt: skip
SMALL_VIDEO = {"torch_width": 8, "torch_input_size": 32}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Intra-op threads on a shared 2-core box spin against each other; a worker replica
    # runs with OMP_NUM_THREADS=1 too (the supervisor sets it).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def forced_torch(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(torch_models.BACKEND_ENV, "torch")
    gpu_emulation.reset()
    yield
    gpu_emulation.reset()


def stages(name: str) -> tuple[list[Handler], list[dict[str, Any]]]:
    spec = load_spec(name)
    return ([load_handler(s.handler or "") for s in spec.stages],
            [dict(s.options) for s in spec.stages])  # fmt: skip


def preprocessed(name: str, index: int = 0, seed: int = 0) -> dict[str, Any]:
    (pre, _, _), opts = stages(name)
    return pre(make_payload(name, np.random.default_rng(seed), index), opts[0])


def test_each_model_runs_on_real_preprocessing_output_and_feeds_postprocessing(
    forced_torch: None,
) -> None:
    """pre -> torch model -> post through the real handlers, spec options, default models."""
    for name in REFERENCE_PIPELINES:
        (pre, gpu, post), opts = stages(name)
        req = StageRequest(request_id=f"{name}-1", pipeline=name, created_ts_s=1.0,
                           enqueued_ts_s=1.0, payload=make_payload(name, np.random.default_rng(3), 0))  # fmt: skip
        launches = gpu_emulation.device().snapshot().launches
        forwards = torch_models.forward_count()
        mid = pre(dict(req.payload), opts[0])
        req = forward_request(req, "pre", 1.0, mid, 2.0)
        out = gpu(dict(req.payload), opts[1])
        req = forward_request(req, "gpu", 1.0, out, 3.0)  # the schema accepts the payload
        final = post(dict(req.payload), opts[2])
        assert torch_models.forward_count() > forwards, name  # the model ran ...
        assert gpu_emulation.device().snapshot().launches == launches, name  # ... not emulation
        if name == "imgcls":
            assert len(out["logits"]) == 1000
            assert len(set(final["classes"])) == 5
            assert final["scores"] == sorted(final["scores"], reverse=True)
            assert final["scores"][0] > 2 * 0.001  # logits spread out, not a flat 1/1000
        elif name == "nlp":
            assert len(out["embedding"]) == nlp_pipeline.HIDDEN
            assert final["label"] in nlp_pipeline.LABELS
        elif name == "textgen":
            assert final["n_tokens"] == len(out["ids"]) > 0
            assert all(i >= torch_models.N_SPECIAL for i in out["ids"])
        else:
            assert out["n"] == mid["n"] == 16 and len(out["logits"]) == 16 * 16
            assert 0 <= final["action"] < 16 and 0 <= final["peak_frame"] < 16


def test_torch_and_emulated_outputs_have_the_same_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 3 sees the same payload fields either way; textgen even the same output length."""
    gpu_emulation.reset()
    for name in REFERENCE_PIPELINES:
        (_, gpu, _), opts = stages(name)
        mid = preprocessed(name, seed=5)
        options = {**opts[1], **(SMALL_VIDEO if name == "video" else SMALL)}
        monkeypatch.setenv(torch_models.BACKEND_ENV, "emulated")
        emulated = gpu(dict(mid), options)
        monkeypatch.setenv(torch_models.BACKEND_ENV, "torch")
        real = gpu(dict(mid), options)
        assert emulated.keys() == real.keys(), name
        for key, value in emulated.items():
            if isinstance(value, list):
                assert len(real[key]) == len(value), (name, key)
    gpu_emulation.reset()


def test_same_seed_same_weights_and_outputs() -> None:
    mid = preprocessed("imgcls")
    x = torch.tensor(mid["pixels"]).reshape(1, 8, 8, 3).permute(0, 3, 1, 2)
    for name in REFERENCE_PIPELINES:
        options = SMALL_VIDEO if name == "video" else SMALL
        a = torch_models.build_model(name, options)
        b = torch_models.build_model(name, options)
        c = torch_models.build_model(name, {**options, "torch_seed": 99})
        sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name
    # Same seed -> identical outputs; another seed -> other outputs.
    small = {**SMALL}
    a, b = torch_models.build_model("imgcls", small), torch_models.build_model("imgcls", small)
    c = torch_models.build_model("imgcls", {**small, "torch_seed": 99})
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))
        assert not torch.allclose(a(x), c(x))
    # Building a model leaves the process's global RNG alone.
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    torch_models.build_model("nlp", SMALL)
    assert torch.equal(torch.rand(3), expected)


def test_handler_outputs_are_deterministic(forced_torch: None) -> None:
    (_, gpu, _), opts = stages("textgen")
    mid = preprocessed("textgen", seed=1)
    first = gpu(dict(mid), {**opts[1], **SMALL})
    torch_models.clear_models()  # rebuilt from the seed: same weights, same tokens
    assert gpu(dict(mid), {**opts[1], **SMALL}) == first


def test_textgen_cost_grows_with_output_length(forced_torch: None) -> None:
    """One decoder forward per generated token (prefill included): counted, not timed."""
    (_, gpu, post), opts = stages("textgen")
    options = {**opts[1], **SMALL}
    mid = preprocessed("textgen", seed=2)
    steps: list[int] = []
    for max_new in (4, 16, 48):
        before = torch_models.forward_count()
        out = gpu({**mid, "max_new_tokens": max_new}, options)
        used = torch_models.forward_count() - before
        # The seeded stop rule may end early: then the last forward made no kept token.
        assert len(out["ids"]) <= used <= len(out["ids"]) + 1
        assert post(out, opts[2])["n_tokens"] == len(out["ids"])
        steps.append(used)
    assert steps[0] < steps[1] < steps[2], steps
    assert steps == [4, 16, 48]  # this seed draws no early stop in 48 tokens


def test_kv_cache_decoding_matches_full_recomputation() -> None:
    model = torch_models.build_model("textgen", SMALL)
    ids = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 46]])
    with torch.inference_mode():
        full = model(ids, 0, model.new_cache(torch.device("cpu")))
        cache = model.new_cache(torch.device("cpu"))
        model(ids[:, :5], 0, cache)
        for pos in range(5, 8):
            step = model(ids[:, pos:pos + 1], pos, cache)
    assert torch.allclose(step, full, rtol=1e-4, atol=1e-4), (step - full).abs().max()


def test_backend_selection_honours_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = torch_models.BACKEND_ENV
    monkeypatch.setenv(env, "torch")
    assert torch_models.selected_backend() == "torch"
    monkeypatch.setenv(env, " Emulated ")
    assert torch_models.selected_backend() == "emulated"
    monkeypatch.setenv(env, "cuda")
    with pytest.raises(ValueError, match="SAIR_GPU_BACKEND='cuda'"):
        torch_models.selected_backend()
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: auto picks torch here")
    # auto (the default) without CUDA: emulation, whether or not a driver is present.
    monkeypatch.delenv(env)
    torch_models.cuda_usable.cache_clear()
    assert torch_models.selected_backend() == "emulated"
    monkeypatch.setattr(torch_models, "_nvidia_driver_present", lambda: True)
    torch_models.cuda_usable.cache_clear()
    try:
        monkeypatch.setenv(env, "auto")
        assert torch_models.selected_backend() == "emulated"  # torch imported, no CUDA
    finally:
        torch_models.cuda_usable.cache_clear()


def test_handlers_follow_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same handler launches emulated kernels or runs the model, as selected."""
    gpu_emulation.reset()
    (_, gpu, _), opts = stages("imgcls")
    mid = preprocessed("imgcls")
    options = {**opts[1], **SMALL}
    dev = gpu_emulation.device()
    for backend, launches, forwards in (("emulated", 60, 0), ("torch", 0, 1), ("auto", 60, 0)):
        if backend == "auto" and torch.cuda.is_available():
            continue
        monkeypatch.setenv(torch_models.BACKEND_ENV, backend)
        l0, f0 = dev.snapshot().launches, torch_models.forward_count()
        gpu(dict(mid), options)
        assert (dev.snapshot().launches - l0, torch_models.forward_count() - f0) == (
            launches, forwards), backend  # fmt: skip
    gpu_emulation.reset()


def test_warmup_builds_once_and_is_a_no_op_on_emulation(
    monkeypatch: pytest.MonkeyPatch, forced_torch: None, caplog: pytest.LogCaptureFixture
) -> None:
    (_, gpu, _), opts = stages("nlp")
    options = {**opts[1], **SMALL, "torch_seed": 5}
    torch_models.clear_models()
    with caplog.at_level(logging.INFO, "sair.pipelines.torch"):
        assert gpu.sair_warmup(options) > 0  # type: ignore[attr-defined]
        model = torch_models.get_model("nlp", options)
        gpu(dict(preprocessed("nlp")), options)
        assert torch_models.get_model("nlp", options) is model
    built = [r for r in caplog.records if "built on cpu" in r.getMessage()]
    assert len(built) == 1
    monkeypatch.setenv(torch_models.BACKEND_ENV, "emulated")
    assert gpu.sair_warmup(options) == 0.0  # type: ignore[attr-defined]


def test_bad_payloads_name_the_field(forced_torch: None) -> None:
    with pytest.raises(ValueError, match="'pixels'"):
        torch_models.classify({"seed": 1, "pixels": [1.0] * 10}, SMALL)
    with pytest.raises(ValueError, match=r"'ids'.*9999"):
        torch_models.encode({"ids": [2, 9999]}, SMALL)
    with pytest.raises(ValueError, match="max_new_tokens=600"):
        torch_models.decode({"seed": 1, "ids": [2, 3], "max_new_tokens": 600}, SMALL)
    with pytest.raises(ValueError, match="n=5"):
        torch_models.per_frame({"frames": [0.0] * 48 * 4, "n": 5}, SMALL_VIDEO)
    with pytest.raises(ValueError, match="torch_heads"):
        torch_models.model_config("nlp", {"torch_d_model": 30, "torch_heads": 4})


def test_unthrottled_torch_path_warns_once_when_rho_is_below_one(
    redis_server: ManagedServer, forced_torch: None, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No interceptor in this process: a rho < 1 is not enforced, and the log says so once."""
    monkeypatch.setenv("SAIR_REDIS_URL", redis_server.url)
    gpu_emulation.configure("torchrho", "infer", 6000.0, redis_server.url)
    torch_models.reset_throttle_warning()
    (_, gpu, _), opts = stages("imgcls")
    options = {**opts[1], **SMALL}
    mid = preprocessed("imgcls")
    with caplog.at_level(logging.WARNING, "sair.pipelines.torch"):
        gpu(dict(mid), options)  # bucket not configured yet: rho unknown, no warning
        assert not [r for r in caplog.records if "NOT enforced" in r.getMessage()]
        gpu_emulation.set_rate(
            redis_server.url, "torchrho", "infer", rate=1200.0, burst=300, rho=0.2
        )
        torch_models.reset_throttle_warning()
        for _ in range(3):
            gpu(dict(mid), options)
    warned = [r.getMessage() for r in caplog.records if "NOT enforced" in r.getMessage()]
    assert len(warned) == 1 and "rho=0.20" in warned[0], warned
    assert torch_models.stage_rho() == pytest.approx(0.2)
    assert torch_models.interceptor_mode() is None
    torch_models.reset_throttle_warning()


@pytest.mark.skipif(not SHIM.exists(), reason="interceptor not built (make -C gpu_interceptor)")
def test_preloaded_interceptor_is_detected_and_told_its_stage(redis_server: ManagedServer) -> None:
    """The worker's configured stage reaches the shim (SAIR_PIPELINE/SAIR_STAGE) before it
    reads its environment, so a supervised worker without those variables is throttled."""
    code = ("import sys; from sair import gpu_emulation; from sair.pipelines import torch_models as t\n"
            "if sys.argv[1] == 'configure': gpu_emulation.configure('p', 's', 1000.0, None)\n"
            "print(t.interceptor_mode())")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAIR_")}
    env |= {"SAIR_GPU_LOG": "0", "SAIR_REDIS_URL": redis_server.url}

    def mode(arg: str, extra: dict[str, str]) -> str:
        run = subprocess.run([sys.executable, "-c", code, arg], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, env={**env, **extra})  # fmt: skip
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    assert mode("-", {"LD_PRELOAD": str(SHIM)}) == "disabled"  # shim, but no stage known
    assert mode("configure", {"LD_PRELOAD": str(SHIM)}) not in {"None", "disabled"}


def test_stats_layout_matches_the_interceptor_reader() -> None:
    from gpu_interceptor.stats import FIELDS

    assert torch_models.STATS_FIELDS == FIELDS


def test_device_check_script(capsys: pytest.CaptureFixture[str]) -> None:
    if not torch.cuda.is_available():
        assert torch_device_check.main(["--n", "1"]) == 2  # no CUDA: refuses without the flag
    assert torch_device_check.main(["--n", "2", "--allow-cpu", "--pipelines", "imgcls",
                                    ]) == 0  # fmt: skip
    last = capsys.readouterr().out.strip().splitlines()[-1]
    import json

    result = json.loads(last)
    assert result["imgcls_p50_ms"] > 0 and result["imgcls_load_s"] > 0
