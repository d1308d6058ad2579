"""maskgit_step with NaN / inf logits: one policy on every backend (issue 23, item 7).

* value checks on (the default): a ValueError that names the op and the argument, for NaN or +inf
  in ``logits`` / ``uncond_logits`` at a masked position, for guided and temperature-scaled logits
  that are NaN or +inf (−inf in ``uncond_logits`` with g > 0, an overflow), for a masked position
  whose logits are −inf for every token, and for non-finite supplied noise;
* value checks off: the documented result, the same on every backend. With ``y`` the guided,
  temperature-scaled logits in fp32: a NaN or +inf ``y_k`` counts as −inf (never sampled); a
  position with no finite ``y_k`` takes token 0 with confidence −inf.
"""

import math

import pytest
import torch
from test_mask_sampling import CPU_BUILT

from conftest import backend_params, device_for
from unif2ace import _backend
from unif2ace.ops import maskgit_decode, maskgit_step

NAN, INF = math.nan, math.inf
B, L, K = 2, 6, 8
MASK = K
BACKENDS = [p for p in backend_params() if p.id in ("torch", "cpu", "triton")]
# the Triton interpreter computes inf - inf in numpy, which warns: those NaNs are the inputs here
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


def _state(device="cpu"):
    logits = torch.randn(B, L, K, generator=torch.Generator().manual_seed(0))
    ids = torch.full((B, L), MASK)
    ids[0, 0] = 3  # one known position: its logits are never read
    return logits.to(device), ids.to(device), torch.tensor([2, 3], device=device)


def _skip_unbuilt(backend):
    if backend == "cpu" and not CPU_BUILT:
        pytest.skip("CPU kernels not built")


# ---- checks on: a clear error ------------------------------------------------------------------


