"""The checkpoint folder: atomic publication, a save killed midway, retention, and the one-line mistakes."""

import multiprocessing
import os
import signal

import pytest

import pretrain_dit
from dit.checkpoint.files import TRACKER, read_tracker, retain, write_tracker
from dit.training import checkpointing
from dit.training.arguments import load_run_config
from dit.training.pretrain import pretrain
from dit.training.run_config import CheckpointConfig
from tests.distributed import RankFailed, pretrain_main, run_distributed
from tests.tiny_data import TINY_RUN, good_entries, write_dataset

FLAGS = TINY_RUN


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return str(write_dataset(tmp_path_factory.mktemp("files"), good_entries(24, seed=9)))


def test_tracker_and_retention(tmp_path):
    for it in (2, 4, 6, 8):
        (tmp_path / f"iter_{it:07d}").mkdir()
    (tmp_path / "iter_0000010.partial").mkdir()
    write_tracker(tmp_path, 4)  # e.g. --ckpt-step went back to 4
    assert read_tracker(tmp_path) == 4 and not (tmp_path / (TRACKER + ".tmp")).exists()
    retain(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "iter_0000004",
        "iter_0000006",
        "iter_0000008",
        "iter_0000010.partial",
    ]  # the tracker's one is kept
    assert read_tracker(tmp_path / "nowhere") is None


def _train(data_path: str, extra: list[str], die_on_save: int | None = None) -> dict:
    """The real loop; with ``die_on_save``, rank 1 is SIGKILLed inside that save, after writing its shards
    and before the checkpoint is published."""
    import torch.distributed as dist

    if die_on_save is not None:
        real_save, calls = checkpointing.dist_checkpointing.save, []

        def save(*args, **kwargs):
            calls.append(1)
            result = real_save(*args, **kwargs)
            if len(calls) == die_on_save and dist.get_rank() == 1:
                for child in multiprocessing.active_children():  # the checkpoint writer's helpers die with it
                    child.kill()
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        checkpointing.dist_checkpointing.save = save
    run = load_run_config(FLAGS + ["--data-path", data_path] + extra, dist.get_world_size())
    result = pretrain(run, pretrain_dit.HOOKS)
    return {
        "iteration": result.state.iteration,
        "losses": {r.iteration: r.loss for r in result.history},
        "exit": result.exit_reason,
        "helpers": [child.name for child in multiprocessing.active_children()],
        "results_manager": checkpointing.filesystem_async._results_queue is not None,
    }


@pytest.mark.dist
def test_a_save_killed_midway_leaves_the_last_checkpoint(tmp_path, dataset):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(RankFailed, match="rank 1 of 2 died"):
        run_distributed(
            _train, 2, dataset, ["--save", str(ckpt), "--save-interval", "2", "--train-iters", "4"], 2, timeout=120
        )
    assert read_tracker(ckpt) == 2  # unchanged: the save of iteration 4 never published
    assert (ckpt / "iter_0000004.partial").is_dir() and not (ckpt / "iter_0000004").exists()
    resumed = run_distributed(_train, 2, dataset, ["--save", str(ckpt), "--save-interval", "2", "--train-iters", "4"])
    assert all(sorted(r["losses"]) == [3, 4] for r in resumed)  # from iteration 2
    assert read_tracker(ckpt) == 4 and not (ckpt / "iter_0000004.partial").exists()


@pytest.mark.slow
def test_exit_interval_saves_and_stops(tmp_path, dataset):
    r = run_distributed(
        _train,
        1,
        dataset,
        ["--save", str(tmp_path), "--train-iters", "10", "--exit-interval", "3", "--save-interval", "100"],
    )[0]
    assert r["iteration"] == 3 and r["exit"] == "--exit-interval 3" and read_tracker(tmp_path) == 3
    # a synchronous save starts no process: Megatron's results Manager costs each rank seconds of CPU
    assert r["helpers"] == [] and not r["results_manager"]


def _error_line(capfd, *argv: str) -> str:
    """pretrain_dit.py's main on one rank of the harness: it must exit 2 with one line and no traceback."""
    capfd.readouterr()
    assert run_distributed(pretrain_main, 1, [*FLAGS, *argv]) == [2]
    out = capfd.readouterr().out
    assert "Traceback" not in out
    return out.strip().splitlines()[-1]


@pytest.mark.slow
def test_checkpoint_mistakes_are_one_line(tmp_path, dataset, capfd):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _error_line(capfd, "--data-path", dataset, "--load", str(empty)) == (
        f"pretrain_dit.py: error: --load: {empty} holds no checkpoint (no {TRACKER}); point it at a --save folder "
        "of an earlier run, or drop --load to start from scratch"
    )
    ckpt = tmp_path / "ckpt"
    assert run_distributed(_train, 1, dataset, ["--save", str(ckpt), "--train-iters", "2"])[0]["iteration"] == 2
    assert _error_line(capfd, "--data-path", dataset, "--load", str(ckpt), "--hidden-size", "96") == (
        f"pretrain_dit.py: error: --hidden-size: the checkpoint {ckpt / 'iter_0000002'} was trained with "
        "48, this run has 96; set it to 48 (or start from scratch)"
    )
    assert _error_line(capfd, "--data-path", dataset, "--load", str(ckpt), "--ckpt-step", "7") == (
        f"pretrain_dit.py: error: --ckpt-step: {ckpt / 'iter_0000007'} is not a complete checkpoint; pick "
        "another --ckpt-step"
    )


class Crash(Exception):
    """The process dying before a filesystem change (a rename or a delete) happens."""


def _publish_dying_at(root, crash_at: int, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Rank 0's publication of iteration 4 over a --save folder whose tracker names 2, with --save-retain 1,
    dying before its ``crash_at``-th rename or delete; True when it died."""
    for it in (2, 4):
        folder = root / (f"iter_{it:07d}" + (".partial" if it == 4 else ""))
        folder.mkdir()
        (folder / "metadata.json").write_text("{}")
    write_tracker(root, 2)
    changes = {"n": 0}

    def dying(change):
        def wrapper(*a, **kw):
            changes["n"] += 1
            if changes["n"] == crash_at:
                raise Crash
            return change(*a, **kw)

        return wrapper

    with monkeypatch.context() as m:
        m.setattr(os, "replace", dying(os.replace))
        m.setattr(checkpointing.shutil, "rmtree", dying(checkpointing.shutil.rmtree))
        saver = checkpointing.Checkpointer(CheckpointConfig(save=str(root), save_retain=1))
        try:
            saver._publish(root / "iter_0000004.partial", root / "iter_0000004", 4, 0.0)
        except Crash:
            return True
    return False


def test_a_crash_at_any_point_of_publication_leaves_the_tracker_on_a_complete_checkpoint(
    single_process, tmp_path, monkeypatch
):
    """Killed before each rename or delete of the publication (folder rename, tracker replace, retention), the
    tracker names a checkpoint that is on disk; the last run completes it."""
    crash_at = 1
    while True:
        root = tmp_path / str(crash_at)
        root.mkdir()
        died = _publish_dying_at(root, crash_at, monkeypatch)
        tracker = read_tracker(root)
        assert (root / f"iter_{tracker:07d}" / "metadata.json").is_file(), (crash_at, sorted(os.listdir(root)))
        if not died:
            break
        crash_at += 1
    assert crash_at == 4 and tracker == 4  # three changes, all made
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000004", TRACKER]
