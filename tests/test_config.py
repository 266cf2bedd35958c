"""Recipes: strict keys, types, overrides, validation, round trip."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from slimtune.config.recipe import RecipeError, field_help, load_yaml, parse_override, resolve


def test_defaults_resolve_to_full_method():
    r = resolve({})
    assert r.method_name == "full"
    assert r.train.lr == 5e-5 and r.model.name == "minilm"


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
