"""Errors that are the user's input, reported as one clear line (no traceback) by the CLI."""

from __future__ import annotations

from slimtune.config.fields import RecipeError
from slimtune.data.datasets import DataError
from slimtune.models.loading import ModelError
from slimtune.train.loop import NonFiniteLossError

USER_ERRORS: tuple[type[BaseException], ...] = (RecipeError, DataError, ModelError, NonFiniteLossError,
                                                 FileNotFoundError)
