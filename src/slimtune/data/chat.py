"""Chat and instruction data for supervised fine-tuning (SFT): reading, rendering, masking, packing.

Files are JSONL (one object a line) or a ``.json`` array of objects, in one of these shapes,
detected from the first row's keys or named by ``data.format``:

- ``chat``: ``{"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}``, and
  ShareGPT's ``{"conversations": [{"from": "system|human|gpt", "value": "..."}, ...]}``;
- ``alpaca``: ``{"instruction": ..., "input": ... (optional, may be empty), "output": ...}``
  (an optional ``"system"`` string becomes a system message);
- ``prompt-completion``: ``{"prompt": ..., "completion": ...}``, strings (one user turn and one
  assistant turn) or message lists (TRL's conversational form).

Rendering. Conversations are rendered with the tokenizer's own chat template
(``data.chat_template=auto``). A tokenizer without one gets :data:`FALLBACK_CHAT_TEMPLATE`
(``### User:`` / ``### Assistant:`` headers, every answer ends with the EOS token), announced in a
log line and recorded in ``metrics.json``; the template is then saved with the exported tokenizer,
so ``slimtune generate`` prompts the model exactly as it was trained. ``none`` concatenates the
contents with no markup (each answer followed by EOS: classic prompt + completion training), and
is saved as the model's template the same way.

Masking. Only assistant tokens carry a loss; every other label is -100. Assistant spans are found
by rendering prefixes: for the assistant turn ``i`` the prompt is
``render(messages[:i], add_generation_prompt=True)`` and the turn ends where
``render(messages[:i + 1])`` ends; both must extend the previous rendering as strings. Each
piece's tokens are what tokenizing the text through that piece adds to the tokens of the text
before it (diffed token ids), so an example is its whole text's tokenization and every prompt is
tokenized exactly as ``slimtune generate`` tokenizes it; where a token merges across a boundary,
that example's pieces are tokenized one by one instead (``piecewise_tokenized`` counts them). Every assistant turn of a
multi-turn conversation is trained. A template that is not prefix-stable (one that rewrites
earlier turns, e.g. dropping past reasoning) makes one example per assistant turn instead, each
trained on its last answer only; ``split_conversations`` counts them. Whitespace the template
puts after an answer (the ``\\n`` after ``<|im_end|>``) is not trained.

Truncation. Examples longer than ``data.max_length`` tokens are cut on the right (counted as
``truncated``). One whose answer tokens are all cut away is dropped and counted as ``dropped``,
never trained with an empty loss. Both counts are printed and written to ``metrics.json``.

Packing (``data.packing``). Whole examples are packed greedily into blocks of at most
``max_length`` tokens (an example is never split). Position ids restart at 0 for each example and
the batch carries no attention mask; from those positions transformers (>= 4.56, through
``masking_utils``: Llama, Mistral, Qwen2, SmolLM, ...) builds a block-diagonal causal mask, so
attention does NOT cross example boundaries. Models whose attention code does not use
``masking_utils`` would attend across examples. ``tests/test_chat_sft.py`` checks that a packed
example's logits equal its logits alone.

Bad rows (invalid JSON, a missing key, an unknown role, non-string or empty content, a conversation
ending on a user turn) raise :class:`~slimtune.data.datasets.DataError` naming ``file:line``;
``data.skip_bad_rows`` counts and skips them instead.
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from slimtune.data.datasets import DataError, TokenizedData, _pad_id

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
CHAT_FORMATS = ("chat", "alpaca", "prompt-completion")
FORMATS = ("auto", "text", *CHAT_FORMATS)
TEMPLATE_MODES = ("auto", "model", "fallback", "none")
ROLES = ("system", "user", "assistant")
# ShareGPT role names -> ours
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                   "assistant": "assistant"}

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}"
    "{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)
"""The template used when a tokenizer has none: ``### System:`` / ``### User:`` /
``### Assistant:`` headers, a blank line between turns, EOS after every answer."""

PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}{% endfor %}"
)
"""``data.chat_template=none``: the contents concatenated, no markup, EOS after every answer."""

Message = dict[str, str]


