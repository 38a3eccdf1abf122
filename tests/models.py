"""The tiny diffusers model factories live in the package (``rehyat_compile.zoo``: the CLI's
presets use them too); tests import them from here."""
from rehyat_compile.zoo import *  # noqa: F401,F403


def converted_wan_t2v(frames: int = 5, chunk_frames: int = 2, overlap_frames: int = 1):
    """(converted tiny Wan2.1 T2V, args, kwargs): the issue's build subject (5 frames, Tc=2, To=1)."""
    import rehyat_compile as rc
    from rehyat_compile.zoo import make_wan_t2v
    model, args, kwargs = make_wan_t2v(frames=frames)
    return rc.transform(model, args, kwargs, chunk_frames=chunk_frames, overlap_frames=overlap_frames), args, kwargs
