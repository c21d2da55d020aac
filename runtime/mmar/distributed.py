"""Data-parallel training across processes: torchrun's environment -> a process group, and what cuts
across ranks (who writes, how data is sharded, how numbers are gathered, how the learning rate scales).

One process per GPU, launched by `torchrun` (locally `mmar train DIR --gpus N` re-launches itself under
`torch.distributed.run --standalone`; on Kubernetes the operator's pods run torchrun with the node rank
and master address). Under torchrun RANK, WORLD_SIZE, LOCAL_RANK (and LOCAL_WORLD_SIZE) are set; with
WORLD_SIZE > 1 a process group is started: NCCL on GPUs, gloo on CPU (which is how the tests run two
processes on a laptop). Without them everything here is the identity and the run is the plain
single-process one.

Config (`multi_gpu` section of config_train.json):
    lr_scaling       true: learning rate x world size (Goyal et al. 2017, arXiv 1706.02677), default true;
                     learning_rate is the single-process rate (not to be multiplied by hand as well)
    warmup_epochs    epochs over which the rate climbs linearly from the single-process rate to the
                     scaled one (default: 5, or a tenth of the run when that is shorter)
    backend          "nccl" or "gloo" (default: nccl with CUDA, else gloo)
    timeout_seconds  joining the process group and every collective operation (default 1800)
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Sequence

from mmar.errors import MMARError

DEFAULT_TIMEOUT_SECONDS = 1800
DEFAULT_WARMUP_EPOCHS = 5
BACKENDS = ("nccl", "gloo")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Context:
    """This process's place in the run. The default is the single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, training state, TensorBoard events, curves, logs and the result."""
        return self.rank == 0


SINGLE = Context()


# ---------------------------------------------------------------------------------------------- launching


