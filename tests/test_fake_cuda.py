"""The CUDA path without a GPU: the model's training and generation steps on fake CUDA tensors.

Under :class:`torch._subclasses.fake_tensor.FakeTensorMode`, tensors on ``device="cuda"`` exist on
this CPU-only torch: ops compute only shapes, dtypes and devices. So

* a CPU tensor that leaks into the step raises ``FakeTensorDeviceMismatchError``;
* any read of device data back to the host (``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``,
  a size that depends on the data) raises ``DataDependentOutputException``: fake tensors have no
  values. A step that passes reads nothing back, as CUDA-graph capture needs.

Two variants per model config and MoE setting: the "torch" backend (what ``auto`` resolves to on a
machine without triton or the CUDA extension), and "triton" / "cuda" reported available, so the ops
go through their custom ops, whose fakes (``register_fake``) serve the fake tensors; no real
launcher may then run (``_backend.launcher`` raises for them).

Two things of the harness, not of the code under test:

* this torch has no CUDA device guard, and the hand-written Python bindings of
  ``Tensor.__getitem__``, ``__setitem__``, ``to``, ``copy_`` and ``__invert__`` (``~t``) enter
  one, so :class:`_Indexing` runs them through the equivalent aten ops (slice, select, index,
  index_put, _to_copy, copy_, bitwise_not);
* :func:`unif2ace.models.unif2ace.draw_noise` is host computation (a CPU generator, like a data
  loader's shuffling), which fake mode cannot tell from device work: it runs outside fake mode.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    FakeTensor,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.overrides import TorchFunctionMode

import unif2ace
from model_data import examples, small_cfg
from unif2ace import _backend, ops
from unif2ace.models import UniF2ace, collate, get_config
from unif2ace.models import unif2ace as model_module
from unif2ace.models.layout import TASK_MMU, TASK_T2I, Example

CUDA = torch.device("cuda", 0)
MOE = [(True, True), (True, False), (False, True), (False, False)]


# ---- the harness ---------------------------------------------------------------------------


def _basic(x: torch.Tensor, idx) -> tuple[torch.Tensor, list]:
    """Apply the basic part of ``x[idx]`` (ints, slices, None, Ellipsis) as views; return the view
    and the advanced indices (tensors, lists) per remaining dim (None: the whole dim)."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    n_real = sum(i is not None and i is not Ellipsis for i in idx)
    n_real += sum(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() - 1 for i in idx
    )
    out, dim, adv = x, 0, []
    for i in idx:
        if i is Ellipsis:
            skip = x.dim() - n_real
            adv += [None] * skip
            dim += skip
        elif i is None:
            out = out.unsqueeze(dim)
            adv.append(None)
            dim += 1
        elif isinstance(i, bool) or not isinstance(i, (int, slice, torch.Tensor, list)):
            raise NotImplementedError(f"fake-CUDA indexing by {type(i).__name__}")
        elif isinstance(i, int):
            out = out.select(dim, i)
        elif isinstance(i, slice):
            start, stop, step = i.indices(out.shape[dim])
            out = torch.ops.aten.slice.Tensor(out, dim, start, max(stop, start), step)
            adv.append(None)
            dim += 1
        else:
            t = torch.as_tensor(i, device=x.device) if isinstance(i, list) else i
            adv.append(t)
            dim += t.dim() if t.dtype == torch.bool else 1
    return out, adv


