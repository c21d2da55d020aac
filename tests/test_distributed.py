"""Data-parallel training with torchrun: 2 gloo processes on CPU against the single-process run.

The comparison recipe makes the two runs mathematically the same computation: a deterministic crop (no
random augmentation), instance norm (no batch statistics), a per-sample mean loss, and the same seed, so
the single process's batch of 2 is exactly the union of the two ranks' batches of 1 (the sampler hands
rank r samples r, r+2, ... of the same permutation) and DDP's averaged gradient is the single process's.
What is left is floating-point summation order, hence the tolerances below.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_seg_mmar, run_mmar
from mmar import distributed

EPOCHS = 3
# a deterministic crop instead of the random augmentation (everything else from the default recipe);
# the foreground/background indices the recipe precomputes for its random crop are dropped, unused
CENTER_CROP = ('train#augmentation=[{"_target_": "CenterSpatialCropd", "keys": ["@image_key", "@label_key"], '
               '"roi_size": "@spatial_size"}, {"_target_": "DeleteItemsd", "keys": ["label_fg", "label_bg"]}]')
# components through --set are code, refused unless asked for (docs/security.md)
COMPONENTS = {"MMAR_ALLOW_EXPRESSIONS": "1"}
NO_LR_SCALING = 'multi_gpu={"lr_scaling": false}'
# Dice per sample: the default "batch Dice" pools a rank's own batch, so 2 ranks of 1 sample and 1 process of
# 2 samples optimize different (both valid) losses; with per-sample Dice the gradients are the same
PER_SAMPLE_DICE = "train#loss#batch=false"
# relative tolerance of the epoch losses: float32 sums in another order, through 2 x 3 optimizer steps
LOSS_RTOL = 1e-5
# validation metrics: the same model on the same cases, only gathered in another order
METRIC_ATOL = 1e-6
# the CPU path (gloo) on any machine: `--gpus 2` on a machine with one GPU would rightly refuse to start
# float32 throughout: the equalities below (1 process vs 2, training-time vs `mmar validate`) are exact up
# to summation order, which bf16 autocast (`amp` on a CPU that has bf16) would round away
CPU = {"CUDA_VISIBLE_DEVICES": "", "MMAR_CPU_AMP": "0"}


@pytest.fixture(scope="module")
def dist_data(tmp_path_factory) -> Path:
    from mmar.synthetic import write_segmentation_dataset

    # 4 training cases (2 per rank) and 3 validation cases: an odd count, so a padding sampler would
    # validate one case twice on 2 ranks and bias the metric
    out = tmp_path_factory.mktemp("distdata")
    datalist = write_segmentation_dataset(out, cases=7, size=16, seed=3, validation_fraction=3 / 7)
    data = json.loads(datalist.read_text())
    assert (len(data["training"]), len(data["validation"])) == (4, 3)
    return datalist


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dist_data):
    """The same recipe trained by 1 process (batch 2) and by 2 gloo processes (batch 1 each)."""
    root = tmp_path_factory.mktemp("runs")
    single = make_seg_mmar(root / "single", dist_data, epochs=EPOCHS)
    double = make_seg_mmar(root / "double", dist_data, epochs=EPOCHS)
    # one thread, as torchrun gives each of the 2 processes: 2 busy cores are not oversubscribed
    single_out = run_mmar("train", str(single), "--set", CENTER_CROP, PER_SAMPLE_DICE, "train#batch_size=2",
                          env={**CPU, **COMPONENTS, "OMP_NUM_THREADS": "1"})
    term = root / "termination.json"
    double_out = run_mmar("train", str(double), "--gpus", "2", "--set", CENTER_CROP, PER_SAMPLE_DICE, "train#batch_size=1",
                          NO_LR_SCALING, env={**CPU, **COMPONENTS, "MMAR_TERMINATION_LOG": str(term)})
    return {"single": single, "double": double, "single_out": single_out, "double_out": double_out, "term": term}


def history(mmar: Path) -> list[dict]:
    return torch.load(mmar / "models" / "train_state.pt", weights_only=False)["progress"]["history"]


def test_two_processes_follow_the_single_process_loss_trajectory(runs):
    single, double = history(runs["single"]), history(runs["double"])
    assert [r["epoch"] for r in double] == list(range(1, EPOCHS + 1))
    for one, two in zip(single, double):
        assert two["loss"] == pytest.approx(one["loss"], rel=LOSS_RTOL), (one, two)
        assert two["lr"] == pytest.approx(one["lr"], rel=1e-12)  # lr scaling off: the same schedule
        assert two["val_mean_dice"] == pytest.approx(one["val_mean_dice"], abs=1e-5)
    assert "data-parallel: 2 processes (gloo), batch 1 per process, 2 in all" in runs["double_out"].stdout
    # the loss does go down: the comparison is between two runs that learn, not two that stand still
    assert double[-1]["loss"] < double[0]["loss"]


def test_only_rank_0_writes(runs):
    models = runs["double"] / "models"
    # a second writer would show as a second event file (named by pid) or temp files left behind
    assert sorted(p.name for p in models.iterdir()) == [
        ".mmar.lock", "model.ckpt", "model_final.ckpt", "runs", "train_state.pt", "training_curves.png"]
    assert len(list(models.glob("runs/*/events.out.tfevents.*"))) == 1
    out = runs["double_out"].stdout
    for epoch in range(1, EPOCHS + 1):
        assert out.count(f"epoch {epoch}/{EPOCHS} loss") == 1, out
    assert out.count("done: ") == 1
    result = json.loads(runs["term"].read_text())
    assert result["processes"] == 2 and result["epochs"] == EPOCHS
    best = torch.load(models / "model.ckpt", weights_only=False)
    state = torch.load(models / "train_state.pt", weights_only=False)
    assert state["complete"] and best["metric"] == state["progress"]["best_metric"]


def test_gathered_validation_metric_equals_a_single_process_validation(runs, tmp_path):
    """The 2-rank validation after the last epoch and `mmar validate` of the same weights agree."""
    double = runs["double"]
    sharded = history(double)[-1]["val_mean_dice"]
    out = tmp_path / "eval"
    run_mmar("validate", str(double), "--ckpt", str(double / "models" / "model_final.ckpt"),
             "--set", f"MMAR_EVAL_OUTPUT_PATH={out}", "validate#inferer#mirror_axes=[]", env=CPU)  # as in training
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_cases"] == 3
    # discriminating: per-case Dice differ by ~0.05 here, so validating a padded duplicate (4 cases) or
    # only rank 0's share would move the mean by ~5e-3, far beyond the tolerance
    assert sharded == pytest.approx(metrics["val_mean_dice"], abs=METRIC_ATOL)


def test_a_crashing_rank_fails_the_job_with_its_error(tmp_path, dist_data):
    """A corrupt training image: the rank that reads it fails, torchrun stops the other, the job exits 1."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dist_data.parent, data)
    listing = json.loads((data / "datalist.json").read_text())
    broken = data / listing["training"][1]["image"]
    content = broken.read_bytes()
    broken.write_bytes(content[: len(content) // 2])
    mmar = make_seg_mmar(tmp_path / "mmar", data / "datalist.json", epochs=2)
    started = time.monotonic()
    # no cache: the file is read in the training loop, by one rank only. The output goes to a file and the
    # job's own exit is awaited (not the end of its output, which any process it leaves behind would hold)
    log = tmp_path / "train.log"
    with log.open("w") as out:
        process = subprocess.run(
            [sys.executable, "-m", "mmar", "train", str(mmar), "--gpus", "2", "--set", "train#cache#rate=0"],
            stdout=out, stderr=subprocess.STDOUT, timeout=180, env={**os.environ, **CPU},
        )
    seconds = time.monotonic() - started
    output = log.read_text()
    assert process.returncode != 0, output
    assert f"cannot read image {broken}" in output
    assert "error: rank " in output  # the failing rank names itself
    assert "Root Cause" in output and "mmar.errors.MMARError: rank " in output  # torchrun's summary
    assert seconds < 120, f"took {seconds:.0f} s to fail"
    assert not (mmar / "models" / "model_final.ckpt").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_rendezvous_timeout_is_reported(seg_mmar):
    """Rank 1 of 2 with no rank 0 anywhere: a clear error after multi_gpu#timeout_seconds, not a hang."""
    env = {**CPU, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    started = time.monotonic()
    result = run_mmar("train", str(seg_mmar), "--set", 'multi_gpu={"timeout_seconds": 2}', env=env, check=False)
    assert result.returncode == 1
    assert "error: rank 1: could not join the process group of 2 processes" in result.stderr
    assert "within 2 s (multi_gpu#timeout_seconds)" in result.stderr
    assert time.monotonic() - started < 60
    assert not (seg_mmar / "models" / "train_state.pt").exists()


def test_bad_multi_gpu_config_fails_before_starting_processes(seg_mmar):
    result = run_mmar("train", str(seg_mmar), "--gpus", "2", "--set", 'multi_gpu={"warmup_epochs": -1}', check=False)
    assert result.returncode == 1 and "multi_gpu#warmup_epochs must be an integer >= 0" in result.stderr
    assert "torch.distributed.run" not in result.stderr and "OMP_NUM_THREADS" not in result.stderr


def _state_epoch(state_file: Path) -> int:
    return torch.load(state_file, weights_only=False)["trainer"]["epoch"] if state_file.exists() else 0


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _wait_stopped(pids: list[int], timeout: float = 10) -> None:
    """Until each process is stopped (state T), a zombie or gone: SIGSTOP is delivered, not awaited."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                break
            if state in ("T", "t", "Z", "X"):
                break
            time.sleep(0.001)


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        found += [int(c) for c in children]
        todo += [int(c) for c in children]
    return found


@pytest.mark.slow
def test_resume_after_a_killed_distributed_run(seg_mmar):
    """`kill -9` of `mmar train --gpus 2` mid-run takes torchrun and both ranks down; re-running resumes,
    on 2 processes, with the linear-scaled learning rate (the default) and the full history."""
    epochs = 8
    command = [sys.executable, "-m", "mmar", "train", str(seg_mmar), "--gpus", "2", "--set", f"epochs={epochs}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **CPU})
    state_file = seg_mmar / "models" / "train_state.pt"
    deadline = time.time() + 240
    killed_after, family = None, []
    try:
        while time.time() < deadline and process.poll() is None:
            family = _descendants(process.pid) or family
            if _state_epoch(state_file) >= 2:
                # frozen while the epoch is read again, so the kill hits the epoch it records (a rank writes
                # the state: the whole family is stopped, not only the process the test started)
                frozen = [process.pid, *_descendants(process.pid)]
                _signal_all(frozen, signal.SIGSTOP)
                _wait_stopped(frozen)
                epoch = _state_epoch(state_file)
                if epoch >= 2:
                    process.send_signal(signal.SIGKILL)
                    killed_after = epoch
                # the rest go on, so that what is checked below is how they die with their parent
                _signal_all(frozen[1:] if epoch >= 2 else frozen, signal.SIGCONT)
                if killed_after is not None:
                    break
            time.sleep(0.05)
        process.communicate()
        assert killed_after is not None and killed_after < epochs, "the run was not killed mid-training"
        # torchrun and the ranks die with their parent (no orphan goes on writing models/)
        time.sleep(3)
        survivors = [pid for pid in family if Path(f"/proc/{pid}").exists()
                     and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]
        assert not survivors, f"processes outlived the killed run: {survivors}"
    finally:
        for pid in _descendants(process.pid) + family:  # only our own processes, if the check above failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    result = run_mmar("train", str(seg_mmar), "--gpus", "2", "--set", f"epochs={epochs}", env=CPU)
    resumed_from = int(result.stdout.split("after epoch ")[1].split()[0])
    assert killed_after <= resumed_from < epochs
    state = torch.load(state_file, weights_only=False)
    assert state["complete"] and state["trainer"]["epoch"] == epochs
    assert [r["epoch"] for r in state["progress"]["history"]] == list(range(1, epochs + 1))
    assert state["ema"]["updates"] == state["trainer"]["iteration"]  # the weight average went on across the kill
    config = json.loads((seg_mmar / "config" / "config_train.json").read_text())
    # linear scaling: the schedule (cosine over the epochs) starts from twice the configured rate
    rates = [r["lr"] for r in state["progress"]["history"]]
    expected = [2 * config["learning_rate"] * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs)]
    assert rates == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------- pure parts


def test_each_rank_takes_an_interleaved_shard_of_the_single_process_permutation():
    data = list(range(10))
    single = distributed.train_sampler(data, distributed.SINGLE, seed=7)
    ranks = [distributed.train_sampler(data, distributed.Context(rank=r, world_size=2), seed=7) for r in (0, 1)]
    for epoch in (1, 2):
        for sampler in (single, *ranks):
            sampler.set_epoch(epoch)
        order = list(single)
        assert list(ranks[0]) == order[0::2] and list(ranks[1]) == order[1::2]
    single.set_epoch(1)
    first = list(single)
    single.set_epoch(2)
    assert list(single) != first  # reshuffled every epoch
    single.set_epoch(1)
    assert list(single) == first  # and the same again for the same (seed, epoch): resumable


def test_validation_shards_cover_every_case_once():
    items = [{"image": f"case_{i}"} for i in range(5)]
    shards = [distributed.shard(items, distributed.Context(rank=r, world_size=3)) for r in range(3)]
    assert sorted(i["image"] for s in shards for i in s) == [i["image"] for i in items]
    assert [len(s) for s in shards] == [2, 2, 1]  # uneven, never padded with a duplicate
    with pytest.raises(Exception, match="fewer than the 4 processes"):
        distributed.shard(items[:3], distributed.Context(rank=0, world_size=4))


def test_linear_warm_up_climbs_from_the_single_process_rate_and_restores_the_schedule():
    from types import SimpleNamespace

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    distributed.scale_lr(optimizer, 4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.4)
    warm = distributed.LinearWarmUp(optimizer, factor=4, iterations=10)
    seen = []
    for iteration in range(1, 13):
        engine = SimpleNamespace(state=SimpleNamespace(iteration=iteration))
        warm._started(engine)
        seen.append(optimizer.param_groups[0]["lr"])
        warm._completed(engine)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.4)  # the scheduler only ever sees this
    assert seen[0] == pytest.approx(0.1)  # the single-process rate first (Goyal et al.: eta -> k*eta)
    assert seen[5] == pytest.approx(0.1 + 0.3 * 5 / 10)
    assert seen[10:] == pytest.approx([0.4, 0.4])
    assert all(a < b for a, b in zip(seen[:10], seen[1:11]))


def test_multi_gpu_options_are_checked_with_defaults():
    assert distributed.options({"epochs": 100}) == {
        "lr_scaling": True, "warmup_epochs": 5, "backend": None, "timeout_seconds": 1800}
    assert distributed.options({"epochs": 20})["warmup_epochs"] == 2  # at most a tenth of the run
    for section, message in [({"lr_scaling": "yes"}, "lr_scaling must be true or false"),
                             ({"backend": "mpi"}, "backend must be one of nccl, gloo"),
                             ({"timeout_seconds": 0}, "timeout_seconds must be a positive number")]:
        with pytest.raises(Exception, match=message):
            distributed.options({"multi_gpu": section})
    assert distributed.lr_factor(distributed.options({}), distributed.Context(world_size=4)) == 4
    assert distributed.lr_factor(distributed.options({"multi_gpu": {"lr_scaling": False}}),
                                 distributed.Context(world_size=4)) == 1
    assert distributed.lr_factor(distributed.options({}), distributed.SINGLE) == 1


def test_the_log_line_says_the_learning_rate_is_already_scaled():
    """Clara's guide had users multiply the rate by the GPU count by hand: doing that here as well gives N^2."""
    two = distributed.Context(rank=0, world_size=2, backend="gloo")
    line = distributed.parallel_summary(two, batch_size=2, factor=2, warmup_epochs=5, learning_rate=4e-3)
    assert line.startswith("data-parallel: 2 processes (gloo), batch 2 per process, 4 in all; ")
    assert "learning rate x2 (0.002 configured, 0.004 used) by multi_gpu#lr_scaling" in line
    assert "do not multiply it by the GPU count yourself" in line and line.endswith("5-epoch warm-up")
    off = distributed.parallel_summary(two, batch_size=2, factor=1, warmup_epochs=0)
    assert off.endswith("learning rate as configured (multi_gpu#lr_scaling is off)")
