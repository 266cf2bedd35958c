"""The OpenAI-compatible endpoints and continuous batching, driven by the official ``openai`` client.

A tiny random chat Llama (ChatML template, ``tests/helpers_chat.py``) is served by the real
uvicorn server with slimtune's protocol in a background thread on a free loopback port; the
``openai`` client talks to it. Every answer is compared with
:func:`slimtune.runtime.generate.generate_ids` on the same prompt (the reference: greedy, seeded
sampling, stop strings), usage with the tokenizer's counts, and every refusal with the
exception the client raises for it. The decoder backend's join/release of KV-cache rows is
checked step by step against generating each prompt alone.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers_chat import make_tiny_chat_llama
from tiny import make_tiny_bert

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from slimtune.runtime.generate import SamplingConfig, generate_ids, prompt_ids  # noqa: E402
from slimtune.serve.app import ServeConfig, create_app, load_runner  # noqa: E402
from slimtune.serve.models import Runner  # noqa: E402
from slimtune.serve.server import server_config  # noqa: E402

MODEL = "tiny-chat"
LIMIT = 24  # the server's --max-new-tokens
QUESTIONS = ["good movie", "was the plot boring ?", "a great film , fresh or rotten ?", "bad", "love the actor"]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # init_std 0.5: the random model's greedy answers vary (not one token repeated)
    return make_tiny_chat_llama(tmp_path_factory.mktemp("chat") / "m", init_std=0.5)


@pytest.fixture(scope="module")
def runner(chat_dir: Path) -> Runner:
    return load_runner(str(chat_dir))


@contextmanager
def serving(runner: Runner, **kw: Any) -> Iterator[str]:
    """The app under uvicorn + slimtune's protocol in a thread; yields its base URL."""
    cfg = ServeConfig(max_new_tokens=LIMIT, log_level="warning", **kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(create_app(runner, cfg, model_name=MODEL), cfg))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        t.join(30)
        sock.close()


@pytest.fixture(scope="module")
def url(runner: Runner) -> Iterator[str]:
    with serving(runner) as u:
        yield u


@pytest.fixture(scope="module")
def client(url: str) -> Any:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _reference(runner: Runner, ids: list[int], **sampling: Any) -> Any:
    """What ``slimtune generate`` makes of these prompt ids (the model alone, batch of one)."""
    return generate_ids(runner.lm.model, runner.tokenizer, [ids], SamplingConfig(**sampling))[0]


def _chat_ids(runner: Runner, question: str) -> list[int]:
    return prompt_ids(runner.tokenizer, [{"role": "user", "content": question}])


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def _completion_tokens(gen: Any, runner: Runner) -> int:
    return len(gen.token_ids) - (gen.finish_reason == "eos")


# --------------------------------------------------------------------------------------------
# Answers equal the reference
# --------------------------------------------------------------------------------------------


def test_models_list_and_retrieve(client: Any) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_greedy_equals_generate_and_usage_counts_tokens(client: Any, runner: Runner) -> None:
    reasons = set()
    for q in QUESTIONS[:3]:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                           temperature=0, max_tokens=12)
        ids = _chat_ids(runner, q)
        ref = _reference(runner, ids, max_new_tokens=12)
        assert r.choices[0].message.content == ref.text
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
        assert r.usage.prompt_tokens == len(ids) == len(runner.tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)["input_ids"])
        assert r.usage.completion_tokens == _completion_tokens(ref, runner)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.model == MODEL and r.id.startswith("chatcmpl-")
        reasons.add(r.choices[0].finish_reason)
    assert "length" in reasons  # 12 tokens of a random model: at least one answer is cut


def test_system_and_text_parts_render_like_the_template(client: Any, runner: Runner) -> None:
    msgs = [{"role": "developer", "content": "review ?"},
            {"role": "user", "content": [{"type": "text", "text": "good "}, {"type": "text", "text": "movie"}]}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=8)
    ids = prompt_ids(runner.tokenizer, [{"role": "system", "content": "review ?"},
                                        {"role": "user", "content": "good movie"}])
    assert r.choices[0].message.content == _reference(runner, ids, max_new_tokens=8).text
    assert r.usage.prompt_tokens == len(ids)


def test_chat_stream_chunks_add_up(client: Any, runner: Runner) -> None:
    q = QUESTIONS[1]
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                                 temperature=0, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    ref = _reference(runner, _chat_ids(runner, q), max_new_tokens=10)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length" if ref.finish_reason == "length" else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == _completion_tokens(ref, runner)
    assert chunks[-1].usage.prompt_tokens == len(_chat_ids(runner, q))
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    # without include_usage: no usage chunk
    plain = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                                temperature=0, max_tokens=10, stream=True))
    assert all(c.choices for c in plain) and "".join(c.choices[0].delta.content or "" for c in plain) == ref.text