@dataclass
class Conversation:
    """One row of a chat/instruction file, as messages."""

    line: int
    """1-based line of the row in its file (the element's first line for a .json array)."""
    messages: list[Message]


@dataclass
class ChatFile:
    """The conversations read from one file."""

    path: str
    format: str
    conversations: list[Conversation]
    rows: int = 0
    """Rows in the file (good and bad)."""
    skipped: int = 0
    """Bad rows skipped (``skip_bad_rows``)."""

    def __len__(self) -> int:
        return len(self.conversations)


# --------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------


def _iter_json(path: Path, text: str, skip_bad_rows: bool) -> tuple[list[tuple[int, Any]], int]:
    """``([(line, parsed object), ...], invalid-JSON rows skipped)`` of a JSONL or .json file."""
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        return _iter_json_array(path, text), 0
    rows: list[tuple[int, Any]] = []
    bad = 0
    for i, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            if not skip_bad_rows:
                raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
            bad += 1
    return rows, bad


def _iter_json_array(path: Path, text: str) -> list[tuple[int, Any]]:
    """Elements of a top-level JSON array with the line each starts on."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    out: list[tuple[int, Any]] = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise DataError(f"{path}: invalid JSON (the array is not closed)")
        if text[pos] == "]":
            return out
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{text.count(chr(10), 0, e.pos) + 1}: invalid JSON ({e.msg})") from None
        out.append((line, obj))


def detect_format(obj: Any) -> str | None:
    """The format a row's keys say (``chat``, ``alpaca``, ``prompt-completion``, ``text``), or None."""
    if not isinstance(obj, dict):
        return None
    keys = set(obj)
    if "messages" in keys or "conversations" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt-completion"
    if "text" in keys:
        return "text"
    return None


def first_object(path: Path, encoding: str) -> tuple[int, Any] | None:
    """The first parseable row of a JSON/JSONL file (cheap: reads lines until one parses)."""
    text = _read(path, encoding)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        rows = _iter_json_array(path, text)
        return rows[0] if rows else None
    for i, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        if line.strip():
            try:
                return i, json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _read(path: Path, encoding: str) -> str:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid {encoding} text ({e.reason} at byte {e.start}); "
                        f"set data.encoding (e.g. latin-1)") from None


def data_format(path: str | os.PathLike, fmt: str = "auto", encoding: str = "utf-8") -> str:
    """The format of a causal-LM data file: ``text`` (raw text) or one of :data:`CHAT_FORMATS`.

    ``fmt`` other than ``auto`` is returned as is (after a check). With ``auto``, a directory or
    a file not ending in .jsonl/.json/.ndjson is raw text; a JSON file is told by its first row's
    keys, and a DataError names the line when they fit no format.
    """
    if fmt not in FORMATS:
        raise DataError(f"data.format: {fmt!r} is not one of {list(FORMATS)}")
    if fmt != "auto":
        return fmt
    p = Path(path)
    if p.is_dir() or p.suffix.lower() not in JSON_SUFFIXES:
        return "text"
    first = first_object(p, encoding)
    if first is None:
        raise DataError(f"{p}: no JSON rows")
    line, obj = first
    found = detect_format(obj)
    if found is None:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{p}:{line}: cannot tell the data format from the keys {keys}; expected "
                        f"'messages' (chat), 'instruction' + 'output' (alpaca), 'prompt' + 'completion', "
                        f"or use a .txt file for raw text (or set data.format)")
    if found == "text":
        raise DataError(f"{p}:{line}: rows with a 'text' key are raw text; the causal-lm raw-text path reads "
                        f".txt files: write the texts to a .txt file, or use chat/instruction rows")
    return found


def is_chat_data(path: str | os.PathLike | None, fmt: str = "auto", encoding: str = "utf-8") -> bool:
    """True when ``path`` holds chat/instruction data (so causal-LM training is SFT)."""
    if path is None:
        return False
    return data_format(path, fmt, encoding) in CHAT_FORMATS


def _content(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} has non-string content ({type(value).__name__})")
    if not value.strip():
        raise DataError(f"{where}: {what} is empty")
    return value


