"""gradkit.devices: restored pipeline state goes to each stage's device; fork_rng on any device and torch."""

from __future__ import annotations

import contextlib
import io
from collections import deque, namedtuple
from typing import Any

import pytest
import torch
from torch import nn

import gradkit
from gradkit import devices
from gradkit.devices import fork_rng, module_device, move_to
from gradkit.methods import PipelineMethod, build
from gradkit.methods.delayed_gradients import _Stash
from gradkit.optim import OptimizerConfig
from gradkit.pipeline.local import Message

pytestmark = pytest.mark.usefixtures("one_torch_thread")

META = torch.device("meta")


def tensors_in(state: Any) -> list[torch.Tensor]:
    """Every tensor inside nested containers and dataclasses."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in tensors_in(v)]
    if isinstance(state, (list, tuple, deque)):
        return [t for v in state for t in tensors_in(v)]
    if hasattr(state, "__dataclass_fields__"):
        return [t for name in state.__dataclass_fields__ for t in tensors_in(getattr(state, name))]
    return []


def test_move_to_reaches_every_tensor_of_the_stages_nested_state() -> None:
    x, w, h = torch.randn(4, 3), torch.randn(3, 3), torch.randn(4, 2)
    y = torch.tensor([1, 0, 1, 1])
    Pair = namedtuple("Pair", "batch tensor")
    state = {
        "fifo": deque([(0, x), (1, x + 1)]),                                 # FR's FIFO of (batch, input)
        "stash": [(2, x, {"0.weight": w, "0.bias": w[0]})],                   # DDG's buffer_state
        "entry": _Stash(3, x, {"w": w}),                                      # DDG's in-memory stash
        "pending": [(4, h, y, None), (5, h, y, h)],                           # DNI's (batch, h, y, δ or None)
        "synthesizer": {"shape": [2], "num_classes": 0, "weights": {"lin.weight": w}},
        "channels": [("activation", 0, 1, [(6, h)])],                         # executor channel state
        "message": Message(7, h),                                             # a frozen dataclass
        "pair": Pair(8, h),
        "nothing": None,
    }
    moved = move_to(state, META)
    assert len(tensors_in(moved)) == len(tensors_in(state)) == 16
    assert all(t.device == META for t in tensors_in(moved))
    assert all(t.device.type == "cpu" for t in tensors_in(state))  # the input is not modified
    # Containers, their types, non-tensor values and dtypes are kept.
    assert isinstance(moved["fifo"], deque) and [b for b, _ in moved["fifo"]] == [0, 1]
    assert isinstance(moved["entry"], _Stash) and moved["entry"].batch == 3 and moved["entry"].output is None
    assert isinstance(moved["message"], Message) and moved["message"].batch == 7
    assert isinstance(moved["pair"], Pair) and moved["pair"].batch == 8
    assert moved["pending"][0][3] is None and moved["pending"][0][2].dtype == torch.int64
    assert moved["synthesizer"]["shape"] == [2] and moved["nothing"] is None
    assert moved["stash"][0][2]["0.weight"].shape == (3, 3)


def test_move_to_is_a_no_op_on_the_same_device() -> None:
    x = torch.randn(3)
    assert move_to([x], torch.device("cpu"))[0] is x


def test_module_device_falls_back_to_the_default() -> None:
    assert module_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(nn.ReLU(), default=META) == META


def small_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU()),
        nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU()),
        nn.Sequential(nn.Linear(32, 4)),
    )


@pytest.mark.parametrize("name", ["fr", "ddg", "dni"])
def test_load_state_dict_sends_every_buffer_and_message_to_its_stages_device(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint loads on the CPU; every in-flight tensor must pass through move_to with the device
    of the stage that owns it (stage k's buffers and the messages addressed to stage k). Emulated
    without a GPU: stage k reports the device cuda:k and move_to records instead of moving."""
    opt = OptimizerConfig(lr=0.05).factory()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
    a = build(name, gradkit.split(small_model(), 3, balance="count"), optimizer=opt)
    for x, y in data:
        a.step(x, y)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True, map_location="cpu")
    pipeline = state["pipeline"]
    assert tensors_in(pipeline["buffers"]) and tensors_in(pipeline["channels"])  # something in flight

    # (tensor id, device): one tensor may be in two stages' state (DNI's labels), moved for each.
    moved: set[tuple[int, torch.device]] = set()

    def spy(obj: Any, device: torch.device) -> Any:
        moved.update((id(t), device) for t in tensors_in(obj))
        return obj

    from gradkit.methods import _pipelined
    monkeypatch.setattr(_pipelined, "move_to", spy)
    monkeypatch.setattr(PipelineMethod, "stage_device", lambda self, k: torch.device("cuda", k))
    b = build(name, gradkit.split(small_model(5), 3, balance="count"), optimizer=opt)
    b.load_state_dict(state)
    for k, stage_state in enumerate(pipeline["buffers"]):
        assert all((id(t), torch.device("cuda", k)) in moved for t in tensors_in(stage_state))
    for _kind, _source, destination, messages in pipeline["channels"]:
        assert all((id(t), torch.device("cuda", destination)) in moved for t in tensors_in(messages))


def test_stage_device_is_the_stages_parameter_device() -> None:
    method = build("fr", gradkit.split(small_model(), 3, balance="count"),
                   optimizer=OptimizerConfig(lr=0.05).factory())
    assert isinstance(method, PipelineMethod)
    assert [method.stage_device(k) for k in range(3)] == [torch.device("cpu")] * 3


def test_fork_rng_restores_the_cpu_random_state() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with fork_rng(torch.device("cpu")):
        torch.rand(100)
    assert torch.equal(torch.rand(3), expected)


def test_fork_rng_passes_a_string_device_type_and_an_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.11 raises TypeError for device_type=None; a CUDA tensor's device may lack an index."""
    calls: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def strict_fork_rng(devices: Any = None, enabled: bool = True, device_type: str = "cuda") -> Any:
        if not isinstance(device_type, str):
            raise TypeError("device_type must be a string (as torch 2.11)")
        calls.append({"devices": list(devices) if devices is not None else None, "device_type": device_type})
        yield

    monkeypatch.setattr(torch.random, "fork_rng", strict_fork_rng)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    with fork_rng(torch.device("cpu")):
        pass
    with fork_rng(torch.device("cuda")):
        pass
    with fork_rng(torch.device("cuda", 1)):
        pass
    assert calls == [{"devices": [], "device_type": "cuda"},
                     {"devices": [3], "device_type": "cuda"},
                     {"devices": [1], "device_type": "cuda"}]


def test_profiler_and_direction_work_with_a_strict_fork_rng(monkeypatch: pytest.MonkeyPatch) -> None:
    """--balance time and --measure-direction no longer pass device_type=None (torch 2.11's TypeError)."""
    real = torch.random.fork_rng

    def strict(devices: Any = None, enabled: bool = True, device_type: Any = "cuda", **kw: Any) -> Any:
        if not isinstance(device_type, str):
            raise TypeError("fork_rng(): device_type must be a string")
        return real(devices=devices, enabled=enabled, device_type=device_type, **kw)

    monkeypatch.setattr(torch.random, "fork_rng", strict)
    assert devices.fork_rng is fork_rng
    from gradkit.direction import true_gradient
    from gradkit.stages import profile_blocks
    model = small_model()
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 4, (8,))
    assert len(profile_blocks(model, x, repeats=1)) == 3
    method = build("bp", [model], optimizer=OptimizerConfig(lr=0.05).factory())
    assert len(true_gradient(method, x, y)) == len(method.parameters())
