"""``slimtune run`` with a causal LM: finetune (any method) → prune → quantize → evaluate → bench → report
on a tiny chat Llama; the stage that cannot take a decoder yet (distill) is refused by name; the task
never changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers_chat import make_tiny_chat_llama, polarity_rows, write_jsonl

from slimtune.config.recipe import RecipeError
from slimtune.evaluate.generation import evaluate_chat_file
from slimtune.models.loading import load_model, load_tokenizer
from slimtune.pipeline.run import run_pipeline, validate_tree


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipe-dec")
    return {"root": root, "model": make_tiny_chat_llama(root / "llama"),
            "train": write_jsonl(root / "train.jsonl", polarity_rows(32, seed=1)),
            "eval": write_jsonl(root / "dev.jsonl", polarity_rows(8, seed=2)),
            "test": write_jsonl(root / "test.jsonl", polarity_rows(12, seed=3)),
            "csv": _csv(root / "test.csv")}


def _csv(p: Path) -> Path:
    p.write_text("text,label\ngood movie,1\nbad plot,0\n")
    return p


def _tree(files: dict[str, Path], out: str, method: str = "lora", stages: tuple[str, ...] = ()) -> dict:
    tree = {
        "output": str(files["root"] / out),
        "model": {"name": str(files["model"])},  # task: inferred (causal-lm) from the chat rows
        "data": {"train": str(files["train"]), "eval": str(files["eval"]), "max_length": 32},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-2, "tensorboard": False, "progress": False, "seed": 0},
        "method": {"name": method},
        "finetune": {},
        "evaluate": {"eval": str(files["test"])},
        "bench": {"seq_lens": [8], "repeats": 3, "warmup": 1},
        "report": {"title": "tiny decoder chain"},
    }
    for s in stages:
        tree[s] = {}
    return tree


def test_decoder_chain_finetune_evaluate_bench_report(files: dict[str, Path]) -> None:
    plan = validate_tree(_tree(files, "chain"))
    assert plan.task == "causal-lm" and plan.stages == ["finetune", "evaluate", "bench", "report"]
    result = run_pipeline(plan, log=lambda m: None)
    out = plan.output
    ft = out / "01-finetune"
    # the task never changed: a causal LM trained on the answers only, exported as a causal LM
    assert json.loads((ft / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    metrics = json.loads((ft / "metrics.json").read_text())
    assert metrics["sft"] and metrics["method"] == "lora" and metrics["train"]["steps"] == 3
    # evaluate: the same figures as evaluating the stage's folder directly on the test file
    ev = json.loads((out / "02-evaluate" / "evaluation.json").read_text())
    assert ev["task"] == "causal-lm" and ev["eval_file"] == str(files["test"]) and list(ev["models"]) == ["01-finetune"]
    got = ev["models"]["01-finetune"]
    tok = load_tokenizer(str(ft))
    ref = evaluate_chat_file(load_model(str(ft), "causal-lm").eval(), tok, str(files["test"]), max_length=32,
                             batch_size=8)
    for k in ("answer_perplexity", "exact_match", "accuracy", "no_label", "generated"):
        assert got[k] == pytest.approx(ref[k], rel=1e-6), k
    assert got["answer_tokens"] == ref["answer_tokens"] > 12 and len(got["samples"]) == 5
    # bench: prefill latency and decoding speed of the decoder
    bench = json.loads((out / "03-bench" / "bench.json").read_text())
    lat = bench["models"]["01-finetune"]["latency"][0]
    assert bench["kind"] == "causal-lm" and lat["seq_len"] == 8 and lat["p50_ms"] > 0 and lat["decode_ms_per_token"] > 0
    assert "ms/token" in (out / "03-bench" / "bench.md").read_text()
    # report: the task metrics and the latency in the rows; exact match and perplexity listed
    row = result["rows"][0]
    assert row["accuracy"] == got["accuracy"] and row["exact_match"] == got["exact_match"]
    assert row["answer_perplexity"] == got["answer_perplexity"] and row["latency_ms_p50"] == lat["p50_ms"]
    md = (out / "report.md").read_text()
    assert "tiny decoder chain" in md and "exact match" in md and "answer perplexity" in md
    # nothing changed: every stage is skipped on a rerun
    again = run_pipeline(validate_tree(_tree(files, "chain")), log=lambda m: None)
    assert all(s["skipped"] for s in again["stages"])


@pytest.mark.parametrize("method", ["full", "adalora", "ia3", "adapters", "qlora"])
def test_every_method_runs_the_decoder_chain(method: str, files: dict[str, Path]) -> None:
    tree = _tree(files, f"m-{method}", method)
    tree["train"]["max_steps"] = 10 if method == "adalora" else 2  # AdaLoRA needs room for its budget schedule
    for s in ("bench", "report"):
        tree.pop(s)
    plan = validate_tree(tree)
    run_pipeline(plan, log=lambda m: None)
    ev = json.loads((plan.output / "02-evaluate" / "evaluation.json").read_text())["models"]["01-finetune"]
    assert "answer_perplexity" in ev and "exact_match" in ev and ev["generated"] == 12
    assert json.loads((plan.output / "01-finetune" / "metrics.json").read_text())["method"] == method


def test_decoder_chain_with_prune_and_quantize(files: dict[str, Path]) -> None:
    from slimtune.runtime.generate import load_for_generation

    tree = _tree(files, "compressed")
    tree["model"]["name"] = str(make_tiny_chat_llama(files["root"] / "llama3", layers=3))
    tree["prune"] = {"keep_layers": 2, "recover_steps": 2, "kd": True}
    tree["quantize"] = {"scheme": "int8", "backend": "torch", "repeats": 2, "new_tokens": 4, "seq_len": 8,
                        "max_perplexity_increase": 1e6}
    plan = validate_tree(tree)
    assert plan.stages == ["finetune", "prune", "quantize", "evaluate", "bench", "report"]
    run_pipeline(plan, log=lambda m: None)
    out = plan.output
    pruned = json.loads((out / "02-prune" / "config.json").read_text())
    assert pruned["architectures"] == ["LlamaForCausalLM"] and pruned["num_hidden_layers"] == 2
    q = json.loads((out / "03-quantize" / "metrics.json").read_text())
    assert q["task"] == "causal-lm" and q["backend_candidate"] == "torch-int8"
    model, _, _ = load_for_generation(str(out / "03-quantize"))  # still a causal LM, on its int8 kernel
    assert len(model.model.layers) == 2
    ev = json.loads((out / "04-evaluate" / "evaluation.json").read_text())["models"]
    assert list(ev) == ["01-finetune", "02-prune", "03-quantize"]
    assert all("exact_match" in m and "answer_perplexity" in m for m in ev.values())
    bench = json.loads((out / "05-bench" / "bench.json").read_text())["models"]
    assert all(r["latency"][0]["decode_ms_per_token"] > 0 for r in bench.values())


def test_distill_cannot_take_a_decoder_and_is_refused_by_name(files: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    from slimtune.cli.main import main

    tree = _tree(files, "refused", stages=("distill",))
    with pytest.raises(RecipeError, match=r"stages: distill cannot take a causal LM yet"):
        validate_tree(tree)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distill cannot take a causal LM yet" in err[0] and "Traceback" not in err[0]
    assert not (files["root"] / "refused").exists()  # refused before anything was written


@pytest.mark.parametrize("edit, message", [
    (lambda t, f: t["evaluate"].update(eval=str(f["csv"])), r"evaluate.eval: .*test.csv is neither chat"),
    (lambda t, f: t["evaluate"].update(label_column="label"), r"evaluate.label_column: a causal LM"),
    (lambda t, f: t["bench"].update(eval=str(f["test"])), r"bench.eval: accuracy inside bench is for classifiers"),
])
def test_decoder_settings_are_checked_before_any_weight(edit, message: str, files: dict[str, Path]) -> None:  # noqa: ANN001
    tree = _tree(files, "bad")
    edit(tree, files)
    with pytest.raises(RecipeError, match=message):
        validate_tree(tree)


def test_without_finetune_the_input_decoder_is_evaluated_as_a_decoder(files: dict[str, Path]) -> None:
    """No data.train, no task given: the model folder says causal LM, so evaluate does not treat it
    as a classifier (the classifier path would fail on, or silently mis-read, a chat file)."""
    tree = {"output": str(files["root"] / "input-only"), "model": {"name": str(files["model"])},
            "data": {"eval": str(files["test"]), "max_length": 32}, "evaluate": {}, "report": {}}
    plan = validate_tree(tree)
    assert plan.task == "causal-lm"
    result = run_pipeline(plan, log=lambda m: None)
    ev = json.loads((plan.output / "01-evaluate" / "evaluation.json").read_text())["models"]["input"]
    assert "answer_perplexity" in ev and "exact_match" in ev
    assert result["rows"][0]["name"] == "input" and result["rows"][0]["exact_match"] == ev["exact_match"]


def test_the_example_recipe_validates(files: dict[str, Path], tmp_path: Path) -> None:
    """recipes/sft_smollm2.yaml: a causal-LM chain, once its data files exist (here: the tiny ones)."""
    path = Path(__file__).resolve().parents[1] / "recipes" / "sft_smollm2.yaml"
    tree = yaml.safe_load(path.read_text())
    tree["output"] = str(tmp_path / "out")
    tree["model"]["name"] = str(files["model"])
    tree["data"].update(train=str(files["train"]), eval=str(files["eval"]))
    tree["evaluate"]["eval"] = str(files["test"])
    plan = validate_tree(tree, str(path))
    assert plan.task == "causal-lm" and plan.stages == ["finetune", "evaluate", "bench", "report"]
    assert plan.tree["method"]["name"] == "lora"
