"""Cross-layer sharing relaxations: ``share: matrices`` and per-layer low-rank ``relax_rank``.

Tiny random BERT classifier and Llama LM with 4 layers shared as [[0, 1], [2, 3]]: exactness of
the SVD init at full rank, a small rank measurably closer to the unshared model than plain
sharing, per-layer norms under ``share: matrices``, the real training loop through the method,
export -> ``load_model`` bit-exact with every shared matrix stored once, and old sidecars.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_model

from slimtune.config.recipe import RecipeError, TrainConfig
from slimtune.data.datasets import TokenizedData
from slimtune.methods import MethodContext, get_method
from slimtune.methods.sharing import (
    RelaxedLinear,
    SharingMethodConfig,
    apply_structure,
    find_layers,
)
from slimtune.models.loading import load_model
from slimtune.train.loop import train

ARCHS = ["bert", "llama"]
TASK = {"bert": "classification", "llama": "causal-lm"}
GROUPS = [[0, 1], [2, 3]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(arch: str) -> torch.nn.Module:
    model = tiny_model(arch, layers=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # distinct, non-trivial norms and biases (init leaves them 1 / 0)
                p.add_(0.1 * torch.randn_like(p))
            else:  # std 0.02 -> 0.1: layers then change the logits visibly (sharing is measurable)
                p.mul_(5)
    return model.eval()


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = {}
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(f"base-{arch}")
        _tiny(arch).save_pretrained(d)
        out[arch] = str(d)
    return out


def _logits(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 100, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def _shared(arch: str, share: str, relax_rank: int, init: str = "mean") -> torch.nn.Module:
    model = _tiny(arch)
    apply_structure(model, {"groups": GROUPS, "share": share, "relax_rank": relax_rank}, init=init)
    return model


def _linear(arch: str, layer: torch.nn.Module) -> torch.nn.Module:
    return layer.attention.self.query if arch == "bert" else layer.self_attn.q_proj


def _norm(arch: str, layer: torch.nn.Module) -> torch.nn.Module:
    return layer.output.LayerNorm if arch == "bert" else layer.input_layernorm


@pytest.mark.parametrize("init", ["mean", "first"])
@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_relax_reproduces_the_unshared_model(arch: str, init: str) -> None:
    ref = _logits(_tiny(arch))
    model = _shared(arch, "matrices", relax_rank=10_000, init=init)  # clipped to min(in, out) per Linear
    _, layers = find_layers(model)
    wrapped = [m for m in layers.modules() if isinstance(m, RelaxedLinear)]
    assert len(wrapped) == 4 * (6 if arch == "bert" else 7)  # every Linear of every layer
    assert all(m.rank == min(m.in_features, m.out_features) for m in wrapped)
    assert _linear(arch, layers[0]).base.weight is _linear(arch, layers[1]).base.weight
    torch.testing.assert_close(_logits(model), ref, atol=1e-5, rtol=0)
    plain = _logits(_shared(arch, "matrices", relax_rank=0, init=init))
    assert (plain - ref).abs().max() > 1e-3  # sharing alone really changes the model


def _hidden(model: torch.nn.Module) -> torch.Tensor:
    """Last hidden states (8, 16, 32) of a fixed batch: 4k numbers, a steadier error measure
    than the 2 logits of the tiny classifier."""
    ids = torch.randint(3, 100, (8, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model.eval()(input_ids=ids, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("share", ["all", "matrices"])
@pytest.mark.parametrize("arch", ARCHS)
def test_small_relax_rank_is_closer_than_plain_sharing(arch: str, share: str) -> None:
    ref = _hidden(_tiny(arch))
    mse = {r: ((_hidden(_shared(arch, share, r)) - ref) ** 2).mean().item() for r in (0, 4, 8)}
    assert mse[4] < mse[0] and mse[8] < mse[4], mse  # rank 4 / 8 of 32 on random weights


@pytest.mark.parametrize("arch", ARCHS)
def test_share_matrices_keeps_norms_and_biases_per_layer(arch: str) -> None:
    orig = _tiny(arch)
    _, orig_layers = find_layers(orig)
    model = _shared(arch, "matrices", relax_rank=0)
    _, layers = find_layers(model)
    for a, b in GROUPS:
        assert _linear(arch, layers[a]).weight is _linear(arch, layers[b]).weight
        na, nb = _norm(arch, layers[a]), _norm(arch, layers[b])
        assert na is not nb and na.weight is not nb.weight
        for i, n in ((a, na), (b, nb)):  # own original values, not the mean
            torch.testing.assert_close(n.weight, _norm(arch, orig_layers[i]).weight, atol=0, rtol=0)
    if arch == "bert":
        assert layers[0].attention.self.query.bias is not layers[1].attention.self.query.bias
    n_params = len(list(model.parameters()))
    all_shared = _shared(arch, "all", relax_rank=0)
    # matrices only: exactly the 1-D parameters of the second member of each group are extra
    extra = sum(p.dim() == 1 for p in layers[1].parameters()) * len(GROUPS)
    assert n_params == len(list(all_shared.parameters())) + extra


@pytest.mark.parametrize("arch", ARCHS)
def test_train_export_reload_stores_shared_matrices_once(arch: str, base_dirs: dict[str, str], tmp_path: Path) -> None:
    from safetensors import safe_open

    method = get_method("sharing")
    cfg = SharingMethodConfig(groups=2, share="matrices", relax_rank=4)
    cfg.validate(None)
    ctx = MethodContext(task=TASK[arch], total_steps=2, base_model=base_dirs[arch])
    model = method.apply(load_model(base_dirs[arch], TASK[arch]), cfg, ctx)
    path, layers = find_layers(model)
    before = _logits(model)
    q0, q1 = _linear(arch, layers[0]), _linear(arch, layers[1])
    A0, A1, W = q0.relax_A.detach().clone(), q1.relax_A.detach().clone(), q0.base.weight.detach().clone()

    # The normal training loop, through the method's hooks.
    g = torch.Generator().manual_seed(1)
    if arch == "bert":
        data = TokenizedData([torch.randint(3, 100, (8,), generator=g).tolist() for _ in range(8)], None,
                             [i % 2 for i in range(8)], pad_id=0)
    else:
        data = TokenizedData([torch.randint(3, 100, (12,), generator=g).tolist() for _ in range(8)], None, None,
                             pad_id=0, causal=True)
    tc = TrainConfig(max_steps=2, batch_size=4, lr=1e-2, warmup_ratio=0.0, tensorboard=False, progress=False,
                     log_every=1, seed=0)
    (tmp_path / "run").mkdir()
    assert train(model, method, cfg, data, tc, tmp_path / "run", total_steps=2)["steps"] == 2
    assert q0.base.weight is q1.base.weight  # still one shared tensor after the optimizer
    assert not torch.equal(W, q0.base.weight) and not torch.equal(A0, q0.relax_A) and not torch.equal(A1, q1.relax_A)
    trained = _logits(model)
    assert (trained - before).abs().max() > 1e-4

    out = tmp_path / "export"
    out.mkdir()
    method.export(model, cfg, out, ctx)
    sidecar = json.loads((out / "slimtune_method.json").read_text())
    assert (sidecar["format_version"], sidecar["share"], sidecar["relax_rank"]) == (2, "matrices", 4)
    loaded = load_model(str(out), TASK[arch])
    torch.testing.assert_close(_logits(loaded), trained, atol=0, rtol=0)  # bit-exact

    file = out / "model_shared.safetensors"
    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
    state = model.state_dict()
    distinct = {t.data_ptr(): t for t in state.values()}
    assert len(keys) == len(distinct) < len(state)  # every distinct tensor once, aliases dropped
    q_name = "attention.self.query" if arch == "bert" else "self_attn.q_proj"
    for a, b in GROUPS:
        names = [f"{path}.{i}.{q_name}.base.weight" for i in (a, b)]
        assert sum(n in keys for n in names) == 1, names  # the shared matrix once per group
        for i in (a, b):  # per-layer residual factors each stored
            assert {f"{path}.{i}.{q_name}.relax_A", f"{path}.{i}.{q_name}.relax_B"} <= keys
    unique_bytes = sum(t.numel() * t.element_size() for t in distinct.values())
    assert unique_bytes <= file.stat().st_size < unique_bytes + 20_000
    plain = sum(p.numel() * 4 for p in _tiny(arch).parameters())
    assert file.stat().st_size < plain


def test_version_1_sidecar_still_loads_and_newer_is_refused(base_dirs: dict[str, str], tmp_path: Path) -> None:
    method = get_method("sharing")
    cfg = SharingMethodConfig(groups=2)
    ctx = MethodContext(task="classification", total_steps=1, base_model=base_dirs["bert"])
    model = method.apply(load_model(base_dirs["bert"], "classification"), cfg, ctx)
    method.export(model, cfg, tmp_path, ctx)
    sidecar = tmp_path / "slimtune_method.json"
    info = json.loads(sidecar.read_text())
    v1 = {k: v for k, v in info.items() if k not in ("share", "relax_rank")} | {"format_version": 1}
    sidecar.write_text(json.dumps(v1))
    torch.testing.assert_close(_logits(load_model(str(tmp_path), "classification")), _logits(model), atol=0, rtol=0)
    sidecar.write_text(json.dumps(info | {"format_version": 3}))
    with pytest.raises(ValueError, match=r"slimtune_method.json: format_version 3 is newer"):
        load_model(str(tmp_path), "classification")
    sidecar.write_text(json.dumps(info | {"share": "some"}))
    with pytest.raises(ValueError, match=r"slimtune_method.json: key 'share'"):
        load_model(str(tmp_path), "classification")


def test_bad_values_name_the_key(base_dirs: dict[str, str]) -> None:
    with pytest.raises(RecipeError, match=r"method.relax_rank: must be >= 0, got -1"):
        SharingMethodConfig(relax_rank=-1).validate(None)
    with pytest.raises(RecipeError, match=r"method.share: 'some' is not one of"):
        SharingMethodConfig(share="some").validate(None)  # type: ignore[arg-type]
    method = get_method("sharing")
    ctx = MethodContext(task="causal-lm", total_steps=1, base_model=base_dirs["llama"])
    # Tiny Llama: k_proj/v_proj are 16x32 (2 KV heads of 8), so 16 is already full rank there.
    with pytest.raises(RecipeError, match=r"method.relax_rank: 16 must be < min\(in, out\) = 16 of model.layers.0.self_attn.k_proj \(16x32\)"):
        method.apply(load_model(base_dirs["llama"], "causal-lm"), SharingMethodConfig(groups=2, relax_rank=16), ctx)
    method.apply(load_model(base_dirs["llama"], "causal-lm"), SharingMethodConfig(groups=2, relax_rank=15), ctx)


def test_bench_overrides_resolve() -> None:
    """The bench row's overrides go through the recipe parser (types, choices, validate)."""
    from slimtune.config.recipe import parse_override, resolve, set_path

    tree: dict = {"method": {"name": "sharing"}}
    for o in ["method.groups=3", "method.init=mean", "method.embedding_rank=192", "method.share=matrices",
              "method.relax_rank=32"]:
        set_path(tree, *parse_override(o))
    m = resolve(tree).method
    assert (m.groups, m.share, m.relax_rank) == (3, "matrices", 32)
    assert (SharingMethodConfig().share, SharingMethodConfig().relax_rank) == ("all", 0)  # off by default
    with pytest.raises(RecipeError, match=r"method.share: 'none' is not one of"):
        resolve({"method": {"name": "sharing", "share": "none"}})
    with pytest.raises(RecipeError, match=r"method.relax_rank: must be >= 0"):
        resolve({"method": {"name": "sharing", "relax_rank": -2}})
