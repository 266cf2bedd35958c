"""Flag contract of ``slimtune generate``, plus one test that every command has a contract.

Every flag is enumerated from the real parser; each has a row giving a non-default value and the
key of the resolved settings it must arrive at (``--print-config``). Flags that change the text
(``--max-new-tokens``, ``--stop``, ``--temperature`` with ``--seed``) are then run for real on a
tiny Llama and the output must change accordingly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from slimtune.cli.main import COMMANDS, build_parser, main

# flag -> (arguments after --model, key in the printed YAML, value it must have)
ROWS: dict[str, tuple[list[str], str, Any]] = {
    "--config": (["--config", "{cfg}"], "max_new_tokens", 7),
    "--model": (["--model", "{llama2}"], "model", "{llama2}"),
    "--adapter": (["--adapter", "{root}/adapter"], "adapter", "{root}/adapter"),
    "--prompt": (["--prompt", "hello"], "prompt", "hello"),
    "--input": (["--input", "{prompts}"], "input", "{prompts}"),
    "--output": (["--input", "{prompts}", "--output", "{root}/a.jsonl"], "output", "{root}/a.jsonl"),
    "--system": (["--system", "be brief"], "system", "be brief"),
    "--chat-template": (["--no-chat-template", "--chat-template"], "chat_template", True),
    "--no-chat-template": (["--no-chat-template"], "chat_template", False),
    "--max-new-tokens": (["--max-new-tokens", "3"], "max_new_tokens", 3),
    "--temperature": (["--temperature", "0.7"], "temperature", 0.7),
    "--top-p": (["--top-p", "0.9"], "top_p", 0.9),
    "--top-k": (["--top-k", "5"], "top_k", 5),
    "--stop": (["--stop", "###", "--stop", "\n\n"], "stop", ["###", "\n\n"]),
    "--seed": (["--seed", "11"], "seed", 11),
    "--batch-size": (["--batch-size", "3"], "batch_size", 3),
    "--skip-bad-rows": (["--skip-bad-rows"], "skip_bad_rows", True),
    "--no-skip-bad-rows": (["--config", "{cfg_skip}", "--no-skip-bad-rows"], "skip_bad_rows", False),
    "--dtype": (["--dtype", "bfloat16"], "dtype", "bfloat16"),
    "--stream": (["--no-stream", "--stream"], "stream", True),
    "--no-stream": (["--no-stream"], "stream", False),
    "--print-config": ([], "model", "{llama}"),
}


def flags_of(cmd: str) -> list[str]:
    """Every option string of ``slimtune CMD``, from the parser ``main`` builds for it."""
    parser = build_parser([cmd])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd]
    return sorted(o for a in sub._actions for o in a.option_strings if o not in ("-h", "--help"))


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory, tiny_assets: Any) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gen")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("good movie", "bad plot", "the actor")))
    (root / "cfg.yaml").write_text(yaml.safe_dump({"generate": {"max_new_tokens": 7}}))
    (root / "cfg_skip.yaml").write_text(yaml.safe_dump({"skip_bad_rows": True}))
    return {"root": str(root), "llama": str(tiny_assets.llama()), "llama2": str(tiny_assets.llama(layers=1)),
            "prompts": str(prompts), "cfg": str(root / "cfg.yaml"), "cfg_skip": str(root / "cfg_skip.yaml")}


def _fill(v: Any, p: dict[str, str]) -> Any:
    return v.format(**p) if isinstance(v, str) else [_fill(x, p) for x in v] if isinstance(v, list) else v


def _printed(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, f"{argv}: exit {rc}: {err}"
    return yaml.safe_load(out)


def test_every_generate_flag_has_a_row() -> None:
    assert set(ROWS) == set(flags_of("generate")), set(ROWS) ^ set(flags_of("generate"))
    print(f"flag contract: generate {len(ROWS)} flags covered")


@pytest.mark.parametrize("flag", sorted(ROWS))
def test_generate_flag_reaches_its_setting(flag: str, paths: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    extra, key, want = ROWS[flag]
    base = ["generate", "--model", paths["llama"]]
    got = _printed(base + _fill(extra, paths) + ["--print-config"], capsys)
    assert got[key] == _fill(want, paths), (flag, got[key])
    if flag == "--print-config":
        return
    # and without the flag (the same row, the flag and its value taken out) the value differs
    i = extra.index(flag)
    n = 2 if i + 1 < len(extra) and not extra[i + 1].startswith("--") else 1
    without = _printed(base + _fill(extra[:i] + extra[i + n:], paths) + ["--print-config"], capsys)
    assert without[key] != got[key], (flag, key)


def test_every_command_has_a_flag_contract() -> None:
    """Each command of the table is covered by one of the tests/test_flags_*.py contracts."""
    covered: set[str] = {"generate"}
    for path in Path(__file__).parent.glob("test_flags_*.py"):
        text = path.read_text(encoding="utf-8")
        covered |= {c for c in COMMANDS if f'"{c}"' in text}
    assert covered == set(COMMANDS), set(COMMANDS) - covered


def test_generation_flags_change_the_text(paths: dict[str, str], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    def answers(*extra: str) -> list[dict[str, Any]]:
        out = tmp_path / f"a{len(list(tmp_path.iterdir()))}.jsonl"
        assert main(["generate", "--model", paths["llama"], "--input", paths["prompts"], "--output", str(out),
                     "--no-chat-template", *extra]) == 0
        assert (out.parent / f"{out.name}.generate.yaml").is_file()  # the resolved settings beside the output
        return [json.loads(line) for line in out.read_text().splitlines()]

    short, long_ = answers("--max-new-tokens", "2"), answers("--max-new-tokens", "6")
    assert all(a["tokens"] <= 2 for a in short) and any(a["tokens"] > 2 for a in long_)
    greedy = answers("--max-new-tokens", "6")
    hot = answers("--max-new-tokens", "6", "--temperature", "5", "--seed", "3")
    assert [a["generated"] for a in greedy] == [a["generated"] for a in long_]  # greedy is deterministic
    assert [a["generated"] for a in hot] != [a["generated"] for a in greedy]
    again = answers("--max-new-tokens", "6", "--temperature", "5", "--seed", "3")
    assert [a["generated"] for a in again] == [a["generated"] for a in hot]  # same seed, same text
    # a stop string cuts the answer where it appears, and is not part of it
    text = next(a["generated"] for a in long_ if len(a["generated"].strip()) >= 2)
    stop = text.strip()[-1]  # a piece the greedy answer really produces
    stopped = answers("--max-new-tokens", "6", "--stop", stop)
    assert all(stop not in a["generated"] for a in stopped)
    assert any(len(s["generated"]) < len(g["generated"]) for s, g in zip(stopped, long_, strict=True))
    capsys.readouterr()
