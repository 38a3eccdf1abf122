"""Save and load a converted model's feature maps: one safetensors file, config in its metadata.

The file holds the phi weights (``<site key>.phi_q.w1`` ...) and, as safetensors metadata, the
conversion record (``hybrid.conversion``: chunking, feature dim, the converted sites with their
layouts) and a fingerprint of the model it was made from: its class and, per converted site, the
parameter shapes of the attention module. Loading checks the fingerprint against the fresh model
(a clear :class:`~rehyat_compile.errors.ConversionError` when it is another architecture), re-applies
:func:`rehyat_compile.transform` with the saved options and fills in the weights.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .errors import ConversionError

FORMAT = "rehyat-hybrid/1"
FILE_NAME = "hybrid.safetensors"


def _file(path, *, saving: bool) -> Path:
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or pathlib.Path, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir() or (saving and path.suffix == ""):
        return path / FILE_NAME
    return path


def _module_shapes(model: nn.Module, path: str) -> dict[str, list[int]] | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return {name: list(t.shape) for name, t in module.state_dict().items()}


def model_fingerprint(model: nn.Module, sites: list[dict]) -> dict:
    """Class name and, per site module path, its parameter/buffer shapes."""
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "modules": {s["module"]: _module_shapes(model, s["module"]) for s in sites}}


def _config(hybrid) -> dict:
    conversion = getattr(hybrid, "conversion", None)
    if not isinstance(conversion, dict) or not conversion.get("sites"):
        raise ValueError("hybrid has no converted sites yet: call it once (or pass example inputs to rc.transform) "
                         "before save_hybrid")
    return conversion


def save_hybrid(hybrid: nn.Module, path) -> Path:
    """Write ``hybrid``'s feature-map weights and conversion config to ``path`` (a ``.safetensors``
    file, or a directory that receives ``hybrid.safetensors``). Returns the file written."""
    if not isinstance(getattr(hybrid, "feature_maps", None), nn.ModuleDict):
        raise TypeError(f"hybrid must be the result of rc.transform, got {type(hybrid).__name__}")
    config = _config(hybrid)
    file = _file(path, saving=True)
    file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in hybrid.feature_maps.state_dict().items()}
    metadata = {"format": FORMAT, "conversion": json.dumps(config),
                "model": json.dumps(model_fingerprint(hybrid.original, config["sites"]))}
    save_file(tensors, str(file), metadata=metadata)
    return file


def read_metadata(path) -> tuple[dict, dict]:
    """(conversion config, model fingerprint) stored in a file written by :func:`save_hybrid`."""
    file = _file(path, saving=False)
    if not file.is_file():
        raise FileNotFoundError(f"path: no hybrid checkpoint at {file}")
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"path: {file} is not a rehyat-compile hybrid checkpoint (format {metadata.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return json.loads(metadata["conversion"]), json.loads(metadata["model"])


def _check_architecture(model: nn.Module, saved: dict, config: dict) -> None:
    now = model_fingerprint(model, config["sites"])
    problems = []
    if now["class"] != saved["class"]:
        problems.append(f"model class is {now['class']}, the checkpoint was made for {saved['class']}")
    for path, shapes in saved["modules"].items():
        current = now["modules"].get(path)
        if current is None:
            problems.append(f"module {path!r} (converted site) does not exist in this model")
        elif current != shapes:
            diff = sorted(k for k in set(shapes) | set(current) if shapes.get(k) != current.get(k))
            problems.append(f"module {path!r} has other parameters: "
                            + ", ".join(f"{k} {current.get(k)} vs saved {shapes.get(k)}" for k in diff[:4]))
    if problems:
        raise ConversionError("load_hybrid: this model has another architecture than the checkpoint's:\n  - "
                              + "\n  - ".join(problems))


def load_hybrid(model: nn.Module, path, args=None, kwargs=None):
    """Re-apply the saved conversion to ``model`` (a fresh original) and load the phi weights.

    ``args``/``kwargs``: example inputs to convert now (else the rewrite happens on the first call and
    the weights are loaded into the feature maps created then). Raises ConversionError when ``model``
    is not the architecture the checkpoint was made from.
    """
    from .transform import transform

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config, fingerprint = read_metadata(path)
    _check_architecture(model, fingerprint, config)
    state = load_file(str(_file(path, saving=False)))
    hybrid = transform(model, args, kwargs, chunk_frames=config["chunk_frames"],
                       overlap_frames=config["overlap_frames"], causal=config["causal"], layers=config["layers"],
                       feature_dim=config["feature_dim"],
                       video_shape=None if config.get("video_shape") is None else tuple(config["video_shape"]))
    _ensure_feature_maps(hybrid, config)
    param = next(model.parameters(), None)
    hybrid.feature_maps.load_state_dict(
        {k: v.to(device=param.device if param is not None else "cpu") for k, v in state.items()}, strict=True)
    return hybrid


def _ensure_feature_maps(hybrid, config: dict) -> None:
    """Create the saved sites' feature maps now, so weights can load before the first call."""
    from .transform import PhiPair

    param = next(hybrid.original.parameters(), None)
    for site in config["sites"]:
        if site["key"] not in hybrid.feature_maps:
            pair = PhiPair(site["heads"] or 1, site["head_dim"], config["feature_dim"])
            if param is not None:
                pair.to(device=param.device, dtype=param.dtype)
            hybrid.feature_maps[site["key"]] = pair
