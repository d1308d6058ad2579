"""The training step under bf16 autocast, as the trainer runs it on CUDA (``amp="auto"``), here
with ``torch.autocast("cpu", torch.bfloat16)``: every small config and MoE setting, compared with
fp32.

Tolerances: bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ≈ 0.2 %) on every matmul input;
over a few layers the loss moves by a fraction of a percent, so it must agree within 3 %. The
gradients must point the same way: the cosine similarity of the whole flattened gradient > 0.99,
and of every parameter tensor that carries at least 1e-3 of the largest gradient norm > 0.95
(small tensors, such as the sequence MoE's two mixing logits, average over few terms).

The loss ops (``d3diff_linear_loss``, ``fused_linear_cross_entropy``) run under autocast as
they are: the LM head's matmuls in bf16, the loss in fp32. The token MoE's experts compute in
bf16 (``moe_mlp`` / ``moe_shared_experts`` cast to the autocast dtype, as ``torch.nn.Linear``
does) and its routing in fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch

from model_data import examples, small_cfg
from unif2ace import ops, use_backend
from unif2ace.models import UniF2ace, collate, get_config
from unif2ace.models.moe import DenseMLP

MOE = [(True, True), (True, False), (False, True), (False, False)]
CONFIGS = {"test": small_cfg, "tiny": lambda **kw: get_config("tiny", **kw)}


def _step(model, batch, amp: bool):
    """(loss, {name: grad}, {name: parameter after one AdamW step})."""
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss, parts = model(batch, loss=True, step=3, seed=1)
    assert loss.dtype == torch.float32 and all(torch.isfinite(v) for v in parts.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return loss.detach(), grads, {n: p.detach() for n, p in model.named_parameters()}


def _cos(a, b):
    return float(
        torch.nn.functional.cosine_similarity(a.detach().flatten(), b.detach().flatten(), dim=0)
    )


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("moe", MOE, ids=lambda m: f"token{int(m[0])}-seq{int(m[1])}")
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_training_step_under_bf16_autocast_matches_fp32(monkeypatch, config, moe, backend):
    cfg = CONFIGS[config](token_moe=moe[0], seq_moe=moe[1], noise_std=0.0, cond_drop=0.3)
    torch.manual_seed(0)
    model = UniF2ace(cfg)
    batch = collate(cfg, examples(cfg, 6 if config == "test" else 4))
    with use_backend(backend):
        l32, g32, p32 = _step(model, batch, amp=False)
        l16, g16, p16 = _step(model, batch, amp=True)
    assert abs(float(l16) - float(l32)) <= 0.03 * abs(float(l32)), (float(l16), float(l32))
    names = list(g32)
    flat = [torch.cat([g[n].flatten() for n in names]) for g in (g32, g16)]
    assert _cos(*flat) > 0.99
    top = max(float(g.norm()) for g in g32.values())
    for n in names:
        if float(g32[n].norm()) >= 1e-3 * top:
            assert _cos(g32[n], g16[n]) > 0.95, (n, _cos(g32[n], g16[n]))
    for n in names:  # the optimizer step ran on the same parameters, in fp32
        assert p16[n].dtype == torch.float32 and torch.isfinite(p16[n]).all(), n


def test_dense_mlp_output_is_scattered_in_its_own_dtype(monkeypatch):
    """token_moe=False: under autocast the dense MLP returns bf16, and the block scatters it over
    the valid tokens with ``index_copy``, which CUDA's autocast leaves alone (a bf16 source into
    an fp32 buffer raises) while CPU's promotes its operands. So the MLP runs under CPU autocast
    and the scatter outside it, as on CUDA (sequence MoE off: outside autocast its fp32 layers
    would not take the bf16 branch)."""
    cfg = small_cfg(token_moe=False, seq_moe=False, noise_std=0.0)
    torch.manual_seed(0)
    model = UniF2ace(cfg)
    batch = collate(cfg, examples(cfg, 5))
    assert batch["meta"].padded
    with use_backend("torch"):
        h32, _ = model.hidden_states(batch["input_ids"], batch)
        forward = DenseMLP.forward

        def amp_forward(self, x, group_ids):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y, aux = forward(self, x, group_ids)
            assert y.dtype == torch.bfloat16
            return y, aux

        monkeypatch.setattr(DenseMLP, "forward", amp_forward)
        h16, aux = model.hidden_states(batch["input_ids"], batch)
    assert torch.isfinite(h16).all() and torch.isfinite(aux)
    assert _cos(h16.float(), h32) > 0.99


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_token_moe_experts_under_autocast(monkeypatch, backend):
    """The token MoE's experts under autocast take bf16 (the routed and the shared ones) while
    the routing weights stay fp32."""
    cfg = small_cfg(token_moe=True, noise_std=0.0)
    model = UniF2ace(cfg)
    batch = collate(cfg, examples(cfg, 4))
    dtypes = []
    for name in ("moe_mlp", "moe_shared_experts", "moe_route"):
        real = getattr(ops, name)

        def record(*args, _real=real, **kwargs):
            out = _real(*args, **kwargs)
            dtypes.append((_real.__name__, out[1].dtype if isinstance(out, tuple) else out.dtype))
            return out

        monkeypatch.setattr(ops, name, record)
    with use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(batch, loss=True)
    assert torch.isfinite(loss)
    assert {n for n, d in dtypes if d == torch.bfloat16} == {"moe_mlp", "moe_shared_experts"}
    assert {n for n, d in dtypes if d == torch.float32} == {"moe_route"}
