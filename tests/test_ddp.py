"""Training on many processes: a 2-process DDP fit (gloo, CPU) of the tiny teacher trains what one process trains
at the same global batch, and under FSDP the export at fit end writes whole weights, not rank 0's shard.

Both runs use Lightning's ``ddp`` strategy, the reference with one device, so both read the training set through the
``DistributedSampler`` Lightning puts in (seeded by ``seed_everything``): its permutation is the same for any world
size, and rank ``r`` takes every other index of it, so the two ranks' batches of step ``k`` together are exactly the
reference's batch ``k`` (same samples per step). The default single-device strategy keeps the datamodule's own
shuffled sampler, another permutation, so it would compare different batches.

What must then agree: DDP averages the two ranks' gradients, which equals the full batch's gradient for a loss that
is a mean over samples (the dense term) and, because the teacher gathers every rank's captions as negatives
(``tarkit_plugins.tatok.teacher.gather_captions``), for SigLIP's pairwise loss too; the logged losses are averaged
over the ranks (``sync_dist``). Left are float rounding differences (sums in another order, batch-size-dependent
kernels), measured at most 1.3e-7 relative over the 6 steps. The tolerance, 1e-4 relative, is far above that and
far below what a wrong equivalence gives: with each rank's own 4 captions as its only negatives (no gather) the
2-process curve leaves the reference by 1e-3 at step 1 and 22 % at step 5 (loss 2.99 against 3.83).
"""

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from .test_training import TinyModel, TinyModule

ROOT = Path(__file__).resolve().parents[1]
TARKIT = str(Path(sys.executable).parent / "tarkit")
TEACHER = str(ROOT / "recipes" / "tiny" / "teacher.yaml")
GLOBAL_BATCH, STEPS = 8, 6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fit(root: Path, devices: int) -> str:
    """A short teacher fit on ``devices`` CPU processes at ``GLOBAL_BATCH / devices`` each; returns its output."""
    # Nothing of an enclosing cluster or launcher may leak in: Lightning would take its ranks from them.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_"))}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(name, None)
    env.update(MASTER_PORT=str(free_port()), TARKIT_NUM_THREADS="1")
    result = subprocess.run(
        [TARKIT, "--verbose", "--root", str(root), "fit", "--config", TEACHER,
         f"--trainer.max_steps={STEPS}", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
         "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
         "--trainer.strategy=ddp", "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
         f"--data.init_args.batch_size={GLOBAL_BATCH // devices}"],
        capture_output=True, text=True, env=env, timeout=300, cwd=root,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def curves(root: Path) -> dict[str, dict[int, float]]:
    """Each logged ``train/`` and ``val/`` loss by step, from the run's only CSV log."""
    (log,) = (root / "runs" / "teacher" / "csv").glob("version_*/metrics.csv")
    out: dict[str, dict[int, float]] = {}
    with log.open() as rows:
        for row in csv.DictReader(rows):
            for key in ("train/loss", "train/dense_loss", "val/loss"):
                if row.get(key):
                    out.setdefault(key, {})[int(row["step"])] = float(row[key])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    roots = {devices: tmp_path_factory.mktemp(f"ddp{devices}") for devices in (1, 2)}
    outputs = {devices: fit(root, devices) for devices, root in roots.items()}
    for devices, output in outputs.items():  # what Lightning's rank 0 prints once every rank has joined the group
        assert f"gloo\nAll distributed processes registered. Starting with {devices} processes" in output
    return roots


def test_two_processes_train_what_one_trains_at_the_same_global_batch(runs: dict[int, Path]) -> None:
    one, two = curves(runs[1]), curves(runs[2])
    assert sorted(one["train/loss"]) == sorted(two["train/loss"]) == list(range(STEPS))
    assert sorted(one["val/loss"]) == sorted(two["val/loss"]) == [2, 5]  # validation after steps 3 and 6
    for key in one:
        for step, loss in one[key].items():
            assert two[key][step] == pytest.approx(loss, rel=1e-4), (key, step)
    assert one["train/loss"][STEPS - 1] < one["train/loss"][0] - 5  # it trained: the comparison is not of two inits


def test_rank_zero_exports_and_checkpoints_once(runs: dict[int, Path]) -> None:
    from safetensors.torch import load_file

    shapes = {}
    for devices, root in runs.items():
        folder = root / "checkpoints" / "teacher"
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        shapes[devices] = {name: w.shape for name, w in load_file(folder / "model.safetensors").items()}
        assert (root / "runs" / "teacher" / "checkpoints" / "last.ckpt").exists()
    assert shapes[1] == shapes[2] and shapes[1]  # whole, not a half-written file of two racing writers


def export_under_fsdp(rank: int, port: int, folder: str) -> None:
    """One of 2 ranks: a TarkitModule wrapped in FSDP (sharded over the ranks, as Lightning's FSDPStrategy wraps it)
    ends its fit; rank 0 exports."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    module = TinyModule(export_dir=folder)
    strategy = FSDPStrategy()
    strategy.model = FSDP(module, use_orig_params=True, device_id=torch.device("cpu"))
    assert module.model.linear.weight.shape != (4, 4)  # each rank holds a flat shard: rank 0 alone has no whole weight
    module.trainer = SimpleNamespace(strategy=strategy, is_global_zero=rank == 0)
    module.on_fit_end()
    torch.distributed.destroy_process_group()


def test_the_export_under_fsdp_writes_the_whole_weights(tmp_path: Path) -> None:
    # Lightning's FSDPStrategy wants a GPU; torch's FSDP itself runs on CPU with gloo, which is what the export meets
    torch.multiprocessing.spawn(export_under_fsdp, args=(free_port(), str(tmp_path / "export")), nprocs=2)
    torch.manual_seed(0)
    expected = TinyModule().model.state_dict()
    exported = TinyModel.from_pretrained(tmp_path / "export").state_dict()
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[name], weight) for name, weight in expected.items())
