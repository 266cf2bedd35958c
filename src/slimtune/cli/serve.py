"""slimtune serve: HTTP inference API with dynamic batching (see docs/serving.md)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from slimtune.serve.app import create_app
from slimtune.serve.batching import ServeConfig
from slimtune.serve.models import load_runner, warmup


def run(args: Any) -> int:
    """Load the model, warm it up, and serve until interrupted."""
    import uvicorn  # optional heavy dependency (the serve extra)

    cfg = ServeConfig(**{f.name: getattr(args, f.name) for f in fields(ServeConfig)})
    try:
        cfg.validate()
    except ValueError as e:
        raise SystemExit(f"slimtune serve: {e}") from None
    try:
        runner = load_runner(args.model, cfg.threads, cfg.device)
    except ValueError as e:
        raise SystemExit(f"slimtune serve: {e}") from None
    warmup(runner)
    app = create_app(runner, cfg, model_name=Path(args.model).name)
    if args.host not in ("127.0.0.1", "localhost", "::1") and cfg.api_key is None:
        logging.getLogger("slimtune").warning("serving on %s without --api-key", args.host)
    print(f"slimtune serve: {runner.task} ({runner.backend}, {runner.device}) from {args.model} on http://{args.host}:{args.port} "
          f"(docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``slimtune serve``."""
    p.add_argument("--model", required=True, help="model folder written by slimtune (safetensors or model.onnx)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    for f in fields(ServeConfig):
        tp = {"threads": int, "api_key": str}.get(f.name) or type(f.default)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=tp, default=f.default,
                       help=f"{f.metadata['help']} (default {f.default})")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")

