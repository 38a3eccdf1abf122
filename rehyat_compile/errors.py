"""Project exceptions. Each derives from the builtin a caller would expect."""


class ShapeError(ValueError):
    """An input tensor does not have the shape the operation documents."""


class ConversionError(ValueError):
    """A model (or a site in it) cannot be converted; the message says why."""


class ComplexityError(ValueError):
    """A cost expression grows faster than linearly in the number of latent frames."""


class CheckpointError(ValueError):
    """A checkpoint file cannot be read (truncated, corrupted, not safetensors) or does not fit the
    model it is loaded into; the message names the file and what is wrong."""