def test_completions_prompt_string_list_and_stream(client: Any, runner: Runner) -> None:
    tok = runner.tokenizer
    prompts = ["the movie was", "bad plot and"]
    refs = [_reference(runner, tok(p)["input_ids"], max_new_tokens=7) for p in prompts]
    one = client.completions.create(model=MODEL, prompt=prompts[0], temperature=0, max_tokens=7)
    assert one.choices[0].text == refs[0].text and one.object == "text_completion"
    assert one.usage.prompt_tokens == len(tok(prompts[0])["input_ids"])
    both = client.completions.create(model=MODEL, prompt=prompts, temperature=0, max_tokens=7)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [r.text for r in refs]
    assert both.usage.completion_tokens == sum(_completion_tokens(r, runner) for r in refs)
    ids = client.completions.create(model=MODEL, prompt=tok(prompts[1])["input_ids"], temperature=0, max_tokens=7)
    assert ids.choices[0].text == refs[1].text  # token ids as the prompt
    texts = ["", ""]
    for c in client.completions.create(model=MODEL, prompt=prompts, temperature=0, max_tokens=7, stream=True):
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert texts == [r.text for r in refs]
    default = client.completions.create(model=MODEL, prompt=prompts[0], temperature=0)  # OpenAI's default: 16
    assert default.usage.completion_tokens <= 16


def test_stop_strings_cut_like_generate(client: Any, runner: Runner) -> None:
    ids = _chat_ids(runner, QUESTIONS[2])
    full = _reference(runner, ids, max_new_tokens=16).text
    words = full.split()
    assert len(words) >= 4, full
    stop = words[2]
    want = _reference(runner, ids, max_new_tokens=16, stop=[stop, "never-there"])
    assert want.finish_reason == "stop" and want.text == full[:full.index(stop)]
    for stream in (False, True):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[2]}],
                                           temperature=0, max_tokens=16, stop=[stop, "never-there"], stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert (text, finish) == (want.text, ["stop"])
        else:
            assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want.text, "stop")
    single = client.completions.create(model=MODEL, prompt="the movie was", temperature=0, max_tokens=16, stop=stop)
    ref = _reference(runner, runner.tokenizer("the movie was")["input_ids"], max_new_tokens=16, stop=[stop])
    assert single.choices[0].text == ref.text


def test_seeded_sampling_equals_generate(client: Any, runner: Runner) -> None:
    ids = _chat_ids(runner, QUESTIONS[0])
    kw = {"temperature": 0.9, "top_p": 0.8, "max_tokens": 12}
    a, b = (client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                           seed=7, **kw).choices[0].message.content for _ in range(2))
    ref = _reference(runner, ids, max_new_tokens=12, temperature=0.9, top_p=0.8, seed=7)
    assert a == b == ref.text
    other = _reference(runner, ids, max_new_tokens=12, temperature=0.9, top_p=0.8, seed=8)
    assert other.text != ref.text  # the seed matters, so the equality above means something


# --------------------------------------------------------------------------------------------
# Continuous batching
# --------------------------------------------------------------------------------------------


def test_concurrent_requests_share_decode_steps_and_match_alone(url: str, client: Any, runner: Runner) -> None:
    steps0, rows0 = _metric(url, "slimtune_batch_size_count"), _metric(url, "slimtune_batch_size_sum")
    jobs = [(q, 6 + 2 * i, i % 2 == 1) for i, q in enumerate(QUESTIONS * 2)]  # staggered ends, half streamed

    def ask(job: tuple[str, int, bool]) -> str:
        q, n, stream = job
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                           temperature=0, max_tokens=n, stream=stream)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
        return r.choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as ex:
        got = list(ex.map(ask, jobs))
    want = [_reference(runner, _chat_ids(runner, q), max_new_tokens=n).text for q, n, _ in jobs]
    assert got == want
    steps = _metric(url, "slimtune_batch_size_count") - steps0
    rows = _metric(url, "slimtune_batch_size_sum") - rows0
    assert rows / steps > 1.5, (rows, steps)  # sequences were decoded together, not one by one
    assert _metric(url, "slimtune_live_sequences") == 0


