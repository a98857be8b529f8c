"""The sweep driver's pure parts: its config guards and the smallest-budget read-out."""

import types

import pytest

from jaxrecover.paper import sweeps


def _point(x, c, k, n, rel=None):
    return {"x": x, "constraint": c, "summary": {"recovered": {"k": k, "n": n, "rate": k / n if n else None},
                                                 **({"delta_rel": {"mean": rel}} if rel is not None else {})}}


def test_smallest_budget_is_the_first_grid_point_that_recovers():
    pts = [_point(0.4, "encoder", 4, 4, 0.39), _point(0.05, "encoder", 0, 4, 0.05), _point(0.1, "encoder", 1, 4, 0.09),
           _point(0.2, "encoder", 3, 4, 0.18), _point(0.05, "none", 0, 4), _point(0.4, "none", 0, 4)]
    enc, none = sweeps.smallest_budgets(pts, ("encoder", "none"))
    assert enc["any"]["budget"] == 0.1 and enc["any"]["delta_rel"] == 0.09  # grid order, not list order
    assert enc["full"]["budget"] == 0.4 and enc["full"]["recovered"]["k"] == 4
    assert none["any"] is None and none["full"] is None
    assert sweeps._smallest_cell(None, True) == "not within the grid"
    assert "budget_rel 0.1 (1/4" in sweeps._smallest_cell(enc["any"], True)
    # a point with no examples (no flips at that budget) is not a recovery
    assert sweeps.smallest_budgets([_point(1.0, "none", 0, 0)], ("none",))[0]["any"] is None


@pytest.mark.parametrize("kw, match", [
    ({"setting": "ioi", "constraints": ("none", "jacobian")}, "single-layer"),
    ({"setting": "refusal", "relative": True, "kind": "budget", "budgets": (0.0, 0.1)}, "--budgets 0.0: must be > 0"),
    ({"setting": "refusal", "constraints": ("encoder", "nope")}, "--constraints"),
])
def test_bad_sweep_configs_are_refused_before_anything_loads(kw, match):
    with pytest.raises(ValueError, match=match):
        sweeps.Config(**kw)


def test_relative_budget_grid_is_solved_point_by_point_absolute_jointly(monkeypatch):
    calls = []

    def fake(setting, prep, *, constraint, store=None, n_features=None, budgets=None, relative=False):
        calls.append((constraint, budgets, relative))
        one = {"n_valid_flips": 2, "modes": {constraint: {"recovered": {"k": 1, "n": 2, "rate": 0.5}}}, "records": []}
        return [one] * len(budgets or [0])

    monkeypatch.setattr(sweeps.D_, "evaluate", fake)  # the one driver: the sweep only picks the grid
    module = types.SimpleNamespace(SETTING=types.SimpleNamespace(judge=None))
    cfg = sweeps.Config(setting="refusal", kind="budget", budgets=(0.1, 0.3), relative=True,
                        constraints=("jacobian", "none_cross"))
    res = sweeps.run_sweep(cfg, module, prepared=object())
    assert not res["joint_budgets"]  # relative budgets differ per delta site: never one joint batch
    assert calls == [("jacobian", (0.1,), True), ("none_cross", (0.1,), True),
                     ("jacobian", (0.3,), True), ("none_cross", (0.3,), True)]
    calls.clear()
    sweeps.run_sweep(sweeps.Config(setting="ioi", kind="budget", budgets=(1.0, 2.0), constraints=("none",)),
                     module, prepared=object())
    assert calls == [("none", (1.0, 2.0), False)]  # absolute budgets: one joint solve
    calls.clear()
    judged = types.SimpleNamespace(SETTING=types.SimpleNamespace(judge=print))  # regenerates per point
    sweeps.run_sweep(sweeps.Config(setting="refusal", kind="budget", budgets=(1.0, 2.0), constraints=("none",)),
                     judged, prepared=object())
    assert calls == [("none", (1.0,), False), ("none", (2.0,), False)]
