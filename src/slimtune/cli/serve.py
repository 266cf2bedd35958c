"""slimtune serve: HTTP inference API (classifiers: /v1/classify with dynamic batching; causal LMs: /v1/generate and the OpenAI-compatible /v1/chat/completions, /v1/completions, /v1/models with continuous batching; see docs/serving.md). Every flag is a field of slimtune.serve.settings.ServeConfig; --config reads them from YAML (a serve: section or a flat file)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from slimtune.cli.common import add_settings_arguments, print_config, resolve_settings
from slimtune.cli.lists import require
from slimtune.config.fields import RecipeError, settings_dict
from slimtune.serve.app import create_app
from slimtune.serve.models import load_runner, warmup
from slimtune.serve.server import run_server
from slimtune.serve.settings import ServeConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``slimtune serve``: ``--config``, one flag per :class:`ServeConfig` field, ``--print-config``."""
    add_settings_arguments(p, ServeConfig)


def shown_settings(cfg: ServeConfig) -> dict[str, Any]:
    """What ``--print-config`` prints: the resolved settings, the API key masked."""
    tree = settings_dict(cfg)
    if tree.get("api_key") is not None:
        tree["api_key"] = "***"
    return tree


def run(args: argparse.Namespace) -> int:
    """Resolve and check the settings, load the model, warm it up, and serve until interrupted."""
    cfg = resolve_settings(ServeConfig, args, "serve")
    require(cfg, ("model",))
    if print_config(args, shown_settings(cfg)):
        return 0
    try:
        runner = load_runner(cfg.model, cfg.threads, cfg.device, min(cfg.max_batch_size, 8))  # checks --device before any weight loads
    except ValueError as e:
        raise RecipeError(str(e)) from None
    warmup(runner)
    name = Path(cfg.model).name
    app = create_app(runner, cfg, model_name=name)
    if cfg.host not in LOOPBACK and cfg.api_key is None:
        logging.getLogger("slimtune").warning("serving on %s without --api-key", cfg.host)
    openai = f"; OpenAI API at /v1, model id {cfg.model_id or name!r}" if runner.task == "causal-lm" else ""
    print(f"slimtune serve: {runner.task} ({runner.backend}, {runner.device}) from {cfg.model} on "
          f"http://{cfg.host}:{cfg.port} (docs at /docs{openai})", flush=True)
    run_server(app, cfg)  # connection cap, header/body timeouts, bounded drain on SIGTERM
    return 0
