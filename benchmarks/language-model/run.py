"""A small language model through every method and activation mode, side by side (issue 14 item 6).

The registry's ``gpt`` (4 layers, width 128, tied embedding) on the ``text`` dataset (character-level
AG News texts), ``--steps`` steps of Adam at 1e-3 (weight decay 0: AdamW and Adam are then the same),
constant learning rate, seed 0: every configuration sees the same initial weights and the same batches
in the same order. Each configuration is one ``gradkit.train`` call (what ``gradkit train`` runs) and
writes one JSON line: validation loss per token and bits per character at the same step, bytes saved
for backward (plus in-flight buffers) at the first step where every stage is busy, median step time
and its ratio to bp/exact measured in the same invocation, σ and the cosine of the update direction
(``--measure-direction``), and the train-loss curve.

Groups (``--groups``, comma-separated; default: all):

  methods      bp, fr K=2, fr K=4, ddg K=2, each by default (staleness-aware steps at this
               sequence boundary) and with the paper's rule (-paper), dni K=2 (default, and the
               paper's: every synthetic δ applied), ulr hybrid K=2 (noise at the stage boundary)
  activations  bp with int8 / int4 / int2 activations (exact is the bp row)
  fr2          fr K=2 with each staleness remedy alone, and both (what the default is here)
  fr4          fr K=4 with the literature's remedies: lr warm-up, staleness-aware step sizes,
               per-stage gradient clipping, and the tie of embedding and head broken
  diagnose     fr K=2 and K=4 (the paper's rule) driven step by step: per stage, the cosine of
               the gradient it applies with the true backprop gradient (same batch, current
               weights) and σ; and backprop
               with FR's batch timing but exact gradients (bp-delayed-batches-k4)

    python benchmarks/language-model/run.py                        # everything, CPU (~15 min idle)
    python benchmarks/language-model/run.py --groups methods,activations
    python benchmarks/language-model/run.py --quick                # a smoke run, seconds
    python benchmarks/language-model/run.py --device cuda --batch-size 32
    python benchmarks/language-model/run.py --report               # tables of results.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gradkit
from gradkit.compress import measure_activations
from gradkit.config import TrainConfig
from gradkit.data import BatchLoader, Dataset, load_dataset
from gradkit.direction import true_gradient
from gradkit.envinfo import collect
from gradkit.losses import cross_entropy
from gradkit.methods.synthetic_gradients import SyntheticGradients
from gradkit.optim import OptimizerConfig

HERE = Path(__file__).resolve().parent
GROUPS = ("methods", "activations", "fr2", "fr4", "diagnose")
LN2 = math.log(2)


def untied_gpt(input_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Sequential:
    """``gpt`` with the head's weight a copy of the embedding's instead of the same Parameter."""
    model = gradkit.build_model("gpt", input_shape, num_classes, **options)
    model.head.proj.weight = nn.Parameter(model.embed.token.weight.detach().clone())
    return model


class ResidualProbe:
    """The residual stream entering one block, at every training step: the norm of its mean over the
    batch and the positions (the part common to every position) and the spread around that mean
    (root mean square over positions). FR's stale δ, like DNI's synthetic one, can grow the common
    part far beyond the spread; the next LayerNorm then sees nearly the same vector at every position
    and the model stays at the unigram loss. Values stay on the device until the run ends, so the
    probe adds no synchronisation to a GPU step."""

    def __init__(self, block: int) -> None:
        self.block = block
        self._latest: torch.Tensor | None = None
        self._per_step: list[torch.Tensor | None] = []

    def wrap(self, builder: Callable[..., nn.Sequential]) -> Callable[..., nn.Sequential]:
        """A model factory: ``builder``'s model with the probe on block ``self.block``'s input."""

        def build(input_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Sequential:
            model = builder(input_shape, num_classes, **options)
            model[self.block].register_forward_pre_hook(self._see)
            return model

        return build

    def _see(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if module.training:  # training forwards only (FR's play and replay both count; the last wins)
            with torch.no_grad():
                h = inputs[0].detach().float()
                common = h.mean(dim=(0, 1))
                spread = (h - common).pow(2).sum(-1).mean().sqrt()
                self._latest = torch.stack([common.norm(), spread])

    def step(self) -> None:
        """Call once per training step (from ``on_step``)."""
        self._per_step.append(self._latest)

    def curve(self, window: int) -> list[list[float]]:
        """``[[step, common, spread], ...]``: means over consecutive windows of ``window`` steps."""
        rows = []
        for i in range(0, len(self._per_step) - window + 1, window):
            seen = [t for t in self._per_step[i:i + window] if t is not None]
            if seen:
                common, spread = torch.stack(seen).mean(dim=0).tolist()
                rows.append([i + window, round(common, 3), round(spread, 3)])
        return rows


PROBE_BLOCK = 3
"""Block 3's input, after embed, block 1 and block 2: FR K=2's stage boundary, probed in every run."""


def _gpt(input_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Sequential:
    return gradkit.build_model("gpt", input_shape, num_classes, **options)


PAPER_STEPS = {"stale_lr": "none", "stale_momentum": None}
"""fr's and ddg's options for the paper's rule at this model's sequence boundaries (every stage at lr
with Adam's β1 0.9). Their default there, ``auto``, is ``stale_lr=inverse`` with ``stale_momentum=0.5``."""

# name -> (group, TrainConfig fields on top of the base)
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "bp": ("methods", {}),
    "fr-k2": ("methods", {"method": "fr", "stages": 2}),
    "fr-k2-paper": ("methods", {"method": "fr", "stages": 2, "method_options": PAPER_STEPS}),
    "fr-k4": ("methods", {"method": "fr", "stages": 4}),
    "fr-k4-paper": ("methods", {"method": "fr", "stages": 4, "method_options": PAPER_STEPS}),
    "ddg-k2": ("methods", {"method": "ddg", "stages": 2}),
    "ddg-k2-paper": ("methods", {"method": "ddg", "stages": 2, "method_options": PAPER_STEPS}),
    "dni-k2": ("methods", {"method": "dni", "stages": 2}),
    "dni-k2-paper": ("methods", {"method": "dni", "stages": 2, "method_options": {"min_cosine": -1.0}}),
    "ulr-hybrid-k2": ("methods", {"method": "ulr", "stages": 2, "method_options": {"copies": 16}}),
    "int8": ("activations", {"activations": "int8"}),
    "int4": ("activations", {"activations": "int4"}),
    "int2": ("activations", {"activations": "int2"}),
    "fr-k2-stale-lr": ("fr2", {"method": "fr", "stages": 2,
                               "method_options": {**PAPER_STEPS, "stale_lr": "inverse"}}),
    "fr-k2-stale-lr-sqrt": ("fr2", {"method": "fr", "stages": 2,
                                    "method_options": {**PAPER_STEPS, "stale_lr": "sqrt"}}),
    "fr-k2-stale-momentum": ("fr2", {"method": "fr", "stages": 2,
                                     "method_options": {**PAPER_STEPS, "stale_momentum": 0.5}}),
    "fr-k2-stale-lr-momentum": ("fr2", {"method": "fr", "stages": 2,
                                        "method_options": {"stale_lr": "inverse", "stale_momentum": 0.5}}),
    "fr-k4-stale-lr-momentum": ("fr4", {"method": "fr", "stages": 4,
                                        "method_options": {"stale_lr": "inverse", "stale_momentum": 0.5}}),
    "fr-k4-warmup": ("fr4", {"method": "fr", "stages": 4, "warmup_steps": 100, "method_options": PAPER_STEPS}),
    "fr-k4-stale-lr": ("fr4", {"method": "fr", "stages": 4,
                               "method_options": {**PAPER_STEPS, "stale_lr": "inverse"}}),
    "fr-k4-clip": ("fr4", {"method": "fr", "stages": 4,
                           "method_options": {**PAPER_STEPS, "clip_grad_norm": 0.5}}),
    "fr-k4-untied": ("fr4", {"method": "fr", "stages": 4, "model": untied_gpt, "method_options": PAPER_STEPS}),
    "bp-untied": ("fr4", {"model": untied_gpt}),
}
DIAGNOSE = {"fr-k2": 2, "fr-k4": 4}