def _messages(value: Any, where: str, key: str = "messages") -> list[Message]:
    """Validate a list of message objects (ours or ShareGPT's) into ``[{"role", "content"}]``."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{key}' must be a non-empty list of messages")
    out: list[Message] = []
    for j, m in enumerate(value, start=1):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {j} is not an object")
        role = m.get("role", m.get("from"))
        if role is None:
            raise DataError(f"{where}: message {j} has no 'role'")
        if not isinstance(role, str) or _SHAREGPT_ROLES.get(role) is None:
            raise DataError(f"{where}: message {j} has unknown role {role!r} (roles: {', '.join(ROLES)})")
        role = _SHAREGPT_ROLES[role]
        if "content" not in m and "value" not in m:
            raise DataError(f"{where}: message {j} ({role}) has no 'content'")
        content = m.get("content", m.get("value"))
        kind = "answer" if role == "assistant" else f"{role} message"
        out.append({"role": role, "content": _content(content, f"message {j} ({kind})", where)})
    return out


def row_messages(obj: Any, fmt: str, where: str) -> list[Message]:
    """A row of format ``fmt`` as a validated list of messages (roles and contents checked).

    Raises DataError starting with ``where`` (``file:line``) for any malformed row.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object per row, got {type(obj).__name__}")
    if fmt == "chat":
        key = "messages" if "messages" in obj else "conversations" if "conversations" in obj else None
        if key is None:
            raise DataError(f"{where}: missing 'messages'")
        return _messages(obj[key], where, key)
    if fmt == "alpaca":
        for k in ("instruction", "output"):
            if k not in obj:
                raise DataError(f"{where}: missing '{k}'")
        instruction = _content(obj["instruction"], "'instruction'", where)
        extra = obj.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: 'input' has non-string content ({type(extra).__name__})")
        msgs: list[Message] = []
        if obj.get("system"):
            msgs.append({"role": "system", "content": _content(obj["system"], "'system'", where)})
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        msgs.append({"role": "user", "content": user})
        msgs.append({"role": "assistant", "content": _content(obj["output"], "'output' (the answer)", where)})
        return msgs
    if fmt == "prompt-completion":
        for k in ("prompt", "completion"):
            if k not in obj:
                raise DataError(f"{where}: missing '{k}'")
        p, c = obj["prompt"], obj["completion"]
        prompt = _messages(p, where, "prompt") if isinstance(p, list) else \
            [{"role": "user", "content": _content(p, "'prompt'", where)}]
        completion = _messages(c, where, "completion") if isinstance(c, list) else \
            [{"role": "assistant", "content": _content(c, "'completion' (the answer)", where)}]
        if any(m["role"] != "assistant" for m in completion):
            raise DataError(f"{where}: 'completion' may hold assistant messages only")
        return prompt + completion
    raise DataError(f"{where}: format {fmt!r} has no chat reader; formats: {', '.join(CHAT_FORMATS)}")


def check_trainable(messages: list[Message], where: str) -> None:
    """A training conversation has a user turn before its first answer and ends on an answer."""
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise DataError(f"{where}: conversation has no assistant message (nothing to learn)")
    if "user" not in roles[: roles.index("assistant")]:
        raise DataError(f"{where}: the first assistant message has no user message before it")
    if roles[-1] != "assistant":
        raise DataError(f"{where}: conversation ends on a {roles[-1]} turn (the last message must be "
                        f"the assistant's answer)")


