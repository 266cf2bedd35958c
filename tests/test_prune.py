"""Pruning: cubic schedule, masks during training, N:M, sparse sidecar, vocabulary remap,
structured slicing, and reload of every pruned output by plain transformers in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import keyword_rows, make_prune_bert, make_tiny_llama, write_tsv

from slimtune.compress.prune.recipe import PruneSettings, prune_to_dir
from slimtune.methods import MethodContext, get_method
from slimtune.methods.magnitude import (
    MagnitudeConfig,
    cubic_sparsity,
    load_sparse_sidecar,
    magnitude_masks,
    nm_mask,
    prunable_weights,
    save_sparse_sidecar,
)

TEXTS = ["the movie was not good", "boring acting and dull stories", "a charming film !", "great great great"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Character-level tiny BERT (labels '0'/'1'), 96 training and 32 eval rows: label 1 iff 'good'/'great'."""
    root = tmp_path_factory.mktemp("prune")
    return {"model": make_prune_bert(root / "base"), "train": write_tsv(root / "train.tsv", keyword_rows(96)),
            "eval": write_tsv(root / "eval.tsv", keyword_rows(32, seed=1)), "root": root}


# --------------------------------------------------------------------------------------------
# Schedule and masks
# --------------------------------------------------------------------------------------------


def test_cubic_schedule_values() -> None:
    # Zhu & Gupta eq. 1 with s_i=0, s_f=0.8, t0=0, n*dt=100: s_t = 0.8 * (1 - (1 - t/100)^3)
    for t in (0, 10, 50, 90):
        assert cubic_sparsity(t, 100, 0.8, end=1.0) == pytest.approx(0.8 * (1 - (1 - t / 100) ** 3))
    assert cubic_sparsity(50, 100, 0.8, end=1.0) == pytest.approx(0.7)
    assert cubic_sparsity(100, 100, 0.8, end=1.0) == 0.8
    # begin/end: nothing before t0, final after end; steps quantised down to multiples of frequency
    assert cubic_sparsity(9, 100, 0.5, initial=0.1, begin=0.1, end=0.5) == 0.1
    assert cubic_sparsity(60, 100, 0.5, begin=0.1, end=0.5) == 0.5
    assert cubic_sparsity(37, 100, 0.5, begin=0.1, end=0.5, frequency=10) == cubic_sparsity(30, 100, 0.5, begin=0.1, end=0.5)
    values = [cubic_sparsity(t, 200, 0.9, end=0.7) for t in range(201)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))


def test_global_and_layer_masks_exact_counts() -> None:
    torch.manual_seed(0)
    w = {"a": torch.randn(8, 16), "b": torch.randn(4, 16) * 10}
    g = magnitude_masks(w, 0.5, "global")
    assert sum(int((~m).sum()) for m in g.values()) == 96  # half of 192 in total
    assert (~g["a"]).sum() > (~g["b"]).sum()  # the small-weight tensor loses more
    lay = magnitude_masks(w, 0.25, "layer")
    assert int((~lay["a"]).sum()) == 32 and int((~lay["b"]).sum()) == 16
    kept_min = w["a"].abs()[lay["a"]].min()
    assert torch.all(w["a"].abs()[~lay["a"]] <= kept_min)


def test_nm_mask_two_of_four() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    m = nm_mask(w, 2, 4)
    assert torch.all(m.view(6, 4, 4).sum(-1) == 2)
    g = w.abs().view(6, 4, 4)
    kept = torch.where(m.view(6, 4, 4), g, torch.inf).amin(-1)
    dropped = torch.where(m.view(6, 4, 4), -torch.inf, g).amax(-1)
    assert torch.all(kept >= dropped)


def test_sparse_sidecar_roundtrip_and_auto(tmp_path: Path) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    w[torch.rand_like(w) < 0.6] = 0
    state = {"w": w, "b": torch.randn(64), "i": torch.arange(5)}
    info = save_sparse_sidecar(state, tmp_path / "s.safetensors", "auto")
    assert info["written"] and info["bytes"] < info["dense_bytes"]
    back = load_sparse_sidecar(tmp_path / "s.safetensors")
    assert set(back) == set(state)
    for k in state:
        assert torch.equal(back[k], state[k])
    dense = {"w": torch.randn(64, 64)}  # no zeros: the compact form would be larger
    assert not save_sparse_sidecar(dense, tmp_path / "d.safetensors", "auto")["written"]
    assert not (tmp_path / "d.safetensors").exists()


