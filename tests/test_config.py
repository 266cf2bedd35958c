"""Recipes: strict keys, types, overrides, validation, round trip."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from slimtune.config.recipe import RecipeError, field_help, load_yaml, parse_override, resolve


def test_defaults_resolve_to_full_method():
    r = resolve({})
    assert r.method_name == "full"
    assert r.train.lr == 1e-4 and r.model.name == "minilm"  # the full method's declared default (issue #23)
    assert r.provenance["train.lr"] == {"value": 1e-4, "source": "default of method full"}


def test_unknown_key_lists_valid_keys():
    with pytest.raises(RecipeError, match=r"unknown key 'train.lrr'.*valid keys of 'train':.*\blr\b"):
        resolve({"train": {"lrr": 1e-3}})


def test_unknown_section_rejected():
    with pytest.raises(RecipeError, match="unknown section 'trian'"):
        resolve({"trian": {}})


def test_types_are_coerced_and_checked():
    r = resolve({"train": {"lr": "1e-4", "batch_size": "16", "progress": "false"}})
    assert r.train.lr == 1e-4 and r.train.batch_size == 16 and r.train.progress is False
    with pytest.raises(RecipeError, match="train.batch_size: expected an integer"):
        resolve({"train": {"batch_size": "many"}})
    with pytest.raises(RecipeError, match=r"train.scheduler: 'wavy' is not one of"):
        resolve({"train": {"scheduler": "wavy"}})


def test_ranges_validated():
    with pytest.raises(RecipeError, match="train.lr: must be > 0"):
        resolve({"train": {"lr": 0}})
    with pytest.raises(RecipeError, match="data.max_length: must be >= 1"):
        resolve({"data": {"max_length": 0}})
    with pytest.raises(RecipeError, match="train.metric"):
        resolve({"model": {"task": "causal-lm"}, "train": {"metric": "accuracy"}})


def test_method_config_is_per_method():
    r = resolve({"method": {"name": "lora", "r": 4, "alpha": 8}})
    assert r.method.r == 4 and r.method.alpha == 8.0
    with pytest.raises(RecipeError, match="unknown key 'method.r'.*'method'"):
        resolve({"method": {"name": "full", "r": 4}})
    with pytest.raises(RecipeError, match="unknown method 'qlora2'"):
        resolve({"method": {"name": "qlora2"}})


def test_missing_data_file_named(tmp_path):
    with pytest.raises(RecipeError, match="data.train: file not found: .*nope.tsv"):
        resolve({"data": {"train": str(tmp_path / "nope.tsv")}})


def test_overrides_parse_yaml_values():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], "3e-4")
    assert parse_override("method.target_modules=[query,value]") == (["method", "target_modules"], ["query", "value"])
    with pytest.raises(RecipeError, match="not of the form"):
        parse_override("train.lr")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: 1\n  batch_size: [1,\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:\d+: invalid YAML"):
        load_yaml(p)


def test_saved_recipe_round_trips(tmp_path):
    r = resolve({"method": {"name": "lora", "r": 4}, "train": {"lr": 2e-4}, "output": "x"})
    r.save(tmp_path / "recipe.yaml")
    again = resolve(yaml.safe_load((tmp_path / "recipe.yaml").read_text()))
    assert again.to_dict() == r.to_dict()


def test_every_field_documented():
    rows = field_help()
    assert len(rows) > 30
    missing = [k for k, _, h in rows if not h.strip()]
    assert not missing, f"fields without help: {missing}"


@pytest.mark.needs_assets("minilm")  # `slimtune validate` checks that the model exists
def test_validate_cli(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"model": {"name": "minilm"}, "train": {"lr": 1e-4}}))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"learning_rate": 1e-4}}))
    ok = subprocess.run([sys.executable, "-m", "slimtune.cli.main", "validate", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    err = subprocess.run([sys.executable, "-m", "slimtune.cli.main", "validate", str(bad)], capture_output=True, text=True)
    assert err.returncode == 2
    assert "unknown key 'train.learning_rate'" in err.stderr


def test_import_is_lean():
    code = "import sys, slimtune, slimtune.config.recipe; print(sorted(m for m in ('torch','transformers','peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- validate = what the run rejects


def _error_lines(err: str) -> list[str]:
    """stderr without third-party import-time warnings (torch/torchao glog lines on first import)."""
    return [ln for ln in err.strip().splitlines() if not re.match(r"[WIE]\d{4} |Failed to load ", ln)]

BAD_RECIPES = [  # (YAML of the recipe, the one-line reason)
    ("train:\n  lr: .nan\n", "train.lr: must be a finite number"),
    ("train:\n  lr: .inf\n", "train.lr: must be a finite number"),
    ("train:\n  epochs: -.inf\n", "train.epochs: must be a finite number"),
    ("train:\n  weight_decay: -0.1\n", "train.weight_decay: must be >= 0, got -0.1"),
    ("train:\n  max_grad_norm: -1.0\n", "train.max_grad_norm: must be >= 0, got -1.0"),
    ("train:\n  eval_every: -1\n", "train.eval_every: must be >= 0, got -1"),
    ("train:\n  save_every: -5\n", "train.save_every: must be >= 0, got -5"),
    ("data:\n  max_train_samples: 0\n", "data.max_train_samples: must be >= 1, got 0"),
    ("train:\n  fsdp: true\n  precision: fp16\n", "train.precision: fp16 is not supported with train.fsdp"),
    ("train:\n  lr: 1.0e-4\n  batch_size: 8\n  lr: 2.0e-4\n", "bad.yaml:4: duplicate key 'lr' (first given on line 2)"),
]


@pytest.mark.parametrize("text,reason", BAD_RECIPES, ids=[r.split(":")[0] + ":" + r.split(":")[1][:24] for _, r in BAD_RECIPES])
def test_validate_rejects_what_finetune_rejects_in_one_line(tmp_path, capsys, text, reason):
    """validate and finetune --config refuse the recipe alike: exit 2, one line naming the key."""
    from slimtune.cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    for argv in (["validate", str(bad)], ["validate", "--config", str(bad)],
                 ["finetune", "--config", str(bad), "--output", str(tmp_path / "out")]):
        assert main(argv) == 2, argv
        err = _error_lines(capsys.readouterr().err)
        assert len(err) == 1 and reason in err[0], (argv, err)
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("flags,reason", [
    (["--lr", "nan"], "train.lr: must be a finite number"),
    (["--max-grad-norm", "-1"], "train.max_grad_norm: must be >= 0"),
    (["--max-train-samples", "0"], "data.max_train_samples: must be >= 1"),
    (["train.weight_decay=-1"], "train.weight_decay: must be >= 0"),
])
def test_bad_flag_values_are_one_line_errors(tmp_path, capsys, flags, reason):
    from slimtune.cli.main import main

    assert main(["finetune", "--output", str(tmp_path / "out"), *flags, "--print-config"]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and reason in err[0], err
    assert not (tmp_path / "out").exists()


def test_validate_takes_config_overrides_and_prints_the_resolved_recipe(tmp_path, capsys, tiny_bert_dir, tiny_assets):
    from slimtune.cli.main import main

    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump({"model": {"name": str(tiny_bert_dir)}, "data": {"train": str(tiny_assets.tsv(24))}}))
    assert main(["validate", "--config", str(rec), "train.lr=0.25", "train.seed=3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 0.25 and printed["train"]["seed"] == 3 and printed["method"]["name"] == "full"
    assert resolve(printed).to_dict() == printed  # the printed recipe is a recipe
    assert main(["validate", str(rec), "--config", str(rec)]) == 2
    assert "give the recipe once" in capsys.readouterr().err
    assert main(["validate"]) == 2
    assert "no recipe given" in capsys.readouterr().err


def test_validate_reads_the_data_as_the_run_will(tmp_path, capsys, tiny_bert_dir, tiny_assets):
    """A column the data lacks is found by validate (it reads the rows), not after the model loads."""
    from slimtune.cli.main import main

    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump({"model": {"name": str(tiny_bert_dir)},
                                   "data": {"train": str(tiny_assets.tsv(24)), "text_column": "review"}}))
    assert main(["validate", str(rec)]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "review" in err[0], err
