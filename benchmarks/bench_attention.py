"""Omni-attention: the engine's C++ kernel against torch's SDPA with the boolean mask, fwd and fwd+bwd.

The model's attention between its projections, on the layout of a real training batch
(:func:`benchmarks.bench_e2e.synthetic_batch`: half text→image rows, a prompt then a 256-token image,
half question rows, an image then text; padding to the longest row), with the model's partial
rotary embedding (half of each head, positions of the valid tokens). Providers:

* ``torch-sdpa``  ``ops.omni_attention(..., backend="torch")``: rotary in PyTorch, then
                  ``F.scaled_dot_product_attention`` with the ``[B, 1, L, L]`` boolean mask (torch's
                  flash CPU kernel) — what ``use_backend("torch")`` runs in the model;
* ``cpu``         ``backend="cpu"``: the C++ kernel, rotary applied as q and k are loaded, only the
                  keys each block of queries may see.

Cases ``fwd`` (no autograd) and ``fwd+bwd`` (gradients of q, k, v from a fixed upstream gradient),
per config (``tiny``: H 4, Dh 32; ``small``: H 6, Dh 64), fp32. There is no GPU kernel of this op:
on CUDA the model uses flash-attn / SDPA, so this benchmark is CPU-only.

Run::

    python benchmarks/bench_attention.py --threads 1            # tiny and small, batch 8
    python benchmarks/bench_attention.py --quick --out /tmp/b   # tiny, batch 2, seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for `benchmarks.*` (appended)
import unif2ace  # noqa: E402
from benchmarks.bench_e2e import synthetic_batch  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    Case,
    Provider,
    Report,
    Target,
    check_targets,
    common_parser,
    exit_code,
    machine_info,
    pick_device,
    run_case,
)
from unif2ace import _backend  # noqa: E402
from unif2ace.models import get_config  # noqa: E402
from unif2ace.models.attention import Rotary  # noqa: E402
from unif2ace.models.layout import positions_of  # noqa: E402
from unif2ace.ops.attention import omni_attention, omni_limit  # noqa: E402

SIZE_KEYS = ("config", "B", "L", "H", "Dh", "dtype")
FULL = {"configs": "tiny,small", "batch": 8}
QUICK = {"configs": "tiny", "batch": 2}


def attention_case(name: str, B: int, backward: bool, device) -> Case:
    cfg = get_config(name)
    batch = synthetic_batch(cfg, B, device)
    is_image, valid = batch["is_image"], batch["valid"]
    Bn, L = is_image.shape
    H, Dh = cfg.n_heads, cfg.head_dim
    limit = omni_limit(is_image)
    rot = Rotary(int(Dh * cfg.rotary_frac), cfg.rope_theta).tables(positions_of(valid))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(Bn, L, H, Dh, generator=g) for _ in range(3))
    go = torch.randn(Bn, L, H, Dh, generator=g)
    last: list = []  # the last call's q, k, v gradients (compared with the baseline's)

    def run(backend: str):
        if not backward:
            return omni_attention(q, k, v, limit, valid, rotary=rot, backend=backend)
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        out = omni_attention(qq, kk, vv, limit, valid, rotary=rot, backend=backend)
        out.backward(go)
        last[:] = [qq.grad, kk.grad, vv.grad]
        return out.detach()

    skip = None if _backend.available("cpu", device) else "unif2ace._C not built"
    allowed = float((limit.long()[:, :, None] > torch.arange(L)).sum())  # the scores the rule keeps
    return Case(
        name="fwd+bwd" if backward else "fwd",
        params={"config": name, "B": Bn, "L": L, "H": H, "Dh": Dh, "dtype": "fp32",
                "device": device.type, "score_fraction": round(allowed / (Bn * L * L), 3)},
        providers=[Provider("torch-sdpa", lambda: run("torch")),
                   Provider("cpu", lambda: run("cpu"), skip=skip)],
        baseline="torch-sdpa",
        outputs=(lambda: list(last)) if backward else None,
        tol=1e-4,
        notes="score_fraction: the share of the L × L scores the omni rule allows (the kernel "
              "reads about that share; SDPA with a mask computes all of them)",
    )  # fmt: skip


def main(argv=None):
    p = common_parser(__doc__.split("\n", 1)[0])
    p.add_argument("--configs", default=None, help=f"default {FULL['configs']!r}")
    p.add_argument("--batch", type=int, default=None, help=f"default {FULL['batch']}")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if device.type != "cpu":
        print("omni_attention has no GPU kernel (the model uses flash-attn / SDPA on CUDA): "
              "nothing to measure on this device")  # fmt: skip
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {k: getattr(args, k) or (QUICK if args.quick else FULL)[k] for k in FULL}
    warmup = args.warmup if args.warmup is not None else 2
    reps = args.reps if args.reps is not None else (3 if args.quick else 15)
    unif2ace.set_checks(True)
    meta = machine_info(device)
    meta.update(sizes=sizes, warmup=warmup, max_reps=reps)
    print(f"# attention on {meta['cpu_model']}, torch {meta['torch']}, "
          f"{meta['torch_threads']} threads")  # fmt: skip
    report = Report("attention", args.out, meta, size_keys=SIZE_KEYS)
    report.notes += [
        "Same inputs, interleaved repetitions, medians; speedup against torch-sdpa. fwd+bwd "
        "compares the cpu provider's q, k, v gradients too.",
        "peak extra MiB counts torch allocations only: the cpu kernel's own scratch (per thread, "
        "about (5·Dh + 16)·L·4 bytes in the backward: 0.3 MiB for tiny) is not in it.",
    ]
    configs = [c.strip() for c in sizes["configs"].split(",") if c.strip()]
    n_cases = 2 * len(configs)
    per_case_s = args.budget_s / n_cases if args.budget_s else None
    targets = []
    for name in configs:
        for backward in (False, True):
            case = attention_case(name, sizes["batch"], backward, device)
            print(f"\n## {case.name} {name}: {case.params}", flush=True)
            rows = run_case(case, device, warmup=warmup, reps=reps, max_time_s=per_case_s,
                            memory=not args.no_memory)  # fmt: skip
            for r in rows:
                r["case"] = f"{case.name}[{name}]"
            report.add(rows)
            targets.append(Target(f"{case.name}[{name}]", "cpu", "speedup", ">=", 1.3,
                                  f"cpu ≥ 1.3× torch-sdpa ({case.name}, {name})"))  # fmt: skip
    report.targets = check_targets(report.rows, targets)
    report.finish()
    print()
    print(report.markdown())
    print(f"results: {args.out / 'attention.json'}, {args.out / 'attention.md'}")
    return exit_code(report, args.strict)


if __name__ == "__main__":
    sys.exit(main())
