"""Distributed updates with Ray Train: one long-lived TorchTrainer (DDP) per trainer process.

Starting Ray and a TorchTrainer costs tens of seconds, so :class:`RayLearner` does both once:
``ray.init`` (loopback, no dashboard, or ``settings.ray_address`` for a cluster) and one
``TorchTrainer.fit()`` whose workers hold a DDP-wrapped :class:`RouterNet` (gloo on CPU,
NCCL on GPUs) and serve updates from Ray queues until told to stop. Each
:meth:`RayLearner.update` puts the same request (initial weights, the dataset as an object
ref, epochs) in every worker's queue; each rank trains on its shard, gradients are
all-reduced by DDP, and rank 0 answers with the new weights and the all-reduced loss.
The same code runs on a laptop and on a Ray cluster; only ``ray_address`` changes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.queue import Empty, Queue

from stormline.settings import Settings
from stormline.trainer.policy import Dataset, PolicyConfig, RouterNet, state_to_cpu, weighted_mse

log = logging.getLogger("stormline.trainer.ray")
REPO_ROOT = Path(__file__).resolve().parent.parent


class LearnerError(RuntimeError):
    pass


@dataclass
class UpdateResult:
    state: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


def _shippable_package() -> str:
    """This process's Stormline as something Ray can ship to a cluster's workers.

    Installed from a wheel, the ``stormline`` folder holds every part. From a source checkout
    (an editable install) the card's folders sit beside it and only map into the namespace
    when installed, so ship a wheel built from the checkout instead (setuptools, offline, <1 s).
    """
    import shutil
    import tempfile

    import stormline

    package = Path(stormline.__file__).resolve().parent
    if not (package.parent / "pyproject.toml").exists():
        return str(package)
    from setuptools import build_meta

    out, cwd = tempfile.mkdtemp(prefix="stormline-wheel-"), os.getcwd()
    os.chdir(package.parent)
    try:
        name = build_meta.build_wheel(out)
    finally:
        os.chdir(cwd)
        shutil.rmtree(package.parent / "build", ignore_errors=True)
    return str(Path(out) / name)


def start_ray(settings: Settings) -> None:
    """Start (or join) Ray once per process; later calls are no-ops."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only; no token file churn
    if settings.ray_address:
        # A cluster: its workers import stormline.* from the code this process runs.
        ray.init(
            address=settings.ray_address,
            runtime_env={"py_modules": [_shippable_package()]},
            log_to_driver=False,
        )
        return
    ray.init(
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        num_cpus=settings.ray_num_cpus,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
        log_to_driver=False,
    )


def _use_gpu(settings: Settings) -> bool:
    if settings.ray_use_gpu is not None:
        return settings.ray_use_gpu
    return torch.cuda.is_available() or _cluster_gpus() >= 1


def _cluster_gpus() -> float:
    """GPUs in the Ray cluster (0 when it has none)."""
    resources = ray.cluster_resources()
    return float(resources.get("GPU", 0))


# ----------------------------------------------------------------- the worker loop --
def _worker_loop(config: dict[str, Any]) -> None:
    """Runs inside each Ray Train worker for the lifetime of the learner."""
    import ray.train
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    requests: Queue = config["requests"][rank]
    results: Queue = config["results"]
    cfg = PolicyConfig.from_dict(config["policy"])
    torch.manual_seed(config["seed"])
    model = ray.train.torch.prepare_model(RouterNet(cfg))
    while True:
        req = requests.get(block=True)
        if req["op"] == "stop":
            break
        if req["op"] == "ping":
            if rank == 0:
                results.put({"id": req["id"], "state": None, "metrics": {"workers": float(world)}})
            continue
        t0 = time.perf_counter()
        first, last, n = _update(model, cfg, req, rank, world)
        if rank == 0:
            results.put(
                {
                    "id": req["id"],
                    "state": state_to_cpu(model),
                    "metrics": {
                        "train_loss_first_epoch": first,
                        "train_loss": last,
                        "train_samples": float(n * req["epochs"]),
                        "train_seconds": time.perf_counter() - t0,
                        "workers": float(world),
                    },
                }
            )


def _update(
    model: torch.nn.Module, cfg: PolicyConfig, req: dict[str, Any], rank: int, world: int
) -> tuple[float, float, int]:
    """One update request on this rank: (first epoch's loss, last epoch's loss, samples).

    The losses are all-reduced over the ranks, so every rank returns the same numbers.
    """
    inner = getattr(model, "module", model)
    device = next(inner.parameters()).device
    if req["state"] is not None:
        inner.load_state_dict(req["state"])
    else:  # from scratch: same seed on every rank keeps replicas identical
        torch.manual_seed(req["seed"])
        inner.load_state_dict(RouterNet(cfg).state_dict())
    data: Dataset = ray.get(req["data"])
    n, bs = len(data), req["batch_size"]
    # Every rank must take the same number of steps or DDP's all-reduce would hang, so
    # the shard is the rank's stride of the data, wrapped to a common length.
    steps = max(1, math.ceil(n / (world * bs)))
    opt = torch.optim.Adam(model.parameters(), lr=req["lr"])
    g = torch.Generator().manual_seed(req["seed"])
    first = last = float("nan")
    for epoch in range(req["epochs"]):
        perm = torch.randperm(n, generator=g)  # same permutation on every rank
        shard = perm[rank::world]
        if len(shard) == 0:
            shard = perm[:1]
        idx = shard.repeat(math.ceil(steps * bs / len(shard)))[: steps * bs]
        mean = _epoch(model, opt, data, idx, steps, bs, device)
        if epoch == 0:
            first = mean
        last = mean
    return first, last, n


