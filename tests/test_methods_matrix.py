"""Every registered method x {tiny BERT classifier, tiny Llama LM} through the same battery.

PEFT's ``PeftCommonTester`` idea: apply -> forward -> a few steps of the real training loop ->
export -> load -> the same outputs. Methods are taken from ``method_names()``, so a method added
later is covered without touching this file. Plus method-specific checks: AdaLoRA really
re-allocates ranks, shared layers are stored once and reload exactly, adapters reload onto a
fresh base, and ``slimtune evaluate`` reads the custom formats.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import SPECIALS, bert_classifier, bert_tokenizer, tiny_model

from slimtune.config.recipe import RecipeError, TrainConfig
from slimtune.data.datasets import TokenizedData
from slimtune.methods import MethodContext, get_method, method_names
from slimtune.models.loading import count_params, load_model
from slimtune.train.loop import train

ARCHS = ["bert", "llama"]
TASK = {"bert": "classification", "llama": "causal-lm"}
STEPS = 4
# Methods whose model equals the base model right after apply (adapters start as identity).
IDENTITY_AT_INIT = {"full", "lora", "adalora", "ia3", "adapters"}
# Methods whose export merges the adapter into the weights (compared at 1e-4, not 1e-5).
MERGING = {"lora", "adalora", "ia3", "qlora"}
# Methods whose PEFT adapter was trained over a 4-bit NF4 base (QLoRA).
NF4_BASE = {"qlora"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    # Tiny models: threads only add overhead (and the machine is shared).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(arch: str) -> torch.nn.Module:
    return tiny_model(arch, layers=2)


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny base models saved as HF folders (PEFT adapters and loaders refer to them by path)."""
    out = {}
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(f"base-{arch}")
        _tiny(arch).save_pretrained(d)
        out[arch] = str(d)
    return out


