"""Serving: validation (every bad input is a 4xx, server healthy after), batching, 503, API key, generate.

Tiny random models are built in-process by ``tiny.py`` over this file's word list, served through
FastAPI's TestClient, which runs the app's lifespan (so the real batcher thread runs).
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from tiny import SPECIALS, make_tiny_bert, make_tiny_llama

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from slimtune.serve.app import Runner, ServeConfig, create_app, load_runner  # noqa: E402

WORDS = "good great fine love bad awful boring movie film plot the a is was and but very not".split()


def _bert_folder(out: Path, id2label: dict[int, str] | None = None) -> Path:
    """Tiny BERT classifier (labels negative/positive) over the words above."""
    from transformers import AutoTokenizer

    id2label = id2label or {0: "negative", 1: "positive"}
    make_tiny_bert(out, num_labels=len(id2label), vocab=[*SPECIALS, *WORDS, ".", ","], id2label=id2label)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.unk_token_id not in tok("good film")["input_ids"]  # the vocab really loaded
    return out


def _llama_folder(out: Path) -> Path:
    """Tiny Llama LM (64 positions) over the words above; EOS is token 2."""
    return make_tiny_llama(out, vocab=["<unk>", "<s>", "</s>", *WORDS, ".", ","], max_positions=64)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _bert_folder(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def bert_runner(bert_dir: Path) -> Runner:
    return load_runner(str(bert_dir))


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_classify_matches_direct_forward(bert_dir: Path, bert_runner: Runner) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["a good movie", "the plot was very boring and not good at all", "awful"]
    with TestClient(create_app(bert_runner, ServeConfig(max_wait_ms=1))) as c:
        r = c.post("/v1/classify", json={"texts": texts})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [set(x["probabilities"]) for x in res] == [{"negative", "positive"}] * 3
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    tok = AutoTokenizer.from_pretrained(bert_dir)
    for text, got in zip(texts, res, strict=True):  # one at a time, no padding: the reference
        with torch.no_grad():
            p = model(**tok(text, return_tensors="pt")).logits.softmax(-1)[0]
        np.testing.assert_allclose([got["probabilities"]["negative"], got["probabilities"]["positive"]],
                                   p.numpy(), atol=1e-4)
        assert got["label"] == ["negative", "positive"][int(p.argmax())]


def test_pairs(bert_runner: Runner) -> None:
    with TestClient(create_app(bert_runner)) as c:
        r = c.post("/v1/classify", json={"pairs": [["a good film", "a great movie"], ["bad", "good"]]})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


BAD_CLASSIFY = [  # (name, kwargs for client.post, expected status)
    ("malformed json", {"content": b'{"texts": ["a"', "headers": {"content-type": "application/json"}}, 400),
    ("invalid utf-8", {"content": b'{"texts": ["\xff\xfe"]}', "headers": {"content-type": "application/json"}}, 400),
    ("deeply nested json", {"content": b"[" * 5000 + b"]" * 5000, "headers": {"content-type": "application/json"}}, 400),
    ("empty body", {"content": b"", "headers": {"content-type": "application/json"}}, 422),
    ("body is a list", {"json": ["a good film"]}, 422),
    ("texts is a string", {"json": {"texts": "a good film"}}, 422),
    ("texts has a number", {"json": {"texts": ["good", 5]}}, 422),
    ("texts is null", {"json": {"texts": None}}, 422),
    ("empty list", {"json": {"texts": []}}, 422),
    ("empty string", {"json": {"texts": [""]}}, 422),
    ("whitespace only", {"json": {"texts": ["   \n\t"]}}, 422),
    ("too many texts", {"json": {"texts": ["good"] * 9}}, 422),
    ("text too long", {"json": {"texts": ["good " * 50]}}, 422),
    ("unknown field", {"json": {"texts": ["good"], "lang": "en"}}, 422),
    ("texts and pairs", {"json": {"texts": ["good"], "pairs": [["a", "b"]]}}, 422),
    ("neither texts nor pairs", {"json": {}}, 422),
    ("pair of three", {"json": {"pairs": [["a", "b", "c"]]}}, 422),
    ("pair with empty side", {"json": {"pairs": [["good", ""]]}}, 422),
    ("not json content type", {"content": b"texts=good", "headers": {"content-type": "text/plain"}}, 415),
    ("body too large", {"json": {"texts": ["good"] * 5000}}, 413),
]


def test_bad_inputs_are_4xx_and_server_stays_healthy(bert_runner: Runner) -> None:
    cfg = ServeConfig(max_texts=8, max_chars=100, max_body_bytes=20_000, api_key="s3cret")
    auth = {"authorization": "Bearer s3cret"}
    with TestClient(create_app(bert_runner, cfg), raise_server_exceptions=False) as c:
        kinds = 0
        for name, kw, want in BAD_CLASSIFY:
            kw = dict(kw)
            kw["headers"] = {**kw.get("headers", {}), **auth}
            r = c.post("/v1/classify", **kw)
            assert r.status_code == want, (name, r.status_code, r.text)
            msg = r.json()["error"]["message"]
            assert isinstance(msg, str) and msg, name
            kinds += 1
        others = [
            ("no api key", c.post("/v1/classify", json={"texts": ["good"]}), 401),
            ("wrong api key", c.post("/v1/classify", json={"texts": ["good"]}, headers={"x-api-key": "nope"}), 401),
            ("wrong endpoint for task", c.post("/v1/generate", json={"prompt": "the"}, headers=auth), 400),
            ("GET on a POST route", c.get("/v1/classify", headers=auth), 405),
            ("unknown path", c.post("/v1/translate", json={}, headers=auth), 404),
            ("metrics without key", c.get("/metrics"), 401),
        ]
        for name, r, want in others:
            assert r.status_code == want, (name, r.status_code, r.text)
            assert r.json()["error"]["message"], name
            kinds += 1
        assert kinds >= 15
        assert c.post("/v1/classify", json={"texts": ["no key"]}).headers.get("www-authenticate") == "Bearer"
        # Still healthy and still answering correctly.
        assert c.get("/healthz").json()["status"] == "ok"
        r = c.post("/v1/classify", json={"texts": ["a good film"]}, headers={"x-api-key": "s3cret"})
        assert r.status_code == 200 and r.json()["results"][0]["label"] in {"negative", "positive"}
        text = c.get("/metrics", headers=auth).text
        assert 'slimtune_requests_total{endpoint="/v1/classify",status="422"}' in text
        assert not re.search(r'status="5\d\d"', text)


def test_error_message_names_the_field(bert_runner: Runner) -> None:
    with TestClient(create_app(bert_runner, ServeConfig(max_texts=2))) as c:
        r = c.post("/v1/classify", json={"texts": ["good", "bad", "fine"]})
        assert r.status_code == 422 and "texts" in r.json()["error"]["message"]
        r = c.post("/v1/classify", json={"texts": ["good"], "oops": 1})
        assert "oops" in r.json()["error"]["message"]


def test_concurrent_requests_are_batched(bert_runner: Runner) -> None:
    cfg = ServeConfig(max_batch_size=16, max_wait_ms=300)
    texts = [" ".join(WORDS[: 2 + i]) for i in range(8)]
    with TestClient(create_app(bert_runner, cfg)) as c:
        single = {t: c.post("/v1/classify", json={"texts": [t]}).json()["results"][0] for t in texts}
        before = _metric(c.get("/metrics").text, "slimtune_batch_size_count")
        with ThreadPoolExecutor(8) as ex:
            rs = list(ex.map(lambda t: c.post("/v1/classify", json={"texts": [t]}), texts))
        metrics = c.get("/metrics").text
    assert all(r.status_code == 200 for r in rs)
    forwards = _metric(metrics, "slimtune_batch_size_count") - before
    assert forwards < 8, f"8 concurrent requests took {forwards} forward passes"
    assert _metric(metrics, 'slimtune_batch_size_bucket{le="1"}') < _metric(metrics, "slimtune_batch_size_count")
    for t, r in zip(texts, rs, strict=True):  # padded in a batch == alone
        got, ref = r.json()["results"][0]["probabilities"], single[t]["probabilities"]
        assert got == pytest.approx(ref, abs=1e-4)


def _blocking_runner(bert_runner: Runner, gate: threading.Event, entered: threading.Event,
                     fail_on: str | None = None) -> Runner:
    tok = bert_runner.tokenizer
    bad_ids = tok(fail_on)["input_ids"][1:-1] if fail_on else None

    def logits(batch: dict) -> np.ndarray:
        entered.set()
        gate.wait(10)
        if bad_ids and any(bad_ids[0] in row for row in batch["input_ids"].tolist()):
            raise RuntimeError("poisoned input")
        return np.zeros((batch["input_ids"].shape[0], 2), dtype=np.float32)

    return Runner("classification", "fake", tok, 32, ["negative", "positive"], logits=logits)


def test_queue_full_gives_503_with_retry_after(bert_runner: Runner) -> None:
    gate, entered = threading.Event(), threading.Event()
    runner = _blocking_runner(bert_runner, gate, entered)
    app = create_app(runner, ServeConfig(max_batch_size=1, max_wait_ms=0, max_queue=2))
    with TestClient(app) as c, ThreadPoolExecutor(3) as ex:
        first = ex.submit(c.post, "/v1/classify", json={"texts": ["good"]})
        assert entered.wait(5)  # the worker holds request 1 inside the model
        waiting = [ex.submit(c.post, "/v1/classify", json={"texts": ["bad"]}) for _ in range(2)]
        deadline = time.time() + 5
        while app.state.batcher.depth() < 2 and time.time() < deadline:
            time.sleep(0.01)
        r = c.post("/v1/classify", json={"texts": ["fine"]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "overloaded"
        assert "slimtune_queue_depth 2" in c.get("/metrics").text
        gate.set()
        assert [f.result().status_code for f in [first, *waiting]] == [200, 200, 200]
        assert c.get("/healthz").status_code == 200


def test_model_error_fails_only_its_request(bert_runner: Runner) -> None:
    gate, entered = threading.Event(), threading.Event()
    gate.set()
    runner = _blocking_runner(bert_runner, gate, entered, fail_on="awful")
    with TestClient(create_app(runner, ServeConfig(max_batch_size=8, max_wait_ms=200)),
                    raise_server_exceptions=False) as c, ThreadPoolExecutor(4) as ex:
        texts = ["good", "awful", "bad", "fine"]
        rs = list(ex.map(lambda t: c.post("/v1/classify", json={"texts": [t]}), texts))
        assert [r.status_code for r in rs] == [200, 500, 200, 200]
        assert rs[1].json()["error"]["type"] == "model_error"
        assert c.get("/healthz").json()["status"] == "ok"
        assert c.post("/v1/classify", json={"texts": ["good"]}).status_code == 200


def test_request_larger_than_batch_and_ordering(bert_runner: Runner) -> None:
    texts = [" ".join(WORDS[: 1 + (7 * i) % 15]) for i in range(10)]
    with TestClient(create_app(bert_runner, ServeConfig(max_batch_size=3, max_texts=16))) as c:
        whole = c.post("/v1/classify", json={"texts": texts}).json()["results"]
        one = [c.post("/v1/classify", json={"texts": [t]}).json()["results"][0] for t in texts]
    for a, b in zip(whole, one, strict=True):  # results come back in request order
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-4)


def test_metrics_and_openapi(bert_runner: Runner) -> None:
    with TestClient(create_app(bert_runner)) as c:
        c.post("/v1/classify", json={"texts": ["good"]})
        text = c.get("/metrics").text
        spec = c.get("/openapi.json").json()
        docs = c.get("/docs")
    assert 'slimtune_requests_total{endpoint="/v1/classify",status="200"} 1' in text
    assert "# TYPE slimtune_request_duration_seconds histogram" in text
    assert 'slimtune_request_duration_seconds_bucket{endpoint="/v1/classify",le="+Inf"} 1' in text
    assert "slimtune_queue_depth 0" in text
    assert {"/v1/classify", "/v1/generate", "/healthz", "/metrics"} <= set(spec["paths"])
    assert docs.status_code == 200


def test_generate_tiny_llama(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    d = _llama_folder(tmp_path / "llama")
    runner = load_runner(str(d))
    assert runner.task == "causal-lm"
    with TestClient(create_app(runner, ServeConfig(max_new_tokens=16, max_wait_ms=100))) as c, \
            ThreadPoolExecutor(3) as ex:
        prompts = ["the movie was", "a good film and the plot", "bad"]
        rs = list(ex.map(lambda p: c.post("/v1/generate", json={"prompt": p, "max_new_tokens": 6}), prompts))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        sampled = c.post("/v1/generate", json={"prompt": "the", "max_new_tokens": 4, "temperature": 0.8})
        assert sampled.status_code == 200 and sampled.json()["completion_tokens"] <= 4
        bad = [c.post("/v1/generate", json=b).status_code for b in (
            {"prompt": "the", "max_new_tokens": 17}, {"prompt": "the", "max_new_tokens": 0},
            {"prompt": "the", "temperature": -1}, {"prompt": ""}, {"prompt": "the", "max_new_tokens": "5"},
            {"prompt": "the", "max_new_tokens": True}, {"prompts": ["the"]},
            {"prompt": " ".join(["good"] * 60)})]
        assert bad == [422] * 8
        assert c.post("/v1/classify", json={"texts": ["good"]}).status_code == 400
        assert c.get("/healthz").json()["task"] == "causal-lm"
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    tok = runner.tokenizer
    for p, r in zip(prompts, rs, strict=True):  # greedy in a left-padded batch == greedy alone
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id or 2)
        new = ref[0, ids.shape[1]:].tolist()
        if 2 in new:
            new = new[:new.index(2)]
        assert r.json()["completion_tokens"] == len(new)
        assert r.json()["text"] == tok.decode(new, skip_special_tokens=True)


def test_onnx_folder_served_like_torch(bert_dir: Path, bert_runner: Runner, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification

    d = tmp_path / "onnx"
    shutil.copytree(bert_dir, d)
    (d / "model.safetensors").unlink()
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    ids = torch.tensor([[2, 5, 6, 3]])
    torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(d / "model.onnx"),
                      input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["logits"],
                      dynamic_axes={n: {0: "b", 1: "t"} for n in ("input_ids", "attention_mask", "token_type_ids")},
                      dynamo=False)
    runner = load_runner(str(d))
    assert runner.backend == "onnxruntime"
    texts = ["a good movie", "the plot was boring", "awful"]
    with TestClient(create_app(runner)) as c:
        got = c.post("/v1/classify", json={"texts": texts}).json()["results"]
    with TestClient(create_app(bert_runner)) as c:
        ref = c.post("/v1/classify", json={"texts": texts}).json()["results"]
    for a, b in zip(got, ref, strict=True):
        assert a["label"] == b["label"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-4)


def test_quantized_folder_served(bert_dir: Path, bert_runner: Runner, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from slimtune.compress.quant import recipe as quantize

    model = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    cfg = quantize.Int8WeightConfig()
    quantize.quantize_(model, cfg)
    d = quantize.save_quantized(model, tmp_path / "q", cfg, bert_runner.tokenizer)
    runner = load_runner(str(d))
    assert runner.backend == "torch-quantized"
    texts = ["a good movie", "the plot was boring"]
    with TestClient(create_app(runner)) as c:
        got = c.post("/v1/classify", json={"texts": texts}).json()["results"]
    with TestClient(create_app(bert_runner)) as c:
        ref = c.post("/v1/classify", json={"texts": texts}).json()["results"]
    for a, b in zip(got, ref, strict=True):  # int8 weights: close to fp32, not equal
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=0.05)


def test_cli_registers_serve(tmp_path: Path) -> None:
    """Flags derive from ServeConfig; defaults come from the dataclass, ``--config`` is under the flags."""
    from slimtune.cli.common import resolve_settings
    from slimtune.cli.main import build_parser

    args = build_parser(["serve"]).parse_args(["serve", "--model", "x", "--max-batch-size", "4", "--api-key", "k",
                                      "--threads", "2", "--max-wait-ms", "2.5"])
    cfg = resolve_settings(ServeConfig, args, "serve")
    assert (cfg.max_batch_size, cfg.api_key, cfg.threads, cfg.max_wait_ms, cfg.host) == (4, "k", 2, 2.5, "127.0.0.1")
    flat = tmp_path / "serve.yaml"
    flat.write_text("port: 9000\nmax_batch_size: 8\n")
    cfg = resolve_settings(ServeConfig, build_parser(["serve"]).parse_args(["serve", "--config", str(flat), "--max-batch-size", "2"]),
                           "serve")
    assert (cfg.port, cfg.max_batch_size, cfg.model) == (9000, 2, None)


def test_serve_config_ranges_exit_2_before_any_weight(capsys: pytest.CaptureFixture[str]) -> None:
    from slimtune.cli.main import main

    with pytest.raises(ValueError, match="--max-queue: must be >= 1"):
        create_app(None, ServeConfig(max_queue=0))  # type: ignore[arg-type]
    assert main(["serve", "--model", "missing", "--max-wait-ms", "-1"]) == 2
    assert "slimtune serve: error: --max-wait-ms: must be >= 0, got -1.0" in capsys.readouterr().err
    assert main(["serve", "--max-batch-size", "4"]) == 2
    assert "--model: is required" in capsys.readouterr().err


def test_device_is_checked_before_any_weight_loads(bert_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from slimtune.cli.main import main
    from slimtune.serve.models import check_device

    check_device("cpu")
    with pytest.raises(ValueError, match="--device 'gpu'"):
        check_device("gpu")
    assert load_runner(str(bert_dir), device="cpu").device == "cpu"
    if torch.cuda.is_available():
        check_device("cuda")
        with pytest.raises(ValueError, match="CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ValueError, match="no CUDA device"):
            load_runner(str(bert_dir), device="cuda")
        assert main(["serve", "--model", str(bert_dir), "--device", "cuda"]) == 2  # one line, no traceback
        assert "slimtune serve: error: --device cuda: no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runner_matches_cpu(bert_dir: Path, bert_runner: Runner) -> None:
    gpu = load_runner(str(bert_dir), device="cuda")
    texts = ["good movie", "awful plot , very bad", "fine"]
    with TestClient(create_app(gpu)) as c:
        got = c.post("/v1/classify", json={"texts": texts}).json()["results"]
        assert c.get("/healthz").json()["device"] == "cuda"
    with TestClient(create_app(bert_runner)) as c:
        ref = c.post("/v1/classify", json={"texts": texts}).json()["results"]
    for a, b in zip(got, ref, strict=True):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-4)


def test_split_by_length_trades_padding_against_forward_cost() -> None:
    from slimtune.serve.batching import split_by_length

    def cost(lengths: list[int], chunks: list[tuple[int, int]], c0: int) -> int:
        return sum(c0 + (b - a) * lengths[b - 1] for a, b in chunks)

    same = [12] * 20
    assert split_by_length(same, 32, 32) == [(0, 20)]  # nothing to save: one forward
    capped = split_by_length(same, 32, 8)  # row cap respected, fewest forwards
    assert len(capped) == 3 and all(b - a <= 8 for a, b in capped)
    mixed = [5] * 8 + [120] * 8  # one batch would pad 8 short rows to 120 tokens
    assert split_by_length(mixed, 32, 32) == [(0, 8), (8, 16)]
    assert split_by_length(mixed, 10_000, 32) == [(0, 16)]  # huge per-forward cost: never split
    lengths = sorted([3, 7, 9, 15, 22, 23, 40, 41, 44, 80, 90, 128])
    for c0 in (0, 8, 32, 200):
        chunks = split_by_length(lengths, c0, 5)
        assert chunks[0][0] == 0 and chunks[-1][1] == len(lengths)
        assert all(a < b and b - a <= 5 for a, b in chunks)
        assert all(chunks[i][1] == chunks[i + 1][0] for i in range(len(chunks) - 1))
        # optimal: no partition into contiguous chunks of <= 5 rows is cheaper (brute force)
        import itertools

        n, best = len(lengths), None
        for k in range(n):
            for cuts in itertools.combinations(range(1, n), k):
                edges = [0, *cuts, n]
                parts = list(zip(edges, edges[1:], strict=False))
                if all(b - a <= 5 for a, b in parts):
                    c = cost(lengths, parts, c0)
                    best = c if best is None else min(best, c)
        assert cost(lengths, chunks, c0) == best