def _epoch(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    data: Dataset,
    idx: torch.Tensor,
    steps: int,
    bs: int,
    device: torch.device,
) -> float:
    """Train ``steps`` batches of ``bs`` of ``idx``; the mean loss over all ranks."""
    model.train()
    total = torch.zeros(2, device=device)
    for s in range(steps):
        b = idx[s * bs : (s + 1) * bs].numpy()
        task = torch.from_numpy(data.task[b]).to(device)
        agent = torch.from_numpy(data.agent[b]).to(device)
        r = torch.from_numpy(data.reward[b]).to(device)
        w = torch.from_numpy(data.weight[b]).to(device)
        loss = weighted_mse(model(task, agent), r, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += torch.stack([loss.detach() * len(b), torch.tensor(len(b), device=device)])
    torch.distributed.all_reduce(total)
    return float(total[0] / total[1])


# ---------------------------------------------------------------------- the driver --
class RayLearner:
    """A started TorchTrainer that trains on demand. Use as a context manager or close()."""

    def __init__(
        self,
        settings: Settings,
        cfg: PolicyConfig,
        *,
        num_workers: int | None = None,
        seed: int = 0,
    ) -> None:
        self.settings = settings
        self.cfg = cfg
        self.num_workers = num_workers or settings.ray_num_workers
        self.seed = seed
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._requests: list[Queue] = []
        self._results: Queue | None = None

    def start(self) -> RayLearner:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        start_ray(self.settings)
        use_gpu = _use_gpu(self.settings)
        gpus = int(_cluster_gpus())
        if use_gpu and 0 < gpus < self.num_workers:
            # One DDP rank per GPU: NCCL refuses two ranks on one device.
            log.info("only %d GPU(s): using %d workers", gpus, gpus)
            self.num_workers = gpus
        opts = {"num_cpus": 0}
        self._requests = [Queue(actor_options=opts) for _ in range(self.num_workers)]
        self._results = Queue(actor_options=opts)
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={
                "requests": self._requests,
                "results": self._results,
                "policy": self.cfg.to_dict(),
                "seed": self.seed,
            },
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=self.num_workers, use_gpu=use_gpu),
            run_config=RunConfig(
                name=f"stormline-trainer-{uuid.uuid4().hex[:8]}",
                storage_path=str(Path(self.settings.data_dir).resolve() / "ray"),
            ),
        )

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as exc:  # surfaced by update()
                self._error = exc

        self._thread = threading.Thread(target=fit, name="torch-trainer", daemon=True)
        self._thread.start()
        log.info("TorchTrainer started: %d workers, gpu=%s", self.num_workers, use_gpu)
        return self

    def update(
        self,
        data: Dataset,
        *,
        init_state: dict[str, torch.Tensor] | None,
        epochs: int,
        batch_size: int,
        lr: float,
        timeout: float = 600.0,
        seed: int | None = None,
    ) -> UpdateResult:
        return self._call(
            {
                "op": "train",
                "state": init_state,
                "data": ray.put(data),
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": lr,
                "seed": self.seed if seed is None else seed,
            },
            timeout,
        )

    def ready(self, timeout: float = 600.0) -> RayLearner:
        """Block until every worker is up and serving (the first start takes a while)."""
        self._call({"op": "ping"}, timeout)
        return self

    def _call(self, req: dict[str, Any], timeout: float) -> UpdateResult:
        if self._results is None:
            raise LearnerError("RayLearner used before start()")
        req = {"id": uuid.uuid4().hex, **req}
        for q in self._requests:
            q.put(req)
        deadline = time.monotonic() + timeout
        while True:
            if self._error is not None or (self._thread and not self._thread.is_alive()):
                raise LearnerError(f"the Ray TorchTrainer stopped: {self._error!r}")
            try:
                out = self._results.get(block=True, timeout=1.0)
            except Empty:
                if time.monotonic() > deadline:
                    raise LearnerError(
                        f"no update from the Ray workers within {timeout}s"
                    ) from None
                continue
            if out["id"] == req["id"]:
                return UpdateResult(out["state"], out["metrics"])

    def close(self, timeout: float = 60.0) -> None:
        for q in self._requests:
            with contextlib.suppress(Exception):  # the queue actor may be gone already
                q.put({"op": "stop"})
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None
        self._results = None

    def __enter__(self) -> RayLearner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
