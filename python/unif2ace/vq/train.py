"""Training and evaluation of the image tokenizer.

Training resumes after a kill: every ``ckpt_every`` steps the model, optimiser, step, RNG state and
step plan go to ``<out>/train_state.pt`` (written atomically); a run started with the same ``out``
picks up from there. The finished tokenizer is ``<out>/model.safetensors`` + ``<out>/config.json``,
and ``<out>/train_info.json`` says how it was trained (steps planned and done, and why fewer).
Nothing in training reads the clock except the optional time budgets, so a run is reproducible to
the byte unless a budget caps it, which the result records.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unif2ace.encoders.cnn import to_tensor
from unif2ace.io import atomic_torch_save, atomic_write_json
from unif2ace.vq.model import VQAutoencoder, VQConfig


def _lr_at(progress: float, lr: float, warmup: float = 0.06) -> float:
    """Warm-up then cosine to 5 % of ``lr``; ``progress`` in [0, 1]."""
    if progress < warmup:
        return lr * (progress + 1e-3) / warmup
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup))))


class SemanticPerceptualLoss(torch.nn.Module):
    """An LPIPS-style distance through a frozen :class:`SemanticEncoder` (the CLIP stand-in, never
    the attribute judge): the mean squared difference of the channel-normalised feature maps after
    each conv stage, plus ``head_weight`` × the KL divergence of the encoder's per-category attribute
    distributions on the reconstruction from those on the original. Real tokenizers (VQGAN,
    MAGVIT) add a perceptual loss from a pretrained classifier for the same reason: pixel losses
    spend their gradient on smooth areas, while 1–2 px strokes (hair style, brows, mouth) carry
    the attributes."""

    def __init__(self, encoder, head_weight: float = 1.0):
        super().__init__()
        self.encoder = encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.head_weight = head_weight

    def train(self, mode: bool = True):  # the encoder stays frozen in eval mode (BatchNorm stats)
        return self

    def _run(self, x: torch.Tensor):
        size = self.encoder.backbone.size
        if x.shape[-1] != size:  # the backbone would resize; a loss must compare like with like
            raise ValueError(f"perceptual encoder expects {size} px images, got {x.shape[-1]}")
        logits, maps = self.encoder.forward_with_maps(x)
        return [F.normalize(m, dim=1) for m in maps], logits

    def forward(self, rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f_x, l_x = self._run(x)
        f_r, l_r = self._run(rec)
        loss = sum(((a - b) ** 2).sum(1).mean() for a, b in zip(f_r, f_x)) / len(f_x)
        if self.head_weight:
            kl = [
                F.kl_div(
                    F.log_softmax(r, -1),
                    F.log_softmax(o, -1),
                    log_target=True,
                    reduction="batchmean",
                )
                for r, o in zip(l_r, l_x)
            ]
            loss = loss + self.head_weight * torch.stack(kl).mean()
        return loss


# The share of a time budget that the planned steps may fill: the timed steps leave out the
# checkpoints and the progress bar, and a machine gets busier; the budget itself still stops a run
# that overruns (reported as ``budget_spent``).
PLAN_MARGIN = 0.9


def _draw(images: np.ndarray, batch: int, g: torch.Generator) -> torch.Tensor:
    """A training batch: ``batch`` images drawn with ``g``, flipped left-right half the time (faces
    are symmetric enough), channels-last."""
    idx = torch.randint(0, len(images), (batch,), generator=g).numpy()
    x = to_tensor(images[idx])
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(-1)
    return x.contiguous(memory_format=torch.channels_last)


def _loss(model, x, edge_weight, perceptual, perceptual_weight) -> torch.Tensor:
    rec, _, aux = model(x)
    loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + aux
    if edge_weight:
        loss = loss + edge_weight * (
            F.l1_loss(rec.diff(dim=-1), x.diff(dim=-1))
            + F.l1_loss(rec.diff(dim=-2), x.diff(dim=-2))
        )
    if perceptual is not None and perceptual_weight:
        loss = loss + perceptual_weight * perceptual(rec, x)
    return loss


def _update(model, opt, loss) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def _plan(steps, max_minutes, max_cpu_minutes, time_step) -> dict:
    """The step count a run trains for, fixed before its first step: ``steps``, or fewer when a
    time budget cannot hold them at the pace of ``time_step()`` (-> wall, CPU seconds of one
    step). Only a budget is timed; a zero budget plans one step."""
    plan = {
        "steps": steps,
        "capped_by": None,
        "max_minutes": max_minutes,
        "max_cpu_minutes": max_cpu_minutes,
        "seconds_per_step": None,
        "cpu_seconds_per_step": None,
    }
    budgets = {"max_minutes": max_minutes, "max_cpu_minutes": max_cpu_minutes}
    budgets = {k: 60.0 * v for k, v in budgets.items() if v is not None}
    if not budgets:
        return plan
    if min(budgets.values()) > 0:
        wall, cpu = time_step()
        plan["seconds_per_step"], plan["cpu_seconds_per_step"] = wall, cpu
        per_step = {"max_minutes": wall, "max_cpu_minutes": cpu}
    else:
        per_step = {k: math.inf for k in budgets}
    for name, seconds in budgets.items():
        fits = max(1, int(PLAN_MARGIN * seconds / max(per_step[name], 1e-9)))
        if fits < plan["steps"]:
            plan["steps"], plan["capped_by"] = fits, name
    return plan


def train_vq(
    images: np.ndarray,
    config: VQConfig | None = None,
    steps: int = 1200,
    batch: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    out=None,
    ckpt_every: int = 200,
    max_minutes: float | None = None,
    progress: bool = True,
    ema_decay: float = 0.0,
    edge_weight: float = 0.0,
    max_cpu_minutes: float | None = None,
    perceptual: SemanticPerceptualLoss | None = None,
    perceptual_weight: float = 0.0,
) -> tuple[VQAutoencoder, dict]:
    """Train on ``uint8 [N, H, W, 3]`` images. Loss: MSE + L1 on pixels + ``edge_weight`` × L1 on
    the horizontal and vertical pixel differences (sharp hair strands and mouth lines) + the
    quantiser's own loss (LFQ: entropy + commitment). ``ema_decay`` > 0 keeps an exponential moving
    average of the weights and returns (and saves) that. ``perceptual`` (a
    :class:`SemanticPerceptualLoss`) adds ``perceptual_weight`` × its distance between
    reconstruction and original.

    The learning-rate schedule follows the step count alone, so the same arguments and seed give
    the same weights, byte for byte. ``max_minutes`` (wall clock) and ``max_cpu_minutes`` (process
    CPU time) are budgets: a fresh run times a few steps on a copy of the model and, when the
    budget cannot hold ``steps``, plans fewer (:data:`PLAN_MARGIN` of the budget); the schedule then
    anneals over the planned count. The plan is kept in the state (a resumed run with the same
    budgets keeps it; other budgets plan again) and reported: ``steps_planned``, ``capped_by``
    (None or the budget's name), ``seconds_per_step_timed``. A run that still overruns a budget
    stops (``budget_spent``) with its state saved, so a later run resumes."""
    config = config or VQConfig(size=images.shape[1])
    torch.manual_seed(seed)
    # channels-last convolutions: oneDNN's CPU convolutions run faster in that layout
    model = VQAutoencoder(config).to(memory_format=torch.channels_last)
    if perceptual is not None:
        perceptual.to(memory_format=torch.channels_last)

    def make_opt(m):
        return torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=1e-4)

    opt = make_opt(model)
    g = torch.Generator().manual_seed(seed)
    ema_params = [p.detach().clone() for p in model.parameters()] if ema_decay > 0 else None
    start, elapsed_before, cpu_before, plan = 0, 0.0, 0.0, None
    state_path = Path(out) / "train_state.pt" if out is not None else None
    if state_path is not None and state_path.exists():
        st = torch.load(state_path, weights_only=False)
        if st["config"] == config.to_dict() and st["steps"] == steps:
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["opt"])
            g.set_state(st["rng"])
            start, elapsed_before = st["step"], st["elapsed"]
            cpu_before = st.get("cpu_elapsed", 0.0)
            if ema_params is not None and st.get("ema") is not None:
                ema_params = st["ema"]
            plan = st.get("plan")
    if plan is None or (plan["max_minutes"], plan["max_cpu_minutes"]) != (
        max_minutes,
        max_cpu_minutes,
    ):

        def time_step(reps: int = 3) -> tuple[float, float]:
            """Median wall and CPU seconds of a step on a copy (the run's state is untouched)."""
            m = copy.deepcopy(model)
            o, g2, times = make_opt(m), torch.Generator().manual_seed(seed), []
            with torch.random.fork_rng(devices=[]):
                for _ in range(reps + 1):  # the first call warms up
                    t, c = time.perf_counter(), time.process_time()
                    x = _draw(images, batch, g2)
                    _update(m, o, _loss(m, x, edge_weight, perceptual, perceptual_weight))
                    times.append((time.perf_counter() - t, time.process_time() - c))
            return tuple(statistics.median(v) for v in zip(*times[1:]))

        plan = _plan(steps, max_minutes, max_cpu_minutes, time_step)
        plan["steps"] = max(plan["steps"], start)  # the steps already done stay done
    planned = plan["steps"]
    t0, cpu0 = time.perf_counter(), time.process_time()
    model.train()
    budget = None if max_minutes is None else 60.0 * max_minutes
    cpu_budget = None if max_cpu_minutes is None else 60.0 * max_cpu_minutes

    def _spent() -> bool:  # whether a budget is used up
        wall = elapsed_before + time.perf_counter() - t0
        cpu = cpu_before + time.process_time() - cpu0
        return (budget is not None and wall >= budget) or (
            cpu_budget is not None and cpu >= cpu_budget
        )

    bar = tqdm(range(start, planned), desc="vq", initial=start, total=planned, disable=not progress)
    ema, spent, step = None, False, start
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step / planned, lr)
        loss = _loss(model, _draw(images, batch, g), edge_weight, perceptual, perceptual_weight)
        _update(model, opt, loss)
        if ema_params is not None:
            with torch.no_grad():
                d = min(ema_decay, (1 + step) / (10 + step))
                for e, p in zip(ema_params, model.parameters()):
                    e.lerp_(p.detach(), 1 - d)
        ema = loss.item() if ema is None else 0.97 * ema + 0.03 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{ema:.4f}")
        done = step + 1
        spent = _spent() and done < planned
        if state_path is not None and (done % ckpt_every == 0 or done == planned or spent):
            atomic_torch_save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "rng": g.get_state(),
                    "step": done,
                    "steps": steps,
                    "plan": plan,
                    "config": config.to_dict(),
                    "elapsed": elapsed_before + time.perf_counter() - t0,
                    "cpu_elapsed": cpu_before + time.process_time() - cpu0,
                    "ema": ema_params,
                },
                state_path,
            )
        if spent:
            break
    bar.close()
    if ema_params is not None:
        with torch.no_grad():
            for e, p in zip(ema_params, model.parameters()):
                p.copy_(e)
    model = model.to(memory_format=torch.contiguous_format).eval()
    steps_done = step + 1 if planned > start else start
    info = {
        "steps_done": steps_done,
        "steps": steps,
        "steps_planned": planned,
        "capped_by": plan["capped_by"],
        "seconds_per_step_timed": plan["seconds_per_step"],
        "cpu_seconds_per_step_timed": plan["cpu_seconds_per_step"],
        "budget_spent": spent,
        "stopped_early": steps_done < steps,
        "max_minutes": max_minutes,
        "max_cpu_minutes": max_cpu_minutes,
        "batch": batch,
        "seconds": elapsed_before + time.perf_counter() - t0,
        "cpu_seconds_this_run": time.process_time() - cpu0,
        "cpu_seconds": cpu_before + time.process_time() - cpu0,
        "ema_decay": ema_decay,
        "edge_weight": edge_weight,
        "perceptual_weight": perceptual_weight if perceptual is not None else 0.0,
        "lr": lr,
        "final_loss": ema,
        "threads": torch.get_num_threads(),
    }
    if out is not None:
        model.save_pretrained(out)
        atomic_write_json(Path(out) / "train_info.json", info)
    return model, info


@torch.no_grad()
def reconstruct(model: VQAutoencoder, images: np.ndarray, batch: int = 128):
    """-> (reconstructions ``uint8 [N, H, W, 3]``, ids ``int64 [N, h, w]``)."""
    recs, ids = [], []
    for i in range(0, len(images), batch):
        x = to_tensor(images[i : i + batch])
        t = model.encode(x)
        r = model.decode(t)
        ids.append(t)
        recs.append(((r + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
    return torch.cat(recs).numpy(), torch.cat(ids).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the PSNR (dB) between two ``uint8`` image stacks."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def evaluate_vq(model: VQAutoencoder, images: np.ndarray) -> tuple[dict, np.ndarray]:
    """PSNR and codebook usage (fraction of the entries used at least once) on ``images``.
    Returns (metrics, reconstructions)."""
    recs, ids = reconstruct(model, images)
    used = np.unique(ids)
    metrics = {
        "psnr_db": psnr(images, recs),
        "codebook_size": model.config.codebook_size,
        "codes_used": int(len(used)),
        "codebook_usage": len(used) / model.config.codebook_size,
        "tokens_per_image": int(ids[0].size),
        "images": int(len(images)),
    }
    return metrics, recs
