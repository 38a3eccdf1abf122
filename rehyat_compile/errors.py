"""Project exceptions. Each derives from the builtin a caller would expect."""


class ShapeError(ValueError):
    """An input tensor does not have the shape the operation documents."""


class ConversionError(ValueError):
    """A model (or a site in it) cannot be converted; the message says why. ``code``: a decline code of
    rehyat_compile/declines.py when the refusal is one (e.g. "cannot-export"), else None."""

    def __init__(self, message: str = "", code: str | None = None):
        super().__init__(message)
        self.code = code

    def __reduce__(self):
        return type(self), (str(self), self.code)


class ComplexityError(ValueError):
    """A cost expression grows faster than linearly in the number of latent frames."""


class CheckpointError(ValueError):
    """A checkpoint file cannot be read (truncated, corrupted, not safetensors) or does not fit the
    model it is loaded into; the message names the file and what is wrong."""