def load_chat(path: str | os.PathLike, fmt: str = "auto", *, skip_bad_rows: bool = False,
              encoding: str = "utf-8", max_rows: int | None = None, seed: int = 0,
              for_training: bool = True) -> ChatFile:
    """Read a chat/instruction file into conversations.

    Args:
        path: JSONL file (or a .json array).
        fmt: ``auto`` or one of :data:`CHAT_FORMATS`.
        skip_bad_rows: count and skip malformed rows instead of raising on the first.
        encoding: text encoding of the file.
        max_rows: keep only this many conversations, chosen by a seeded shuffle (file order kept).
        seed: seed of that shuffle.
        for_training: also require every conversation to end on an assistant answer (prompts for
            ``slimtune generate`` may end on a user turn).

    Raises:
        DataError: naming ``file:line`` for the first bad row (unless skipped), or the file when
            no usable row is left.
    """
    p = Path(path)
    fmt = data_format(p, fmt, encoding)
    if fmt not in CHAT_FORMATS:
        raise DataError(f"{p}: not chat/instruction data (format {fmt!r}); expected JSONL rows with "
                        f"'messages', 'instruction' + 'output' or 'prompt' + 'completion'")
    rows, bad_json = _iter_json(p, _read(p, encoding), skip_bad_rows)
    skipped = bad_json
    convs: list[Conversation] = []
    for line, obj in rows:
        where = f"{p}:{line}"
        try:
            msgs = row_messages(obj, fmt, where)
            if for_training:
                check_trainable(msgs, where)
        except DataError:
            if not skip_bad_rows:
                raise
            skipped += 1
            continue
        convs.append(Conversation(line, msgs))
    total = len(rows) + bad_json  # invalid-JSON rows are not in ``rows``
    if not convs:
        raise DataError(f"{p}: no usable rows ({skipped} skipped as malformed)")
    if skipped:
        print(f"[slimtune] {p}: skipped {skipped} malformed row(s)", file=sys.stderr)
    if max_rows is not None and max_rows < len(convs):
        idx = list(range(len(convs)))
        random.Random(seed).shuffle(idx)
        convs = [convs[i] for i in sorted(idx[:max_rows])]
    return ChatFile(str(p), fmt, convs, rows=total, skipped=skipped)


def prompt_row(obj: Any, where: str) -> tuple[list[Message], str | None]:
    """A row of a prompts file as ``(prompt messages, reference answer or None)``.

    Any training shape works (a trailing assistant message, ``output`` or ``completion`` becomes
    the reference), and so do rows without an answer: ``messages`` ending on a user turn,
    ``{"instruction", "input"}``, ``{"prompt"}`` or ``{"text"}`` (one user turn).
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object per row, got {type(obj).__name__}")
    fmt = detect_format(obj)
    if fmt is None:
        fmt = "alpaca" if "instruction" in obj else "prompt-completion" if "prompt" in obj else None
    if fmt == "text":
        return [{"role": "user", "content": _content(obj["text"], "'text'", where)}], None
    if fmt is None:
        raise DataError(f"{where}: no prompt: expected 'messages', 'instruction', 'prompt' or 'text', "
                        f"got keys {sorted(obj)}")
    answer_key = {"alpaca": "output", "prompt-completion": "completion"}.get(fmt)
    has_answer = answer_key is None or answer_key in obj
    msgs = row_messages(obj if has_answer else {**obj, answer_key: "-"}, fmt, where)
    if msgs[-1]["role"] == "assistant":
        ref = msgs[-1]["content"] if has_answer else None
        msgs = msgs[:-1]
    else:
        ref = None
    if not msgs or msgs[-1]["role"] != "user":
        raise DataError(f"{where}: a prompt must end on a user message")
    return msgs, ref


def load_prompts(path: str | os.PathLike, *, skip_bad_rows: bool = False,
                 encoding: str = "utf-8") -> tuple[list[dict[str, Any]], int]:
    """``([{"line", "messages", "reference"}], rows skipped)`` of a prompts JSONL (see :func:`prompt_row`)."""
    p = Path(path)
    rows, skipped = _iter_json(p, _read(p, encoding), skip_bad_rows)
    out = []
    for line, obj in rows:
        try:
            msgs, ref = prompt_row(obj, f"{p}:{line}")
        except DataError:
            if not skip_bad_rows:
                raise
            skipped += 1
            continue
        out.append({"line": line, "messages": msgs, "reference": ref})
    if not out:
        raise DataError(f"{p}: no usable prompts ({skipped} skipped as malformed)")
    return out, skipped


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def own_template(tokenizer: Any) -> str | None:
    """The tokenizer's chat template (its ``default`` one when it has several), or None."""
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default")
    return t or None


