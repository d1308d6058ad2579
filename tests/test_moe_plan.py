"""A plan given to ``moe_mlp`` is checked against the ids it is used with (issue 23, item 6).

``moe_mlp(x, w_up, w_down, ids, w, plan=moe_plan(other_ids))`` with a plan of the same shape but
other ids used to run the experts on the wrong rows without a word. What is checked, and when:

* always (host values, free): the plan's experts, slots and top_k against the ids' shape;
* with the value checks on: the plan against the ids' values. Free when the plan was made from
  this very ids tensor and the tensor was not written since (the plan keeps a reference and the
  tensor's version); otherwise the plan is made again from the ids and compared (one pass over
  T·k ids, one host read).
"""

import pytest
import torch

import unif2ace
import unif2ace.ops.moe as moe_pkg
from conftest import backend_params, device_for, rel_err
from unif2ace.ops.moe import moe_mlp, moe_plan

T, D, FH, E, K = 24, 16, 8, 4, 2


def _inputs(device):
    x = torch.randn(T, D, device=device)
    w_up = torch.randn(E, 2 * FH, D, device=device) / D**0.5
    w_down = torch.randn(E, D, FH, device=device) / FH**0.5
    ids = torch.rand(T, E, device=device).argsort(1)[:, :K]
    w = torch.rand(T, K, device=device)
    return x, w_up, w_down, ids, w


def _other_ids(ids):
    """Ids of the same shape with other values (every token's experts shifted by one)."""
    return (ids + 1) % E


@pytest.mark.parametrize("backend", backend_params())
def test_a_plan_of_other_ids_is_refused(backend):
    x, wu, wd, ids, w = _inputs(device_for(backend))
    plan = moe_plan(_other_ids(ids), E, backend=backend)
    with pytest.raises(ValueError, match="moe_mlp: plan was made for other topk_ids"):
        moe_mlp(x, wu, wd, ids, w, plan=plan, backend=backend)


@pytest.mark.parametrize("backend", backend_params())
def test_a_plan_of_these_ids_gives_the_planless_output(backend):
    x, wu, wd, ids, w = _inputs(device_for(backend))
    ref = moe_mlp(x, wu, wd, ids, w, backend=backend)
    same = moe_mlp(x, wu, wd, ids, w, plan=moe_plan(ids, E, backend=backend), backend=backend)
    copy = moe_mlp(
        x, wu, wd, ids, w, plan=moe_plan(ids.clone(), E, backend=backend), backend=backend
    )
    assert rel_err(same, ref) == 0 and rel_err(copy, ref) == 0


def test_ids_written_after_planning_are_refused():
    x, wu, wd, ids, w = _inputs("cpu")
    plan = moe_plan(ids, E, backend="cpu")
    ids.copy_(_other_ids(ids))  # the same tensor, other values: its version moved on
    with pytest.raises(ValueError, match="plan was made for other topk_ids"):
        moe_mlp(x, wu, wd, ids, w, plan=plan, backend="cpu")


def test_the_plan_of_the_same_tensor_is_not_made_again(monkeypatch):
    """The cheap path: a plan made from this ids tensor, unchanged since, costs no second plan."""
    x, wu, wd, ids, w = _inputs("cpu")
    plan = moe_plan(ids, E, backend="cpu")
    calls = []
    real = moe_pkg.plan_op
    monkeypatch.setattr(moe_pkg, "plan_op", lambda *a: calls.append(1) or real(*a))
    moe_mlp(x, wu, wd, ids, w, plan=plan, backend="cpu")
    assert calls == []
    moe_mlp(x, wu, wd, ids.clone(), w, plan=plan, backend="cpu")  # another tensor: checked
    assert calls == [1]


def test_a_plan_of_another_top_k_is_refused_with_checks_off():
    """Same T·k slots, another k: a host check, so it holds with the value checks off too."""
    x, wu, wd, ids, w = _inputs("cpu")
    wide = torch.cat([ids, _other_ids(ids)], 1)[: T // 2]  # [T/2, 2k]: the same N = T·k
    plan = moe_plan(wide, E, backend="cpu")
    unif2ace.set_checks(False)
    try:
        with pytest.raises(ValueError, match="plan was made for top_k = 4"):
            moe_mlp(x, wu, wd, ids, w, plan=plan, backend="cpu")
    finally:
        unif2ace.set_checks(True)
