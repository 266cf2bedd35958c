"""Transfer-set augmentation: neighbours from embeddings, replacement, pair swaps, CLI, bad input."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch
import yaml
from tiny import WORDS, bert_tokenizer, sentiment_rows, write_tsv

from slimtune.cli.main import main
from slimtune.data.augment import AugmentConfig, augment_rows, augment_text, word_neighbours
from slimtune.data.datasets import load_classification


def test_neighbours_are_the_nearest_whole_words_by_cosine() -> None:
    tok = bert_tokenizer()  # the tiny BERT's lower-casing WordPiece vocabulary
    vocab = tok.get_vocab()
    emb = torch.randn(len(vocab), 16, generator=torch.Generator().manual_seed(0))
    emb[vocab["great"]] = emb[vocab["good"]] * 3 + 0.01  # same direction, other norm: cosine ~1
    emb[vocab["awful"]] = emb[vocab["bad"]] + 0.01
    nb = word_neighbours(emb, tok, {"Good", "bad", "unknownword", "a"}, k=3)
    assert nb["Good"][0] == "great"  # looked up case-insensitively in a lower-cased vocabulary
    assert nb["bad"][0] == "awful"
    assert "unknownword" not in nb  # not one whole-word token: never replaced
    assert "a" not in nb  # one letter: not a replaceable word
    assert all(len(v) == 3 and w.lower() not in v for w, v in nb.items())
    specials = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    assert not specials & {x for v in nb.values() for x in v}


def test_augment_text_replaces_words_only_and_keeps_case_and_punctuation() -> None:
    nb = {"good": ["fine"], "Movie": ["film"], "the": ["a"]}
    rng = random.Random(0)
    assert augment_text("Movie was good , the end .", nb, 1.0, rng) == "Film was fine , a end ."
    assert augment_text("good", nb, 1e-9, rng) == "good"
    assert augment_text("GOOD!", {"GOOD": ["nice"]}, 1.0, rng) == "NICE!"


def test_augment_rows_makes_new_distinct_rows_and_swaps_pairs() -> None:
    nb = {w: [x for x in WORDS if x != w][:5] for w in WORDS if len(w) > 1}
    texts = ["the movie was good", "a bad plot", "the actor"]
    cfg = AugmentConfig(copies=4, prob=0.5, seed=1)
    rows = augment_rows(texts, None, nb, cfg)
    assert len(rows) == len(set(rows)) <= 4 * len(texts)
    assert not {r[0] for r in rows} & set(texts)  # inputs are never repeated
    assert all(r[1] is None for r in rows)
    assert rows == augment_rows(texts, None, nb, cfg)  # seeded
    assert rows != augment_rows(texts, None, nb, AugmentConfig(copies=4, prob=0.5, seed=2))

    pairs = ["a good story", "the plot was bad", "an actor"]
    prow = augment_rows(texts, pairs, nb, AugmentConfig(copies=2, prob=0.5, seed=1))
    assert all(r[1] is not None for r in prow)
    assert {(b, a) for a, b in zip(texts, pairs, strict=True)} <= set(prow)  # each original swapped once
    no_swap = augment_rows(texts, pairs, nb, AugmentConfig(copies=2, prob=0.5, seed=1, swap_pairs=False))
    assert not {(b, a) for a, b in zip(texts, pairs, strict=True)} & set(no_swap)
    sources: list[int] = []
    mapped = augment_rows(["good one", "bad two", "good three"], None, {"good": ["fine"]}, AugmentConfig(prob=1.0),
                          sources)
    assert mapped == [("fine one", None), ("fine three", None)] and sources == [0, 2]
    few = augment_rows(texts, None, nb, AugmentConfig(copies=2, min_words=3))
    assert len(few) <= 2 * 2  # "the actor" has 2 replaceable words: skipped
    assert len(augment_rows(texts, None, nb, AugmentConfig(copies=2, max_rows=1))) <= 2


def test_cli_writes_a_transfer_set_that_distill_reads(tmp_path: Path, tiny_assets, tiny_bert_dir: Path) -> None:
    teacher = tiny_bert_dir
    rows = sentiment_rows(30)
    train = tiny_assets.tsv(30)
    out = tmp_path / "aug" / "train.aug.tsv"
    assert main(["augment", "--model", str(teacher), "--input", str(train), "--output", str(out),
                 "--copies", "3", "--neighbours", "4"]) == 0
    info = json.loads(Path(str(out) + ".json").read_text())
    aug = load_classification(out, require_labels=False)
    assert aug.labels is None and aug.pairs is None
    assert len(aug.texts) == info["rows_out"] > 30
    assert not set(aug.texts) & {t for t, _ in rows}
    assert info["settings"]["copies"] == 3 and info["rows_in"] == 30
    # --keep-labels (the no-KD ablation) copies each source row's label, under the input's column name.
    labelled = tmp_path / "aug" / "labelled.tsv"
    assert main(["augment", "--model", str(teacher), "--input", str(train), "--output", str(labelled),
                 "--copies", "3", "--neighbours", "4", "--keep-labels"]) == 0
    lab = load_classification(labelled)
    assert lab.texts == aug.texts and lab.labels is not None and set(lab.label_names) <= {"0", "1"}
    assert labelled.read_text().splitlines()[0] == "sentence\tlabel"
    # The teacher labels it: slimtune distill reads it as a transfer set.
    assert main(["distill", "--teacher", str(teacher), "--train", str(train), "--eval", str(train),
                 "--student-layers", "1", "--epochs", "1", "--batch-size", "8", "--output", str(tmp_path / "s"),
                 "--cache-dir", str(tmp_path / "cache"), "--unlabeled", str(out), "train.tensorboard=false"]) == 0
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["transfer_set"]["added"] == m["transfer_set"]["read"] - m["transfer_set"]["duplicates"] > 0


def test_cli_pairs_keep_their_column_names(tmp_path: Path, tiny_bert_dir: Path) -> None:
    teacher = tiny_bert_dir
    src = tmp_path / "pairs.tsv"
    src.write_text("Quality\t#1 String\t#2 String\n1\tthe movie was good\ta good film\n0\tbad plot\tthe actor was happy\n")
    out = tmp_path / "pairs.aug.tsv"
    assert main(["augment", "--model", str(teacher), "--input", str(src), "--output", str(out), "--copies", "2"]) == 0
    assert out.read_text().splitlines()[0] == "#1 String\t#2 String"
    aug = load_classification(out, require_labels=False)
    assert aug.pairs is not None and ("a good film", "the movie was good") in set(zip(aug.texts, aug.pairs, strict=True))


def test_cli_bad_input_exits_2_and_keeps_files(tmp_path: Path, capsys, tiny_bert_dir: Path) -> None:  # noqa: ANN001
    teacher = tiny_bert_dir
    train = write_tsv(tmp_path / "train.tsv", sentiment_rows(5))  # its own copy: the test tries to overwrite it
    before = train.read_text()
    base = ["augment", "--model", str(teacher)]
    assert main([*base, "--input", str(tmp_path / "missing.tsv"), "--output", str(tmp_path / "o.tsv")]) == 2
    assert "missing.tsv" in capsys.readouterr().err
    assert main([*base, "--input", str(train), "--output", str(train)]) == 2  # would overwrite its input
    assert train.read_text() == before
    assert main([*base, "--input", str(train), "--output", str(tmp_path / "o.tsv"), "--prob", "0"]) == 2
    assert "--prob" in capsys.readouterr().err
    assert not (tmp_path / "o.tsv").exists() and not (tmp_path / "o.tsv.augment.yaml").exists()
    assert main(["augment", "--input", str(train), "--output", str(tmp_path / "o.tsv")]) == 2  # no --model
    assert "--model: is required" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine\t1\n\t0\n")
    assert main([*base, "--input", str(bad), "--output", str(tmp_path / "o.tsv")]) == 2
    assert "bad.tsv:3" in capsys.readouterr().err


def test_bpe_vocabularies_count_only_word_initial_tokens() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slimtune.data.augment import _word_tokens

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    corpus = [" ".join(WORDS)] * 20 + ["the movies were goodish"] * 5
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>")
    table = _word_tokens(tok)
    vocab = tok.get_vocab()
    assert table["movie"] == vocab["Ġmovie"] and table["good"] == vocab["Ġgood"]
    bare = [t for t in vocab if t.isalpha() and t.isascii() and len(t) > 1 and "Ġ" + t not in vocab]
    assert bare and not set(bare) & set(table)  # word-internal pieces are never replacement words


def test_cli_settings_file_repeats_the_run(tmp_path: Path, capsys, tiny_assets, tiny_bert_dir: Path) -> None:  # noqa: ANN001
    """OUTPUT.augment.yaml holds the resolved settings; --config reads it back (flags win)."""
    out = tmp_path / "a.tsv"
    flags = ["--copies", "2", "--prob", "0.6", "--no-swap-pairs", "--seed", "5", "--neighbours", "3"]
    assert main(["augment", "--model", str(tiny_bert_dir), "--input", str(tiny_assets.tsv(30)),
                 "--output", str(out), *flags]) == 0
    saved = tmp_path / "a.tsv.augment.yaml"
    settings = yaml.safe_load(saved.read_text())
    assert settings == {**dataclasses.asdict(AugmentConfig()), "model": str(tiny_bert_dir),
                        "input": str(tiny_assets.tsv(30)), "output": str(out), "copies": 2, "prob": 0.6,
                        "swap_pairs": False, "seed": 5, "neighbours": 3}
    again = tmp_path / "b.tsv"
    assert main(["augment", "--config", str(saved), "--output", str(again)]) == 0
    assert again.read_text() == out.read_text()
    assert yaml.safe_load((tmp_path / "b.tsv.augment.yaml").read_text()) == {**settings, "output": str(again)}
    capsys.readouterr()
    assert main(["augment", "--config", str(saved), "--copies", "4", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == {**settings, "copies": 4}
    bad = tmp_path / "bad.yaml"
    bad.write_text(saved.read_text() + "copiez: 3\n")
    assert main(["augment", "--config", str(bad), "--print-config"]) == 2
    assert "unknown key 'copiez'" in capsys.readouterr().err
