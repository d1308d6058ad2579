"""ops.omni_attention: every backend against the fp64 reference (outputs and gradients, padding
rows included), the limits of Show-o's layout against its is_image rule, the torch backend's split
and masked SDPA paths, the kernels' launchers against their torch spec, opcheck and torch.compile,
and one test per validation rule."""

from __future__ import annotations

import pytest
import torch

import unif2ace
from unif2ace import _backend
from unif2ace.ops.attention import (
    _cpu,
    _cuda,
    _custom_ops,
    _torch,
    apply_rotary,
    limit_mask,
    omni_attention,
    omni_attention_ref,
    omni_limit,
)

needs_kernel = pytest.mark.skipif(_backend.cpu_ext() is None, reason="C++ CPU kernels not built")
BACKENDS = ["torch", pytest.param("cpu", marks=needs_kernel)]


def layout(B: int, L: int, g: torch.Generator, drop: bool = True):
    """Random Show-o rows: text, an image span, text, then padding; some rows with invalid keys
    inside (a dropped prompt), one row without an image."""
    is_image = torch.zeros(B, L, dtype=torch.bool)
    valid = torch.ones(B, L, dtype=torch.bool)
    for b in range(B):
        n = int(torch.randint(max(1, L // 2), L + 1, (1,), generator=g))
        valid[b, n:] = False
        if b != 1:  # row 1: text only
            s = int(torch.randint(0, max(1, n // 2), (1,), generator=g))
            e = int(torch.randint(s + 1, n + 1, (1,), generator=g))
            is_image[b, s:e] = True
        if drop and b == 2 and n > 3:
            valid[b, 1:3] = False
    return is_image, valid


def qkv(B, L, H, Dh, dtype=torch.float32):
    return [torch.randn(B, L, H, Dh, dtype=dtype) for _ in range(3)]


def show_o_mask(is_image, key_valid=None):
    """Show-o's rule written on is_image: key_valid[j] and (j <= i or both image tokens), and a
    query always sees itself."""
    L = is_image.shape[1]
    idx = torch.arange(L)
    allowed = (idx[None, :, None] >= idx[None, None, :]) | (
        is_image[:, :, None] & is_image[:, None, :]
    )
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    return allowed | torch.eye(L, dtype=torch.bool)[None]


def test_omni_limit_gives_the_show_o_rule():
    g = torch.Generator().manual_seed(0)
    for L in (1, 7, 40):
        is_image, valid = layout(5, L, g)
        limit = omni_limit(is_image)
        assert limit is not None and limit.dtype == torch.int32
        for kv in (None, valid):
            assert torch.equal(limit_mask(limit, kv), show_o_mask(is_image, kv))
    gap = torch.tensor([[False, True, False, True]])  # two image spans: not a per-query limit
    assert omni_limit(gap) is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Dh", [16, 32, 64, 128])
def test_matches_fp64_reference_with_gradients(backend, Dh):
    g = torch.Generator().manual_seed(Dh)
    B, L, H = 4, 37, 3
    is_image, valid = layout(B, L, g)
    limit = omni_limit(is_image)
    q, k, v = (x.requires_grad_() for x in qkv(B, L, H, Dh))
    go = torch.randn(B, L, H, Dh)
    out = omni_attention(q, k, v, limit, valid, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), go)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = omni_attention_ref(q64, k64, v64, limit, valid)
    want = torch.autograd.grad(ref, (q64, k64, v64), go.double())
    assert out.shape == (B, L, H, Dh)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    for got, w in zip(grads, want):
        torch.testing.assert_close(got.double(), w, atol=2e-5, rtol=1e-5)


def rope_tables(B, L, half, g):
    """cos, sin [B, L, half] of increasing positions with gaps (padding / dropped prompts)."""
    pos = torch.randint(0, 3, (B, L), generator=g).cumsum(1).double()
    inv = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    ang = pos[..., None] * inv
    return ang.cos().float(), ang.sin().float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Dh,half", [(32, 8), (64, 32), (16, 4)])
def test_rotary_inside_matches_fp64_reference(backend, Dh, half):
    """rotary=(cos, sin) turns q and k first (Phi's partial rotary: half = Dh / 4); gradients are
    those of the un-rotated inputs."""
    g = torch.Generator().manual_seed(half)
    B, L, H = 3, 41, 2
    is_image, valid = layout(B, L, g)
    limit = omni_limit(is_image)
    rot = rope_tables(B, L, half, g)
    q, k, v = (x.requires_grad_() for x in qkv(B, L, H, Dh))
    go = torch.randn(B, L, H, Dh)
    out = omni_attention(q, k, v, limit, valid, rotary=rot, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), go)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = omni_attention_ref(q64, k64, v64, limit, valid, rotary=tuple(t.double() for t in rot))
    want = torch.autograd.grad(ref, (q64, k64, v64), go.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    for got, w in zip(grads, want):
        torch.testing.assert_close(got.double(), w, atol=2e-5, rtol=1e-5)


def test_apply_rotary_rotate_half():
    """Dims d and d + half turn by the angle; the rest pass through; the model's Rotary (heads
    first) is the same function; the negated angle undoes it."""
    from unif2ace.models.attention import Rotary

    g = torch.Generator().manual_seed(0)
    B, L, H, Dh, half = 2, 9, 3, 32, 8
    rotary = Rotary(2 * half, 10000.0)
    positions = torch.randint(0, 3, (B, L), generator=g).cumsum(1)
    x = torch.randn(B, L, H, Dh, dtype=torch.float64)
    cos, sin = (t[:, :, None].double() for t in rotary.tables(positions))
    got = apply_rotary(x, cos, sin)
    a, b = x[..., :half], x[..., half : 2 * half]
    torch.testing.assert_close(got[..., :half], a * cos - b * sin)
    torch.testing.assert_close(got[..., half : 2 * half], b * cos + a * sin)
    assert torch.equal(got[..., 2 * half :], x[..., 2 * half :])
    heads_first = rotary(x.transpose(1, 2), positions).transpose(1, 2)
    torch.testing.assert_close(heads_first, got, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(apply_rotary(got, cos, -sin), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_full_and_strided_inputs(backend):
    """limit = i + 1 is causal attention, limit = L full attention; q, k, v may be views of the
    [B, H, L, Dh] layout (the model's) and scale is honoured."""
    B, L, H, Dh = 2, 29, 2, 32
    base = [torch.randn(B, H, L, Dh) for _ in range(3)]
    q, k, v = (x.transpose(1, 2) for x in base)  # [B, L, H, Dh] views
    idx = torch.arange(L, dtype=torch.int32)
    causal = (idx + 1).expand(B, L)
    full = torch.full((B, L), L, dtype=torch.int32)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for limit, is_causal in ((causal, True), (full, False)):
        got = omni_attention(q, k, v, limit, scale=0.3, backend=backend)
        want = sdpa(*(x.double() for x in base), is_causal=is_causal, scale=0.3).transpose(1, 2)
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_sizes_and_limits(backend):
    """limit 0 or no valid key: a query sees only itself (out = v); L = 1; an empty batch."""
    B, L, H, Dh = 2, 13, 2, 32
    q, k, v = qkv(B, L, H, Dh)
    zero = torch.zeros(B, L, dtype=torch.int32)
    torch.testing.assert_close(omni_attention(q, k, v, zero, backend=backend), v)
    full = torch.full((B, L), L, dtype=torch.int32)
    none_valid = torch.zeros(B, L, dtype=torch.bool)
    torch.testing.assert_close(omni_attention(q, k, v, full, none_valid, backend=backend), v)
    one = [x[:, :1] for x in (q, k, v)]
    torch.testing.assert_close(
        omni_attention(*one, full[:, :1].clamp(max=1), backend=backend), one[2]
    )
    empty = [x[:0] for x in (q, k, v)]
    assert omni_attention(*empty, full[:0], backend=backend).shape == (0, L, H, Dh)


@needs_kernel
def test_kernel_on_the_model_layout_many_threads():
    """A full Show-o batch (one image span per row, prompts dropped in some) through the kernel at
    every thread count gives the same bits."""
    g = torch.Generator().manual_seed(3)
    B, L, H, Dh = 6, 70, 4, 32
    is_image, valid = layout(B, L, g)
    limit = omni_limit(is_image)
    q, k, v = qkv(B, L, H, Dh)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(omni_attention(q, k, v, limit, valid, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


@needs_kernel
@pytest.mark.parametrize("Dh,half", [(16, 0), (32, 8), (64, 0), (64, 16), (128, 32)])
def test_kernel_tiles_odd_sizes_and_limits(Dh, half):
    """The kernel's blocking (16-key vectors, blocks of 2 to 8 queries, the backward's strips of 32
    queries against chunks of 64 keys) at lengths around every boundary, with arbitrary limits:
    query blocks whose keys end inside a chunk or before it, rows that see only themselves, rows
    that see every key, and padding. Output and gradients against the fp64 reference."""
    g = torch.Generator().manual_seed(Dh + half)
    B, H = 3, 2
    for L in (1, 15, 17, 31, 33, 63, 65, 97, 130):
        limit = torch.randint(0, L + 1, (B, L), generator=g, dtype=torch.int32)
        limit[1] = torch.arange(1, L + 1, dtype=torch.int32)  # causal
        limit[2, : L // 2] = L  # the first half sees every key
        valid = torch.rand(B, L, generator=g) > 0.2
        rot = rope_tables(B, L, half, g) if half else None
        q, k, v = (x.requires_grad_() for x in qkv(B, L, H, Dh))
        go = torch.randn(B, L, H, Dh, generator=g)
        out = omni_attention(q, k, v, limit, valid, rotary=rot, backend="cpu")
        grads = torch.autograd.grad(out, (q, k, v), go)
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        rot64 = None if rot is None else tuple(t.double() for t in rot)
        ref = omni_attention_ref(q64, k64, v64, limit, valid, rotary=rot64)
        want = torch.autograd.grad(ref, (q64, k64, v64), go.double())
        torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5, msg=f"out, L={L}")
        for name, got, w in zip("qkv", grads, want):
            torch.testing.assert_close(got.double(), w, atol=2e-5, rtol=1e-5, msg=f"d{name}, L={L}")


@needs_kernel
def test_kernel_backward_same_bits_at_every_thread_count():
    """Each (sequence, head) pair's backward runs on one thread with its own accumulators: the
    gradients do not depend on the thread count."""
    g = torch.Generator().manual_seed(4)
    B, L, H, Dh = 3, 75, 3, 64
    is_image, valid = layout(B, L, g)
    limit = omni_limit(is_image)
    rot = rope_tables(B, L, 16, g)
    base = qkv(B, L, H, Dh)
    go = torch.randn(B, L, H, Dh, generator=g)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            q, k, v = (x.clone().requires_grad_() for x in base)
            out = omni_attention(q, k, v, limit, valid, rotary=rot, backend="cpu")
            grads.append(torch.autograd.grad(out, (q, k, v), go))
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)


@needs_kernel
def test_auto_falls_back_for_other_dtypes_and_head_sizes():
    B, L, H = 2, 9, 2
    limit = omni_limit(torch.zeros(B, L, dtype=torch.bool))
    for dtype, Dh in ((torch.float64, 32), (torch.float32, 24), (torch.bfloat16, 32)):
        q, k, v = qkv(B, L, H, Dh, dtype)
        assert not _cpu.supports(q)
        with unif2ace.use_backend("auto"):
            got = omni_attention(q, k, v, limit)
        want = omni_attention_ref(q.double(), k.double(), v.double(), limit)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
        if dtype != torch.float64:
            with pytest.raises(ValueError, match="cpu kernel takes fp32"):
                omni_attention(q, k, v, limit, backend="cpu")


def test_process_default_without_a_launcher_means_auto():
    """A process default with no omni-attention launcher (triton) runs "auto"; asked for
    explicitly it is an error."""
    q, k, v = qkv(2, 9, 2, 16)
    limit = omni_limit(torch.zeros(2, 9, dtype=torch.bool))
    with unif2ace.use_backend("triton"):
        got = omni_attention(q, k, v, limit)
    torch.testing.assert_close(got, omni_attention(q, k, v, limit, backend="auto"))
    with pytest.raises(RuntimeError, match="triton"):
        omni_attention(q, k, v, limit, backend="triton")


@needs_kernel
def test_opcheck_and_torch_compile():
    g = torch.Generator().manual_seed(5)
    B, L, H, Dh = 2, 19, 2, 16
    is_image, valid = layout(B, L, g)
    limit = omni_limit(is_image)
    kv = valid.to(torch.uint8)
    q, k, v = qkv(B, L, H, Dh)
    cos, sin = rope_tables(B, L, 4, g)
    for rope in ((None, None), (cos, sin)):
        args = (q.requires_grad_(), k, v, limit, kv, *rope, 0.25, "cpu")
        torch.library.opcheck(torch.ops.unif2ace.omni_attention_fwd.default, args)

    def step(q, k, v):
        return omni_attention(q, k, v, limit, valid, backend="cpu").square().sum()

    args = [x.detach().clone().requires_grad_() for x in qkv(B, L, H, Dh)]
    _backend.set_checks(False)  # value checks read the data: not part of a compiled graph
    try:
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        got = compiled(*args)
    finally:
        _backend.set_checks(True)
    want = step(*args)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, args), torch.autograd.grad(want, args)):
        torch.testing.assert_close(a, b)


# ---- the torch backend's two SDPA paths, the kernels' torch spec, the cuda launcher -------------


def test_launchers_registered():
    assert _backend.implemented("attention.omni") == ("torch", "cpu", "cuda")
    assert _backend.implemented("attention.omni_fwd") == ("torch", "cpu")
    assert _backend.implemented("attention.omni_bwd") == ("torch", "cpu")


@pytest.mark.parametrize("L,s,e", [(1, 0, 0), (37, 5, 21), (64, 0, 64), (19, 18, 19), (40, 3, 3)])
def test_torch_split_and_masked_paths(L, s, e):
    """Every row with its image at [s, e) and no padding: the torch backend's split (a causal call,
    then the image queries over the keys [0, e)) and its masked call both equal the reference. A
    one-token image is causal attention already."""
    B, H, Dh = 3, 2, 16
    q, k, v = qkv(B, L, H, Dh, torch.float64)
    is_img = torch.zeros(B, L, dtype=torch.bool)
    is_img[:, s:e] = True
    limit = omni_limit(is_img)
    span = _torch.split_span(limit, torch.ones(B, L, dtype=torch.bool))
    assert span == ((s, e) if e - s > 1 else (0, 0))
    ref = omni_attention_ref(q, k, v, limit)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    for path in (span, None):
        out = _torch.sdpa(qt, kt, vt, limit, None, path, Dh**-0.5).transpose(1, 2)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    got = omni_attention(q, k, v, limit, backend="torch")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_split_span_only_for_the_split_layout():
    L = 12
    idx = torch.arange(L, dtype=torch.int32)
    causal = (idx + 1).expand(2, L)
    assert _torch.split_span(causal, None) == (0, 0)
    prefix = torch.where(idx < 5, 5, idx + 1).expand(2, L)  # prefix-LM is a split too
    assert _torch.split_span(prefix, None) == (0, 5)
    padded = torch.ones(2, L, dtype=torch.bool)
    padded[1, -2:] = False
    assert _torch.split_span(prefix, padded) is None
    rows_differ = torch.stack([prefix[0], causal[0]])
    assert _torch.split_span(rows_differ, None) is None
    assert _torch.split_span(torch.zeros(2, L, dtype=torch.int32), None) is None
    assert _torch.split_span(causal[:0], None) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_show_o_mixed_layouts_and_padding(backend):
    """Images at different places, left and right padding, a text-only row: the boolean-mask
    path, equal to the reference (and to the is_image rule, test_omni_limit_gives_the_show_o_rule)."""
    B, L, H, Dh = 4, 29, 3, 16
    dtype = torch.float64 if backend == "torch" else torch.float32
    q, k, v = qkv(B, L, H, Dh, dtype)
    is_img = torch.zeros(B, L, dtype=torch.bool)
    valid = torch.ones(B, L, dtype=torch.bool)
    is_img[0, 2:12] = True  # mmu
    valid[0, 20:] = False  # right padding
    is_img[1, 15:27] = True  # t2i, left padding
    valid[1, :4] = False
    valid[3, 10:] = False  # text only, padded
    limit = omni_limit(is_img)
    assert _torch.split_span(limit, valid) is None
    ref = omni_attention_ref(q.double(), k.double(), v.double(), limit, valid)
    out = omni_attention(q, k, v, limit, valid, backend=backend)
    tol = 1e-10 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_show_o_rule(backend):
    """Image tokens see their whole image; text sees only the past."""
    L = 10
    q, k, v = qkv(1, L, 1, 16)
    is_img = torch.zeros(1, L, dtype=torch.bool)
    is_img[0, 2:6] = True
    limit = omni_limit(is_img)
    base = omni_attention(q, k, v, limit, backend=backend)
    v2 = v.clone()
    v2[0, 5] += 1.0  # the last image token
    out = omni_attention(q, k, v2, limit, backend=backend)
    changed = (out - base).abs().sum(-1)[0, :, 0] > 0
    assert changed.tolist() == [False, False, True, True, True, True, True, True, True, True]


def test_torch_spec_of_the_kernels_matches_fp64_reference():
    """The "torch" launchers of attention.omni_fwd / omni_bwd (the executable spec) through the
    custom ops: output and gradients equal the reference's autograd, rotary included."""
    g = torch.Generator().manual_seed(7)
    B, L, H, Dh = 3, 23, 2, 16
    is_image, valid = layout(B, L, g)
    limit = omni_limit(is_image)
    cos, sin = (t.double() for t in rope_tables(B, L, 4, g))
    q, k, v = (x.requires_grad_() for x in qkv(B, L, H, Dh, torch.float64))
    go = torch.randn(B, L, H, Dh, dtype=torch.float64)
    out = _custom_ops.kernel_pair(q, k, v, limit, valid, cos, sin, 0.3, "torch")
    ref = omni_attention_ref(q, k, v, limit, valid, scale=0.3, rotary=(cos, sin))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out, (q, k, v), go)
    want = torch.autograd.grad(ref, (q, k, v), go)
    for a, b in zip(grads, want):  # the backward reads the float32 lse of the contract
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    args = (q, k, v, limit.to(torch.int32), valid.to(torch.uint8), cos, sin, 0.3, "torch")
    torch.library.opcheck(torch.ops.unif2ace.omni_attention_fwd.default, args)


@needs_kernel
def test_cpu_kernels_match_the_torch_spec():
    """Both launchers of attention.omni_fwd on the same fp32 inputs: out and lse agree."""
    g = torch.Generator().manual_seed(8)
    B, L, H, Dh = 3, 33, 2, 32
    is_image, valid = layout(B, L, g)
    limit = omni_limit(is_image).contiguous()
    cos, sin = rope_tables(B, L, 8, g)
    q, k, v = qkv(B, L, H, Dh)
    kv = valid.to(torch.uint8)
    res = {b: _custom_ops.omni_fwd(q, k, v, limit, kv, cos, sin, 0.2, b) for b in ("torch", "cpu")}
    for a, b in zip(res["cpu"], res["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


@pytest.mark.gpu
def test_cuda_launcher_flash_split():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("flash_attn")
    B, L, H, Dh = 2, 300, 4, 64
    q, k, v = (x.cuda().to(torch.bfloat16) for x in qkv(B, L, H, Dh))
    is_img = torch.zeros(B, L, dtype=torch.bool, device="cuda")
    is_img[:, 40:296] = True
    limit = omni_limit(is_img)
    assert _cuda.flash_available(q) and _torch.split_span(limit, None) == (40, 296)
    ref = omni_attention_ref(q.double(), k.double(), v.double(), limit)
    args = (q, k, v, limit, None, None, None, Dh**-0.5, (40, 296))
    out = _backend.launcher("attention.omni", "cuda")(*args)
    assert (out.double() - ref).norm() / ref.norm() < 1e-2


# ---- the span: the layout as host values -------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s,e", [(0, 0), (4, 15), (0, 19)])
def test_span_from_the_caller_is_the_detected_one(backend, s, e):
    """span=(s, e) gives the bits of span="auto" (which finds it by reading), span=None those of
    the masked call; gradients too."""
    B, L, H, Dh = 3, 19, 2, 16
    q, k, v = (x.requires_grad_() for x in qkv(B, L, H, Dh))
    is_img = torch.zeros(B, L, dtype=torch.bool)
    is_img[:, s:e] = True
    limit = omni_limit(is_img)
    mask_path = _torch.sdpa(*(x.transpose(1, 2) for x in (q, k, v)), limit, None, None, Dh**-0.5)
    outs = {}
    for span in ("auto", (s, e), None):
        out = omni_attention(q, k, v, limit, span=span, backend=backend)
        outs[span] = (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(outs["auto"], outs[(s, e)]):
        assert torch.equal(a, b)
    if backend == "torch":
        assert torch.equal(outs[None][0], mask_path.transpose(1, 2))
    for a, b in zip(outs["auto"], outs[None]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_span_errors():
    B, L = 2, 9
    q, k, v = qkv(B, L, 2, 16)
    idx = torch.arange(L)
    limit = torch.where((idx >= 2) & (idx < 6), 6, idx + 1).expand(B, L).to(torch.int32)
    for bad in ((2,), (2, 6.0), "detect", (True, 6), torch.tensor([2, 6])):
        with pytest.raises(ValueError, match="span must be a pair of ints"):
            omni_attention(q, k, v, limit, span=bad)
    for bad in ((6, 2), (-1, 6), (2, 10)):
        with pytest.raises(ValueError, match="0 <= s <= e <= L = 9"):
            omni_attention(q, k, v, limit, span=bad)
    with pytest.raises(ValueError, match="pass key_valid=None"):
        omni_attention(q, k, v, limit, torch.ones(B, L, dtype=torch.bool), span=(2, 6))
    with pytest.raises(ValueError, match="as many queries as keys"):
        omni_attention(q[:, :1], k, v, limit[:, :1], span=(0, 0))
    with pytest.raises(ValueError, match="as the span says"):
        omni_attention(q, k, v, limit, span=(2, 7))
    unif2ace.set_checks(False)
    try:  # the layout check reads limit: a value check
        omni_attention(q, k, v, limit, span=(2, 7))
    finally:
        unif2ace.set_checks(True)


def _model_spans(monkeypatch, cfg, batch):
    """The spans the model passes to omni_attention in one forward, with the layouts they say."""
    from unif2ace import ops

    seen = []
    real = ops.omni_attention

    def record(q, k, v, limit, key_valid=None, **kw):
        seen.append((kw.get("span", "auto"), _torch.split_span(limit, key_valid)))
        return real(q, k, v, limit, key_valid, **kw)

    monkeypatch.setattr(ops, "omni_attention", record)
    from unif2ace.models import UniF2ace

    with torch.no_grad():
        UniF2ace(cfg).hidden_states(batch["input_ids"], batch)
    return seen


def test_the_model_passes_the_span_of_its_batch(monkeypatch):
    """The model's span, from its host metadata, is the one split_span reads off the tensors: a
    batch of t2i rows with the image at the same place and no padding, and a mixed one."""
    from model_data import examples, small_cfg
    from unif2ace.models import collate
    from unif2ace.models.layout import TASK_T2I, Example

    cfg = small_cfg()
    N = cfg.image_tokens
    prompt = list(range(10, 10 + cfg.max_text_len))  # a full-length prompt: no padding
    t2i = [Example(TASK_T2I, torch.zeros(N, dtype=torch.long), prompt) for _ in range(3)]
    batch = collate(cfg, t2i)
    assert not batch["meta"].padded
    seen = _model_spans(monkeypatch, cfg, batch)
    assert len(seen) == cfg.n_layers and all(s == d and s[1] - s[0] == N for s, d in seen)
    seen = _model_spans(monkeypatch, cfg, collate(cfg, examples(cfg, 4)))
    assert all(s is None and d is None for s, d in seen)


# ---- the "cuda" backend behind its custom op (on CPU tensors: SDPA, flash-attn needs CUDA) -------


def _cuda_on_cpu(monkeypatch):
    """torch.cuda.device recorded instead of entered: the "cuda" launcher runs SDPA on CPU."""
    entered = []

    class Device:
        def __init__(self, d):
            entered.append(torch.device(d))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Device)
    return entered


@pytest.mark.parametrize("span", [(3, 12), None])
def test_cuda_backend_custom_op_matches_torch(monkeypatch, span):
    """unif2ace::omni_attention over the "cuda" launcher: the torch backend's output, and the same
    gradients through its backward (the launcher recomputed under autograd); the launcher enters
    the tensors' device."""
    entered = _cuda_on_cpu(monkeypatch)
    g = torch.Generator().manual_seed(3)
    B, L, H, Dh = 2, 17, 2, 16
    is_img = torch.zeros(B, L, dtype=torch.bool)
    is_img[:, 3:12] = True
    limit = omni_limit(is_img)
    valid = None if span else torch.rand(B, L, generator=g) > 0.2
    cos, sin = rope_tables(B, L, 4, g)
    q, k, v = (x.requires_grad_() for x in qkv(B, L, H, Dh))
    go = torch.randn(B, L, H, Dh)
    args = (limit, valid, cos, sin, 0.3, span)
    out = _custom_ops.omni(q, k, v, *args, "cuda")
    want = _backend.launcher("attention.omni", "torch")(q, k, v, *args)
    assert out.is_contiguous() and torch.equal(out, want)
    for a, b in zip(
        torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(want, (q, k, v), go)
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert entered and set(entered) == {q.device}
    op_args = (q, k, v, *args[:-1], None if span is None else list(span), "cuda")
    torch.library.opcheck(torch.ops.unif2ace.omni_attention.default, op_args)


# ---- validation: one test per rule ---------------------------------------------------------------


def test_errors():
    q, k, v = qkv(2, 5, 2, 16)
    limit = torch.full((2, 5), 5, dtype=torch.int32)
    with pytest.raises(ValueError, match="must be \\[B, L, H, Dh\\]"):
        omni_attention(q[0], k[0], v[0], limit)
    with pytest.raises(ValueError, match="Lk >= Lq"):
        omni_attention(q, k[:, :4], v[:, :4], limit)
    with pytest.raises(ValueError, match="Lk >= Lq"):
        omni_attention(q, k, v[:, :4], limit)
    with pytest.raises(TypeError, match="one floating dtype"):
        omni_attention(q, k.double(), v, limit)
    with pytest.raises(ValueError, match="limit must be an integer tensor"):
        omni_attention(q, k, v, limit.float())
    with pytest.raises(ValueError, match="limit must be an integer tensor"):
        omni_attention(q, k, v, limit[:, :4])
    with pytest.raises(ValueError, match="limit must lie in"):
        omni_attention(q, k, v, limit + 1)
    with pytest.raises(ValueError, match="key_valid must be a bool tensor"):
        omni_attention(q, k, v, limit, torch.ones(2, 5))
    with pytest.raises(ValueError, match="rotary \\(cos, sin\\) must be two floating tensors"):
        omni_attention(q, k, v, limit, rotary=(torch.ones(2, 5, 9), torch.ones(2, 5, 9)))
    with pytest.raises(ValueError, match="rotary must be a pair"):
        omni_attention(q, k, v, limit, rotary=torch.ones(2, 5, 4))


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 23), (3, 17)])
def test_fewer_queries_than_keys_is_a_decode_step(backend, Lq, Lk):
    """The queries are the last Lq positions: query i always sees key Lk - Lq + i (a KV-cache
    decode step); the default backend on CPU runs it through SDPA (the kernel takes Lq = Lk)."""
    g = torch.Generator().manual_seed(Lq * 100 + Lk)
    B, H, Dh = 3, 2, 16
    q = torch.randn(B, Lq, H, Dh, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Lk, H, Dh, generator=g, dtype=torch.float64) for _ in range(2))
    limit = torch.randint(0, Lk + 1, (B, Lq), generator=g, dtype=torch.int32)
    key_valid = torch.rand(B, Lk, generator=g) > 0.3
    mask = limit_mask(limit, key_valid)
    assert mask.shape == (B, Lq, Lk)
    assert mask[:, torch.arange(Lq), torch.arange(Lk - Lq, Lk)].all()  # each query sees itself
    explicit = torch.softmax(
        (torch.einsum("bihd,bjhd->bhij", q, k) / Dh**0.5).masked_fill(~mask[:, None], -torch.inf),
        dim=-1,
    )
    want = torch.einsum("bhij,bjhd->bihd", explicit, v)
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    out = omni_attention(qf, kf, vf, limit, key_valid, backend=backend)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(omni_attention_ref(q, k, v, limit, key_valid), want)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (qf, kf, vf))


@needs_kernel
def test_decode_step_errors():
    q = torch.randn(2, 1, 2, 16)
    k, v = torch.randn(2, 7, 2, 16), torch.randn(2, 7, 2, 16)
    limit = torch.full((2, 1), 7, dtype=torch.int32)
    with pytest.raises(ValueError, match="Lq = Lk"):
        omni_attention(q, k, v, limit, backend="cpu")
    with pytest.raises(ValueError, match="rotary needs as many queries as keys"):
        omni_attention(q, k, v, limit, rotary=(torch.ones(2, 1, 4), torch.ones(2, 1, 4)))
    with pytest.raises(ValueError, match="key_valid must be a bool tensor \\[B, Lk\\]"):
        omni_attention(q, k, v, limit, torch.ones(2, 1, dtype=torch.bool))
