"""Which sites to convert, and with which chunk size, under a FLOPs budget (Attention Surgery).

Each site has one option "keep softmax" (error 0, the softmax cost) and one option per chunk size
Tc it was distilled with (the distilled attention error, the hybrid cost). Choosing exactly one
option per site to minimise the summed error with the summed cost within the budget is a
multiple-choice knapsack; it is solved exactly by dynamic programming over the Pareto frontier of
(cost, error) states, site by site (sites of equal shape share costs, so the frontier stays small;
past ``max_states`` states it is thinned to the best state per cost bucket, never over budget).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .op import hybrid_attention_flops

SOFTMAX = None  # the option key meaning "keep this site's softmax attention"


@dataclass(frozen=True)
class Selection:
    """``choices[site]``: the chosen Tc, or None to keep softmax; ``layers``: the converted sites (for
    ``rc.transform(layers=...)``); ``error``/``cost``: totals of the choice; ``softmax_cost``: the cost
    with every site kept; ``budget``: the bound it was chosen under."""

    choices: dict
    error: float
    cost: float
    softmax_cost: float
    budget: float

    @property
    def layers(self) -> list[str]:
        return [s for s, tc in self.choices.items() if tc is not SOFTMAX]

    @property
    def chunk_frames(self) -> dict:
        return {s: tc for s, tc in self.choices.items() if tc is not SOFTMAX}

    def __str__(self) -> str:
        kept = len(self.choices) - len(self.layers)
        lines = [f"select_layers: convert {len(self.layers)} of {len(self.choices)} sites (keep {kept}); "
                 f"cost {self.cost:.4g} of budget {self.budget:.4g} (all softmax {self.softmax_cost:.4g}); "
                 f"total error {self.error:.4g}"]
        lines += [f"  {s:<32} {'softmax' if tc is SOFTMAX else f'Tc={tc}'}" for s, tc in self.choices.items()]
        return "\n".join(lines)


def site_flops(shape, feature_dim: int, layout: Mapping, chunk_frames) -> float:
    """FLOPs of one site for q of ``shape`` [B, H, N, D]: softmax attention (4·N²·D per head) when
    ``chunk_frames`` is None, else the hybrid op plus both feature maps (hidden width = D)."""
    b, h, n, d = shape
    if chunk_frames is SOFTMAX:
        return float(4 * b * h * n * n * d)
    op = hybrid_attention_flops(b, h, n, d, feature_dim, tokens_per_frame=layout["tokens_per_frame"],
                                chunk_frames=chunk_frames, overlap_frames=min(layout["overlap_frames"], chunk_frames),
                                causal=layout["causal"], extra_before=layout["extra_before"],
                                extra_after=layout["extra_after"])
    maps = 2 * 2 * b * h * n * (d * d + d * feature_dim)
    return float(op + maps)


def _errors_and_info(report_or_errors):
    """``({site: {tc: error}}, {site: (shape, feature_dim, layout)})`` from reports or a mapping."""
    if isinstance(report_or_errors, Mapping):
        errors = {}
        for site, value in report_or_errors.items():
            if isinstance(value, Mapping):
                errors[site] = {tc: float(e) for tc, e in value.items()}
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                errors[site] = {"convert": float(value)}
            else:
                raise TypeError(f"report_or_errors[{site!r}] must be an error (float) or {{Tc: error}}, got {value!r}")
        return errors, {}
    reports = report_or_errors if isinstance(report_or_errors, (list, tuple)) else [report_or_errors]
    errors, info = {}, {}
    for report in reports:
        per_layer = getattr(report, "per_layer", None)
        if not isinstance(per_layer, Mapping):
            raise TypeError("report_or_errors must be a DistillReport, a list of them, {site: error} or "
                            f"{{site: {{Tc: error}}}}, got {type(report).__name__}")
        for site, r in per_layer.items():
            tc = r.layout["chunk_frames"]
            errors.setdefault(site, {})[tc] = float(r.error_after)
            info.setdefault(site, {})[tc] = (tuple(r.shape), r.feature_dim, r.layout)
    return errors, info


def _cost_table(errors, info, cost) -> dict:
    """``{site: {option: flops}}`` with option SOFTMAX for keeping the site."""
    table = {}
    for site, options in errors.items():
        row = {}
        for option in [SOFTMAX, *options]:
            if cost is None:
                if site not in info:
                    raise ValueError("cost is None: give costs explicitly when the errors come without a report "
                                     "(cost={site: {Tc or None: flops}} or cost(site, Tc_or_None) -> flops)")
                shape, feature_dim, layout = next(iter(info[site].values())) if option is SOFTMAX else info[site][option]
                row[option] = site_flops(shape, feature_dim, layout, option)
            elif callable(cost):
                row[option] = float(cost(site, option))
            elif isinstance(cost, Mapping):
                if site not in cost or option not in cost[site]:
                    raise ValueError(f"cost has no entry for site {site!r} option {option!r} "
                                     "(None = keep softmax)")
                row[option] = float(cost[site][option])
            else:
                raise TypeError(f"cost must be None, a mapping {{site: {{Tc or None: flops}}}} or a callable, "
                                f"got {type(cost).__name__}")
            if not math.isfinite(row[option]) or row[option] < 0:
                raise ValueError(f"cost of site {site!r} option {option!r} must be finite and >= 0, got {row[option]}")
        table[site] = row
    return table


def _thin(frontier: list, budget: float, max_states: int) -> list:
    """Keep at most about ``max_states`` states: the least error per cost bucket of budget/max_states.
    Only a frontier that large loses optimality; every kept state is exact and within budget."""
    if len(frontier) <= max_states:
        return frontier
    kept, bucket = [], None
    for state in frontier:  # sorted by cost, errors decreasing: the last of a bucket is its best
        b = int(state[0] * max_states / budget)
        if kept and b == bucket:
            kept[-1] = state
        else:
            kept.append(state)
        bucket = b
    return kept


def select_layers(report_or_errors, cost: Mapping | Callable | None = None, budget: float | None = None, *,
                  max_states: int = 100_000) -> Selection:
    """Pick, per site, keep-softmax or one distilled Tc, minimising total attention error with total
    FLOPs <= ``budget``.

    ``report_or_errors``: a :class:`~rehyat_compile.distill.DistillReport` (its per-site error after
    distillation, at the Tc it was run with), a list of reports (one per Tc: several options per
    site), ``{site: error}`` or ``{site: {Tc: error}}``. ``cost``: None (derived from the reports'
    site shapes and layouts: softmax 4·N²·D per head vs ``rc.hybrid_attention_flops`` plus the
    feature maps), ``{site: {Tc or None: flops}}`` (None = softmax), or ``cost(site, Tc_or_None)``.
    ``budget``: FLOPs over these sites, same unit as ``cost``.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive finite number of FLOPs, got {budget!r}")
    if isinstance(max_states, bool) or not isinstance(max_states, int) or max_states < 1:
        raise ValueError(f"max_states must be a positive int, got {max_states!r}")
    errors, info = _errors_and_info(report_or_errors)
    if not errors:
        raise ValueError("report_or_errors holds no sites")
    table = _cost_table(errors, info, cost)
    sites = list(errors)
    softmax_cost = sum(table[s][SOFTMAX] for s in sites)
    cheapest = sum(min(table[s].values()) for s in sites)
    if cheapest > budget:
        raise ValueError(f"budget {budget:.6g} is below the cheapest selection ({cheapest:.6g} FLOPs, every site at "
                         "its cheapest option)")
    # frontier: (cost, error, parent index, option) states, Pareto-optimal, exact costs
    frontier = [(0.0, 0.0, -1, None)]
    history = []
    for site in sites:
        options = [SOFTMAX, *errors[site]]
        grown = [(c + table[site][o], e + (0.0 if o is SOFTMAX else errors[site][o]), i, o)
                 for i, (c, e, _, _) in enumerate(frontier) for o in options]
        grown = [g for g in grown if g[0] <= budget]
        grown.sort(key=lambda g: (g[0], g[1]))
        frontier = []
        for g in grown:
            if not frontier or g[1] < frontier[-1][1]:
                frontier.append(g)
        frontier = _thin(frontier, budget, max_states)
        history.append(frontier)
    i = min(range(len(frontier)), key=lambda j: (frontier[j][1], frontier[j][0]))
    choices = {}
    for site, states in zip(reversed(sites), reversed(history)):
        _, _, i, option = states[i]
        choices[site] = option
    choices = {s: choices[s] for s in sites}
    total_error = sum(0.0 if tc is SOFTMAX else errors[s][tc] for s, tc in choices.items())
    total_cost = sum(table[s][tc] for s, tc in choices.items())
    return Selection(choices, total_error, total_cost, softmax_cost, float(budget))