def _set(t, idx, v):
    t = t.clone()
    t[idx] = v
    return t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "change,match",
    [
        (dict(logits=((1, 2, 5), NAN)), r"maskgit_step: logits has NaN or \+inf .*\(b=1, l=2\)"),
        (dict(logits=((0, 4, 0), INF)), r"maskgit_step: logits has NaN or \+inf .*\(b=0, l=4\)"),
        (dict(uncond=((1, 1, 3), NAN)), r"maskgit_step: uncond_logits has NaN or \+inf"),
        (dict(logits=((0, 3), -INF)), r"maskgit_step: logits are -inf for every token .*l=3"),
        # -inf in uncond with g > 0 makes that column's guided logit +inf
        (dict(uncond=((1, 5, 2), -INF)), r"maskgit_step: logits .*guidance and temperature"),
        # finite, but beyond float32 once divided by the temperature
        (dict(logits=((1, 0, 6), 3e38), temperature=0.5), r"guidance and temperature"),
        (dict(gumbel=((0, 1, 1), NAN)), r"maskgit_step: gumbel_noise has non-finite"),
        (dict(choice=((1, 1), INF)), r"maskgit_step: choice_noise has non-finite"),
    ],
)
def test_nonfinite_inputs_are_refused_with_checks_on(backend, change, match):
    _skip_unbuilt(backend)
    dev = device_for(backend)
    logits, ids, mask_len = _state(dev)
    uncond = torch.zeros_like(logits)
    gumbel = torch.zeros_like(logits)
    choice = torch.zeros(B, L, device=dev)
    kw = dict(uncond_logits=uncond, guidance=1.5, gumbel_noise=gumbel, choice_noise=choice)
    for name, key in (("logits", None), ("uncond", "uncond_logits"), ("gumbel", "gumbel_noise")):
        if name in change:
            t = _set(logits if name == "logits" else kw[key], *change[name])
            if name == "logits":
                logits = t
            else:
                kw[key] = t
    if "choice" in change:
        kw["choice_noise"] = _set(choice, *change["choice"])
    kw["temperature"] = change.get("temperature", 1.0)
    with pytest.raises(ValueError, match=match):
        maskgit_step(logits, ids, MASK, mask_len, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_what_the_kernels_never_read_is_not_checked(backend):
    """NaN at a known position (never read) and −inf in some columns (a token of probability 0)
    are fine with the checks on."""
    _skip_unbuilt(backend)
    dev = device_for(backend)
    logits, ids, mask_len = _state(dev)
    logits[0, 0] = NAN  # position (0, 0) is known
    logits[1, :, :3] = -INF
    new_ids, _ = maskgit_step(logits, ids, MASK, mask_len, seed=1, backend=backend)
    filled = (new_ids != MASK) & (ids == MASK)
    assert (new_ids[1][filled[1]] >= 3).all()


def test_decode_checks_the_logits_of_every_step():
    """maskgit_decode checks ids and mask_len once (valid by construction after), but the model's
    logits are new at every step."""
    calls = []

    def logits_fn(ids):
        calls.append(1)
        z = torch.randn(1, L, K)
        return z if len(calls) < 3 else z.fill_(NAN)

    with pytest.raises(ValueError, match="maskgit_step: logits has NaN"):
        maskgit_decode(
            logits_fn, torch.full((1, L), MASK), 4, mask_id=MASK, seed=0, backend="torch"
        )
    assert len(calls) == 3


# ---- checks off: one documented result on every backend -----------------------------------------


def _policy_case(device):
    """Rows of [B = 4, L = 8, K = 8] logits, one kind of bad input per position, supplied noise.

    The noise favours column 5 (G = 20, else 0), so a row picks 5 unless a finite logit larger by
    more than 20 sits elsewhere."""
    Bp, Lp = 4, 8
    z = torch.randn(Bp, Lp, K, generator=torch.Generator().manual_seed(1))
    z[0, 0, 5] = NAN  # NaN never wins: the row picks its best other column
    z[0, 1, 2] = INF  # +inf is never sampled either
    z[0, 2, [1, 6]] = INF
    z[0, 3] = -INF  # all -inf: token 0, confidence -inf
    z[0, 4] = NAN  # all NaN: the same
    z[0, 5] = torch.tensor([NAN, -INF, 0.5, NAN, -INF, NAN, -INF, NAN])  # one finite column: 2
    z[0, 6, :4] = NAN
    z[1, 1, 3] = 1e30  # large but finite (no overflow, with or without guidance): certain
    z[1, 2, 3] = -INF
    uncond = torch.randn(Bp, Lp, K, generator=torch.Generator().manual_seed(2))
    uncond[2, 0, 4] = -INF  # with g = 1.5: y = +inf in column 4
    uncond[2, 1, :] = INF  # every y = -inf: token 0, confidence -inf
    uncond[2, 2, 3] = NAN
    z[3, 0, 7] = INF
    uncond[3, 0, 7] = INF  # +inf - +inf = NaN: never sampled
    gumbel = torch.zeros(Bp, Lp, K)
    gumbel[..., 5] = 20.0
    ids = torch.full((Bp, Lp), MASK)
    ids[3, 7] = 1
    move = lambda t: t.to(device)  # noqa: E731
    choice = torch.randn(Bp, Lp, generator=torch.Generator().manual_seed(3))
    return move(z), move(uncond), move(ids), move(gumbel), move(choice)


def _run(backend, guided, mask_len, tau=0.0, gumbel=True, seed=5):
    dev = device_for(backend)
    z, uncond, ids, gn, cn = _policy_case(dev)
    _backend.set_checks(False)
    try:
        out = maskgit_step(
            z,
            ids,
            MASK,
            torch.full((z.shape[0],), mask_len, device=dev),
            uncond_logits=uncond if guided else None,
            guidance=1.5,
            choice_temperature=tau,
            gumbel_noise=gn if gumbel else None,
            choice_noise=cn if gumbel else None,
            seed=seed,
            return_confidence=True,
            backend=backend,
        )
    finally:
        _backend.set_checks(True)
    return [t.cpu() for t in out]


def test_policy_with_supplied_noise_is_the_documented_result():
    ids, _, conf = _run("torch", guided=False, mask_len=0)
    assert ids[0, 0] != 5  # NaN never sampled
    assert ids[0, 1] == 5 and ids[0, 2] == 5 and ids[3, 0] == 5  # nor +inf
    assert torch.isfinite(conf[0, :3]).all()
    assert ids[0, 3] == 0 and conf[0, 3] == -INF  # all -inf
    assert ids[0, 4] == 0 and conf[0, 4] == -INF  # all NaN
    assert ids[0, 5] == 2 and conf[0, 5] == 0.0  # the one finite column: certain, log p = 0
    assert ids[1, 1] == 3 and conf[1, 1] == 0.0  # a large finite logit
    assert ids[0, 6] == 5 and ids[1, 2] == 5  # the noise wins elsewhere
    ids, _, conf = _run("torch", guided=True, mask_len=0)
    assert ids[2, 0] == 5  # -inf uncond with g > 0: +inf, never sampled
    assert ids[2, 1] == 0 and conf[2, 1] == -INF  # every guided logit -inf
    assert ids[2, 2] == 5 and ids[3, 0] == 5  # NaN (+inf - +inf) never sampled
    assert ids[3, 7] == 1 and conf[3, 7] == INF  # known position


def _same(got, want, what):
    for a, b, name in zip(got, want, ("ids", "mask", "confidence")):
        if name == "confidence":
            assert torch.equal(torch.isinf(a), torch.isinf(b)) and not a.isnan().any(), what
            fin = torch.isfinite(b)
            assert torch.equal(a[~fin], b[~fin]), what
            torch.testing.assert_close(a[fin], b[fin], rtol=1e-6, atol=1e-5, msg=what)
        else:
            assert torch.equal(a, b), (what, name, a, b)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "torch"])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("mask_len,tau", [(0, 0.0), (3, 0.0), (3, 2.0)])
def test_policy_with_supplied_noise_is_the_same_on_every_backend(backend, guided, mask_len, tau):
    _skip_unbuilt(backend)
    want = _run("torch", guided, mask_len, tau)
    _same(_run(backend, guided, mask_len, tau), want, f"{backend} guided={guided}")


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "torch"])
@pytest.mark.parametrize("guided", [False, True])
def test_policy_on_the_philox_path(backend, guided):
    """Seeded noise: cpu, triton (and cuda) draw the same Philox noise, so they agree everywhere;
    the torch backend draws its own, so it agrees where the result does not depend on the noise."""
    _skip_unbuilt(backend)
    ids, mask, conf = _run(backend, guided, 2, tau=1.0, gumbel=False)
    ref = _run("cpu" if CPU_BUILT else backend, guided, 2, tau=1.0, gumbel=False)
    _same((ids, mask, conf), ref, f"{backend} vs cpu")
    tids, _, tconf = _run("torch", guided, 0, gumbel=False)
    oids, _, oconf = _run(backend, guided, 0, gumbel=False)
    certain = [(0, 3), (0, 4), (0, 5), (1, 1)] + ([(2, 1)] if guided else [])
    for p in certain:
        assert oids[p] == tids[p], p
        assert oconf[p] == tconf[p] or abs(float(oconf[p] - tconf[p])) < 1e-6, p
    for ids in (oids, tids):  # NaN and +inf columns are never sampled
        assert ids[0, 0] != 5 and ids[0, 1] != 2 and ids[0, 2] not in (1, 6)
        assert ids[2, 0] != 4 if guided else ids[3, 0] != 7