def under_torchrun(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return all(name in env for name in TORCHRUN_VARIABLES)


def torchrun_command(nproc: int, module_argv: Sequence[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone ... -m mmar ARGV`: N processes on this machine.

    `--standalone` rendezvous on a free local port, so several runs on one machine never collide.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={nproc}", "-m", "mmar", *module_argv]


def check_gpus(nproc: int) -> str:
    """The backend `--gpus nproc` will use on this machine; an error if there are fewer GPUs than asked."""
    import torch

    if not torch.cuda.is_available():
        return "gloo"
    visible = torch.cuda.device_count()
    if nproc > visible:
        raise MMARError(f"--gpus {nproc}: only {visible} CUDA device(s) visible "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return "nccl"


def relaunch(nproc: int, module_argv: Sequence[str], log=print) -> int:
    """Run `mmar ARGV` as `nproc` processes under torchrun and return its exit status.

    torchrun stops every other process as soon as one exits non-zero and exits non-zero itself, naming
    the failed rank (with the error that rank recorded, see `commands/train.py`).
    """
    backend = check_gpus(nproc)
    if backend == "gloo":
        log(f"no CUDA device: --gpus {nproc} starts {nproc} CPU processes with gloo "
            "(for testing the multi-process path; slower than one process)")
    command = torchrun_command(nproc, module_argv)
    # `kill -9` of this process must not leave torchrun and its workers training (and writing) on their own
    process = subprocess.Popen(command, preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    forwarded = _forward_signals(process)
    try:
        code = process.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to torchrun too; let it stop its workers
        code = process.wait()
    finally:
        for signum, previous in forwarded.items():
            signal.signal(signum, previous)
    return code if code >= 0 else 128 - code


def die_with_parent(signum: int) -> None:
    """Ask Linux to send `signum` to this process when its parent dies (best effort, Linux only).

    torchrun starts each worker in a session of its own, so a torchrun killed with SIGKILL (OOM killer,
    `kill -9`) would leave its workers running, holding GPUs and writing into models/ beside the next run.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    prctl = getattr(libc, "prctl", None)
    if prctl is None:
        return
    parent = os.getppid()
    PR_SET_PDEATHSIG = 1  # noqa: N806 - <sys/prctl.h>
    if prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), int(signum))


def _forward_signals(process: subprocess.Popen) -> dict[int, Any]:
    """SIGTERM (a pod being stopped, `kill`) reaches torchrun, which stops its workers cleanly."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous[signum] = signal.signal(signum, lambda number, _frame: process.send_signal(number))
    return previous


# ---------------------------------------------------------------------------------------------- set-up


def options(config: dict[str, Any]) -> dict[str, Any]:
    """The checked `multi_gpu` section (read in single-process runs too, so a typo fails everywhere)."""
    section = config.get("multi_gpu") or {}
    epochs = int(config.get("epochs", 1))
    lr_scaling = section.get("lr_scaling", True)
    if not isinstance(lr_scaling, bool):
        raise MMARError(f"config: multi_gpu#lr_scaling must be true or false, got {lr_scaling!r}")
    warmup = section.get("warmup_epochs", min(DEFAULT_WARMUP_EPOCHS, epochs // 10))
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise MMARError(f"config: multi_gpu#warmup_epochs must be an integer >= 0, got {warmup!r}")
    backend = section.get("backend")
    if backend is not None and backend not in BACKENDS:
        raise MMARError(f"config: multi_gpu#backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    timeout = section.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise MMARError(f"config: multi_gpu#timeout_seconds must be a positive number, got {timeout!r}")
    return {"lr_scaling": lr_scaling, "warmup_epochs": warmup, "backend": backend, "timeout_seconds": timeout}


def setup(config: dict[str, Any], env: dict[str, str] | None = None) -> Context:
    """Join the process group torchrun's environment describes (no-op for a single process)."""
    env = os.environ if env is None else env
    opts = options(config)
    if not under_torchrun(env) or int(env["WORLD_SIZE"]) <= 1:
        return Context(timeout_seconds=opts["timeout_seconds"])
    import torch
    import torch.distributed as dist

    rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if "TORCHELASTIC_RUN_ID" in env:  # started by a torchrun agent: do not outlive it
        die_with_parent(signal.SIGKILL)
    backend = opts["backend"] or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise MMARError("config: multi_gpu#backend is nccl but no CUDA device is visible (use gloo on CPU)")
        if local_rank >= torch.cuda.device_count():
            raise MMARError(f"rank {rank}: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                            "CUDA device(s) visible: one process per GPU (torchrun --nproc-per-node <= GPUs)")
        torch.cuda.set_device(local_rank)
    ctx = Context(rank=rank, world_size=world, local_rank=local_rank, backend=backend,
                  timeout_seconds=opts["timeout_seconds"])
    if dist.is_initialized():
        return ctx
    where = f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=opts["timeout_seconds"]))
        # every rank has joined once this returns: a missing rank is reported here, not mid-epoch
        dist.barrier()
    except Exception as error:  # noqa: BLE001 - DistStoreError, RuntimeError: all mean "could not join"
        raise MMARError(
            f"rank {rank}: could not join the process group of {world} processes ({backend}, master {where}) "
            f"within {opts['timeout_seconds']:g} s (multi_gpu#timeout_seconds): {_first_line(error)}. "
            "Are all ranks started, and is the master address reachable from this node?"
        ) from None
    return ctx


def cleanup(ctx: Context) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# how a collective fails when another rank is gone (gloo, NCCL) or silent (timeout)
_PEER_GONE = ("connection closed", "connection reset", "broken pipe", "remote process exited")
_TIMED_OUT = ("timed out", "timeout")
PEER_FAILURE_GRACE_SECONDS = 10.0


@contextmanager
def explain_timeouts(ctx: Context) -> Iterator[None]:
    """A collective that timed out (a rank stuck or gone) becomes an error that says so, on this rank.

    When the collective failed because a peer died, this rank waits a moment before failing: torchrun then
    sees the peer's exit first, stops this rank, and reports the peer's error as the root cause rather
    than this rank's consequential one.
    """
    try:
        yield
    except MMARError:
        raise
    except Exception as error:  # noqa: BLE001
        text = str(error).lower()
        peer_gone = any(word in text for word in _PEER_GONE)
        if not ctx.enabled or not (peer_gone or any(word in text for word in _TIMED_OUT)):
            raise
        if peer_gone:
            import time

            time.sleep(PEER_FAILURE_GRACE_SECONDS)
        raise MMARError(
            f"rank {ctx.rank}: a collective operation with the other {ctx.world_size - 1} process(es) failed "
            f"or did not complete within {ctx.timeout_seconds:g} s (multi_gpu#timeout_seconds): "
            f"{_first_line(error)}. Another rank probably failed first: look for its error above."
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else type(error).__name__


# ---------------------------------------------------------------------------------------------- model & data


def wrap(network, ctx: Context, device):
    """DistributedDataParallel around `network` (its weights are broadcast from rank 0 here)."""
    if not ctx.enabled:
        return network
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)


def train_sampler(dataset, ctx: Context, seed: int):
    """Each rank's shard of a permutation drawn from (seed, epoch); `EpochBatches` sets the epoch.

    A single process uses the same sampler with one replica, so with the same seed the global batches are
    the same whatever the number of processes (rank r of N takes samples r, r+N, ... of the permutation).
    The shards are padded to equal length (training needs the same number of steps on every rank).
    """
    from monai.data import DistributedSampler

    return DistributedSampler(dataset, even_divisible=True, num_replicas=ctx.world_size, rank=ctx.rank,
                              shuffle=True, seed=seed)


def shard(items: Sequence[Any], ctx: Context) -> list[Any]:
    """This rank's share of the validation items: interleaved, not padded (a duplicated case would bias
    the gathered metric). MONAI's metrics gather their per-case buffers across ranks on aggregation."""
    if not ctx.enabled:
        return list(items)
    if len(items) < ctx.world_size:
        raise MMARError(f"the validation list has {len(items)} case(s), fewer than the {ctx.world_size} "
                        "processes: every process validates a share; use fewer processes or more cases")
    from monai.data import partition_dataset

    return list(partition_dataset(list(items), num_partitions=ctx.world_size, shuffle=False,
                                  even_divisible=False)[ctx.rank])


def shared_seed(seed: int | None, ctx: Context) -> int:
    """The configured seed, else one drawn on rank 0 and shared (all ranks must shuffle alike)."""
    if seed is not None:
        return int(seed)
    drawn = random.SystemRandom().randrange(1 << 31)
    return int(broadcast_object(drawn, ctx))


# ---------------------------------------------------------------------------------------------- gathering


def _device(ctx: Context):
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if ctx.backend == "nccl" else torch.device("cpu")


def sum_across(values: Sequence[float], ctx: Context) -> list[float]:
    """Element-wise sum of `values` over all ranks (every rank gets the result)."""
    if not ctx.enabled:
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device(ctx))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def max_across(value: float, ctx: Context) -> float:
    if not ctx.enabled:
        return float(value)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_device(ctx))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def broadcast_object(obj: Any, ctx: Context) -> Any:
    """Rank 0's `obj` on every rank (e.g. the training state: only rank 0 needs to see models/)."""
    if not ctx.enabled:
        return obj
    import torch.distributed as dist

    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, device=_device(ctx) if ctx.backend == "nccl" else None)
    return box[0]


# ---------------------------------------------------------------------------------------------- learning rate


def lr_factor(opts: dict[str, Any], ctx: Context) -> int:
    """Linear scaling rule: N processes take N times larger global batches, so N times larger steps."""
    return ctx.world_size if opts["lr_scaling"] and ctx.enabled else 1


def parallel_summary(ctx: Context, batch_size: int, factor: int, warmup_epochs: int,
                     learning_rate: float | None = None) -> str:
    """The log line of a data-parallel run: batches, and the learning rate it really uses.

    Clara's guide told users to multiply the learning rate by the GPU count themselves; here that is done by
    default, so the line says so: a user who also does it by hand trains with N squared times the rate.
    """
    line = (f"data-parallel: {ctx.world_size} processes ({ctx.backend}), batch {batch_size} per process, "
            f"{batch_size * ctx.world_size} in all; ")
    if factor == 1:
        return line + "learning rate as configured (multi_gpu#lr_scaling is off)"
    rate = "" if learning_rate is None else f" ({learning_rate / factor:g} configured, {learning_rate:g} used)"
    line += (f"learning rate x{factor}{rate} by multi_gpu#lr_scaling (linear scaling rule, arXiv 1706.02677): "
             f"configure the single-GPU rate, do not multiply it by the GPU count yourself")
    return line + (f"; reached after a {warmup_epochs}-epoch warm-up" if warmup_epochs else "; no warm-up")


def scale_lr(optimizer, factor: float) -> None:
    """Multiply every parameter group's rate; call before any scheduler is built (it reads them)."""
    if factor == 1:
        return
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * factor


class LinearWarmUp:
    """Gradual warm-up (Goyal et al., section 2.2): the rate climbs linearly, per iteration, from the
    single-process rate (scheduled / factor) to the scaled one over `iterations` iterations.

    Only the iteration's step sees the warmed rate: the scheduled rate is put back after each iteration,
    so any epoch-level scheduler, the saved training state and the logged rate see the schedule alone,
    and a resumed run warms up exactly as an unbroken one (the multiplier depends on the iteration only).
    """

    def __init__(self, optimizer, factor: float, iterations: int):
        self.optimizer, self.factor, self.iterations = optimizer, float(factor), int(iterations)
        self._scheduled: list[float] | None = None

    def multiplier(self, iteration: int) -> float:
        """For the `iteration`-th iteration (1-based, as ignite counts)."""
        if self.factor == 1 or iteration > self.iterations:
            return 1.0
        progress = (iteration - 1) / self.iterations
        return (1 + (self.factor - 1) * progress) / self.factor

    def attach(self, trainer) -> None:
        from ignite.engine import Events

        if self.factor == 1 or self.iterations <= 0:
            return
        trainer.add_event_handler(Events.ITERATION_STARTED, self._started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._completed)

    def _started(self, trainer) -> None:
        scale = self.multiplier(trainer.state.iteration)
        self._scheduled = [group["lr"] for group in self.optimizer.param_groups]
        for group, lr in zip(self.optimizer.param_groups, self._scheduled):
            group["lr"] = lr * scale

    def _completed(self, trainer) -> None:
        if self._scheduled is not None:
            for group, lr in zip(self.optimizer.param_groups, self._scheduled):
                group["lr"] = lr
            self._scheduled = None


# ------------------------------------------------------------------------------------- multi-node


DEFAULT_RESOLVE_SECONDS = 180


def wait_for_address(host: str, seconds: float, *, resolve: Any = None, sleep: Any = None,
                     clock: Any = None) -> str:
    """Wait until `host` (rank 0's name, PET_MASTER_ADDR) resolves, at most `seconds`; return its address.

    On Kubernetes a multi-node step's pods find rank 0 by its headless-Service name. Without working cluster
    DNS, torchrun's rendezvous retries `Temporary failure in name resolution` for many minutes while the
    step looks like it runs: the operator renders this wait as an init container, so the step fails after
    `seconds` with a message that names the name and why."""
    import socket
    import time

    resolve = resolve or socket.getaddrinfo
    sleep = sleep or time.sleep
    clock = clock or time.monotonic
    start = clock()
    while True:
        try:
            return str(resolve(host, None)[0][4][0])
        except OSError as error:
            if clock() - start >= seconds:
                raise MMARError(
                    f"rank 0's address {host} did not resolve within {seconds:g} s ({error}): the cluster DNS does "
                    "not answer for the pods of the step's headless Service (check the cluster's DNS, e.g. CoreDNS, "
                    "and that the pods' subdomain names the Service)") from None
            sleep(min(2.0, max(0.1, seconds / 50)))


def _main(argv: Sequence[str]) -> int:
    """`python -m mmar.distributed wait-for-address HOST SECONDS`: exit 1 with the reason in
    /dev/termination-log (when writable) and on stderr if HOST does not resolve in time."""
    if len(argv) != 3 or argv[0] != "wait-for-address":
        print("usage: python -m mmar.distributed wait-for-address HOST SECONDS", file=sys.stderr)
        return 2
    try:
        address = wait_for_address(argv[1], float(argv[2]))
    except MMARError as error:
        message = f"error: {error}"
        print(message, file=sys.stderr)
        try:
            with open("/dev/termination-log", "w", encoding="utf-8") as log:
                log.write(message)
        except OSError:
            pass
        return 1
    print(f"rank 0 ({argv[1]}) is at {address}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