class _Indexing(TorchFunctionMode):
    """``Tensor.__getitem__``, ``__setitem__``, ``to``, ``copy_`` and ``__invert__`` on fake CUDA
    tensors through aten ops (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            x = args[0]
            if device is not None and torch.device(device).type == "cuda" or x.is_cuda:
                device = x.device if device is None else torch.device(device)
                if device.type == "cuda" and device.index is None:
                    device = CUDA
                if device == x.device and dtype in (None, x.dtype):
                    return x
                if not isinstance(x, FakeTensor):
                    x = torch._guards.detect_fake_mode().from_tensor(x)
                return torch.ops.aten._to_copy.default(
                    x, dtype=dtype or x.dtype, device=device, non_blocking=non_blocking
                )
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and args[0].is_cuda:
            view, adv = _basic(args[0], args[1])
            has_adv = any(a is not None for a in adv)
            if func is torch.Tensor.__getitem__:
                return torch.ops.aten.index.Tensor(view, adv) if has_adv else view
            value = args[2]
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value, dtype=view.dtype, device=view.device)
            if has_adv:
                torch.ops.aten.index_put_(view, adv, value.to(view.dtype))
            else:
                torch.ops.aten.copy_.default(view, value)
            return None
        if func is torch.Tensor.copy_ and args[0].is_cuda:
            return torch.ops.aten.copy_.default(*args, **kwargs)
        if func is torch.Tensor.__invert__ and args[0].is_cuda:
            return torch.ops.aten.bitwise_not.default(args[0])
        return func(*args, **kwargs)


def _no_launch(kernel, backend, *args):
    raise AssertionError(f"a real launcher ran in fake mode: {kernel} on {backend}")


@contextlib.contextmanager
def fake_cuda(monkeypatch, engine: str | None):
    """Fake CUDA with value checks off. ``engine`` ("triton" or "cuda"): that backend reported
    available on CUDA devices, so the ops resolve to it and run their custom ops' fakes; every
    launcher but the "torch" ones (plain PyTorch, which fake mode runs) then raises."""
    if engine is not None:
        real_available, real_launcher = _backend.available, _backend.launcher

        def available(backend, device):
            device = torch.device(device)
            if device.type == "cuda" and backend == engine:
                return True
            return real_available(backend, device)

        def launcher(kernel, backend):
            if backend != "torch":
                return functools.partial(_no_launch, kernel, backend)
            return real_launcher(kernel, backend)

        monkeypatch.setattr(_backend, "available", available)
        monkeypatch.setattr(_backend, "launcher", launcher)
    resolved: list[str] = []
    real_resolve = _backend.resolve

    def resolve(*args, **kwargs):
        resolved.append(real_resolve(*args, **kwargs))
        return resolved[-1]

    monkeypatch.setattr(_backend, "resolve", resolve)
    real_draw = model_module.draw_noise

    def draw_noise(*a, **kw):
        with unset_fake_temporarily():
            return real_draw(*a, **kw)

    monkeypatch.setattr(model_module, "draw_noise", draw_noise)
    checks = _backend.checks_enabled()
    unif2ace.set_checks(False)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), _Indexing():
            yield resolved
    finally:
        unif2ace.set_checks(checks)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


CONFIGS = {"test": lambda **kw: small_cfg(**kw), "tiny": lambda **kw: get_config("tiny", **kw)}


# ---- the steps -----------------------------------------------------------------------------


def _model(cfg) -> UniF2ace:
    """The model, built and initialised on the CPU outside fake mode, with every parameter and
    buffer replaced by a fake CUDA copy (``nn.Module.to`` cannot swap fakes in, and the CUDA
    generator that the initialisation needs does not exist here)."""
    mode = torch._guards.detect_fake_mode()
    with unset_fake_temporarily():
        model = UniF2ace(cfg)
        for mod in model.modules():
            for table in (mod._parameters, mod._buffers):
                for k, t in table.items():
                    if t is not None:
                        fake = FakeTensor(mode, torch.empty_like(t, device="meta"), CUDA)
                        is_param = isinstance(t, torch.nn.Parameter)
                        table[k] = torch.nn.Parameter(fake, t.requires_grad) if is_param else fake
    return model


def _loss_step(cfg, batch):
    model = _model(cfg)
    with torch.no_grad():
        loss, parts = model(_to(batch, CUDA), loss=True, step=3, seed=1)
    assert loss.device.type == "cuda" and loss.shape == ()
    assert all(v.device.type == "cuda" and v.shape == () for v in parts.values()), parts


def _generation_batches(cfg) -> tuple[dict, dict]:
    """(t2i with its CFG row, mmu) batches for the generation steps, collated on the host."""
    codes = torch.zeros(2, cfg.image_tokens, dtype=torch.long)
    t2i = [Example(TASK_T2I, None, [10, 11, 12]), Example(TASK_T2I, None, [])]
    mmu = [Example(TASK_MMU, codes[b], q) for b, q in enumerate([[10, 11], [12]])]
    return collate(cfg, t2i), collate(cfg, mmu)


def _generation_steps(cfg, t2i: dict, mmu: dict):
    model = _model(cfg).eval()
    K, N = cfg.codebook_size, cfg.image_tokens
    with torch.no_grad():
        # one image decode step: the model's image logits, then the fused MaskGIT step
        batch = _to(t2i, CUDA)
        logits = model.image_logits(batch["input_ids"], batch)  # [2, N, K]
        assert logits.shape == (2, N, K) and logits.is_cuda
        ids = torch.full((1, N), K, dtype=torch.long, device=CUDA)
        new, mask = ops.maskgit_step(
            logits[:1].float(),
            ids,
            K,
            N // 2,
            uncond_logits=logits[1:].float(),
            guidance=2.0,
            seed=3,
        )
        assert new.shape == (1, N) and new.is_cuda and mask.is_cuda
        # one text decode step: prefill with the cache, then one appended token per row
        batch = _to(mmu, CUDA)
        cache: list[dict] = []
        h, _ = model.hidden_states(batch["input_ids"], batch, cache=cache)
        lengths = batch["valid"].sum(1)
        last = h[torch.arange(2, device=CUDA), lengths - 1]
        w, bias = model.head_rows("text")
        nxt = (last @ w.T + bias).argmax(-1)
        key_valid = torch.cat([batch["valid"], torch.ones(2, 1, dtype=torch.bool, device=CUDA)], 1)
        out = model.decode_step(nxt, lengths, cache, key_valid)
        assert out.shape == (2, cfg.d_model) and out.is_cuda


@pytest.mark.parametrize("engine", [None, "triton"], ids=["torch", "triton"])
@pytest.mark.parametrize("moe", MOE, ids=lambda m: f"token{int(m[0])}-seq{int(m[1])}")
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_loss_step_on_fake_cuda(monkeypatch, config, moe, engine):
    cfg = CONFIGS[config](token_moe=moe[0], seq_moe=moe[1], cond_drop=0.5)
    batch = collate(cfg, examples(cfg, 6))
    with fake_cuda(monkeypatch, engine) as resolved:
        _loss_step(cfg, batch)
    assert (engine or "torch") in resolved and "cpu" not in resolved


@pytest.mark.parametrize("engine", [None, "triton"], ids=["torch", "triton"])
@pytest.mark.parametrize("moe", MOE, ids=lambda m: f"token{int(m[0])}-seq{int(m[1])}")
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_generation_steps_on_fake_cuda(monkeypatch, config, moe, engine):
    cfg = CONFIGS[config](token_moe=moe[0], seq_moe=moe[1])
    batches = _generation_batches(cfg)
    with fake_cuda(monkeypatch, engine) as resolved:
        _generation_steps(cfg, *batches)
    assert (engine or "torch") in resolved and "cpu" not in resolved


@pytest.mark.parametrize("moe", MOE, ids=lambda m: f"token{int(m[0])}-seq{int(m[1])}")
def test_training_step_reads_nothing(monkeypatch, moe):
    """The whole training step (loss, backward, AdamW) on fake tensors reads nothing back. On the
    fake CPU device: autograd records each input's device stream, which needs the CUDA device
    guard that a CPU-only torch lacks, so the backward cannot run on fake CUDA tensors here. The
    ops run the C++ kernels' custom ops, whose fakes serve; no launcher may run."""
    cfg = small_cfg(token_moe=moe[0], seq_moe=moe[1], cond_drop=0.5)
    batch = collate(cfg, examples(cfg, 6))
    real_launcher = _backend.launcher

    def launcher(kernel, backend):
        if backend == "torch":
            return real_launcher(kernel, backend)
        return functools.partial(_no_launch, kernel, backend)

    with fake_cuda(monkeypatch, None) as resolved, unif2ace.use_backend("cpu"):
        monkeypatch.setattr(_backend, "launcher", launcher)
        model = UniF2ace(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        loss, parts = model(batch, loss=True, step=3, seed=1)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
    assert "cpu" in resolved


# ---- what is left in ops/: each pinned by a strict xfail ------------------------------------


@pytest.mark.parametrize("engine", [None, "cuda"], ids=["torch", "cuda"])
def test_omni_attention_reads_only_when_asked_to_find_the_span(monkeypatch, engine):
    """Given the span (or None) as host values, omni_attention reads nothing on "torch" and
    "cuda"; span="auto" finds it by reading limit and key_valid, as documented."""
    B, L, H, Dh = 2, 12, 2, 8
    with fake_cuda(monkeypatch, engine) as resolved:
        q, k, v = (torch.empty(B, L, H, Dh, device=CUDA) for _ in range(3))
        idx = torch.arange(L, device=CUDA)
        limit = torch.where((idx >= 3) & (idx < 9), 9, idx + 1).expand(B, L).to(torch.int32)
        for span in ((3, 9), (0, 0), None):
            assert ops.omni_attention(q, k, v, limit, span=span).shape == (B, L, H, Dh)
        valid = torch.ones(B, L, dtype=torch.bool, device=CUDA)
        assert ops.omni_attention(q, k, v, limit, valid, span=None).shape == (B, L, H, Dh)
        with pytest.raises(DataDependentOutputException):
            ops.omni_attention(q, k, v, limit, valid)
    assert set(resolved) == {engine or "torch"}


def test_moe_balance_loss_reads(monkeypatch):
    """The balance loss reads nothing: its expert -> group map and coefficients are constants of
    the config, cached per device (no data-dependent size, no host -> device copy per call)."""
    cfg = small_cfg(token_moe=True)
    batch = collate(cfg, examples(cfg, 4))
    with fake_cuda(monkeypatch, None):
        _loss_step(cfg, batch)


def test_cuda_backend_runs_fakes(monkeypatch):
    """With "cuda" available, every op runs its custom op's fake (omni_attention's
    unif2ace::omni_attention included): no launcher runs, flash-attn and torch.cuda.device
    are never reached."""
    cfg = small_cfg(cond_drop=0.5)
    batch, gen = collate(cfg, examples(cfg, 6)), _generation_batches(cfg)
    with fake_cuda(monkeypatch, "cuda") as resolved:
        _loss_step(cfg, batch)
        _generation_steps(cfg, *gen)
    assert "cuda" in resolved


def test_omni_limit_reads_only_with_checks(monkeypatch):
    """omni_limit's contiguity check reads is_image: only with the value checks on."""
    with fake_cuda(monkeypatch, None):
        is_image = torch.zeros(2, 8, dtype=torch.bool, device=CUDA)
        assert ops.omni_limit(is_image).shape == (2, 8)
        unif2ace.set_checks(True)
        with pytest.raises(DataDependentOutputException):
            ops.omni_limit(is_image)


def test_schedule_reads_only_with_checks(monkeypatch):
    """schedule's value check on t (finite, in [0, 1]) reads t: only with the value checks on."""
    with fake_cuda(monkeypatch, None):
        t = torch.zeros(3, device=CUDA)
        assert ops.schedule(t).ratio.shape == (3,)
        assert all(w.shape == (3,) for w in ops.d3diff_weights(t, torch.ones(3, device=CUDA)))
        unif2ace.set_checks(True)
        with pytest.raises(DataDependentOutputException):
            ops.schedule(t)
