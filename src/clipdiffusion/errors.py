"""Error types shared by every layer. All are ValueError subclasses, so callers that validate input can catch
ValueError; the CLI prints them as one line and the server maps them to 4xx responses."""


class ClipDiffusionError(ValueError):
    """Base class: bad input that the user can fix. The message names the field and the value."""


class PromptError(ClipDiffusionError):
    """A prompt that cannot be parsed or encoded (bad weight, absurd length, invalid text)."""


class CheckpointError(ClipDiffusionError):
    """A weights file or folder that cannot be read safely or does not match a known model layout."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
