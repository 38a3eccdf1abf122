"""Save and load a converted model's feature maps: one safetensors file, config in its metadata.

The file holds the phi weights (``<site key>.phi_q.w1`` ...) and, as safetensors metadata, the
conversion record (``hybrid.conversion``: chunking, feature dim, the converted sites with their
layouts) and a fingerprint of the model it was made from: its class and, per converted site, the
parameter shapes of the attention module. Loading checks the fingerprint against the fresh model
(a clear :class:`~rehyat_compile.errors.ConversionError` when it is another architecture), re-applies
:func:`rehyat_compile.transform` with the saved options and fills in the weights.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .errors import CheckpointError, ConversionError

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


def _attention_geometry(model: nn.Module, path: str) -> dict | None:
    """{"heads", "head_dim"} of the attention module at ``path`` from its attributes (diffusers'
    ``heads`` and ``inner_dim`` or ``head_dim``), None entries where it does not say. Parameter
    shapes alone cannot tell 2 x 16 heads from 4 x 8: the projections are 32 x 32 either way."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    heads = _positive_int(getattr(module, "heads", None)) or _positive_int(getattr(module, "num_heads", None))
    head_dim = _positive_int(getattr(module, "head_dim", None)) or _positive_int(getattr(module, "dim_head", None))
    inner = _positive_int(getattr(module, "inner_dim", None))
    if head_dim is None and heads and inner and inner % heads == 0:
        head_dim = inner // heads
    return {"heads": heads, "head_dim": head_dim}


def _positive_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def model_fingerprint(model: nn.Module, sites: list[dict]) -> dict:
    """Class name and, per site module path, its parameter/buffer shapes and its heads x head dim."""
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "modules": {s["module"]: _module_shapes(model, s["module"]) for s in sites},
            "attention": {s["module"]: _attention_geometry(model, s["module"]) for s in sites}}


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
                "model": json.dumps(model_fingerprint(hybrid.original, config["sites"])),
                "weights_sha256": weights_digest(tensors)}
    save_file(tensors, str(file), metadata=metadata)
    return file


def read_metadata(path) -> tuple[dict, dict]:
    """(conversion config, model fingerprint) stored in a file written by :func:`save_hybrid`."""
    file = _file(path, saving=False)
    if not file.is_file():
        raise FileNotFoundError(f"path: no hybrid checkpoint at {file}")
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"path: {file} is not a readable safetensors file (truncated, corrupted or another "
                              f"format): {err}") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"path: {file} is not a rehyat-compile hybrid checkpoint (format "
                              f"{metadata.get('format')!r}, expected {FORMAT!r})")
    try:
        config, fingerprint = json.loads(metadata["conversion"]), json.loads(metadata["model"])
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"path: {file} has a damaged {FORMAT} header (metadata {err} missing or not JSON)") \
            from None
    if (not isinstance(config, dict) or not isinstance(config.get("sites"), list) or not isinstance(fingerprint, dict)
            or not isinstance(fingerprint.get("modules"), dict) or "class" not in fingerprint):
        raise CheckpointError(f"path: {file} has a damaged {FORMAT} header (conversion or model record malformed)")
    return config, fingerprint


def _saved_digest(file: Path) -> str | None:
    with safe_open(str(file), framework="pt") as f:
        return (f.metadata() or {}).get("weights_sha256")


def weights_digest(tensors: dict) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes (safetensors itself has no checksum,
    so flipped bits in the data would otherwise load as other weights)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.flatten().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _read_weights(file: Path, expected_digest: str | None) -> dict:
    """The tensors of ``file``; CheckpointError naming it when its body is damaged (the header can
    be intact while the data is cut short or altered). Files saved before the digest have none."""
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"path: {file} is truncated or corrupted (its tensors cannot be read): {err}") from None
    if expected_digest is not None and weights_digest(tensors) != expected_digest:
        raise CheckpointError(f"path: {file} is corrupted: its weights do not match the sha256 saved with them")
    return tensors


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
    problems += _geometry_problems(saved.get("attention", {}), now["attention"])
    if problems:
        raise ConversionError("load_hybrid: this model has another architecture than the checkpoint's:\n  - "
                              + "\n  - ".join(problems))


def _geometry_problems(saved: dict, current: dict) -> list[str]:
    """Sites whose heads x head dim differ (checkpoints from before this record have none)."""
    problems = []
    for path, was in saved.items():
        now = current.get(path)
        if not was or not now:
            continue
        if any(was[k] is not None and now[k] is not None and was[k] != now[k] for k in ("heads", "head_dim")):
            problems.append(f"module {path!r} has {now['heads']} heads x {now['head_dim']} head dim, the checkpoint's "
                            f"feature maps are for {was['heads']} x {was['head_dim']}")
    return problems


def _check_converted_sites(hybrid, config: dict, file: Path) -> None:
    """After an eager conversion: every saved site exists with the saved heads and head dim (the
    graph's own count, for modules whose attributes do not say)."""
    found = {s.key: s for s in hybrid.sites}
    problems = []
    for saved in config["sites"]:
        site = found.get(saved["key"])
        if site is None:
            name = saved.get("name", saved["key"])
            problems.append(f"site {name!r} of the checkpoint is not converted in this model")
        elif (site.heads or 1, site.head_dim) != (saved["heads"] or 1, saved["head_dim"]):
            problems.append(f"site {site.name!r} has {site.heads} heads x {site.head_dim} head dim, the checkpoint's "
                            f"feature maps are for {saved['heads']} x {saved['head_dim']}")
    if problems:
        raise ConversionError(f"load_hybrid: {file} does not fit this model:\n  - " + "\n  - ".join(problems))


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
    file = _file(path, saving=False)
    state = _read_weights(file, _saved_digest(file))
    hybrid = transform(model, args, kwargs, chunk_frames=config["chunk_frames"],
                       overlap_frames=config["overlap_frames"], causal=config["causal"], layers=config["layers"],
                       feature_dim=config["feature_dim"],
                       video_shape=None if config.get("video_shape") is None else tuple(config["video_shape"]))
    if hybrid.sites:
        _check_converted_sites(hybrid, config, file)
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