def test_decoder_join_and_release_match_each_prompt_alone(runner: Runner) -> None:
    """Drive the torch backend by hand: sequences join a running batch at different steps, with
    prompts of different lengths, and leave it early; each one's greedy tokens and logits equal
    generating it alone."""
    lm = runner.lm
    prompts = {10: _chat_ids(runner, QUESTIONS[0]), 11: _chat_ids(runner, QUESTIONS[2]),
               12: _chat_ids(runner, QUESTIONS[3])}
    alone = {s: _reference(runner, p, max_new_tokens=9).token_ids for s, p in prompts.items()}
    starts, ends = {10: 0, 11: 2, 12: 4}, {10: 6, 11: 9, 12: 8}  # step at which each joins / has its tokens
    got: dict[int, list[int]] = {s: [] for s in prompts}
    seen: dict[int, list[torch.Tensor]] = {s: [] for s in prompts}  # the logits each token was chosen from
    finished: set[int] = set()
    for step in range(12):
        live = [s for s in prompts if starts[s] < step and s not in finished]
        if live:
            logits = lm.decode(live, [got[s][-1] for s in live])
            for s, row in zip(live, logits, strict=True):
                got[s].append(int(row.argmax()))
                seen[s].append(row)
        new = [s for s in prompts if starts[s] == step]
        if new:
            for s, row in zip(new, lm.prefill([(s, prompts[s]) for s in new]), strict=True):
                got[s].append(int(row.argmax()))
                seen[s].append(row)
        done = [s for s in prompts if s not in finished and len(got[s]) == ends[s] - starts[s]]
        lm.release(done)
        finished.update(done)
        assert lm.held() == len([s for s in prompts if starts[s] <= step and s not in finished])
    assert lm.held() == 0
    for s in prompts:
        n = ends[s] - starts[s]
        assert got[s] == alone[s][:n], s
        full = torch.tensor([prompts[s] + got[s][:-1]])  # one pass, no cache, no padding: the reference
        with torch.no_grad():
            ref = lm.model(input_ids=full).logits[0, len(prompts[s]) - 1:]
        torch.testing.assert_close(torch.stack(seen[s]), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("how", ["backend holds one sequence", "max_batch_tokens"])
def test_one_at_a_time_when_nothing_more_fits(chat_dir: Path, how: str) -> None:
    """A backend that cannot batch sequences (``max_batch = 1``), or a cache budget that fits one
    sequence, serves concurrent requests one after the other, with the same answers."""
    runner = load_runner(str(chat_dir))
    kw: dict[str, Any] = {}
    if how == "max_batch_tokens":
        kw["max_batch_tokens"] = 2 * (len(_chat_ids(runner, QUESTIONS[0])) + 5) - 1  # not two of them
    else:
        runner.lm.max_batch = 1  # what a backend that cannot batch sequences reports
    with serving(runner, **kw) as u:
        c = openai.OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0, timeout=60)
        with ThreadPoolExecutor(3) as ex:
            got = list(ex.map(lambda q: c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=5
            ).choices[0].message.content, [QUESTIONS[0], QUESTIONS[3], QUESTIONS[0]]))
        steps = _metric(u, "slimtune_batch_size_count")
        assert steps >= 3 * 4 and _metric(u, "slimtune_batch_size_sum") == steps  # one sequence per step
    want = [_reference(runner, _chat_ids(runner, q), max_new_tokens=5).text for q in (QUESTIONS[0], QUESTIONS[3])]
    assert got == [want[0], want[1], want[0]]


