"""A killed run loses nothing: atomic files, step-seeded randomness, and a SIGKILLed fit that resumes to the
uninterrupted run's weights bit for bit."""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tarkit.resumable import StepSeeds, atomic_write

TARKIT = str(Path(sys.executable).parent / "tarkit")
TATOK = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "tatok.yaml")


def test_atomic_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_write(target) as handle:
        handle.write(b"new")
        assert target.read_bytes() == b"old"  # nothing visible until the write is complete
    assert target.read_bytes() == b"new" and list(tmp_path.iterdir()) == [target]


def test_an_error_while_writing_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write(b"half")
        raise RuntimeError("the writer failed")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_a_process_killed_mid_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"the previous checkpoint")
    script = f"""
        import os, signal
        from tarkit.resumable import atomic_write
        with atomic_write({str(target)!r}) as handle:
            handle.write(b"half of a new one")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"the previous checkpoint"  # the next resume reads a whole file


def test_step_seeds_make_a_steps_draws_independent_of_what_ran_before(monkeypatch):
    class Trainer:
        current_epoch, global_rank = 1, 0

    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    draws = []
    for history in (0, 5):
        torch.rand(history)  # whatever ran before: other steps, validation, a sanity check
        StepSeeds().on_train_batch_start(Trainer(), None, None, batch_idx=3)
        draws.append(torch.rand(4))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
    StepSeeds().on_train_batch_start(Trainer(), None, None, batch_idx=4)
    assert not torch.equal(torch.rand(4), draws[0])  # the next step draws anew


UNTRAINED_ENCODER = Path(__file__).resolve().parent / "fixtures" / "untrained_encoder.yaml"


def fit(root: Path, *extra: str) -> subprocess.Popen:
    """The tiny TA-Tok recipe over an untrained tiny encoder: stochastic quantization, a scale drawn per step,
    warmup and AdamW, all of which a resume must carry on exactly."""
    args = [TARKIT, "--root", str(root), "fit", "--config", TATOK, "--trainer.max_steps=130",
            "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--data.init_args.batch_size=8",
            "--config", str(UNTRAINED_ENCODER), *extra]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err


def test_a_fit_killed_mid_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """SIGKILL after the step-100 checkpoint, resume with --ckpt_path last: the exported weights equal those of
    a run never stopped (data order, optimizer, scheduler and randomness all carried across)."""
    finish(fit(tmp_path / "whole"))

    killed = fit(tmp_path / "killed")
    last = tmp_path / "killed" / "runs" / "tatok" / "checkpoints" / "last.ckpt"
    while not last.exists():
        assert killed.poll() is None, killed.stderr.read()
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "checkpoints" / "tatok").exists()  # it died before its export
    assert torch.load(last, weights_only=True)["global_step"] == 100

    finish(fit(tmp_path / "killed", "--ckpt_path=last"))
    whole, resumed = (load_file(tmp_path / run / "checkpoints" / "tatok" / "model.safetensors")
                      for run in ("whole", "killed"))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)
    assert not list(last.parent.glob("*.partial"))
