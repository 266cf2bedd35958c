"""End to end through the CLI: finetune (full, LoRA) → plain-transformers / PEFT reload → evaluate.

LoRA learns an easy separable task on a random tiny BERT. Causal LM: LoRA lowers held-out
perplexity and the merged model loads in plain transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from slimtune.cli.main import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SLIMTUNE_NO_PROGRESS": "1"}


@pytest.fixture(scope="module")
def files(tiny_assets, tiny_bert_dir, tiny_llama_dir):
    return {"bert": tiny_bert_dir, "llama": tiny_llama_dir,
            "train": tiny_assets.tsv(600, seed=1), "eval": tiny_assets.tsv(200, seed=2),
            "corpus": tiny_assets.corpus(6000)}


def _run(*args):
    assert main([str(a) for a in args]) == 0


def _plain_logits(model_dir, texts):
    """Logits from plain transformers in a fresh process (no slimtune import)."""
    code = (
        "import json,sys,torch\n"
        "from transformers import AutoModelForSequenceClassification as M, AutoTokenizer as T\n"
        f"d={str(model_dir)!r}; m=M.from_pretrained(d).eval(); t=T.from_pretrained(d)\n"
        f"b=t({texts!r}, padding=True, return_tensors='pt')\n"
        "with torch.no_grad(): print(json.dumps({'logits': m(**b).logits.tolist(), 'labels': m.config.id2label}))\n"
        "assert 'slimtune' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_learns_and_exports_plain_model(files, tmp_path, method):
    out = tmp_path / method
    lr = "3e-3" if method == "full" else "1e-2"
    _run("finetune", "--model", files["bert"], "--train", files["train"], "--eval", files["eval"],
         "--output", out, "--method", method, "--epochs", 4, "--batch-size", 16, "--lr", lr,
         "--max-length", 32, "train.tensorboard=false")
    metrics = json.loads((out / "metrics.json").read_text())
    if method == "full":  # the toy task is learnable (majority class is 0.6); LoRA on a *random*
        # base model stays near the majority class here: its learning is checked on an easier
        # task below (test_lora_learns_a_separable_task) and on real MiniLM (test_real_models).
        assert metrics["accuracy"] > 0.75, metrics
    assert set(metrics) >= {"accuracy", "macro_f1", "params", "size_mb", "per_class", "trainable_params"}
    assert (out / "model.safetensors").is_file() and (out / "recipe.yaml").is_file()
    assert not (out / "checkpoints").exists()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["method"]["name"] == method
    if method == "lora":
        assert metrics["trainable_params"] < 0.5 * metrics["params"]
        assert (out / "adapter" / "adapter_config.json").is_file()
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # Plain transformers in a fresh process reproduces slimtune's evaluation.
    texts = ["the movie was good", "bad boring plot , awful"]
    plain = _plain_logits(out, texts)
    assert plain["labels"] == {"0": "0", "1": "1"}
    from slimtune.models.loading import load_model, load_tokenizer
    tok, model = load_tokenizer(str(out)), load_model(str(out), "classification").eval()
    with torch.no_grad():
        ours = model(**tok(texts, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(torch.tensor(plain["logits"]), ours, atol=1e-5, rtol=1e-5)


def test_lora_learns_a_separable_task(tiny_assets, tiny_bert_dir, tmp_path):
    """LoRA (default rank, head trained) on the random tiny BERT through the real loop: sentences of
    only positive vs only negative words, from CSV files. Chance is 0.5 (balanced); 2 epochs of
    16 steps reach ~0.99 for every model and data seed tried."""
    out = tmp_path / "lora"
    _run("finetune", "--model", tiny_bert_dir, "--train", tiny_assets.separable_csv(256, seed=0),
         "--eval", tiny_assets.separable_csv(200, seed=1), "--output", out, "--method", "lora",
         "--epochs", 2, "--batch-size", 16, "--lr", "1e-2", "--max-length", 16, "train.tensorboard=false")
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 200 and m["train"]["steps"] == 32
    assert m["trainable_params"] < 0.5 * m["params"]  # the adapter and the head, not the encoder
    assert m["accuracy"] >= 0.9, m
    assert min(c["recall"] for c in m["per_class"].values()) >= 0.8, m["per_class"]  # both classes, not one


def test_lora_adapter_reloads_with_plain_peft(files, tmp_path):
    out = tmp_path / "lora"
    _run("finetune", "--model", files["bert"], "--train", files["train"], "--output", out, "--method", "lora",
         "--max-steps", 10, "--lr", "1e-2", "--lora-r", 4, "train.tensorboard=false")
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(files["bert"], num_labels=2)
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    b = tok(["a good film", "sad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**b).logits, merged(**b).logits, atol=1e-4, rtol=1e-4)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_evaluate_cli_writes_metrics(files, tmp_path, capsys):
    out = tmp_path / "m"
    _run("finetune", "--model", files["bert"], "--train", files["train"], "--output", out,
         "--max-steps", 5, "train.tensorboard=false")
    report = tmp_path / "report.json"
    _run("evaluate", "--model", out, "--eval", files["eval"], "--output", report)
    text = capsys.readouterr().out
    assert "precision" in text and "macro-F1" in text
    m = json.loads(report.read_text())
    assert m["n"] == 200 and 0 <= m["accuracy"] <= 1 and "per_class" in m


def test_cli_reports_bad_input_without_traceback(files, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood\t1\nbad\t0\textra\n")
    r = subprocess.run([sys.executable, "-m", "slimtune.cli.main", "finetune", "--model", str(files["bert"]),
                        "--train", str(bad), "--output", str(tmp_path / "o")], env=ENV, capture_output=True, text=True)
    assert r.returncode == 2
    assert "bad.tsv:3: row has 3 fields" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()  # the data is read before anything is written


def test_missing_train_or_output_is_a_one_line_user_error(files, tmp_path, capsys):
    assert main(["finetune", "--model", str(files["bert"]), "--output", str(tmp_path / "o")]) == 2
    assert "slimtune finetune: error: --train (data.train) is required" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(files["bert"]), "--train", str(files["train"]),
                 "--student-layers", "1"]) == 2
    assert "slimtune distill: error: --output (output) is required" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_causal_lm_lora_lowers_perplexity_and_merged_loads(files, tmp_path):
    out = tmp_path / "lm"
    _run("finetune", "--model", files["llama"], "--task", "causal-lm", "--train", files["corpus"],
         "--output", out, "--method", "lora", "--max-steps", 60, "--batch-size", 8, "--lr", "1e-2",
         "--max-length", 32, "train.tensorboard=false")
    m = json.loads((out / "metrics.json").read_text())
    assert m["perplexity"] < 0.8 * m["perplexity_before"], m
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
