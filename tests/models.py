"""The tiny diffusers model factories live in the package (``rehyat_compile.zoo``: the CLI's
presets use them too); tests import them from here."""
from rehyat_compile.zoo import *  # noqa: F401,F403
