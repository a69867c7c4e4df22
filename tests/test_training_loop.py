"""What every training loop shares: resident training images, the step clock and profiler ranges,
the GPU benchmark that reads them, and the opt-in torch.compile path, all on the CPU."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ad_models.data.layout import read_manifest
from ad_models.data.loading import ImageDataset
from ad_models.methods import create_method, load_method
from ad_models.methods import base, pfm
from ad_models.methods.base import STEP_PHASES, TrainingImages, clock_steps, side_by_side, step_phase

ROOT = Path(__file__).resolve().parents[1]
NDPNET = {"image_size": 64, "widths": (8, 8, 16, 16, 16), "ffm_channels": 8, "phase1_epochs": 1,
          "phase2_epochs": 1, "batch_size": 4}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_images_give_the_same_floats_as_the_images():
    data = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    images = TrainingImages(data, torch.device("cpu"))
    idx = torch.tensor([3, 0, 3])
    assert images.residence == "cpu" and len(images) == 5
    assert torch.equal(images.batch(idx), data[idx].float() / 255)


def test_the_step_clock_times_each_part_of_real_training_steps(tiny_category):
    dataset, _ = tiny_category
    rows = read_manifest(dataset)
    train = ImageDataset(rows[rows.split == "train"], 64)
    with clock_steps() as clock:
        create_method("ndpnet", NDPNET).fit(train, device="cpu", progress=False)
    assert set(clock.seconds) == set(STEP_PHASES)
    assert all(clock.seconds[p] > 0 for p in ("data", "forward", "backward", "optimizer", "log"))
    assert clock.seconds["select"] == 0  # no bank, nothing to score
    # outside a clock the parts only mark profiler ranges: a trace names them
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        with step_phase("forward"):
            torch.ones(3).sum()
    assert "train/forward" in {event.key for event in profile.key_averages()}


def test_the_gpu_benchmark_runs_on_the_cpu_and_explains_a_step(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--methods", "pfm", "--device", "cpu",
                           "--train-images", "8", "--image-size", "64", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "img/s" in done.stdout and "step: data" in done.stdout and "device-hours" in done.stdout
    row = json.loads(out.read_text())["rows"][0]
    assert row["loops"]["epochs"]["images_per_second"] > 0 and row["inference_ms_per_image"] > 0
    # the parts of a step and the start-up add up to the whole training
    assert sum(row["step_breakdown"].values()) == pytest.approx(1.0, abs=0.02)
    assert row["full_budget_seconds"] > row["startup_seconds"]


@pytest.mark.slow
def test_compiled_training_matches_eager_training(tiny_category, tmp_path):
    dataset, _ = tiny_category
    rows = read_manifest(dataset)
    train = ImageDataset(rows[rows.split == "train"][:8], 64)  # two full batches: one shape to compile
    images = torch.rand(4, 3, 64, 64)
    losses, scores = {}, {}
    for mode in (None, "default"):
        model = create_method("ndpnet", NDPNET)
        if mode:
            model.compile_networks(mode)
        log = model.fit(train, device="cpu", progress=False)
        model.save(tmp_path / str(mode))
        losses[mode] = torch.tensor(log["loss_per_epoch"])
        scores[mode] = model.predict(images)[0]
    # float rounding apart, the same training and the same predictions
    assert torch.allclose(losses[None], losses["default"], rtol=1e-3, atol=1e-5)
    assert torch.allclose(scores[None], scores["default"], rtol=1e-3, atol=1e-4)
    # the weights keep their names: a model trained compiled loads as any other
    assert torch.allclose(load_method(tmp_path / "default", device="cpu").predict(images)[0], scores["default"],
                          rtol=1e-3, atol=1e-4)


def test_side_by_side_runs_each_task_on_its_own_core_with_the_result_it_has_alone():
    def task(seed: int):
        torch.manual_seed(seed)  # here, not in the task: the tasks share no random draws
        net = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                                  torch.nn.Conv2d(32, 8, 1))
        x = torch.randn(16, 8, 8, 8)

        def fit() -> tuple[str, int, torch.Tensor]:
            optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
            for _ in range(5):
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(net(x), x).backward()
                optimizer.step()
            return threading.current_thread().name, torch.get_num_threads(), net[3].weight.detach().clone()
        return fit

    alone = [fit() for fit in [task(seed) for seed in range(3)]]  # one thread (this module's fixture)
    torch.set_num_threads(2)
    try:
        together = side_by_side([task(seed) for seed in range(3)], torch.device("cpu"))
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(1)
    assert len({name for name, _, _ in together}) == 2  # two workers, neither the caller
    assert threading.current_thread().name not in {name for name, _, _ in together}
    assert all(threads == 1 for _, threads, _ in together)  # 2 threads shared by 2 workers
    assert all(torch.equal(a[2], b[2]) for a, b in zip(alone, together))
    # one thread, or a GPU: in the caller's thread, one after the other
    caller = {threading.current_thread().name}
    assert {name for name, _, _ in side_by_side([task(seed) for seed in range(3)], torch.device("cpu"))} == caller


def test_pfm_trains_its_levels_side_by_side_with_the_weights_of_one_after_the_other(tiny_category, monkeypatch):
    dataset, _ = tiny_category
    rows = read_manifest(dataset)
    train = ImageDataset(rows[rows.split == "train"], 64)
    config = {"image_size": 64, "epochs": 2, "batch_size": 4}

    def fit() -> tuple[dict, dict]:
        model = create_method("pfm", config)
        log = model.fit(train, device="cpu", progress=False)
        return log, {k: v.clone() for k, v in model.net.projectors.state_dict().items()}

    levels_ran_on = []
    train_level = pfm.PFM._train_level
    monkeypatch.setattr(pfm.PFM, "_train_level", lambda self, level, *args: (
        levels_ran_on.append(threading.current_thread().name), train_level(self, level, *args))[1])
    torch.set_num_threads(2)  # the features at 2 threads in both runs; the projectors at 1 per level
    try:
        log, together = fit()

        def one_after_the_other(tasks, device):
            torch.set_num_threads(1)
            return [task() for task in tasks]
        monkeypatch.setattr(pfm, "side_by_side", one_after_the_other)
        log_alone, alone = fit()
    finally:
        torch.set_num_threads(1)
    assert len(set(levels_ran_on[:3])) == 2 and threading.current_thread().name not in levels_ran_on[:3]
    assert log["loss_per_epoch"] == log_alone["loss_per_epoch"]
    assert all(torch.equal(together[k], alone[k]) for k in alone)

    # compiled networks (`execution.compile`) train their levels on the caller's thread only
    levels_ran_on.clear()
    monkeypatch.setattr(pfm, "side_by_side", base.side_by_side)  # the real one again
    compiled = create_method("pfm", {**config, "epochs": 1})
    compiled.compiled = True  # as compile_networks leaves it, without minutes of compiling
    torch.set_num_threads(2)
    try:
        compiled.fit(train, device="cpu", progress=False)
    finally:
        torch.set_num_threads(1)
    assert set(levels_ran_on) == {threading.current_thread().name}


@pytest.mark.parametrize("name, config", [
    ("pfm", {"epochs": 2, "batch_size": 4}),
    ("slsg", {"decoder_widths": (16, 16, 8, 8), "aux_width": 8, "iterations": 4, "batch_size": 2})])
def test_bf16_training_on_a_cpu_is_opt_in_only_on_bf16_hardware_and_inference_stays_fp32(name, config, tiny_category,
                                                                                         monkeypatch):
    dataset, _ = tiny_category
    rows = read_manifest(dataset)
    train = ImageDataset(rows[rows.split == "train"][:8], 64)
    config = {"image_size": 64, **config}
    images = torch.rand(2, 3, 64, 64)

    def trained(**options):
        model = create_method(name, {**config, **options})
        log = model.fit(train, device="cpu", progress=False)
        return log, model.predict(images)[1], model.net.state_dict()  # frozen parts equal, trained ones differ

    fp32_log, fp32_maps, fp32_weights = trained()
    assert fp32_log["training_precision"] == "float32"
    # asked for, on a CPU without bf16 matrix units: ignored, the fp32 training bit for bit
    monkeypatch.setattr(base, "cpu_has_bf16_matrix_units", lambda: False)
    log, maps, weights = trained(cpu_bf16_training=True)
    assert log["training_precision"] == "float32"
    assert all(torch.equal(weights[k], fp32_weights[k]) for k in fp32_weights)
    # with them (here pretended, so the test holds on any CPU): bf16 steps, an fp32 model that maps
    # nearly as the fp32-trained one
    monkeypatch.setattr(base, "cpu_has_bf16_matrix_units", lambda: True)
    log, maps, weights = trained(cpu_bf16_training=True)
    assert log["training_precision"] == "bfloat16"
    assert all(w.dtype == fp32_weights[k].dtype for k, w in weights.items())
    assert not all(torch.equal(weights[k], fp32_weights[k]) for k in fp32_weights)
    assert maps.dtype == torch.float32
    assert torch.corrcoef(torch.stack([maps.flatten(), fp32_maps.flatten()]))[0, 1] > 0.95
    # on two threads (PFM: levels side by side): a repeat gives the same weights
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, second = trained(cpu_bf16_training=True)[2], trained(cpu_bf16_training=True)[2]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(first[k], second[k]) for k in first)