def _env(args: argparse.Namespace) -> dict[str, Any]:
    env = collect()
    return {"cpu": env["cpu"], "cpus": env["cpu_count"], "torch": env["packages"]["torch"],
            "threads": args.threads, "device": args.device, "cuda": env["cuda_available"]}


def _commit() -> str:
    """The code measured: the checkout's commit (``+`` if it has uncommitted changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../../src"], cwd=HERE,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty else "")


def _write(args: argparse.Namespace, record: dict[str, Any]) -> None:
    record = {**record, "commit": args.commit, "invocation": args.invocation, "date": time.strftime("%Y-%m-%d %H:%M"),
              "steps": args.steps, "batch_size": args.batch_size, "context": args.context, "seed": args.seed,
              "quick": args.quick, "env": _env(args)}
    print(json.dumps({k: v for k, v in record.items() if k not in ("curve", "env", "stages_detail")}), flush=True)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _dataset(args: argparse.Namespace) -> Dataset:
    return load_dataset("text", options={"context": args.context}, limit_train=args.steps * args.batch_size,
                        limit_test=args.eval_windows, seed=0)


def _base(args: argparse.Namespace) -> dict[str, Any]:
    model_options = {"layers": 2, "width": 32} if args.quick else {}
    return dict(model="gpt", model_options=model_options, data="text", data_options={"context": args.context},
                optimizer="adam", lr=1e-3, weight_decay=0.0, lr_schedule="constant", epochs=1,
                batch_size=args.batch_size, eval_batch_size=256, seed=args.seed, threads=args.threads,
                device=args.device, progress=False, balance="params",
                limit_train=args.steps * args.batch_size, limit_test=args.eval_windows)


def run_one(name: str, args: argparse.Namespace, data: Dataset, measure_every: int | None) -> dict[str, Any]:
    group, fields = RUNS[name]
    stamps: list[float] = []
    losses: list[float] = []

    probe = ResidualProbe(PROBE_BLOCK)

    def on_step(epoch: int, step: int, loss: float) -> None:
        stamps.append(time.perf_counter())
        losses.append(loss)
        probe.step()

    options = {**_base(args), **fields}
    options["model"] = probe.wrap(fields.get("model", _gpt))
    if options.get("method", "bp") != "bp" or fields.get("model") is untied_gpt:
        options["measure_direction"] = measure_every
    config = TrainConfig(**options)
    start = time.perf_counter()
    try:
        result = gradkit.train(config, dataset=data, on_step=on_step)
    except gradkit.GradkitError as e:
        return {"bench": "train", "name": name, "group": group, "error": f"{type(e).__name__}: {e}"}
    except RuntimeError as e:  # a method that cannot run this model yet: report it, keep going
        return {"bench": "train", "name": name, "group": group, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    wall = time.perf_counter() - start
    final = result.final
    # Step times: between consecutive steps; steps that also measured σ (an extra backprop) or memory
    # are outliers the median ignores.
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][2:]
    window = max(1, args.steps // 12)
    curve = [[i + window, round(statistics.fmean(losses[i:i + window]), 4)]
             for i in range(0, len(losses) - window + 1, window)]
    record: dict[str, Any] = {
        "bench": "train", "name": name, "group": group, "method": config.method, "stages": config.stages,
        "stage_sizes": result.stage_sizes, "activations": config.activations,
        "method_options": config.method_options, "warmup_steps": config.warmup_steps,
        "model": "gpt" if isinstance(fields.get("model", "gpt"), str) else "gpt (untied)",
        "val_loss": round(final["test_loss"], 4), "val_bpc": round(final["test_loss"] / LN2, 4),
        "train_loss_last50": round(statistics.fmean(losses[-50:]), 4),
        "median_step_s": round(statistics.median(gaps), 4) if gaps else None,
        "wall_s": round(wall, 1), "activation_bytes": final.get("activation_bytes"),
        "stage_memory": final.get("stage_memory"),
        "sigma_mean": final.get("direction_sigma_mean"), "sigma_min": final.get("direction_sigma_min"),
        "cosine_mean": final.get("direction_cosine_mean"), "cosine_min": final.get("direction_cosine_min"),
        "curve": curve,
        "residual_probe": {"block": PROBE_BLOCK, "curve": probe.curve(window)},
    }
    if isinstance(result.method, SyntheticGradients):
        record["synthetic_updates"] = result.method.synthetic_update_counts()
    if config.activations != "exact" or name == "bp":
        record.update(_stored_bytes(config, data))
    return record


def _stored_bytes(config: TrainConfig, data: Dataset) -> dict[str, Any]:
    """measure_activations on one training batch of a fresh model: exact vs this run's mode."""
    torch.manual_seed(config.seed)
    model = gradkit.build_model("gpt", data.info.input_shape, data.info.num_classes, **config.model_options)
    x, y = data.train_x[:config.batch_size], data.train_y[:config.batch_size]
    m = measure_activations(model, x, y, config.activations, loss_fn=cross_entropy)
    return {"exact_bytes": m.exact_bytes, "stored_bytes": m.stored_bytes, "stored_ratio": round(m.ratio, 3)}


