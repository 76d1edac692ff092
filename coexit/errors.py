"""Exception types shared by every coexit package.

Errors carry a message a person can act on; the cloud service maps them to gRPC status codes at its boundary, the
`coexit` command prints them as one line (coexit.cli), and edge-serve answers them as OpenAI-shaped errors.
"""


class CoexitError(Exception):
    """Base class for every error coexit raises on purpose."""


class ConfigError(CoexitError, ValueError):
    """A config.json or early-exit block that cannot describe a valid model."""


class CheckpointError(CoexitError):
    """A checkpoint directory that cannot be read: missing files, wrong shapes, unknown architecture."""


class UsageError(CoexitError, ValueError):
    """An option, argument or request field that cannot work as given (out of range, contradicting another, or one
    that would be silently ignored). The message names it and says what would work."""


class ContextLengthError(UsageError):
    """A prompt, plus the tokens asked for, longer than the model's context."""

    def __init__(self, prompt_tokens: int, max_new: int, limit: int) -> None:
        self.prompt_tokens, self.max_new, self.limit = prompt_tokens, max_new, limit
        if prompt_tokens >= limit:
            msg = (f"the prompt is {prompt_tokens} tokens, but the model's context is {limit} positions: "
                   f"shorten it to at most {limit - 1} tokens")
        else:
            msg = (f"the prompt ({prompt_tokens} tokens) plus {max_new} new tokens exceed the model's context of "
                   f"{limit} positions: ask for at most {limit - prompt_tokens} new tokens or shorten the prompt")
        super().__init__(msg)
