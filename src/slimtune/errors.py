"""Errors that are the user's input, reported as one clear line (no traceback) by the CLI."""

from __future__ import annotations

from slimtune.config import RecipeError
from slimtune.data import DataError
from slimtune.models import ModelError
from slimtune.train import NonFiniteLossError

USER_ERRORS: tuple[type[BaseException], ...] = (RecipeError, DataError, ModelError, NonFiniteLossError,
                                                 FileNotFoundError)
