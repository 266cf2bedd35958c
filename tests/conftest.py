"""Shared fixtures: tiny models and data files from ``tiny.py``, and the ``needs_assets`` marker.

Folders and files are built once per session, on first request, and cached by their arguments:
``tiny_assets.bert(layers=3)`` in two tests is one folder. They are shared, so tests must treat
them as read-only (write outputs under ``tmp_path``); a test that needs a modified copy builds
it with ``tiny.py`` under its own ``tmp_path``.

``@pytest.mark.needs_assets("minilm", ...)`` marks a test that loads an installed packaged
model (aliases of :mod:`slimtune.models.loading`); it is skipped, saying what to install,
where that package is missing (a fresh clone without ``scripts/install-assets.sh``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tiny


class TinyAssets:
    """Builds tiny model folders and data files under one session folder, each once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[str, Path] = {}

    def _once(self, kind: str, suffix: str, build: Any, **kw: Any) -> Path:
        key = kind + "".join(f"-{k}={v}" for k, v in sorted(kw.items()))
        if key not in self._made:
            path = self.root / f"{kind}{len(self._made)}{suffix}"
            self._made[key] = build(path, **kw)
        return self._made[key]

    def bert(self, **kw: Any) -> Path:
        """A :func:`tiny.make_tiny_bert` folder (default: 2 layers, hidden 32, labels 0/1)."""
        return self._once("bert", "", tiny.make_tiny_bert, **kw)

    def llama(self, **kw: Any) -> Path:
        """A :func:`tiny.make_tiny_llama` folder (default: 2 layers, hidden 32, tied embeddings)."""
        return self._once("llama", "", tiny.make_tiny_llama, **kw)

    def tsv(self, n: int, seed: int = 0, names: tuple[str, str] | None = None) -> Path:
        """``n`` :func:`tiny.sentiment_rows` as a sentence/label TSV; ``names``: labels for 0 and 1."""
        def build(path: Path, n: int, seed: int, names: tuple[str, str] | None) -> Path:
            rows = tiny.sentiment_rows(n, seed)
            return tiny.write_tsv(path, [(t, names[y]) for t, y in rows] if names else rows)

        return self._once("sentiment", ".tsv", build, n=n, seed=seed, names=names)

    def separable_csv(self, n: int, seed: int = 0) -> Path:
        """``n`` :func:`tiny.separable_rows` (one cue word decides the label) as a text,label CSV."""
        return self._once("separable", ".csv", lambda p, n, seed: tiny.write_csv(p, tiny.separable_rows(n, seed)),
                          n=n, seed=seed)

    def corpus(self, n_words: int = 3000, seed: int = 0) -> Path:
        """A :func:`tiny.write_corpus` text file for causal-LM runs."""
        return self._once("corpus", ".txt", tiny.write_corpus, n_words=n_words, seed=seed)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    return TinyAssets(tmp_path_factory.mktemp("tiny-assets"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tiny_assets: TinyAssets) -> Path:
    """Tiny random BERT classifier folder (2 layers, hidden 32, 36-token WordPiece tokenizer)."""
    return tiny_assets.bert()


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_assets: TinyAssets) -> Path:
    """Tiny random Llama causal-LM folder (2 layers, hidden 32, 34-token word-level tokenizer)."""
    return tiny_assets.llama()


@pytest.fixture(scope="session")
def tiny_corpus(tiny_assets: TinyAssets) -> Path:
    """3000 words of repetitive toy text."""
    return tiny_assets.corpus()


# --------------------------------------------------------------------------------------------
# needs_assets
# --------------------------------------------------------------------------------------------


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs_assets"):
        if not mark.args:
            raise pytest.UsageError(f"{item.nodeid}: needs_assets() names no alias")
        from slimtune.models.loading import ALIASES, ModelError, check_exists

        for alias in mark.args:
            if alias not in ALIASES:
                raise pytest.UsageError(f"{item.nodeid}: needs_assets({alias!r}): not an alias of {sorted(ALIASES)}")
            try:
                check_exists(alias)  # the cheap check: the package is installed, no weights read
            except ModelError as e:
                pytest.skip(f"packaged model {alias!r} not installed: {e}")