def diagnose_one(name: str, args: argparse.Namespace, data: Dataset) -> dict[str, Any]:
    """FR driven step by step. Every ``--diagnose-every`` steps, for each stage k: the cosine of the
    gradient it applies with the true gradient of its parameters (1) on the batch it trains on (the
    stale one, K-1-k steps old) at the weights before the step, and (2) on the step's new batch (what
    σ compares with); and σ of the whole update. The tied weight (embedding = head) is reported apart:
    stage 0 and the last stage each apply their use's part of it with their own optimizer."""
    k = DIAGNOSE[name]
    torch.manual_seed(0)
    options = {"layers": 2, "width": 32} if args.quick else {}
    model = gradkit.build_model("gpt", data.info.input_shape, data.info.num_classes, **options)
    stages = gradkit.split(model, k, balance="params")
    method = gradkit.methods.build("fr", stages, optimizer=OptimizerConfig(name="adam", lr=1e-3,
                                                                         weight_decay=0.0).factory(),
                                   **PAPER_STEPS)  # what stalls, and what the README diagnoses
    tied = model.embed.token.weight
    params = method.parameters()
    owner = {id(p): s for s, stage in enumerate(stages) for p in stage.parameters() if p is not tied}
    loader = BatchLoader(data.train_x, data.train_y, data.info, args.batch_size, train=True, seed=0)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    samples, losses = [], []
    for step, (x, y) in enumerate(loader.epoch(0)):
        seen[step] = (x, y)
        seen.pop(step - k, None)
        if step % args.diagnose_every or step < k:
            losses.append(method.step(x, y))
            continue
        applied: dict[int, tuple[int, dict[int, torch.Tensor]]] = {}
        method.update_observers.append(lambda s, b, ps, into=applied: into.__setitem__(
            s if b >= 0 else -1, (b, {id(p): p.grad.detach().clone() for p in ps if p.grad is not None})))
        truth = {b: dict(zip(map(id, params), true_gradient(method, *seen[b]), strict=True))
                 for b in range(step - k + 1, step + 1)}
        losses.append(method.step(x, y))
        method.update_observers.pop()
        row: dict[str, Any] = {"step": step, "stages": []}
        dot = norm_f = 0.0
        shared = applied.pop(-1, None)  # one update of the parameters held by several stages (the tie)
        if shared is not None and id(tied) in shared[1]:
            row["tied"] = [{"stage": "shared", "cos_with_total": round(float(F.cosine_similarity(
                shared[1][id(tied)].flatten(), truth[step][id(tied)].flatten(), dim=0)), 4)}]
        for s, (batch, grads) in sorted(applied.items()):
            ids = [i for i in grads if owner.get(i) == s]
            if not ids:
                continue
            g = torch.cat([grads[i].flatten() for i in ids])
            same = torch.cat([truth[batch][i].flatten() for i in ids])
            fresh = torch.cat([truth[step][i].flatten() for i in ids])
            row["stages"].append({"stage": s, "age": step - batch,
                                  "cos_same_batch": round(float(F.cosine_similarity(g, same, dim=0)), 4),
                                  "cos_new_batch": round(float(F.cosine_similarity(g, fresh, dim=0)), 4),
                                  "norm_ratio": round(float(g.norm() / same.norm().clamp_min(1e-12)), 3)})
            if id(tied) in grads:
                total = truth[batch][id(tied)].flatten()
                row.setdefault("tied", []).append(
                    {"stage": s, "cos_with_total": round(float(F.cosine_similarity(grads[id(tied)].flatten(),
                                                                                  total, dim=0)), 4)})
        if shared is not None:
            applied[-1] = shared
        for p in params:
            f = truth[step][id(p)].double()
            norm_f += float(f.pow(2).sum())
            for _, grads in applied.values():
                if id(p) in grads:
                    dot += float((f * grads[id(p)].double()).sum())
        row["sigma"] = round(dot / norm_f, 4) if norm_f else None
        samples.append(row)
    method.flush()
    window = max(1, args.steps // 12)
    return {"bench": "diagnose", "name": name, "stages": k,
            "stage_sizes": [len(s) for s in stages], "samples": samples,
            "curve": [[i + window, round(statistics.fmean(losses[i:i + window]), 4)]
                      for i in range(0, len(losses) - window + 1, window)]}


def delayed_batches(args: argparse.Namespace, data: Dataset, k: int = 4) -> dict[str, Any]:
    """FR's batch timing without its stale weights or δ: at step t, stage k gets the exact gradient,
    at the current weights, of the batch FR would give it (t-(K-1-k)), by full backprop on each of
    the K batches. The untied model, so every parameter belongs to one stage. If this stalls like
    fr-k4-untied, the stall comes from stages stepping on different batches, not from staleness."""
    torch.manual_seed(0)
    options = {"layers": 2, "width": 32} if args.quick else {}
    model = untied_gpt(data.info.input_shape, data.info.num_classes, **options)
    stages = gradkit.split(model, k, balance="params")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.0)
    loader = BatchLoader(data.train_x, data.train_y, data.info, args.batch_size, train=True, seed=0)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    losses = []
    for step, (x, y) in enumerate(loader.epoch(0)):
        seen[step] = (x, y)
        seen.pop(step - k, None)
        opt.zero_grad(set_to_none=True)
        for s, stage in enumerate(stages):
            b = step - (k - 1 - s)
            if b < 0:  # FR's warm-up: stage s does not update in its first K-1-s steps
                continue
            params = [p for p in stage.parameters() if p.requires_grad]
            loss = cross_entropy(model(seen[b][0]), seen[b][1])
            for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
                p.grad = g
            if b == step:
                losses.append(loss.item())
        opt.step()
    model.eval()
    with torch.no_grad():
        val = statistics.fmean(float(cross_entropy(model(data.test_x[i:i + 256]), data.test_y[i:i + 256]))
                               for i in range(0, len(data.test_y), 256))
    window = max(1, args.steps // 12)
    return {"bench": "delayed-batches", "name": f"bp-delayed-batches-k{k}", "model": "gpt (untied)",
            "stage_sizes": [len(s) for s in stages], "val_loss": round(val, 4), "val_bpc": round(val / LN2, 4),
            "train_loss_last50": round(statistics.fmean(losses[-50:]), 4),
            "curve": [[i + window, round(statistics.fmean(losses[i:i + window]), 4)]
                      for i in range(0, len(losses) - window + 1, window)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", default=",".join(GROUPS), help="comma-separated: " + ", ".join(GROUPS))
    p.add_argument("--only", default="", help="comma-separated run names (see RUNS / DIAGNOSE)")
    p.add_argument("--no-reference", action="store_true",
                   help="do not add the bp run that step-time ratios divide by (the report then uses the last bp row)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context", type=int, default=32, help="characters per example (T)")
    p.add_argument("--eval-windows", type=int, default=512, help="validation windows of --context characters")
    p.add_argument("--measure-every", type=int, default=50, help="σ and cosine every this many steps")
    p.add_argument("--diagnose-every", type=int, default=30)
    p.add_argument("--seed", type=int, default=0,
                   help="initial weights and batch order (the windows stay the same); rows of seeds other than 0 "
                        "appear only in the report's table across seeds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="a smoke run: a 2-layer width-32 gpt, 6 steps, "
                                                        "16 validation windows; writes nothing")
    p.add_argument("--out", type=Path, default=HERE / "results" / "results.jsonl")
    p.add_argument("--report", action="store_true", help="print the tables of --out and exit")
    args = p.parse_args()
    if args.report:
        report(args.out)
        return
    if args.quick:
        args.steps, args.eval_windows, args.context, args.batch_size = 6, 16, 16, 4
        args.measure_every = args.diagnose_every = 3
    args.invocation = time.strftime("%Y%m%dT%H%M%S")
    args.commit = _commit()
    torch.set_num_threads(args.threads)
    groups = set(args.groups.split(","))
    only = set(filter(None, args.only.split(",")))
    data = _dataset(args)
    names = [n for n, (g, _) in RUNS.items() if g in groups and (not only or n in only)]
    if "bp" not in names and not args.no_reference:
        names.insert(0, "bp")  # the reference of every ratio, in the same invocation
    for name in names:
        _write(args, run_one(name, args, data, args.measure_every))
    if "diagnose" in groups:
        for name in DIAGNOSE:
            if not only or name in only:
                _write(args, diagnose_one(name, args, data))
        if not only or "bp-delayed-batches-k4" in only:
            _write(args, delayed_batches(args, data))


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def report(path: Path) -> None:
    """Markdown tables of the last invocation's rows (per name, the latest row wins)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = {r["name"]: r for r in rows if r["bench"] == "train" and not r.get("seed")}
    by_seed = {(r["name"], r.get("seed", 0)): r for r in rows if r["bench"] == "train" and "error" not in r}
    bp = train.get("bp")
    if bp is None:
        print("no bp row")
        return
    by_inv = {r["invocation"]: r for r in rows if r["bench"] == "train" and r["name"] == "bp"}

    def line(r: dict[str, Any]) -> str:
        if "error" in r:
            return f"| {r['name']} | fails: {r['error'][:120]} | | | | | | | | |"
        ref = by_inv.get(r["invocation"], bp)
        other = "" if r["invocation"] == ref["invocation"] else "*"  # bp of another invocation: noisier
        sigma = "-" if r.get("sigma_mean") is None else f"{r['sigma_mean']:.2f} / {r['cosine_mean']:.2f}"
        split = "" if r["stages"] == 1 else f" ({'+'.join(map(str, r['stage_sizes']))})"
        return (f"| {r['name']}{split} | {r['val_loss']:.3f} | {r['val_loss'] - bp['val_loss']:+.3f} | "
                f"{r['val_bpc']:.3f} | {r['train_loss_last50']:.3f} | {_mib(r['activation_bytes'])} | "
                f"{r['activation_bytes'] / bp['activation_bytes']:.2f}x | "
                f"{r['median_step_s'] / ref['median_step_s']:.2f}x{other} | {sigma} | {r.get('commit', 'unknown')} |")

    head = ("| run (blocks per stage) | val loss | vs bp | val bpc | train loss (last 50) | saved for backward + "
            "buffers | vs bp | step time vs bp | σ / cos (mean) | code |\n|---|---|---|---|---|---|---|---|---|---|")
    for group in ("methods", "activations", "fr2", "fr4"):
        print(f"\n### {group}\n\n{head}")
        if group != "methods":
            print(line(bp))
        for r in train.values():
            if r["group"] == group:
                print(line(r))
    seeds = sorted({seed for _, seed in by_seed})
    if len(seeds) > 1:
        names = [n for n in RUNS if all((n, seed) in by_seed for seed in seeds)]
        print("\n### val loss vs bp of the same seed\n\n| run | " + " | ".join(f"seed {x}" for x in seeds)
              + " | mean |\n|---" * 1 + "|---" * (len(seeds) + 1) + "|")
        for n in names:
            gaps = [by_seed[(n, x)]["val_loss"] - by_seed[("bp", x)]["val_loss"] for x in seeds]
            print(f"| {n} | " + " | ".join(f"{g:+.3f}" for g in gaps) + f" | {sum(gaps) / len(gaps):+.3f} |")
    acts = [r for r in train.values() if "stored_bytes" in r]
    if acts:
        print("\n| mode | exact | stored | ratio |\n|---|---|---|---|")
        for r in acts:
            print(f"| {r['activations']} | {_mib(r['exact_bytes'])} | {_mib(r['stored_bytes'])} | {r['stored_ratio']:.2f} |")
    print("\n### curves (train loss, mean over windows)\n")
    for r in train.values():
        if "curve" in r:
            print(f"- {r['name']}: " + " ".join(f"{s}:{v:.2f}" for s, v in r["curve"]))
    for r in rows:
        if r["bench"] == "delayed-batches":
            print(f"\n{r['name']} ({r['model']}, {r.get('commit')}): val loss {r['val_loss']:.3f}, "
                  "curve " + " ".join(f"{s}:{v:.2f}" for s, v in r["curve"]))
        if r["bench"] != "diagnose":
            continue
        print(f"\n### per-stage cosines, {r['name']} (stage sizes {r['stage_sizes']}, code {r.get('commit', 'unknown')})\n")
        k = r["stages"]
        print("| step | σ | " + " | ".join(f"stage {s} same / new batch" for s in range(k - 1)) + " | last stage | tied |")
        print("|---" * (k + 3) + "|")
        for smp in r["samples"]:
            cells = {c["stage"]: c for c in smp["stages"]}
            tied = ", ".join(f"{t['stage']} {t['cos_with_total']:.2f}" for t in smp.get("tied", []))
            print(f"| {smp['step']} | {smp['sigma']} | " + " | ".join(
                f"{cells[s]['cos_same_batch']:.2f} / {cells[s]['cos_new_batch']:.2f}" if s in cells else "-"
                for s in range(k - 1)) + f" | {cells[k - 1]['cos_same_batch']:.2f} | {tied} |")
        print("- curve: " + " ".join(f"{s}:{v:.2f}" for s, v in r["curve"]))


if __name__ == "__main__":
    main()
