"""Flag contract of ``slimtune export``.

Every flag is enumerated from the real parser; each has a row giving a non-default value and the
key of the resolved settings it must arrive at (``--print-config``), and without the flag the
value differs. The flags that change what is written are then run for real on a tiny Llama and
``export.json`` / the GGUF file must change accordingly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers_export import make_bpe_llama
from test_flags_generate import flags_of

from slimtune.cli.main import main
from slimtune.runtime.llamacpp import llamacpp_available

# flag -> (arguments after the base, key in the printed YAML, value it must have)
ROWS: dict[str, tuple[list[str], str, Any]] = {
    "--config": (["--config", "{cfg}"], "check_tokens", 7),
    "--model": (["--model", "{llama2}"], "model", "{llama2}"),
    "--adapter": (["--adapter", "{adapter}"], "adapter", "{adapter}"),
    "--format": (["--format", "onnx"], "format", "onnx"),
    "--quant": (["--quant", "q8_0"], "quant", "q8_0"),
    "--output": (["--output", "{root}/other"], "output", "{root}/other"),
    "--overwrite": (["--overwrite"], "overwrite", True),
    "--no-overwrite": (["--config", "{cfg_over}", "--no-overwrite"], "overwrite", False),
    "--embedding-quant": (["--embedding-quant", "f16"], "embedding_quant", "f16"),
    "--pre-tokenizer": (["--pre-tokenizer", "smollm"], "pre_tokenizer", "smollm"),
    "--check": (["--no-check", "--check"], "check", True),
    "--no-check": (["--no-check"], "check", False),
    "--check-prompt": (["--check-prompt", "hello there"], "check_prompt", "hello there"),
    "--check-tokens": (["--check-tokens", "3"], "check_tokens", 3),
    "--threads": (["--threads", "2"], "threads", 2),
    "--opset": (["--opset", "19"], "opset", 19),
    "--onnx-exporter": (["--format", "onnx", "--onnx-exporter", "dynamo"], "onnx_exporter", "dynamo"),
    "--print-config": ([], "model", "{llama}"),
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("export-flags")
    llama = make_bpe_llama(root / "llama")
    llama2 = make_bpe_llama(root / "llama2", layers=1)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(llama), LoraConfig(r=2, target_modules=["q_proj"]))
    peft.save_pretrained(root / "adapter")
    (root / "cfg.yaml").write_text(yaml.safe_dump({"export": {"check_tokens": 7}}))
    (root / "cfg_over.yaml").write_text(yaml.safe_dump({"overwrite": True}))
    return {"root": str(root), "llama": str(llama), "llama2": str(llama2), "adapter": str(root / "adapter"),
            "cfg": str(root / "cfg.yaml"), "cfg_over": str(root / "cfg_over.yaml")}


def _fill(v: Any, p: dict[str, str]) -> Any:
    return v.format(**p) if isinstance(v, str) else [_fill(x, p) for x in v] if isinstance(v, list) else v


def _printed(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, f"{argv}: exit {rc}: {err}"
    return yaml.safe_load(out)


def test_every_export_flag_has_a_row() -> None:
    assert set(ROWS) == set(flags_of("export")), set(ROWS) ^ set(flags_of("export"))


@pytest.mark.parametrize("flag", sorted(ROWS))
def test_export_flag_reaches_its_setting(flag: str, paths: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    extra, key, want = ROWS[flag]
    base = ["export", "--model", paths["llama"], "--format", "gguf", "--output", f"{paths['root']}/out"]
    got = _printed(base + _fill(extra, paths) + ["--print-config"], capsys)
    assert got[key] == _fill(want, paths), (flag, got[key])
    if flag == "--print-config":
        return
    i = extra.index(flag)
    n = 2 if i + 1 < len(extra) and not extra[i + 1].startswith("--") else 1
    without = _printed(base + _fill(extra[:i] + extra[i + n:], paths) + ["--print-config"], capsys)
    assert without[key] != got[key], (flag, key)


def _types(gguf_path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(gguf_path).tensors}


def test_export_flags_change_what_is_written(paths: dict[str, str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    def run(name: str, *extra: str) -> tuple[Path, dict[str, Any]]:
        out = tmp_path / name
        assert main(["export", "--model", paths["llama"], "--output", str(out), *extra]) == 0
        saved = yaml.safe_load((out / "export.yaml").read_text())
        capsys.readouterr()
        assert main(["export", "--config", str(out / "export.yaml"), "--print-config"]) == 0  # --config reads it back
        assert yaml.safe_load(capsys.readouterr().out) == saved
        return out, json.loads((out / "export.json").read_text())

    f16, info16 = run("f16", "--format", "gguf", "--no-check")
    q8, info8 = run("q8", "--format", "gguf", "--quant", "q8_0", "--no-check")
    emb, _ = run("emb", "--format", "gguf", "--quant", "q8_0", "--embedding-quant", "f16", "--no-check")
    pre, infopre = run("pre", "--format", "gguf", "--pre-tokenizer", "smollm", "--no-check")
    assert info16["check"] is None and info16["quant"] == "f16"
    assert _types(f16 / "model.gguf")["blk.0.attn_q.weight"] == "F16" and _types(q8 / "model.gguf")["blk.0.attn_q.weight"] == "Q8_0"
    assert (q8 / "model.gguf").stat().st_size < (f16 / "model.gguf").stat().st_size
    assert _types(emb / "model.gguf")["token_embd.weight"] == "F16" and _types(q8 / "model.gguf")["token_embd.weight"] == "Q8_0"
    assert infopre["written"]["tokenizer"]["pre"] == "smollm" and info16["written"]["tokenizer"]["pre"] == "gpt-2"
    a, info_a = run("a", "--format", "safetensors", "--check-tokens", "3", "--check-prompt", "the movie")
    b, info_b = run("b", "--format", "safetensors", "--check-tokens", "5")
    assert len(info_a["check"]["reference"]) == 3 and len(info_b["check"]["reference"]) == 5
    assert info_a["check"]["prompt_tokens"] < info_b["check"]["prompt_tokens"]  # "the movie" vs the default prompt
    if llamacpp_available():
        _, g = run("g", "--format", "gguf", "--check-tokens", "4", "--threads", "1")
        assert g["check"]["threads"] == 1 and len(g["check"]["export"]) == 4
    capsys.readouterr()