def test_masks_stay_applied_during_training(assets: dict[str, Path], tmp_path: Path) -> None:
    from slimtune.config.recipe import TrainConfig
    from slimtune.data.datasets import load_classification, tokenize_classification
    from slimtune.models.loading import load_model, load_tokenizer
    from slimtune.train.loop import train

    tok = load_tokenizer(str(assets["model"]))
    model = load_model(str(assets["model"]), "classification")
    data = tokenize_classification(load_classification(assets["train"], label_names=["0", "1"]), tok, 32)
    method = get_method("magnitude")
    cfg = MagnitudeConfig(sparsity=0.6, end=0.5, frequency=2)
    steps = 12
    model = method.apply(model, cfg, MethodContext("classification", steps, str(assets["model"])))
    seen: list[tuple[int, float, float]] = []

    class Spy:  # the real method, plus a check after every step
        name, config_cls = method.name, method.config_cls

        def on_step_end(self, m: torch.nn.Module, c: MagnitudeConfig, step: int) -> None:
            method.on_step_end(m, c, step)
            st = m._slimtune_magnitude
            weights = prunable_weights(m)
            zeros = sum(int((weights[n] == 0).sum()) for n in st.names)
            numel = sum(weights[n].numel() for n in st.names)
            for n in st.names:  # every masked weight is exactly zero after the optimizer step
                assert torch.all(weights[n][~st.masks[n]] == 0)
            seen.append((step, zeros / numel, method.current_sparsity(m, c, step)))

    tcfg = TrainConfig(max_steps=steps, batch_size=8, lr=1e-2, tensorboard=False, resume=False, progress=False)
    train(model, Spy(), cfg, data, tcfg, tmp_path, total_steps=steps)
    assert len(seen) == steps
    for step, actual, target in seen:
        assert actual == pytest.approx(target, abs=0.01), step
    assert seen[-1][2] == 0.6 and seen[0][2] < seen[3][2] < 0.6  # gradual, then final
    method.export(model, cfg, tmp_path / "out", MethodContext("classification", steps, ""))
    report = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert report["pruned_weights_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert set(report["per_layer"]) == set(prunable_weights(model))
    assert not hasattr(model, "_slimtune_magnitude")


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------


def test_vocab_pruning_tokenizes_corpus_identically(assets: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from slimtune.compress.prune.vocab import prune_vocabulary, read_corpus_texts
    from slimtune.models.loading import load_model, load_tokenizer

    tok = load_tokenizer(str(assets["model"]))
    model = load_model(str(assets["model"]), "classification")
    emb_before = model.get_input_embeddings().weight.detach().clone()
    corpus = read_corpus_texts([assets["train"]])
    new_tok, new_to_old, info = prune_vocabulary(model, tok, corpus, tmp_path / "tok")
    assert info["vocab_size_after"] < info["vocab_size_before"]
    fresh = AutoTokenizer.from_pretrained(tmp_path / "tok")  # plain transformers, from disk
    for t in (new_tok, fresh):
        assert len(t) == info["vocab_size_after"]
        for text in corpus[:50] + [f"{corpus[0]} [SEP] {corpus[1]}"]:
            old_ids = tok(text)["input_ids"]
            new_ids = t(text)["input_ids"]
            assert new_to_old[new_ids].tolist() == old_ids
            assert t.convert_ids_to_tokens(new_ids) == tok.convert_ids_to_tokens(old_ids)
        pair_old, pair_new = tok(corpus[0], corpus[1]), t(corpus[0], corpus[1])
        assert new_to_old[pair_new["input_ids"]].tolist() == pair_old["input_ids"]
        assert pair_new["token_type_ids"] == pair_old["token_type_ids"]
    assert fresh.pad_token_id == 0 and model.config.pad_token_id == 0
    assert torch.equal(model.get_input_embeddings().weight, emb_before[new_to_old])
    # Words outside the corpus fall back to kept pieces / single characters, not [UNK].
    assert fresh.unk_token not in fresh.tokenize("zebra")
    vocab_txt = (tmp_path / "tok" / "vocab.txt").read_text().splitlines()
    assert vocab_txt == fresh.convert_ids_to_tokens(list(range(len(fresh))))


# --------------------------------------------------------------------------------------------
# Structured
# --------------------------------------------------------------------------------------------


def test_slice_model_exact_when_removed_neurons_are_dead(assets: dict[str, Path]) -> None:
    from slimtune.compress.prune.structured import (
        encoder_layers,
        ffn_linears,
        slice_model,
        taylor_importance,
        top_indices,
    )
    from slimtune.data.datasets import load_classification, tokenize_classification
    from slimtune.models.loading import load_model, load_tokenizer

    model = load_model(str(assets["model"]), "classification").eval()
    dead = torch.arange(0, 64, 2)  # zero the down-projection of every even neuron: they contribute nothing
    with torch.no_grad():
        for layer in encoder_layers(model):
            ffn_linears(layer)[1].weight[:, dead] = 0
    data = tokenize_classification(load_classification(assets["train"], label_names=["0", "1"]),
                                   load_tokenizer(str(assets["model"])), 32)
    scores = taylor_importance(model, data, num_batches=2)
    assert torch.all(scores[:, dead] == 0) and torch.all(scores[:, 1::2] > 0)
    idx = top_indices(scores, 32)
    assert torch.equal(idx, torch.arange(1, 64, 2).expand(2, 32))
    small = slice_model(model, idx).eval()
    assert small.config.intermediate_size == 32 and ffn_linears(encoder_layers(small)[0])[0].out_features == 32
    ids = torch.randint(5, 80, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_heads_refused_with_reason(assets: dict[str, Path], tmp_path: Path) -> None:
    from slimtune.config.recipe import RecipeError

    with pytest.raises(RecipeError, match="hidden_size // num_attention_heads"):
        prune_to_dir(PruneSettings(model=str(assets["model"]), output=str(tmp_path / "h"), heads=0.5))


# --------------------------------------------------------------------------------------------
# End to end: every pruned output reloads with plain transformers in a fresh process
# --------------------------------------------------------------------------------------------

RELOAD = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
texts, out = json.loads(sys.argv[1]), {}
for d in sys.argv[2:]:
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForSequenceClassification.from_pretrained(d).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out[d] = {"ids": enc["input_ids"].tolist(), "logits": model(**enc).logits.tolist()}
print(json.dumps(out))
"""

CASES = {
    "unstructured": {"sparsity": 0.5, "recover_steps": 6, "kd": True},
    "two_four": {"pattern": "2:4", "recover_steps": 3},
    "structured": {"ffn": 0.5, "layers": 1, "recover_steps": 4, "kd": True},
    "vocab": {"vocab_from": "train"},
    "combined": {"ffn": 0.5, "layers": 1, "vocab_from": "train", "recover_steps": 4, "kd": True, "importance": "magnitude"},
}


@pytest.fixture(scope="module")
def pruned(assets: dict[str, Path]) -> dict[str, dict]:
    """Every case pruned in this process, then all reloaded by ONE fresh Python process."""
    runs: dict[str, dict] = {}
    for case, kw in CASES.items():
        kw = dict(kw)
        if "vocab_from" in kw:
            kw["vocab_from"] = [str(assets["train"])]
        out = assets["root"] / case
        s = PruneSettings(model=str(assets["model"]), output=str(out), train=str(assets["train"]),
                          eval=str(assets["eval"]), batch_size=8, **kw)
        model, tok, metrics = prune_to_dir(s, log=lambda msg: None)
        enc = tok(TEXTS, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model.eval()(**enc).logits
        runs[case] = {"out": out, "model": model, "ids": enc["input_ids"].tolist(), "logits": logits, "metrics": metrics}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(TEXTS), *(str(r["out"]) for r in runs.values())],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    for r in runs.values():
        r["fresh"] = fresh[str(r["out"])]
    return runs


@pytest.mark.parametrize("case", list(CASES))
def test_pruned_output_reloads_identically_in_fresh_process(pruned: dict[str, dict], case: str) -> None:
    r = pruned[case]
    out, metrics, model = r["out"], r["metrics"], r["model"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "prune.json"):
        assert (out / name).is_file(), name
    assert (out / "recipe.yaml").is_file() == (case != "vocab")  # only runs with recovery training
    assert r["fresh"]["ids"] == r["ids"]
    torch.testing.assert_close(torch.tensor(r["fresh"]["logits"]), r["logits"], rtol=0, atol=1e-5)
    assert metrics["n"] == 32 and 0 <= metrics["accuracy"] <= 1
    if case in ("structured", "combined"):
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["intermediate_size"] == 32 and cfg["num_hidden_layers"] == 1
        assert metrics["params"] < metrics["params_before"]
    if case in ("unstructured", "two_four"):
        assert metrics["sparsity"]["pruned_weights_sparsity"] == pytest.approx(0.5, abs=1e-3)
        for w in prunable_weights(model).values():
            if case == "two_four":
                assert torch.all((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2)
    if case in ("vocab", "combined"):
        assert json.loads((out / "config.json").read_text())["vocab_size"] == metrics["vocab"]["vocab_size_after"]


def test_cli_prune_end_to_end(assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from slimtune.cli.main import main

    out = tmp_path / "cli"
    rc = main(["prune", "--model", str(assets["model"]), "--train", str(assets["train"]), "--eval",
               str(assets["eval"]), "--output", str(out), "--ffn", "0.25", "--vocab-from", str(assets["train"]),
               "--recover-steps", "2", "--batch-size", "8", "--importance", "magnitude"])
    assert rc == 0
    assert "params" in capsys.readouterr().out
    settings = json.loads((out / "prune.json").read_text())
    assert settings["ffn"] == 0.25 and settings["vocab_from"] == [str(assets["train"])]
    assert main(["prune", "--model", str(assets["model"]), "--output", str(tmp_path / "x")]) == 2  # nothing to prune


def test_magnitude_recipe_validation() -> None:
    from slimtune.config.recipe import RecipeError, resolve

    r = resolve({"method": {"name": "magnitude", "sparsity": 0.7, "pattern": "unstructured", "scope": "layer"}})
    assert r.method.sparsity == 0.7 and r.method.scope == "layer"
    for bad, key in (({"pattern": "4:2"}, "method.pattern"), ({"sparsity": 1.0}, "method.sparsity"),
                     ({"begin": 0.8, "end": 0.5}, "method.begin"), ({"scope": "row"}, "method.scope")):
        with pytest.raises(RecipeError, match=key):
            resolve({"method": {"name": "magnitude", **bad}})


# --------------------------------------------------------------------------------------------
# Regressions: aliases, decoders refused, install hint, settings saved, nothing half-written
# --------------------------------------------------------------------------------------------


@pytest.mark.needs_assets("minilm-l3")
def test_prune_accepts_every_encoder_alias(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`prune --model minilm-l3` used to fail with 'no such model folder' (only 'minilm' was accepted)."""
    from slimtune.cli.main import main

    rc = main(["prune", "--model", "minilm-l3", "--output", str(tmp_path / "o"), "--sparsity", "0.5", "--print-config"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert yaml.safe_load(cap.out)["model"] == "minilm-l3"


def test_prune_refuses_an_unknown_model_and_a_decoder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from slimtune.cli.main import main

    rc = main(["prune", "--model", "minilm-l9", "--output", str(tmp_path / "o"), "--sparsity", "0.5"])
    assert rc == 2 and "not an alias (minilm, minilm-l3)" in capsys.readouterr().err
    for model in (str(make_tiny_llama(tmp_path / "llama")), "smollm2"):
        rc = main(["prune", "--model", model, "--output", str(tmp_path / "o"), "--sparsity", "0.5"])
        err = capsys.readouterr().err
        assert rc == 2 and "a causal language model" in err and "sequence classifiers only" in err, err
        assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_missing_package_message_names_a_script_that_exists() -> None:
    """The hint used to point to scripts/install-assets.sh, which does not exist."""
    import re

    from slimtune.models.loading import ModelError, _package_dir

    with pytest.raises(ModelError) as e:
        _package_dir("slimtune_no_such_package", "no-such-package==0")
    scripts = re.findall(r"scripts/[\w.-]+", str(e.value))
    assert scripts and all((Path(__file__).resolve().parents[1] / s).is_file() for s in scripts), str(e.value)
    assert "pip install --no-deps no-such-package==0" in str(e.value)


def test_prune_settings_saved_and_read_back(assets: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from slimtune.cli.main import main

    out = tmp_path / "s"
    assert main(["prune", "--model", str(assets["model"]), "--output", str(out), "--sparsity", "0.5",
                 "--scope", "layer", "--vocab-from", str(assets["train"]), "--no-vocab-chars"]) == 0
    capsys.readouterr()
    saved = yaml.safe_load((out / "prune.yaml").read_text())
    assert (saved["scope"], saved["vocab_keep_chars"], saved["vocab_from"]) == ("layer", False, [str(assets["train"])])
    assert json.loads((out / "prune.json").read_text()) == saved
    assert main(["prune", "--config", str(out / "prune.yaml"), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == saved


def test_failed_prune_writes_nothing(assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run that fails after loading (2 of 2 layers) leaves no output folder and no temp folder."""
    from slimtune.cli.main import main

    out = tmp_path / "fail"
    rc = main(["prune", "--model", str(assets["model"]), "--output", str(out), "--train", str(assets["train"]),
               "--layers", "2", "--vocab-from", str(assets["train"])])
    err = capsys.readouterr().err
    assert rc == 2 and "--layers: can remove 0..1 of 2 layers" in err
    assert list(tmp_path.iterdir()) == []