def _data(arch: str, n: int = 16) -> TokenizedData:
    g = torch.Generator().manual_seed(1)
    if arch == "bert":
        ids = [torch.randint(3, 100, (int(torch.randint(5, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
        return TokenizedData(ids, None, [i % 2 for i in range(n)], pad_id=0)
    ids = [torch.randint(3, 100, (16,), generator=g).tolist() for _ in range(n // 2)]
    return TokenizedData(ids, None, None, pad_id=0, causal=True)


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 100, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _out(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**_inputs()).logits.float()


def _train(model: torch.nn.Module, name: str, cfg: object, arch: str, out: Path, steps: int = STEPS) -> dict:
    tc = TrainConfig(max_steps=steps, batch_size=4, lr=1e-2, warmup_ratio=0.0, tensorboard=False,
                     progress=False, log_every=1, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    return train(model, get_method(name), cfg, _data(arch), tc, out, total_steps=steps)


def _apply(name: str, arch: str, base_dir: str, steps: int = STEPS, **cfg_kw: object) -> tuple:
    method = get_method(name)
    cfg = method.config_cls(**cfg_kw)
    ctx = MethodContext(task=TASK[arch], total_steps=steps, base_model=base_dir)
    model = method.apply(load_model(base_dir, TASK[arch]), cfg, ctx)
    return method, cfg, ctx, model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", method_names())
def test_method_matrix(name: str, arch: str, base_dirs: dict[str, str], tmp_path: Path) -> None:
    base_dir = base_dirs[arch]
    base_out = _out(load_model(base_dir, TASK[arch]))
    method, cfg, ctx, model = _apply(name, arch, base_dir)
    assert count_params(model, trainable_only=True) > 0, f"{name} left nothing trainable"
    if name in IDENTITY_AT_INIT:
        torch.testing.assert_close(_out(model), base_out, atol=1e-5, rtol=0)

    summary = _train(model, name, cfg, arch, tmp_path / "run")
    assert summary["steps"] == STEPS
    trained = _out(model)
    assert (trained - base_out).abs().max() > 1e-4, f"{name}: training did not change the outputs"

    out = tmp_path / "export"
    out.mkdir()
    exported = method.export(model, cfg, out, ctx)
    tol = 1e-4 if name in MERGING else 1e-5
    torch.testing.assert_close(_out(exported), trained, atol=tol, rtol=0)  # merged == unmerged

    loaded = load_model(str(out), TASK[arch])  # plain folder, or the method's own format
    torch.testing.assert_close(_out(loaded), _out(exported), atol=1e-5, rtol=0)

    if (out / "adapter" / "adapter_config.json").is_file():  # PEFT adapter onto a fresh base
        from peft import PeftModel

        fresh = load_model(base_dir, TASK[arch])
        if name in NF4_BASE:  # trained over NF4-rounded base weights: round the fresh base the same way
            from slimtune.compress.quant.codebook import decode_nf4, encode_nf4
            from slimtune.methods._peft import default_target_modules

            mods = dict(fresh.named_modules())
            for n in default_target_modules(fresh):
                mods[n].weight.data = decode_nf4(*encode_nf4(mods[n].weight.data, cfg.block_size))
        peft_model = PeftModel.from_pretrained(fresh, out / "adapter")
        torch.testing.assert_close(_out(peft_model), trained, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_reload_onto_fresh_base(arch: str, base_dirs: dict[str, str], tmp_path: Path) -> None:
    from slimtune.methods.adapters import Bottleneck, load_adapters

    method, cfg, ctx, model = _apply("adapters", arch, base_dirs[arch], size=8, placement="ffn")
    assert sum(isinstance(m, Bottleneck) for m in model.modules()) == 2  # Pfeiffer: 1 per layer
    _train(model, "adapters", cfg, arch, tmp_path / "run")
    method.export(model, cfg, tmp_path, ctx)
    stored = tmp_path / "adapters" / "adapter_model.safetensors"
    assert stored.stat().st_size < 0.5 * (tmp_path / "model_with_adapters.safetensors").stat().st_size
    fresh = load_adapters(load_model(base_dirs[arch], TASK[arch]), tmp_path / "adapters")
    torch.testing.assert_close(_out(fresh), _out(model), atol=1e-5, rtol=0)
    info = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert info["placement"] == "ffn" and info["size"] == 8 and info["base_model_name_or_path"] == base_dirs[arch]


def test_adapters_unknown_architecture_is_a_clear_error() -> None:
    from slimtune.methods.adapters import find_targets

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no attention output projection found in Sequential"):
        find_targets(model, "both")
    assert find_targets(model, "ffn", ffn_modules=[r"^2$"]) == {"ffn": ["2"]}


def test_adalora_allocates_ranks_across_layers(base_dirs: dict[str, str], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    steps = 20
    method, cfg, ctx, model = _apply("adalora", "bert", base_dirs["bert"], steps=steps, init_r=6, target_r=2)
    pc = model.peft_config["default"]
    assert (pc.total_step, pc.tinit, pc.tfinal) == (steps, 2, 4)  # from the run: 10% / 20%
    _train(model, "adalora", cfg, "bert", tmp_path / "run", steps=steps)
    method.export(model, cfg, tmp_path, ctx)
    ranks = json.loads((tmp_path / "adalora_ranks.json").read_text())
    values = list(ranks["layers"].values())
    assert len(values) == 12  # 6 linear layers x 2 blocks
    assert sum(values) == ranks["budget"] == 2 * 12  # final budget met exactly
    assert len(set(values)) > 1 and max(values) > 2, f"allocation did not differ across layers: {values}"
    # The saved PEFT adapter is resized to the final pattern (no dead rank stored).
    state = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    e_sizes = sorted(t.shape[0] for k, t in state.items() if "lora_E" in k)
    assert sum(e_sizes) == 24 and e_sizes[0] != e_sizes[-1]


def test_adalora_schedule_fits_short_runs_and_rejects_impossible_ones() -> None:
    from slimtune.methods.adalora import AdaLoraMethodConfig, schedule

    for steps in (1, 2, 3, 7, 100):
        tinit, tfinal = schedule(AdaLoraMethodConfig(), steps)
        assert tinit < steps - tfinal
    with pytest.raises(RecipeError, match=r"method.tinit=5 \+ method.tfinal=5 leave no budgeting phase in a run of 8"):
        schedule(AdaLoraMethodConfig(tinit=5, tfinal=5), 8)
    with pytest.raises(RecipeError, match="method.target_r"):
        AdaLoraMethodConfig(init_r=8, target_r=8).validate(None)


def test_sharing_groups() -> None:
    from slimtune.methods.sharing import resolve_groups

    assert resolve_groups(3, 6) == [[0, 1], [2, 3], [4, 5]]
    assert resolve_groups(0, 5) == [[0, 1], [2, 3], [4]]
    assert resolve_groups(2, 5) == [[0, 1, 2], [3, 4]]
    assert resolve_groups(3, 6, "cycle") == [[0, 3], [1, 4], [2, 5]]
    assert resolve_groups(2, 5, "cycle") == [[0, 2, 4], [1, 3]]
    assert resolve_groups([[0, 5], [1, 2, 3, 4]], 6, "cycle") == [[0, 5], [1, 2, 3, 4]]
    assert resolve_groups([[0, 5], [1, 2, 3, 4]], 6) == [[0, 5], [1, 2, 3, 4]]
    with pytest.raises(RecipeError, match="every layer index 0..5"):
        resolve_groups([[0, 1], [2, 3]], 6)
    with pytest.raises(RecipeError, match="7 shared blocks for a model with 6 layers"):
        resolve_groups(7, 6)


@pytest.mark.parametrize("embedding_rank", [0, 8])
def test_sharing_stores_once_and_reloads_exactly(embedding_rank: int, tmp_path: Path) -> None:
    from slimtune.methods.sharing import find_layers

    base = tmp_path / "base"
    bert_classifier(layers=6).save_pretrained(base)  # 6 layers of hidden 32, vocabulary 100
    method, mcfg, ctx, model = _apply("sharing", "bert", str(base), groups=3, embedding_rank=embedding_rank)
    _, layers = find_layers(model)
    assert layers[0].attention.self.query.weight is layers[1].attention.self.query.weight
    assert layers[1].attention.self.query.weight is not layers[2].attention.self.query.weight
    before = layers[0].output.dense.weight.detach().clone()
    _train(model, "sharing", mcfg, "bert", tmp_path / "run")
    assert not torch.equal(before, layers[1].output.dense.weight)  # trained through the alias
    out = tmp_path / "export"
    out.mkdir()
    method.export(model, mcfg, out, ctx)
    shared_bytes = (out / "model_shared.safetensors").stat().st_size
    plain_bytes = (base / "model.safetensors").stat().st_size
    unique = count_params(model) * 4  # fp32: every distinct parameter once, nothing more
    assert shared_bytes < unique * 1.02 + 20_000, (shared_bytes, unique)
    assert shared_bytes < plain_bytes * (0.8 if embedding_rank == 0 else 0.7)
    loaded = load_model(str(out), "classification")
    torch.testing.assert_close(_out(loaded), _out(model), atol=0, rtol=0)  # bit-exact
    sidecar = json.loads((out / "slimtune_method.json").read_text())
    assert sidecar["layer_to_block"] == {"0": 0, "1": 0, "2": 1, "3": 1, "4": 2, "5": 2}


def test_sharing_mean_init_is_the_mean(base_dirs: dict[str, str]) -> None:
    base = load_model(base_dirs["llama"], "causal-lm")
    w0, w1 = (base.model.layers[i].mlp.up_proj.weight.detach().clone() for i in (0, 1))
    _, _, _, model = _apply("sharing", "llama", base_dirs["llama"], groups=1, init="mean")
    torch.testing.assert_close(model.model.layers[1].mlp.up_proj.weight.detach(), (w0 + w1) / 2)
    assert model.model.layers[1].self_attn.layer_idx == 1  # modules stay distinct (KV cache)


@pytest.mark.parametrize("name", ["adapters", "sharing"])
def test_finetune_then_evaluate_custom_format(name: str, tmp_path: Path) -> None:
    """``slimtune finetune`` -> ``slimtune evaluate --model DIR`` on the methods' own formats."""
    from slimtune.config.recipe import resolve
    from slimtune.evaluate.evaluator import run_evaluate
    from slimtune.train.finetune import run_finetune

    words = [f"w{i}" for i in range(90)]
    base = tmp_path / "base"
    model = _tiny("bert")
    model.config.vocab_size = 95
    model.resize_token_embeddings(95)
    model.save_pretrained(base)
    bert_tokenizer([*SPECIALS, *words]).save_pretrained(base)
    rows = ["sentence\tlabel"] + [f"{' '.join(words[(i * 7 + j) % 90] for j in range(5))}\t{i % 2}" for i in range(24)]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    recipe = resolve({"output": str(tmp_path / "out"), "model": {"name": str(base)},
                      "data": {"train": str(tmp_path / "train.tsv"), "eval": str(tmp_path / "train.tsv")},
                      "train": {"max_steps": 3, "batch_size": 8, "tensorboard": False, "progress": False},
                      "method": {"name": name}})
    result = run_finetune(recipe)
    again = run_evaluate(str(tmp_path / "out"), str(tmp_path / "train.tsv"), output=str(tmp_path / "m.json"))
    assert again["accuracy"] == result["accuracy"]
    assert abs(again["loss"] - result["loss"]) < 1e-5
