"""DNI: decoupled neural interfaces with synthetic gradients (Jaderberg et al., ICML 2017).

At every stage boundary a small synthesizer predicts the error gradient δ of the stage's output from
the output itself (and, for cDNI, from the label). The stage updates at once with the prediction;
the synthesizer is regressed (MSE) onto the true δ when stage k+1 sends it, one step later. Options
from users of the reference code: a warm-up that trains the synthesizers while the stages still use
true gradients, and mixing true and synthetic δ (both wait for the true δ of the same batch, i.e.
they bring backward locking back). The FR paper reports DNI diverging on deep ResNets.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradkit.errors import ConfigError
from gradkit.methods._base import LossFn
from gradkit.methods._pipelined import PipelineMethod
from gradkit.methods._registry import METHODS
from gradkit.optim import OptimizerFactory
from gradkit.pipeline.boundary import is_sequence_boundary, stage_output_shapes
from gradkit.pipeline.schedule import DATA, DELTA, LABEL, Action, Op, Schedule
from gradkit.pipeline.stage import PipelineError, PipelineStage

__all__ = ["SEQUENCE_MIN_COSINE", "SyntheticGradients", "Synthesizer", "SyntheticGradientSchedule",
           "SyntheticGradientStage"]

AGREEMENT_WEIGHT = 0.1
"""Weight of the newest fit in a stage's ``agreement`` (about the last 10 batches count)."""

SEQUENCE_MIN_COSINE = 0.1
"""``min_cosine`` by default at a sequence boundary ``(N, T, C)``. A language model's δ at a position
depends on the next token and, through attention, on later positions, which the per-position
synthesizer does not see: on the 4-layer gpt it agreed 0.00-0.03 with the true δ, and applying its
predictions left the model at the unigram loss (issue 14; ``benchmarks/language-model``). Other
boundaries default to -1, the paper's rule (there synthesizers agree little too, 0.02-0.06, yet train)."""


