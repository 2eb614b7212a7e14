"""gradkit.stages.auto (``--stages auto``) and the stages package's place in the import graph."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gradkit.stages.auto as auto
from gradkit.config import TrainConfig
from gradkit.data import Dataset
from gradkit.errors import ConfigError
from gradkit.methods import stage_parallel_names
from gradkit.stages import AutoChoice, available_workers, default_threads, resolve_auto_stages

STAGES_DIR = Path(auto.__file__).resolve().parent
SRC = STAGES_DIR.parents[1]


def config(**kw: object) -> TrainConfig:
    base: dict = dict(method="fr", model="mlp", data="blobs", epochs=1, batch_size=32, seed=3,
                      progress=False, out="unused-run-folder")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.fixture
def blobs_data(monkeypatch: pytest.MonkeyPatch, blobs: Dataset) -> None:
    monkeypatch.setattr(auto, "load_dataset", lambda *args, **kwargs: blobs)


# --- resolve_auto_stages -------------------------------------------------------------------------


def test_resume_reuses_the_saved_choice_without_profiling(
    monkeypatch: pytest.MonkeyPatch, no_launcher: None
) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("profiled again on --resume")

    monkeypatch.setattr(auto, "plan_stages", fail)
    saved = {"stages": 2, "stage_sizes": [1, 2]}
    resolved = resolve_auto_stages(config(resume=True), 4, saved)
    assert (resolved.stages, resolved.stage_sizes, resolved.workers) == (2, (1, 2), 2)
    one = resolve_auto_stages(config(resume=True), 4, {"stages": 1, "stage_sizes": [3]})
    assert (one.stages, one.stage_sizes, one.workers) == (1, (3,), None)


def test_a_new_run_plans_and_prints_the_choice(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_launcher: None,
    blobs_data: None,
) -> None:
    calls = []
    real = auto.plan_stages

    def plan(cfg: TrainConfig, workers: int) -> AutoChoice:
        calls.append(workers)
        return real(cfg, workers)

    monkeypatch.setattr(auto, "plan_stages", plan)
    # Without --resume a saved configuration is not reused (the run-folder guard reports it later).
    resolved = resolve_auto_stages(config(), 2, {"stages": 5, "stage_sizes": [1, 1, 1, 1, 1]})
    assert calls == [2]
    assert 1 <= resolved.stages <= 2
    if resolved.stages == 1:
        assert resolved.stage_sizes is None and resolved.workers is None
    else:
        assert resolved.workers == 2 and resolved.stage_sizes is not None
        assert sum(resolved.stage_sizes) == 3  # mlp: 3 blocks
    assert capsys.readouterr().out.startswith("fr with up to 2 workers: K=")


def test_under_a_launcher_k_is_the_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setattr(auto, "plan_stages", lambda *a: pytest.fail("planned under a launcher"))
    resolved = resolve_auto_stages(config(balance="count"), None, None)
    assert (resolved.stages, resolved.balance, resolved.stage_sizes) == (3, "time", None)


def test_plan_stages_needs_a_stage_parallel_method(blobs_data: None) -> None:
    with pytest.raises(ConfigError) as info:
        auto.plan_stages(config(method="ulr"), 2)
    names = ", ".join(stage_parallel_names())  # bp, fr, ddg, dni (and any registered by other tests)
    assert names.startswith("bp, fr, ddg, dni")
    assert str(info.value) == f"--stages auto needs a pipelined method ({names}), not 'ulr'"


def test_plan_stages_profiles_one_batch(blobs_data: None) -> None:
    choice = auto.plan_stages(config(method="ddg", threads=1), 2)
    assert [c.k for c in choice.candidates] == [1, 2] and choice.method == "ddg"
    assert choice.single_process_s > 0


def test_threads_and_workers() -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_threads(1) == cores
    assert default_threads(10_000) == 1 and default_threads(0) == cores
    assert available_workers() >= 1


def test_the_old_locations_are_gone_or_deprecated() -> None:
    import importlib

    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("gradkit.distributed.auto")
    sys.modules.pop("gradkit.distributed.cost_model", None)
    with pytest.warns(DeprecationWarning, match="moved to gradkit.stages.cost_model"):
        old = importlib.import_module("gradkit.distributed.cost_model")
    from gradkit.stages import cost_model

    assert old.balanced_sizes is cost_model.balanced_sizes
    from gradkit.distributed import launch

    assert launch.default_threads is default_threads


# --- no import circles ---------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["gradkit.stages", "gradkit.config", "gradkit.methods"])
def test_importing_does_not_load_the_distributed_runner(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('gradkit.distributed'))\n"
        "assert not loaded, loaded\n"
        "assert 'gradkit.stages' in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_no_module_of_the_stages_package_imports_gradkit_distributed() -> None:
    files = sorted(STAGES_DIR.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "split.py", "partition.py", "profile.py",
                                       "cost_model.py", "auto.py"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n.startswith("gradkit.distributed") for n in names), (path.name, names)
