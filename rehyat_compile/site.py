"""One attention site and what the pipeline decided about it (``rc.inspect(...).sites``, ``hybrid.sites``).

Sites are immutable: each pass of :mod:`rehyat_compile.passes.pipeline` returns new ones
(``dataclasses.replace``). A site is rewritable once the layout pass has placed the video in its
token axis and no pass declined it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .declines import Decline


def site_key(name: str) -> str:
    """A ModuleDict-safe key for a site name (dots and colons become underscores)."""
    return name.replace(".", "_").replace(":", "_") or "root"


@dataclass(frozen=True)
class Site:
    """One attention site (units: tokens, frames). ``layout``: a
    :class:`~rehyat_compile.passes.infer_video_layout.VideoLayout` once known; ``decline``: why it is
    kept (None while convertible); ``match``: the graph nodes (find_attention's AttentionMatch)."""

    name: str
    module: str
    kind: str
    form: str
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    layout: object = None
    decline: Decline | None = None
    scale: float | None = None
    key: str = ""
    frame_major: bool | None = None  # True: verified in the graph; None: could not be checked
    chunk_frames: int | None = None  # set on converted sites (HybridModel.sites)
    overlap_frames: int | None = None
    causal: bool | None = None
    graph: int | None = None  # index of the Dynamo-captured graph holding the site (None: one exported graph)
    match: object = field(default=None, repr=False, compare=False)

    @property
    def rewritable(self) -> bool:
        return self.decline is None and self.layout is not None

    @property
    def reason(self) -> str:
        """Why the site is kept ("" when it converts)."""
        return "" if self.decline is None else self.decline.detail

    @property
    def code(self) -> str | None:
        """The decline code (rehyat_compile.declines.CODES), None when rewritable."""
        return None if self.decline is None else self.decline.code

    @property
    def video(self) -> tuple[int, int, int] | None:
        """(offset, frames, tokens_per_frame) of the video range, or None."""
        if self.layout is None:
            return None
        return self.layout.extra_before, self.layout.frames, self.layout.tokens_per_frame

    @property
    def tokens_per_frame(self) -> int | None:
        return None if self.layout is None else self.layout.tokens_per_frame

    @property
    def extra_before(self) -> int | None:
        return None if self.layout is None else self.layout.extra_before

    @property
    def extra_after(self) -> int | None:
        """Extra tokens after the video; None when unknown or data-dependent (computed in the graph)."""
        return None if self.layout is None else self.layout.extra_after

    @property
    def decision(self) -> str:
        return "convert" if self.rewritable else "keep"

    def declined(self, code: str, detail: str) -> "Site":
        """This site, kept for the reason ``Decline(code, detail)``."""
        return replace(self, decline=Decline(code, detail))

    def to_dict(self) -> dict:
        layout = self.layout
        return {"name": self.name, "module": self.module, "kind": self.kind, "form": self.form,
                "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "video": None if self.video is None else list(self.video),
                "extra_before": None if layout is None else layout.extra_before,
                "extra_after": None if layout is None else layout.extra_after,
                "frame_major": self.frame_major, "rewritable": self.rewritable, "reason": self.reason,
                "code": self.code, "scale": self.scale, "chunk_frames": self.chunk_frames,
                "overlap_frames": self.overlap_frames, "causal": self.causal} | (
                    {} if self.graph is None else {"graph": self.graph})