class Synthesizer(nn.Module):
    """Predicts the gradient of a stage's output from the output: a conv net for feature maps
    ``(C, H, W)``, one MLP over ``C`` shared by every position for sequences ``(T, C)``, an MLP for
    vectors (and for anything else, flattened).

    A sequence boundary (a language model's ``(N, T, C)``) gets the per-position form, as DNI for
    recurrent nets predicts the gradient of each step's state from that state (Jaderberg et al. 2017,
    Sec. 3.1): its size does not grow with ``T`` (an MLP over the flattened ``T*C`` vector has
    ``T``-squared times the weights and learns from one example per sequence). The last layer starts at
    zero, so a fresh synthesizer predicts δ = 0 (no update) instead of noise.

    Predictions and targets are in per-term units: the gradient of the loss times the number of terms
    the loss averages over (:meth:`terms`), samples, or samples times positions for sequences.

    Args:
        shape: the stage output's shape without the batch dimension.
        num_classes: > 0 conditions the prediction on the one-hot label (cDNI): one label per sample
            (any shape), or for sequences also one label per position (a language model's next tokens).
        hidden: hidden channels (feature maps, sequences) or units (vectors); default: the output's
            width (vectors: between 64 and 1024).
    """

    def __init__(self, shape: Sequence[int], num_classes: int = 0, hidden: int | None = None) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.num_classes = num_classes
        self.spatial = len(self.shape) == 3
        self.sequence = is_sequence_boundary(self.shape)
        if self.spatial:
            channels = self.shape[0]
            width = hidden or channels
            self.net: nn.Sequential = nn.Sequential(
                nn.Conv2d(channels + num_classes, width, 3, padding=1), nn.ReLU(),
                nn.Conv2d(width, channels, 3, padding=1),
            )
        else:
            # Sequences: nn.Linear acts on the last dimension, so this MLP runs at every position.
            features = self.shape[-1] if self.sequence else math.prod(self.shape)
            width = hidden or (features if self.sequence else min(max(features, 64), 1024))
            self.net = nn.Sequential(
                nn.Linear(features + num_classes, width), nn.ReLU(), nn.Linear(width, features),
            )
        last = self.net[-1]
        assert isinstance(last, (nn.Conv2d, nn.Linear))
        nn.init.zeros_(last.weight)
        assert last.bias is not None
        nn.init.zeros_(last.bias)

    def terms(self, h: torch.Tensor) -> int:
        """How many loss terms a batch ``h`` stands for: samples, times positions for sequences (a
        per-token loss is a mean over both)."""
        return h.shape[0] * h.shape[1] if self.sequence else h.shape[0]

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        n = h.shape[0]
        inputs = h if self.spatial or self.sequence else h.reshape(n, -1)
        if self.num_classes:
            if y is None:
                raise ValueError("a label-conditioned synthesizer needs the labels")
            inputs = torch.cat([inputs, self._onehot(h, y)], dim=1 if self.spatial else -1)
        return self.net(inputs).reshape(h.shape)

    def _onehot(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The label as input channels: per sample, broadcast over positions or pixels; or per position."""
        per_position = self.sequence and tuple(y.shape) == tuple(h.shape[:2])
        if y.dim() != 1 and not per_position:
            where = f"a {tuple(h.shape[1:])} boundary" + (" of another length" if self.sequence else "")
            raise ConfigError(f"dni option conditioned=true takes one label per example, or one per position "
                              f"at (N, T, C) boundaries; labels {tuple(y.shape)} do not fit {where}: "
                              "drop -o conditioned=true")
        onehot = nn.functional.one_hot(y.long(), self.num_classes).to(h.dtype)
        if self.spatial:
            return onehot[:, :, None, None].expand(-1, -1, *h.shape[2:])
        if self.sequence and not per_position:
            return onehot[:, None, :].expand(-1, h.shape[1], -1)
        return onehot


class SyntheticGradientSchedule(Schedule):
    """DNI: update at once with a synthetic δ; fit the synthesizer when the true δ arrives.

    During a warm-up, or when true and synthetic gradients are mixed, a stage waits for the true δ of
    the same batch (backward locking).

    Args:
        num_stages: K.
        locked_steps: steps (from the start) during which every stage waits for the true δ of the
            same batch (the warm-up that trains synthesizers while using true gradients).
        always_locked: wait for the true δ at every step (needed to mix true and synthetic δ).
    """

    name = "dni"

    def __init__(self, num_stages: int, *, locked_steps: int = 0, always_locked: bool = False) -> None:
        super().__init__(num_stages)
        if locked_steps < 0:
            raise ValueError(f"locked_steps must be >= 0, got {locked_steps}")
        self.locked_steps = locked_steps
        self.always_locked = always_locked

    def locked(self, step: int) -> bool:
        """Whether stages wait for the true δ of batch ``step``."""
        return self.always_locked or step < self.locked_steps

    def actions(self, step: int, stage: int, last_batch: int | None = None) -> list[Action]:
        if self._last(stage):
            return self._loss_actions(step, stage, last_batch)
        out = []
        if self._exists(step, last_batch):
            labels = ((LABEL, DATA),)
            out.append(Action(Op.FORWARD, step, (self._from_below(stage),) + labels, self._up(stage)))
            if self.locked(step):
                out.append(Action(Op.BACKWARD, step, ((DELTA, stage + 1),), self._down(stage)))
                out.append(Action(Op.UPDATE, step))
                out.append(Action(Op.FIT, step))
            else:
                out.append(Action(Op.SYNTHETIC, step, (), self._down(stage)))
                out.append(Action(Op.UPDATE, step))
        previous = step - 1
        if self._exists(previous, last_batch) and not self.locked(previous):
            out.append(Action(Op.FIT, previous, ((DELTA, stage + 1),)))
        return out

    def drain_steps(self) -> int:
        return 1


class SyntheticGradientStage(PipelineStage):
    """One DNI stage: forward, update with the synthesizer's δ, fit the synthesizer on the true δ."""

    def __init__(self, index: int, num_stages: int, module: nn.Module, optimizer: torch.optim.Optimizer,
                 *, loss_fn: LossFn, method: SyntheticGradients) -> None:
        super().__init__(index, num_stages, module, optimizer, loss_fn=loss_fn)
        self.method = method
        self.synthesizer: Synthesizer | None = None
        self.synth_optimizer: torch.optim.Optimizer | None = None
        self.current: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # (batch, output, label, true δ or None): outputs waiting for the true δ to fit on.
        self.pending: deque[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = deque()
        self.agreement: torch.Tensor | float = 0.0
        """Exponential average of the cosine between the synthesizer's prediction for a batch (made
        before fitting on it) and that batch's true δ: how far its synthetic δ can be trusted."""
        self.synthetic_updates = {"applied": 0, "skipped": 0}
        """Synthetic updates made, and skipped because ``agreement`` was below ``min_cosine``."""
        self.min_cosine = -1.0 if method.min_cosine is None else method.min_cosine
        """The agreement below which this stage keeps its weights (set with its synthesizer)."""

    def build_synthesizer(self, shape: Sequence[int], num_classes: int) -> None:
        self.synthesizer = Synthesizer(shape, num_classes, self.method.synthesizer_hidden)
        if self.method.min_cosine is None:
            self.min_cosine = SEQUENCE_MIN_COSINE if self.synthesizer.sequence else -1.0
        device = next((p.device for p in self.module.parameters()), torch.device("cpu"))
        self.synthesizer.to(device)
        self.synth_optimizer = self.method.optimizer_factory(list(self.synthesizer.parameters()))
        if self.method.synthesizer_lr is not None:
            for group in self.synth_optimizer.param_groups:
                group["lr"] = self.method.synthesizer_lr

    def run(self, action: Action, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        op = action.op
        if op is Op.FORWARD:
            x = self.input_for_grad(received["activation"])
            out = self.module(x)
            self.current = (action.batch, x, out, received["label"])
            return {"activation": out.detach()}
        if op is Op.SYNTHETIC:
            return self._backward(action.batch, None)
        if op is Op.BACKWARD:
            return self._backward(action.batch, received[DELTA])
        if op is Op.FIT:
            self._fit(action.batch, received.get(DELTA))
            return {}
        raise self.unknown(action)

    def _predict(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert self.synthesizer is not None
        with torch.no_grad():
            # The synthesizer predicts per-term gradients; the loss is a mean over the terms.
            return self.synthesizer(h, y) / self.synthesizer.terms(h)

    def _backward(self, batch: int, true_delta: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if self.current is None or self.current[0] != batch:
            raise PipelineError(f"stage {self.index} has no forward of batch {batch} to backpropagate")
        _, x, out, y = self.current
        self.current = None
        h = out.detach()
        delta = self._predict(h, y)
        if true_delta is not None:
            mix = self.method.mix_at(batch)
            delta = true_delta if mix == 1.0 else mix * true_delta + (1.0 - mix) * delta
        self.optimizer.zero_grad(set_to_none=True)
        if true_delta is None and self.min_cosine > -1.0 and float(self.agreement) < self.min_cosine:
            # Not trusted: the weights keep their values (no .grad, so the update skips them, shared
            # ones included), but δ still goes down, so the stage below keeps fitting its synthesizer.
            self.synthetic_updates["skipped"] += 1
            if x.requires_grad:
                (x.grad,) = torch.autograd.grad(out, x, delta)
        else:
            if true_delta is None:
                self.synthetic_updates["applied"] += 1
            out.backward(delta)
        self.pending.append((batch, h, y, true_delta))
        return self.input_grad(x)

    def _fit(self, batch: int, true_delta: torch.Tensor | None) -> None:
        stored, h, y, delta = self.pending.popleft()
        if stored != batch:
            raise PipelineError(f"stage {self.index} fits its synthesizer on batch {batch} but holds batch {stored}")
        target = true_delta if true_delta is not None else delta
        assert target is not None and self.synthesizer is not None and self.synth_optimizer is not None
        self.synth_optimizer.zero_grad(set_to_none=True)
        predicted = self.synthesizer(h, y)
        scaled_target = target * self.synthesizer.terms(h)
        # Measured before fitting on this batch, so it is the prediction's quality on unseen data. Kept
        # on the device: only a stage that gates on it (min_cosine) reads it back, once per step.
        cosine = nn.functional.cosine_similarity(predicted.detach().flatten(), scaled_target.flatten(), dim=0)
        self.agreement = (1 - AGREEMENT_WEIGHT) * self.agreement + AGREEMENT_WEIGHT * cosine
        loss = nn.functional.mse_loss(predicted, scaled_target)
        loss.backward()
        self.synth_optimizer.step()

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.synth_optimizer] if self.synth_optimizer is not None else []

    def buffers(self) -> dict[str, list[torch.Tensor]]:
        stored = [t for _, h, y, d in self.pending for t in (h, y, d) if t is not None]
        synth: list[torch.Tensor] = list(self.synthesizer.parameters()) if self.synthesizer is not None else []
        return {"stored_outputs": stored, "synthesizer": synth}

    def buffer_state(self) -> dict[str, Any]:
        if self.synthesizer is None:
            return {"synthesizer": None, "pending": []}
        return {
            "synthesizer": {
                "shape": list(self.synthesizer.shape),
                "num_classes": self.synthesizer.num_classes,
                "weights": self.synthesizer.state_dict(),
            },
            "pending": list(self.pending),
            "agreement": self.agreement,
            "synthetic_updates": dict(self.synthetic_updates),
        }

    def load_buffer_state(self, state: dict[str, Any]) -> None:
        synth = state["synthesizer"]
        if synth is not None:
            self.build_synthesizer(synth["shape"], synth["num_classes"])
            assert self.synthesizer is not None
            self.synthesizer.load_state_dict(synth["weights"])
        self.pending = deque(tuple(p) for p in state["pending"])  # type: ignore[misc]
        # Checkpoints written before min_cosine existed hold neither: a fresh start is what they did.
        self.agreement = state.get("agreement", 0.0)
        self.synthetic_updates = dict(state.get("synthetic_updates", {"applied": 0, "skipped": 0}))

    def reset(self) -> None:
        self.pending.clear()
        self.current = None


def _counts(stage: SyntheticGradientStage) -> dict[str, Any]:
    return {**stage.synthetic_updates, "agreement": round(float(stage.agreement), 4), "min_cosine": stage.min_cosine}


@METHODS.register("dni", help="synthetic gradients at every stage boundary (Jaderberg et al. 2017)")
class SyntheticGradients(PipelineMethod):
    """DNI / cDNI over K stages.

    Args:
        stages, loss_fn, optimizer: see :class:`~gradkit.methods.Method`; synthesizers get optimizers
            from the same factory.
        conditioned: give the synthesizers the one-hot label too (cDNI).
        warmup_steps: for this many steps stages use the true δ (waiting for it) while the
            synthesizers train.
        true_gradient_mix: after the warm-up, update with ``mix * true + (1 - mix) * synthetic``;
            any value > 0 makes every stage wait for the true δ (backward locking).
        synthesizer_lr: learning rate of the synthesizers (default: the stages' rate).
        synthesizer_hidden: hidden width of the synthesizers (default: the stage output's width).
        min_cosine: update a stage with its synthetic δ only while its synthesizer's recent
            predictions have at least this cosine with the true δ (an exponential average over the
            fits, starting at 0); below it the stage keeps its weights that step. -1 applies every
            prediction, as in the paper. Default (None): :data:`SEQUENCE_MIN_COSINE` at sequence
            boundaries ``(N, T, C)``, -1 elsewhere. A synthesizer that cannot predict δ (a language
            model's, whose δ depends on the next token) otherwise drives the stage with its bias
            alone, and under Adam that bias gets full-sized steps.
        record_timeline: keep every executed action in ``executor.timeline``.
    """

    name = "dni"

    def __init__(
        self,
        stages: Sequence[nn.Module],
        *,
        loss_fn: LossFn | None = None,
        optimizer: OptimizerFactory | None = None,
        conditioned: bool = False,
        warmup_steps: int = 0,
        true_gradient_mix: float = 0.0,
        synthesizer_lr: float | None = None,
        synthesizer_hidden: int | None = None,
        min_cosine: float | None = None,
        record_timeline: bool = False,
    ) -> None:
        if not 0.0 <= true_gradient_mix <= 1.0:
            raise ConfigError(f"true_gradient_mix must be in [0, 1], got {true_gradient_mix}")
        if warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if synthesizer_hidden is not None and synthesizer_hidden < 1:
            raise ConfigError(f"synthesizer_hidden must be a positive width, got {synthesizer_hidden}")
        if min_cosine is not None and not -1.0 <= min_cosine <= 1.0:
            raise ConfigError(f"min_cosine must be in [-1, 1] (-1: apply every synthetic δ), got {min_cosine}")
        self.conditioned = bool(conditioned)
        self.warmup_steps = int(warmup_steps)
        self.true_gradient_mix = float(true_gradient_mix)
        self.synthesizer_lr = synthesizer_lr
        self.synthesizer_hidden = synthesizer_hidden
        self.min_cosine = None if min_cosine is None else float(min_cosine)
        super().__init__(stages, loss_fn=loss_fn, optimizer=optimizer, record_timeline=record_timeline)

    @classmethod
    def block_seconds(cls, forward_s: float, backward_s: float, *, last: bool,
                      synthesizer_fraction: float = 0.0) -> float:
        # Every stage but the last also runs and fits its synthesizer, a fraction of its F + B.
        both = forward_s + backward_s
        return both if last else both * (1 + synthesizer_fraction)

    @classmethod
    def schedule_for(cls, num_stages: int, *, warmup_steps: int = 0, true_gradient_mix: float = 0.0,
                     **options: Any) -> Schedule:
        return SyntheticGradientSchedule(num_stages, locked_steps=warmup_steps,
                                         always_locked=true_gradient_mix > 0)

    def schedule_options(self) -> dict[str, Any]:
        return {"warmup_steps": self.warmup_steps, "true_gradient_mix": self.true_gradient_mix}

    def make_stage(self, index: int, module: nn.Module, optimizer: torch.optim.Optimizer) -> PipelineStage:
        return SyntheticGradientStage(index, len(self.stages), module, optimizer,
                                      loss_fn=self.loss_fn, method=self)

    def synthetic_update_counts(self) -> list[dict[str, float]]:
        """Per stage below the last that this process holds: synthetic updates applied and skipped
        (below its ``min_cosine``, also given) and the synthesizer's current agreement with the true δ."""
        return [c for c in self.epoch_metrics()["synthetic_updates"] if c is not None]

    def epoch_metrics(self) -> dict[str, Any]:
        # A stage held still by min_cosine (the default at a language model's boundaries) shows here.
        return {"synthetic_updates": [None if s.is_last else _counts(s) for s in self.pipeline_stages
                                      if isinstance(s, SyntheticGradientStage)]}

    def mix_at(self, batch: int) -> float:
        """Weight of the true δ for ``batch``: 1 during the warm-up, then ``true_gradient_mix``."""
        return 1.0 if batch < self.warmup_steps else self.true_gradient_mix

    def prepare(self, sample: torch.Tensor) -> None:
        super().prepare(sample)
        stages = [s for s in self.pipeline_stages if isinstance(s, SyntheticGradientStage) and not s.is_last]
        if any(s.synthesizer is None for s in stages):
            self._build_synthesizers(sample)

    def _build_synthesizers(self, x: torch.Tensor) -> None:
        """Shapes of every stage output (and the class count, for cDNI) from one probe forward.

        The classes are the model output's dimension 1, or its last for per-token logits ``(N, T, V)``
        (what the default loss reads)."""
        shapes = stage_output_shapes(self.stages, x)
        output = shapes[-1]
        num_classes = int(output[-1] if is_sequence_boundary(output) else output[0]) if self.conditioned else 0
        for pipeline_stage, shape in zip(self.pipeline_stages[:-1], shapes[:-1], strict=True):
            assert isinstance(pipeline_stage, SyntheticGradientStage)
            if pipeline_stage.synthesizer is None:
                pipeline_stage.build_synthesizer(shape, num_classes)