def test_stream_closed_by_client_stops_its_sequence(chat_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = load_runner(str(chat_dir))
    real = runner.lm.decode

    def slow(seq_ids: Any, tokens: Any) -> torch.Tensor:  # 24 steps take ~1 s: time to hang up mid-answer
        time.sleep(0.04)
        return real(seq_ids, tokens)

    monkeypatch.setattr(runner.lm, "decode", slow)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "good"}], "max_tokens": LIMIT, "stream": True,
            "temperature": 0}
    with serving(runner) as u:
        with httpx.stream("POST", f"{u}/v1/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            first = next(ln for ln in r.iter_lines() if ln.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        deadline = time.monotonic() + 10
        while _metric(u, "slimtune_live_sequences") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _metric(u, "slimtune_live_sequences") == 0
        assert 0 < _metric(u, "slimtune_completion_tokens_total") < LIMIT  # stopped early, not run to the end
        assert httpx.get(f"{u}/healthz").status_code == 200


# --------------------------------------------------------------------------------------------
# Refusals: OpenAI's error shape, the client's matching exceptions, never a 5xx
# --------------------------------------------------------------------------------------------


def test_refusals_raise_the_clients_exceptions(client: Any, url: str) -> None:
    msgs = [{"role": "user", "content": "good"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=msgs)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert "tiny-chat" in e.value.body["message"]
    cases = [
        ({"max_tokens": LIMIT + 1}, "max_tokens", f"({LIMIT}"),
        ({"n": 2}, "n", "n=1"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", "'user'"),
        ({"messages": [{"role": "user"}]}, "messages.0.content", "required"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages.0.content", ""),
        ({"temperature": 3}, "temperature", "2"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"presence_penalty": 1.0}, "presence_penalty", "not supported"),
        ({"extra_body": {"tools": []}}, "tools", "Extra inputs"),
        ({"extra_body": {"max_token": 5}}, "max_token", "Extra inputs"),
        ({"stream_options": {"include_usage": True}}, None, "stream: true"),
    ]
    for kw, param, words in cases:
        args = {"model": MODEL, "messages": msgs, **kw}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**args)
        assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error", kw
        assert e.value.body["param"] == param and words in e.value.body["message"], (kw, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=" ".join(["good"] * 300), max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[10 ** 6], max_tokens=4)
    assert e.value.body["code"] == "invalid_token"
    raw = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert _metric(url, 'slimtune_batch_errors_total') == 0
    text = httpx.get(f"{url}/metrics").text
    assert not re.findall(r'status="5\d\d"', text)  # nothing above answered 5xx
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_api_key_and_classifier_server(runner: Runner, tmp_path: Path) -> None:
    with serving(runner, api_key="s3cret") as u:
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=f"{u}/v1", api_key="wrong", max_retries=0).models.list()
        assert e.value.body["type"] == "authentication_error"
        ok = openai.OpenAI(base_url=f"{u}/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "good"}],
                                          max_tokens=2).usage.completion_tokens <= 2
    bert = load_runner(str(make_tiny_bert(tmp_path / "bert")))
    with serving(bert) as u:
        c = openai.OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "good"}])
        assert e.value.body["code"] == "wrong_task" and "/v1/classify" in e.value.body["message"]


def test_generate_endpoint_runs_on_the_engine(url: str, runner: Runner) -> None:
    r = httpx.post(f"{url}/v1/generate", json={"prompt": "the movie was", "max_new_tokens": 6})
    ref = _reference(runner, runner.tokenizer("the movie was")["input_ids"], max_new_tokens=6)
    assert r.status_code == 200
    assert (r.json()["text"], r.json()["completion_tokens"]) == (ref.text, _completion_tokens(ref, runner))


def test_engine_survives_a_failing_forward(chat_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = load_runner(str(chat_dir))
    real = runner.lm.prefill

    def flaky(seqs: Any) -> torch.Tensor:
        if any(len(p) == 3 for _, p in seqs):  # one poisoned prompt length
            raise RuntimeError("boom")
        return real(seqs)

    real_decode, fail_next = runner.lm.decode, []

    def flaky_decode(seq_ids: Any, tokens: Any) -> torch.Tensor:
        if fail_next:
            fail_next.pop()
            raise RuntimeError("boom")
        return real_decode(seq_ids, tokens)

    monkeypatch.setattr(runner.lm, "prefill", flaky)
    monkeypatch.setattr(runner.lm, "decode", flaky_decode)
    with serving(runner) as u:
        c = openai.OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=MODEL, prompt="good movie plot", max_tokens=3)  # 3 tokens: poisoned
        assert e.value.body["code"] == "model_error"
        assert c.completions.create(model=MODEL, prompt="good movie", max_tokens=3).usage.completion_tokens <= 3
        fail_next.append(1)  # the next decode pass raises
        with pytest.raises(openai.InternalServerError):
            c.completions.create(model=MODEL, prompt="good movie", max_tokens=3)
        want = _reference(runner, runner.tokenizer("good movie")["input_ids"], max_new_tokens=3).text
        assert c.completions.create(model=MODEL, prompt="good movie", max_tokens=3, temperature=0).choices[0].text == want
        assert httpx.get(f"{u}/healthz").status_code == 200 and _metric(u, "slimtune_live_sequences") == 0


def test_model_id_setting_names_the_model(runner: Runner) -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app(runner, ServeConfig(model_id="my-llm"), model_name=MODEL)) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["my-llm"]
        ok = c.post("/v1/completions", json={"model": "my-llm", "prompt": "good", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["model"] == "my-llm"
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "good"}).status_code == 404
