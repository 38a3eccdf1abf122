"""The ``rc.inspect`` report: every attention site, its layout and the decision, as a table and a dict."""
from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

COLUMNS = ("site", "module", "kind", "form", "heads", "head dim", "video offset", "frames", "tokens/frame",
           "frame-major", "decision", "reason")
FRAME_MAJOR = {True: "yes", False: "no", None: "?"}


def _cell(x) -> str:
    return "-" if x is None else str(x)


class InspectReport:
    """``sites``: list of :class:`~rehyat_compile.site.Site`; ``frame_axis``: how the export saw
    time. ``capture``: "export" (one exported graph) or "dynamo" (torch.export failed; graphs captured
    by torch.compile between graph breaks, ``site.graph`` says which); for "dynamo" also ``graphs``
    (how many were captured), ``captures`` (call structures, i.e. frame counts, captured) and
    ``breaks`` (the graph-break reasons). ``str(report)`` is a table; ``to_dict()`` is JSON-serialisable."""

    def __init__(self, sites, frame_axis, model_name: str = "", *, capture: str = "export", graphs: int | None = None,
                 captures: int | None = None, breaks=()):
        self.sites = list(sites)
        self.frame_axis = frame_axis
        self.model_name = model_name
        self.capture = capture
        self.graphs = graphs
        self.captures = captures
        self.breaks = tuple(breaks)

    @property
    def rewritable(self):
        return [s for s in self.sites if s.rewritable]

    @property
    def columns(self) -> tuple[str, ...]:
        return COLUMNS if self.capture == "export" else ("graph",) + COLUMNS

    def rows(self) -> list[tuple[str, ...]]:
        rows = []
        for s in self.sites:
            video = s.video or (None, None, None)
            checked = FRAME_MAJOR[s.frame_major] if s.layout is not None else None
            row = tuple(_cell(x) for x in (s.name, s.module, s.kind, s.form, s.heads, s.head_dim, video[0],
                                           video[1], video[2], checked, s.decision, s.reason))
            rows.append(row if self.capture == "export" else (_cell(s.graph),) + row)
        return rows

    def __str__(self) -> str:
        fa = self.frame_axis
        if fa is not None and fa.dynamic:
            axis = f"frames symbolic: {fa.input}[dim {fa.dim}] = {fa.patch} x T ({fa.size} in the example)"
        elif fa is not None:
            axis = f"static export ({fa.reason})" + (f", video_shape={fa.video_shape}" if fa.video_shape else "")
        else:
            axis = ""
        title = f"{self.model_name}: {len(self.rewritable)} of {len(self.sites)} attention sites convertible"
        if not self.sites:
            title = f"{self.model_name}: no softmax attention found"
        if self.capture != "export":
            title += f" ({self.graphs} graphs captured through Dynamo, {self.captures} capture(s))"
            axis = "graph breaks: " + ("; ".join(self.breaks) if self.breaks else "none recorded") + (
                f"\n{axis}" if axis else "")
        table = Table(title=title, caption=axis)
        for column in self.columns:
            table.add_column(column, overflow="fold")
        for row in self.rows():
            table.add_row(*row)
        buffer = io.StringIO()
        Console(file=buffer, width=200, force_terminal=False, color_system=None).print(table)
        return buffer.getvalue()

    __repr__ = __str__

    def to_dict(self) -> dict:
        return {"model": self.model_name,
                "frame_axis": None if self.frame_axis is None else self.frame_axis.to_dict(),
                "sites": [s.to_dict() for s in self.sites], "capture": self.capture} | (
                    {} if self.capture == "export" else
                    {"graphs": self.graphs, "captures": self.captures, "breaks": list(self.breaks)})