class ChatRenderer:
    """Renders messages to text with the template ``mode`` picks for ``tokenizer``.

    ``mode``: ``auto`` (the tokenizer's template, else :data:`FALLBACK_CHAT_TEMPLATE`), ``model``
    (the tokenizer's, an error without one), ``fallback``, or ``none``
    (:data:`PLAIN_CHAT_TEMPLATE`: contents concatenated, EOS after each answer). ``source`` says which was used: ``model``, ``fallback`` or ``none``.
    """

    def __init__(self, tokenizer: Any, mode: str = "auto"):
        if mode not in TEMPLATE_MODES:
            raise DataError(f"data.chat_template: {mode!r} is not one of {list(TEMPLATE_MODES)}")
        own = own_template(tokenizer)
        if mode == "model" and own is None:
            raise DataError("data.chat_template=model, but the tokenizer has no chat template "
                            "(use auto or fallback)")
        self.tokenizer = tokenizer
        if mode == "none":
            self.template, self.source = PLAIN_CHAT_TEMPLATE, "none"
        elif mode == "fallback" or own is None:
            self.template, self.source = FALLBACK_CHAT_TEMPLATE, "fallback"
        else:
            self.template, self.source = own, "model"

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        """The text of ``messages`` (plus the assistant header when ``add_generation_prompt``)."""
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
            raise DataError(f"the chat template failed on this conversation: {e}") from None


def conversation_pieces(renderer: ChatRenderer, messages: list[Message]) -> list[list[tuple[str, bool]]]:
    """The conversation as examples of ``(text, trained)`` pieces whose concatenation is the text.

    One example with every assistant turn trained when the template is prefix-stable, else one
    example per assistant turn (trained on that turn only).
    """
    pieces: list[tuple[str, bool]] = []
    prev = ""
    stable = True
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        pre = renderer.render(messages[:i], add_generation_prompt=True)
        full = renderer.render(messages[: i + 1])
        if not (pre.startswith(prev) and full.startswith(pre)):
            stable = False
            break
        pieces.extend(_answer_pieces(pre[len(prev):], full[len(pre):]))
        prev = full
    if stable:
        rest = renderer.render(messages)
        if rest.startswith(prev):
            if rest[len(prev):]:
                pieces.append((rest[len(prev):], False))
            return [pieces]
    # Not prefix-stable: one example per assistant turn, trained on its own answer.
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        pre = renderer.render(messages[:i], add_generation_prompt=True)
        full = renderer.render(messages[: i + 1])
        if not full.startswith(pre):
            raise DataError("the chat template renders an answer that does not extend its prompt "
                            "(render(messages[:i], add_generation_prompt=True) is not a prefix of "
                            "render(messages[:i+1])); set data.chat_template=fallback")
        out.append(_answer_pieces(pre, full[len(pre):]))
    return out


def _answer_pieces(prompt: str, answer: str) -> list[tuple[str, bool]]:
    """``[(prompt, False), (answer without trailing whitespace, True), (that whitespace, False)]``."""
    core = answer.rstrip()
    out = [(prompt, False)] if prompt else []
    if core:
        out.append((core, True))
    if len(core) < len(answer):
        out.append((answer[len(core):], False))
    return out


# --------------------------------------------------------------------------------------------
# Tokenizing, truncating, packing
# --------------------------------------------------------------------------------------------


def _tokenize_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for s in range(0, len(texts), 2048):  # batched: the fast tokenizer runs the batch in Rust
        out.extend(tokenizer(texts[s:s + 2048], add_special_tokens=False)["input_ids"])
    return out


def _piece_tokens(tokenizer: Any, examples: list[list[tuple[str, bool]]]) -> tuple[list[list[list[int]]], int]:
    """Token ids of every piece of every example, and how many examples fell back to piecewise.

    The ids of piece k are what tokenizing the text up to and including piece k adds to the
    tokens of the text before it, so an example's ids are its whole text's tokenization (what
    ``apply_chat_template(tokenize=True)`` gives; SentencePiece tokenizers would add a dummy
    prefix space to pieces tokenized alone). Where a token merges across a boundary (the
    earlier text's ids are not a prefix of the longer text's), the pieces are tokenized one
    by one instead.
    """
    prefixes = ["".join(t for t, _ in ex[: k + 1]) for ex in examples for k in range(len(ex))]
    flat = iter(_tokenize_texts(tokenizer, prefixes))
    out: list[list[list[int]]] = []
    redo: list[int] = []
    for i, ex in enumerate(examples):
        cum = [next(flat) for _ in ex]  # ids of the text up to and including each piece
        if all(cum[k][: len(cum[k - 1])] == cum[k - 1] for k in range(1, len(cum))):
            out.append([c[len(p):] for p, c in zip([[], *cum[:-1]], cum, strict=True)])
        else:
            out.append([])
            redo.append(i)
    if redo:
        alone = iter(_tokenize_texts(tokenizer, [t for i in redo for t, _ in examples[i]]))
        for i in redo:
            out[i] = [next(alone) for _ in examples[i]]
    return out, len(redo)


