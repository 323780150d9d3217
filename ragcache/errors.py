"""One error hierarchy for ragcache.

Each error carries a message that says what was expected and a hint that says how to fix it. The CLI maps
`exit_code` to the process status and the HTTP layer maps `http_status` to the response, once each.
"""

from __future__ import annotations


class RagcacheError(Exception):
    """Base of every error ragcache raises on purpose."""

    exit_code: int = 1
    http_status: int = 500

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(RagcacheError):
    """A setting, flag or environment variable has a value ragcache cannot use."""

    exit_code = 2
    http_status = 400


class ModelNotFoundError(RagcacheError):
    """A model name, folder or hub id does not lead to a loadable model."""

    exit_code = 3
    http_status = 404


class ModelPackageError(RagcacheError):
    """An embedded model's package is missing, incomplete or corrupt."""

    exit_code = 3
    http_status = 500


class UnsupportedQuantError(ConfigError):
    """A quantization mode that ragcache does not know."""


class PromptTooLongError(RagcacheError):
    """The prompt does not fit the model's context window."""

    exit_code = 4
    http_status = 413


class InvalidRequestError(RagcacheError):
    """A request whose values are out of range or malformed."""

    exit_code = 2
    http_status = 400


class GenerationCancelled(RagcacheError):
    """The caller cancelled a generation before it finished."""

    exit_code = 130
    http_status = 499
