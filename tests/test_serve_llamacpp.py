"""``slimtune serve`` on llama.cpp: the GGUF decoder backend against the torch backend on the same model.

A tiny random Llama with a byte-level BPE tokenizer (``tests/helpers_export.py``) is exported to
an f32 GGUF by ``slimtune export`` and put in a GGUF folder (``model.gguf`` beside the HF config
and tokenizer, as ``slimtune quantize`` writes one). The same schedule of continuous batching (two
prompts start together, a third joins mid-way, the first leaves early) runs on
:class:`~slimtune.serve.llamacpp_lm.LlamaCppDecoder` and on
:class:`~slimtune.serve.torch_lm.TorchDecoder`: greedy tokens must be equal and every logits row
close (llama.cpp keeps its KV cache in f16). Then the real server answers the ``openai`` client
from the GGUF folder exactly as it answers from the transformers folder. Skipped, saying why,
where llama-cpp-python is not installed.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers_export import make_bpe_llama

from slimtune.cli.main import main
from slimtune.runtime.llamacpp import llamacpp_available
from slimtune.serve.lm_backend import DecoderBackend
from slimtune.serve.models import load_runner

pytestmark = pytest.mark.skipif(not llamacpp_available(),
                                reason="llama-cpp-python is not installed (pip install slimtune[llamacpp])")
PROMPTS = ["The quick brown fox jumps", "Is 12 + 30 = 42? Yes, it's", "over the lazy dog. The fox"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(transformers folder, GGUF folder of the same weights)."""
    base = tmp_path_factory.mktemp("lcpp")
    hf = make_bpe_llama(base / "hf", init_std=0.3)
    assert main(["export", "--model", str(hf), "--output", str(base / "g"), "--format", "gguf", "--quant", "f32",
                 "--no-check"]) == 0
    gg = base / "gguf"
    gg.mkdir()
    shutil.copy(base / "g" / "model.gguf", gg / "model.gguf")
    for f in hf.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, gg / f.name)
    return hf, gg


def drive(lm: DecoderBackend, prompts: list[list[int]], steps: int = 8) -> tuple[dict[int, list[int]],
                                                                                   dict[int, list[np.ndarray]]]:
    """Greedy continuous batching: sequences 0 and 1 start together, 2 joins after 3 steps, 0 leaves after 5."""
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    rows: dict[int, list[np.ndarray]] = {i: [] for i in range(len(prompts))}

    def take(ids: list[int], logits: object) -> None:
        for s, row in zip(ids, logits, strict=True):  # type: ignore[call-overload]
            rows[s].append(row.numpy())
            tokens[s].append(int(row.argmax()))

    take([0, 1], lm.prefill([(0, prompts[0]), (1, prompts[1])]))
    live = [1, 0]  # any order: the backend answers in the order it is asked
    for step in range(steps):
        if step == 3:
            take([2], lm.prefill([(2, prompts[2])]))
            live.append(2)
        if step == 5:
            lm.release([0])
            live.remove(0)
        take(live, lm.decode(live, [tokens[s][-1] for s in live]))
    lm.release(live)
    assert lm.held() == 0
    return tokens, rows


def test_llamacpp_backend_batches_like_the_torch_backend(folders: tuple[Path, Path]) -> None:
    hf, gg = folders
    torch_runner, ll_runner = load_runner(str(hf), threads=1), load_runner(str(gg), threads=1, max_sequences=4)
    assert (torch_runner.backend, ll_runner.backend) == ("torch", "llama.cpp")
    tok = torch_runner.tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    ref_tokens, ref_rows = drive(torch_runner.lm, prompts)
    got_tokens, got_rows = drive(ll_runner.lm, prompts)
    assert got_tokens == ref_tokens
    assert len(set(ref_tokens[1])) > 2  # a continuation that says something, not one token repeated
    for s in ref_rows:
        for ref, got in zip(ref_rows[s], got_rows[s], strict=True):
            assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-2  # llama.cpp's KV cache is f16
    assert ll_runner.lm.eos_ids == torch_runner.lm.eos_ids
    # a freed slot starts clean: the same prompt gives the same logits as it did the first time
    again = ll_runner.lm.prefill([(7, prompts[0])])[0].numpy()
    np.testing.assert_allclose(again, got_rows[0][0], rtol=0, atol=1e-5)
    ll_runner.lm.release([7])


def test_llamacpp_backend_refuses_more_sequences_than_it_holds(folders: tuple[Path, Path]) -> None:
    lm = load_runner(str(folders[1]), threads=1, max_sequences=2).lm
    assert lm is not None and lm.max_batch == 2
    ids = lm.tokenizer("hello there")["input_ids"]
    lm.prefill([(0, ids), (1, ids)])
    with pytest.raises(ValueError, match="room for 0"):
        lm.prefill([(2, ids)])
    with pytest.raises(ValueError, match="every held sequence"):
        lm.decode([0], [1])
    lm.release([0, 1])
    assert lm.held() == 0 and lm.prefill([(3, ids)]).shape[0] == 1


def test_a_gguf_folder_refuses_a_gpu_device(folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("slimtune.serve.models.check_device", lambda device: None)  # as if a GPU were here
    with pytest.raises(ValueError, match="--device cpu"):
        load_runner(str(folders[1]), device="cuda")


def test_openai_client_gets_the_same_answers_from_the_gguf_folder(folders: tuple[Path, Path]) -> None:
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from test_serve_openai import serving  # the real uvicorn server in a thread

    def answers(folder: Path) -> list[str]:
        runner = load_runner(str(folder), threads=1, max_sequences=4)
        with serving(runner) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none")

            def ask(q: str) -> str:
                r = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": q}],
                                                   temperature=0, max_tokens=12)
                return r.choices[0].message.content or ""

            with ThreadPoolExecutor(4) as pool:  # concurrent: continuous batching in both backends
                return list(pool.map(ask, PROMPTS + ["fox", "dog"]))

    ref, got = answers(folders[0]), answers(folders[1])
    assert got == ref
    assert any(a.strip() for a in ref)


def test_bench_times_a_gguf_folder_beside_its_transformers_folder(folders: tuple[Path, Path],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from slimtune.benchmark.generation import bench_decoders

    hf, gg = folders
    res = bench_decoders({"hf": str(hf), "gguf": str(gg)}, seq_lens=[8], repeats=3, warmup=1, new_tokens=4)
    assert res["models"]["gguf"]["kind"] == "gguf" and res["models"]["hf"]["kind"] == "hf"
    assert res["models"]["gguf"]["size_mb"] == pytest.approx((gg / "model.gguf").stat().st_size / 1e6)
    for r in res["models"].values():
        e = r["latency"][0]
        assert e["p50_ms"] > 0 and e["decode_ms_per_token"] > 0 and e["seq_len"] == 8
    with pytest.raises(ValueError, match="batch size 1"):
        bench_decoders({"gguf": str(gg)}, batch_sizes=[2], seq_lens=[8])
    out = gg.parent / "bench.json"
    assert main(["bench", "--model", str(hf), str(gg), "--seq-lens", "8", "--repeats", "2", "--warmup", "1",
                 "--output", str(out)]) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["models"]) == {"hf", "gguf"}


def test_bench_refuses_a_decoder_among_classifiers(folders: tuple[Path, Path], tiny_bert_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--model", str(tiny_bert_dir), str(folders[0]), "--seq-lens", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a causal LM among classifiers" in err[0]