def tokenize_chat(chat: ChatFile, tokenizer: Any, max_length: int, *, renderer: ChatRenderer,
                  packing: bool = False, seed: int = 0) -> TokenizedData:
    """Render, tokenize and mask conversations; optionally pack them into blocks.

    Returns a causal :class:`TokenizedData` with ``token_labels`` (-100 outside answers),
    ``position_ids`` when packed, and ``info["chat"]``: counts (rows, examples, assistant turns,
    truncated, dropped, tokens, answer tokens), the format and the template used.
    """
    examples: list[list[tuple[str, bool]]] = []
    split = turns = 0
    for conv in chat.conversations:
        try:
            exs = conversation_pieces(renderer, conv.messages)
        except DataError as e:
            raise DataError(f"{chat.path}:{conv.line}: {e}") from None
        turns += sum(m["role"] == "assistant" for m in conv.messages)
        split += len(exs) > 1
        examples.extend(exs)
    token_pieces, piecewise = _piece_tokens(tokenizer, examples)
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    truncated = dropped = answer_tokens = cut_answer_tokens = 0
    for ex, pieces in zip(examples, token_pieces, strict=True):
        ids: list[int] = []
        lab: list[int] = []
        for (_, trained), piece in zip(ex, pieces, strict=True):
            ids.extend(piece)
            lab.extend(piece if trained else [-100] * len(piece))
        n_answer = sum(x != -100 for x in lab)
        if len(ids) > max_length:
            truncated += 1
            ids, lab = ids[:max_length], lab[:max_length]
            kept = sum(x != -100 for x in lab)
            cut_answer_tokens += n_answer - kept
            if kept == 0:  # the whole answer is past max_length: drop, never train on no answer
                dropped += 1
                continue
            n_answer = kept
        answer_tokens += n_answer
        input_ids.append(ids)
        labels.append(lab)
    if not input_ids:
        raise DataError(f"{chat.path}: every example lost its whole answer to truncation at "
                        f"max_length={max_length}; raise data.max_length")
    info: dict[str, Any] = {
        "file": chat.path, "format": chat.format, "chat_template": renderer.source, "rows": chat.rows,
        "skipped_rows": chat.skipped, "conversations": len(chat), "assistant_turns": turns,
        "examples": len(input_ids), "split_conversations": split, "piecewise_tokenized": piecewise,
        "truncated": truncated,
        "dropped": dropped, "answer_tokens_cut": cut_answer_tokens, "max_length": max_length,
        "tokens": sum(map(len, input_ids)), "answer_tokens": answer_tokens, "packed_blocks": None,
    }
    position_ids = None
    if packing:
        input_ids, labels, position_ids = pack_examples(input_ids, labels, max_length, seed)
        info["packed_blocks"] = len(input_ids)
    data = TokenizedData(input_ids, None, None, _pad_id(tokenizer), causal=True, token_labels=labels,
                         position_ids=position_ids)
    data.info["chat"] = info
    return data


