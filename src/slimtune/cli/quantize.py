"""Quantize a fine-tuned classifier: int8 on the fastest CPU backend (chosen by measurement among those that can run the settings), int4, nf4, k-means, or the fused fp32 ONNX folder. OUT/metrics.json says what was applied and what it cost; OUT/quantize.yaml holds the settings (--config repeats the run). A result that misses --min-sqnr / --max-accuracy-drop exits 2 and writes nothing."""

from __future__ import annotations

import argparse

from slimtune.cli.common import add_settings_arguments, print_config, resolve_settings
from slimtune.compress.quant.recipe import (
    SETTINGS_FILE,
    QuantizeSettings,
    format_summary,
    run_quantize,
)
from slimtune.compress.quant.storage import QuantizedFormatError
from slimtune.config.fields import RecipeError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``slimtune quantize``: ``--config``, one flag per :class:`QuantizeSettings` field, ``--print-config``."""
    add_settings_arguments(p, QuantizeSettings)
    # The spelling of --no-symmetric that the docs use (same dest: the field `symmetric`).
    p.add_argument("--asymmetric", dest="symmetric", action="store_false", default=None,
                   help="min/max zero point: the same as --no-symmetric")


def run(args: argparse.Namespace) -> int:
    """``slimtune quantize`` entry point."""
    s = resolve_settings(QuantizeSettings, args, "quantize")
    if print_config(args, s):
        return 0
    try:
        m = run_quantize(s)
    except ValueError as e:
        # A bare ValueError is a group size that does not divide a layer (the message names the layer);
        # its subclasses (RecipeError, DataError, ModelError) already reach the user as one line.
        if type(e) is not ValueError and not isinstance(e, QuantizedFormatError):
            raise
        raise RecipeError(str(e)) from None
    print(format_summary(m))
    print(f"wrote {s.output} (metrics.json, {SETTINGS_FILE})")
    return 0
