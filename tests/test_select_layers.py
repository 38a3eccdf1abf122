"""select_layers: the multiple-choice knapsack over (keep softmax | Tc) per site."""
import itertools

import pytest
from hypothesis import given, settings, strategies as st

import rehyat_compile as rc
from rehyat_compile.distill import DistillReport, SiteResult
from rehyat_compile.select import site_flops


def brute_force(errors, cost, budget):
    sites = list(errors)
    best = None
    for combo in itertools.product(*[[None, *errors[s]] for s in sites]):
        c = sum(cost[s][o] for s, o in zip(sites, combo))
        e = sum(0.0 if o is None else errors[s][o] for s, o in zip(sites, combo))
        if c <= budget and (best is None or e < best):
            best = e
    return best


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.randoms(use_true_random=False), st.floats(0.35, 1.0))
def test_knapsack_matches_brute_force_and_respects_budget(n_sites, n_options, rnd, fraction):
    errors = {f"s{i}": {tc: rnd.uniform(0, 1) for tc in range(1, n_options + 1)} for i in range(n_sites)}
    cost = {s: {None: 100.0, **{tc: rnd.uniform(5, 30) for tc in errors[s]}} for s in errors}
    budget = fraction * 100.0 * n_sites
    chosen = rc.select_layers(errors, cost, budget)
    assert chosen.cost <= budget
    assert chosen.error <= brute_force(errors, {s: c for s, c in cost.items()}, budget) + 1e-9


def test_tight_budget_converts_the_best_distilled_sites_first():
    errors = {"a": {1: 0.1}, "b": {1: 0.5}, "c": {1: 0.3}}
    cost = {s: {None: 10.0, 1: 2.0} for s in errors}
    chosen = rc.select_layers(errors, cost, 16.0)  # only one site can keep softmax
    assert chosen.layers == ["a", "c"] and chosen.choices["b"] is None
    assert chosen.error == pytest.approx(0.4) and chosen.cost == pytest.approx(14.0)
    assert rc.select_layers(errors, cost, 30.0).layers == []  # everything fits: nothing converted


def test_budget_below_cheapest_selection_is_an_error():
    with pytest.raises(ValueError, match="budget"):
        rc.select_layers({"a": {1: 0.1}}, {"a": {None: 10.0, 1: 2.0}}, 1.0)
    with pytest.raises(ValueError, match="budget"):
        rc.select_layers({"a": {1: 0.1}}, {"a": {None: 10.0, 1: 2.0}}, -5)


def result(name, tc, error, frames=21, m=1560):
    layout = dict(tokens_per_frame=m, chunk_frames=tc, overlap_frames=1 if tc > 1 else 0, causal=True,
                  extra_before=0, extra_after=0, scale=None)
    return SiteResult(name, 1.0, error, [], (1, 12, frames * m, 128), 64, layout)


def report(tc, errors):
    per = {n: result(n, tc, e) for n, e in errors.items()}
    return DistillReport(per, [], None, None, None, 10, 1e-3, "l1", 0.0)


def test_reports_give_costs_from_the_cost_model_and_several_tc_options():
    r1 = report(1, {"x": 0.2, "y": 0.4})
    r3 = report(3, {"x": 0.1, "y": 0.15})
    soft = site_flops((1, 12, 21 * 1560, 128), 64, r1.per_layer["x"].layout, None)
    hyb1 = site_flops((1, 12, 21 * 1560, 128), 64, r1.per_layer["x"].layout, 1)
    hyb3 = site_flops((1, 12, 21 * 1560, 128), 64, r3.per_layer["x"].layout, 3)
    assert hyb1 < hyb3 < soft
    chosen = rc.select_layers([r1, r3], None, 2 * hyb3)
    assert chosen.choices == {"x": 3, "y": 3}
    chosen = rc.select_layers([r1, r3], None, hyb3 + hyb1)
    assert chosen.choices == {"x": 1, "y": 3}  # the larger chunk goes where it saves more error
    chosen = rc.select_layers([r1, r3], None, soft + hyb1)
    assert chosen.choices == {"x": 1, "y": None}


def test_errors_without_costs_need_a_cost_argument():
    with pytest.raises(ValueError, match="cost"):
        rc.select_layers({"a": 0.1}, None, 10.0)
    chosen = rc.select_layers({"a": 0.1}, lambda site, option: 10.0 if option is None else 1.0, 5.0)
    assert chosen.layers == ["a"]