def pack_examples(input_ids: list[list[int]], labels: list[list[int]], block_size: int,
                  seed: int = 0) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Greedily pack whole examples (in a seeded order) into blocks of at most ``block_size``.

    Returns ``(input_ids, labels, position_ids)`` per block; positions restart at 0 for every
    example, which is what lets transformers keep attention inside each example.
    """
    order = list(range(len(input_ids)))
    random.Random(seed).shuffle(order)
    blocks: tuple[list[list[int]], list[list[int]], list[list[int]]] = ([], [], [])
    cur: tuple[list[int], list[int], list[int]] = ([], [], [])
    for i in order:
        ids = input_ids[i]
        if cur[0] and len(cur[0]) + len(ids) > block_size:
            for b, c in zip(blocks, cur, strict=True):
                b.append(c)
            cur = ([], [], [])
        cur[0].extend(ids)
        cur[1].extend(labels[i])
        cur[2].extend(range(len(ids)))
    if cur[0]:
        for b, c in zip(blocks, cur, strict=True):
            b.append(c)
    return blocks


def references(chat: ChatFile) -> list[dict[str, Any]]:
    """``[{"line", "prompt": messages before the last answer, "reference": last answer}]``."""
    return [{"line": c.line, "prompt": c.messages[:-1], "reference": c.messages[-1]["content"]}
            for c in chat.conversations]


def prepare_chat_data(d: Any, tokenizer: Any, seed: int) -> tuple[TokenizedData, TokenizedData | None, None]:
    """Train/eval data for SFT from a recipe's ``data`` section (the causal-lm chat path).

    Without ``d.eval`` a seeded ``d.eval_fraction`` of the conversations is held out. Packing
    applies to training data only. The eval data's ``info["references"]`` holds its prompts and
    reference answers (for generation metrics). Returns ``(train, eval, None)`` like
    :func:`slimtune.train.finetune.prepare_data`.
    """
    renderer = ChatRenderer(tokenizer, d.chat_template)
    if renderer.source != "model":  # saved with the exported tokenizer: generate prompts as trained
        why = "the tokenizer has no chat template" if own_template(tokenizer) is None else f"data.chat_template={d.chat_template}"
        what = "slimtune's fallback template (### User: / ### Assistant: headers" if renderer.source == "fallback" \
            else "no template (contents concatenated"
        print(f"[slimtune] {why}: using {what}, EOS after each answer); it is saved as the model's chat template",
              file=sys.stderr)
        tokenizer.chat_template = renderer.template
    kw = {"skip_bad_rows": d.skip_bad_rows, "encoding": d.encoding}
    train = load_chat(d.train, d.format, max_rows=None if d.eval is None else d.max_train_samples,
                      seed=seed, **kw)
    if d.eval is not None:
        ev: ChatFile | None = load_chat(d.eval, d.format, max_rows=d.max_eval_samples, seed=seed, **kw)
    else:  # hold out whole conversations (no conversation in both splits)
        if len(train) < 2:
            raise DataError(f"{d.train}: only {len(train)} conversation(s): too few to hold out an eval split")
        idx = list(range(len(train)))
        random.Random(seed).shuffle(idx)
        n_eval = min(len(train) - 1, max(1, round(len(train) * d.eval_fraction)))
        held = sorted(idx[:n_eval][: d.max_eval_samples or None])
        kept = sorted(idx[n_eval:][: d.max_train_samples or None])
        ev = ChatFile(train.path, train.format, [train.conversations[i] for i in held], len(held), 0)
        train = ChatFile(train.path, train.format, [train.conversations[i] for i in kept], train.rows,
                         train.skipped)
    tr = tokenize_chat(train, tokenizer, d.max_length, renderer=renderer, packing=d.packing, seed=seed)
    _report(tr.info["chat"])
    ev_data = None
    if ev is not None:
        ev_data = tokenize_chat(ev, tokenizer, d.max_length, renderer=renderer)
        _report(ev_data.info["chat"])
        ev_data.info["references"] = references(ev)
    return tr, ev_data, None


def _report(info: dict[str, Any]) -> None:
    msg = (f"[slimtune] {info['file']}: {info['examples']} SFT example(s) from {info['conversations']} "
           f"conversation(s) ({info['format']}, template {info['chat_template']}), "
           f"{info['answer_tokens']:,} answer tokens of {info['tokens']:,}")
    if info["packed_blocks"]:
        msg += f", packed into {info['packed_blocks']} block(s) of <= {info['max_length']}"
    if info["truncated"] or info["dropped"]:
        msg += (f"; {info['truncated']} truncated at max_length={info['max_length']} "
                f"({info['answer_tokens_cut']} answer tokens cut), {info['dropped']} dropped (no answer left)")
    print(msg, file=sys.stderr)
