"""Project exceptions. Each derives from the builtin a caller would expect."""


class ShapeError(ValueError):
    """An input tensor does not have the shape the operation documents."""


class ConversionError(ValueError):
    """A model (or a site in it) cannot be converted; the message says why."""


class ComplexityError(ValueError):
    """A cost expression grows faster than linearly in the number of latent frames."""
