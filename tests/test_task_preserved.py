"""No silent task change: every command, given a causal LM, keeps it a causal LM or refuses clearly.

Each command of ``slimtune`` (``finetune``, ``evaluate``, ``distill``, ``prune``, ``quantize``,
``bench``, ``generate``, ``compress``, ``run``, and ``export`` where it exists) runs in-process on a
tiny chat Llama with a byte-level BPE tokenizer (:func:`helpers_bpe.make_bpe_chat_llama`) and chat/instruction data. It must
either exit 0, and then every model folder it wrote is a causal LM (``config.json``
architectures ``*ForCausalLM``; transformers reloads it and its logits range over the
vocabulary) and every metrics file it wrote is an LM's (perplexity, never a classifier's
accuracy from a freshly initialised head), or exit 2 with one clear line and no traceback.
The input folder is never changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers_bpe import make_bpe_chat_llama
from helpers_chat import polarity_rows, write_jsonl
from tiny import write_corpus

from slimtune.cli.main import COMMANDS, main


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("task-preserved")
    return {"model": make_bpe_chat_llama(root / "chat-llama"), "chat": write_jsonl(root / "chat.jsonl", polarity_rows(24)),
            "eval": write_jsonl(root / "eval.jsonl", polarity_rows(8, seed=1)),
            "text": write_corpus(root / "corpus.txt", 600), "root": root}


def _recipe(lm: dict[str, Path], out: Path) -> Path:
    tree = {"output": str(out), "model": {"name": str(lm["model"])},
            "data": {"train": str(lm["chat"]), "eval": str(lm["eval"]), "max_length": 64},
            "train": {"max_steps": 2, "tensorboard": False, "progress": False},
            "stages": ["finetune", "prune", "quantize", "evaluate"],
            "prune": {"keep_layers": 1}}
    path = out.parent / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _argv(cmd: str, lm: dict[str, Path], out: Path) -> list[str]:
    m, chat, ev = str(lm["model"]), str(lm["chat"]), str(lm["eval"])
    return {
        "finetune": ["--model", m, "--train", chat, "--eval", ev, "--max-steps", "2", "--output", str(out),
                     "--no-tensorboard", "--no-progress"],
        "evaluate": ["--model", m, "--eval", ev, "--output", str(out / "metrics.json")],
        "distill": ["--teacher", m, "--train", chat, "--eval", ev, "--student-layers", "1", "--max-steps", "2",
                    "--output", str(out), "--no-tensorboard", "--no-progress"],
        "prune": ["--model", m, "--train", chat, "--eval", ev, "--keep-layers", "1", "--ffn", "0.5",
                  "--recover-steps", "1", "--output", str(out)],
        "quantize": ["--model", m, "--eval", ev, "--output", str(out)],
        "bench": ["--model", m, "--eval", ev, "--seq-lens", "8", "--repeats", "2", "--warmup", "1",
                  "--output", str(out / "bench.json")],
        "generate": ["--model", m, "--input", ev, "--max-new-tokens", "3", "--output", str(out / "generated.jsonl")],
        "compress": ["--model", m, "--train", chat, "--eval", ev, "--max-accuracy-drop", "1", "--budget-minutes", "1",
                     "--output", str(out)],
        "run": [str(_recipe(lm, out))],
        "export": ["--model", m, "--format", "safetensors", "--output", str(out)],
    }[cmd]


CHECKED = ["finetune", "evaluate", "distill", "prune", "quantize", "bench", "generate", "compress", "run", "export"]
PARAMS = CHECKED


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _check_causal_lm(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = json.loads((folder / "config.json").read_text())
    archs = cfg.get("architectures") or []
    assert archs and all(a.endswith("ForCausalLM") for a in archs), f"{folder}: {archs}"
    if not any(folder.glob("*.safetensors")):
        return  # a method's own format or a non-transformers artifact: its architecture is what counts
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size), f"{folder}: logits {tuple(logits.shape)}"


def _check_metrics(path: Path) -> None:
    m = json.loads(path.read_text())
    rows = m if isinstance(m, list) else m.get("models", [m]) if isinstance(m, dict) else []
    for r in rows if isinstance(rows, list) else [rows]:
        if isinstance(r, dict) and r.get("task") is not None:
            assert r["task"] in ("causal-lm", "lm", "generation"), f"{path}: task {r['task']!r}"


CLASSIFIER_DATA = ("text column", "label column", "labels")
"""Words of an error a command hits when it reads the LM's chat data as classification rows."""


@pytest.fixture
def no_classifier_of(monkeypatch: pytest.MonkeyPatch, lm: dict[str, Path]) -> list[str]:
    """Fail whenever a command loads the causal LM folder as a sequence classifier (a fresh head)."""
    import transformers

    calls: list[str] = []
    original = transformers.AutoModelForSequenceClassification.from_pretrained

    def spy(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(str(path)).resolve() == lm["model"].resolve():
            calls.append(str(path))
            raise AssertionError(f"{path}: a causal LM loaded with AutoModelForSequenceClassification")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", spy)
    return calls


@pytest.mark.parametrize("cmd", PARAMS)
def test_a_causal_lm_stays_a_causal_lm(cmd: str, lm: dict[str, Path], tmp_path: Path, no_classifier_of: list[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    if cmd not in COMMANDS:
        pytest.skip(f"slimtune {cmd} does not exist in this tree")
    before = _digest(lm["model"])
    out = tmp_path / "out"
    if cmd in ("evaluate", "bench", "generate"):
        out.mkdir()
    try:
        rc = main([cmd, *_argv(cmd, lm, out)])
    except AssertionError:
        rc = None
    err = capsys.readouterr().err
    assert not no_classifier_of, f"slimtune {cmd} loaded the causal LM as a classifier"
    assert rc is not None and "Traceback" not in err, err[-2000:]
    assert _digest(lm["model"]) == before, f"slimtune {cmd} changed its input folder"
    if rc == 2:
        lines = [ln for ln in err.splitlines() if f"slimtune {cmd}: error:" in ln]
        assert len(lines) == 1, err[-2000:]
        assert not any(w in lines[0] for w in CLASSIFIER_DATA), f"treated as a classifier: {lines[0]}"
        print(f"{cmd}: refused: {lines[0]}")
        return
    assert rc == 0, err[-2000:]
    folders = sorted({p.parent for p in out.rglob("config.json")})
    for folder in folders:
        _check_causal_lm(folder)
    for path in out.rglob("metrics.json"):
        _check_metrics(path)
    print(f"{cmd}: {len(folders)} model folder(s), all causal LMs")


def test_every_command_is_checked() -> None:
    """A new command must be added here (serve, validate and augment write no model; see below)."""
    not_writing = {"serve", "validate", "augment"}  # a server, a recipe check, a text transfer set
    assert set(COMMANDS) - not_writing <= set(CHECKED), sorted(set(COMMANDS) - not_writing - set(CHECKED))
