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


class NonFiniteError(ClipDiffusionError):
    """A stage of generation produced NaN or Inf: broken weights or a dtype that overflows (fp16), not bad input.

    ``stage`` is "text encoder", "VAE encode", "UNet", "sampler" or "VAE decode"; ``step`` (1-based) and ``total``
    are set for "UNet" (the sampler step whose model call gave non-finite output); ``detail`` says how many values
    are NaN and Inf. The CLI prints it as one line (exit 2) and writes no image; the server answers 500 with the
    message (a model problem, not a request problem), as AUTOMATIC1111 does for its NansException.
    """

    def __init__(self, stage: str, *, step: int | None = None, total: int | None = None, detail: str = "",
                 hint: str | None = None, model: str | None = None):
        self.stage = stage
        self.step = step
        self.total = total
        self.detail = detail
        self.model = model
        where = f"{stage} output" if step is None else f"{stage} output at step {step} of {total}"
        hint = hint or ("the model's weights are broken or its dtype overflows (fp16: try float32); run "
                        f"`clipdiffusion info --check {model or 'MODEL'}` to find non-finite weights")
        self.hint = hint
        prefix = f"{model}: " if model else ""
        super().__init__(f"{prefix}{where} has non-finite values ({detail or 'NaN/Inf'}): {hint}")

    def for_model(self, model: str) -> "NonFiniteError":
        """The same error, naming the model file or folder (the CLI and server know it; the stages do not)."""
        hint = None if "info --check MODEL`" in self.hint else self.hint
        return NonFiniteError(self.stage, step=self.step, total=self.total, detail=self.detail, hint=hint,
                              model=model)
