"""The one configuration layer: only the command line reads a Namespace, a user's mistake is one line found at
launch (``--validate-only`` included), and any other exception keeps its traceback."""

import ast
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests.launch import ROOT
from tests.tiny_data import TINY_RUN as TINY
from tests.tiny_data import good_entries, payloads, write_dataset

COMMAND_LINES = {
    "dit/training/arguments.py",
    "dit/training/main.py",
    "dit/generate.py",
    "dit/convert.py",
    "data/report.py",
    "data/prepare.py",
    "data/digits.py",
    "data/digits_score.py",
    "data/synthetic.py",
}
"""The modules that own a command line: the only ones that may hold an argparse Namespace."""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return str(write_dataset(tmp_path_factory.mktemp("ds"), good_entries(16, seed=9)))


def _labelled(root: Path, labels: list[int], channels: int = 4) -> str:
    entries = [
        (
            f"img_{i:03d}",
            payloads(
                (channels, 2, 2 + 2 * (i % 2)), seed=i, meta={"caption": "x", "height": 16, "width": 16, "label": label}
            ),
        )
        for i, label in enumerate(labels)
    ]
    return str(write_dataset(root, entries))


def _main(capsys, *argv: str) -> tuple[int, str]:
    """pretrain_dit.py's main in this process: its status and the last line it printed to stderr."""
    import pretrain_dit
    from dit.training.main import main

    capsys.readouterr()
    status = main(pretrain_dit.HOOKS, list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err.strip().splitlines()[-1] if err.strip() else ""


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "pretrain_dit.py"), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _reads_a_namespace(tree: ast.AST) -> list[str]:
    """Where a module names argparse's Namespace, or reads ``args.<x>`` / ``<y>.args``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(a.name == "argparse" for a in node.names):
            found.append(f"line {node.lineno}: imports argparse")
        elif isinstance(node, ast.Attribute) and node.attr == "Namespace":
            found.append(f"line {node.lineno}: argparse.Namespace")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
            found.append(f"line {node.lineno}: args.{node.attr}")
        elif isinstance(node, ast.Attribute) and node.attr == "args" and not isinstance(node.ctx, ast.Store):
            found.append(f"line {node.lineno}: .args")
    return found


def test_no_module_below_the_command_line_reads_a_namespace():
    """Arguments become a RunConfig once (dit.training.arguments.run_config); everything else takes configs."""
    readers = {}
    for path in sorted([*ROOT.glob("dit/**/*.py"), *ROOT.glob("data/**/*.py")]):
        name = path.relative_to(ROOT).as_posix()
        if name not in COMMAND_LINES:
            found = _reads_a_namespace(ast.parse(path.read_text()))
            if found:
                readers[name] = found
    assert readers == {}
    assert _reads_a_namespace(ast.parse("def f(args):\n    return args.lr\n"))  # the scan sees a reader


@pytest.mark.slow
def test_validate_only_checks_the_checkpoint_flags(tmp_path, dataset, capsys):
    """--save under a file, --load without a checkpoint, --ckpt-step of none and --finetune with nothing to load
    each passed --validate-only and failed (or trained from scratch) once launched."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    base = [*TINY, "--data-path", dataset, "--validate-only"]
    out = _run(*base, "--save", str(tmp_path / "file" / "ckpt"))
    assert (out.returncode, out.stderr.strip()) == (
        2,
        f"pretrain_dit.py: error: --save: {tmp_path / 'file' / 'ckpt'} is under {tmp_path / 'file'}, which is a "
        "file; give a directory",
    )
    assert _main(capsys, *base, "--load", str(tmp_path / "empty")) == (
        2,
        f"pretrain_dit.py: error: --load: {tmp_path / 'empty'} holds no checkpoint (no "
        "latest_checkpointed_iteration.txt); point it at a --save folder of an earlier run, or drop --load to "
        "start from scratch",
    )
    assert _main(capsys, *base, "--save", str(tmp_path / "empty"), "--ckpt-step", "3") == (
        2,
        f"pretrain_dit.py: error: --ckpt-step: {tmp_path / 'empty' / 'iter_0000003'} is not a complete checkpoint; "
        "pick another --ckpt-step",
    )
    assert _main(capsys, *base, "--save", str(tmp_path / "empty"), "--finetune") == (
        2,
        f"pretrain_dit.py: error: --finetune: needs a checkpoint to load, and --save {tmp_path / 'empty'} holds "
        "none: pass --load DIR (a --save folder of an earlier run), or drop the flag to train from scratch",
    )
    assert _main(capsys, *base, "--save", str(tmp_path / "new"))[0] == 0  # a folder yet to be made is fine


def test_validate_only_refuses_a_save_folder_this_user_cannot_write(tmp_path, dataset, capsys):
    """A folder without write permission (root writes anywhere, but not on a read-only mount such as a
    container's /proc/sys): refused at --validate-only, not at the first save with a traceback."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    unwritable = next((p for p in (locked, Path("/proc/sys")) if not os.access(p, os.W_OK | os.X_OK)), None)
    if unwritable is None:
        pytest.skip("root on a machine without a read-only folder: every folder here is writable")
    save = unwritable / "ckpt"
    assert _main(capsys, *TINY, "--data-path", dataset, "--validate-only", "--save", str(save)) == (
        2,
        f"pretrain_dit.py: error: --save: {save} cannot be written ({unwritable} is not writable for this user); "
        "give a directory you can write",
    )


def test_a_negative_number_in_exponent_form_is_a_value(dataset):
    out = _run(*TINY, "--data-path", dataset, "--validate-only", "--lr", "-1e-3")
    assert (out.returncode, out.stderr.strip()) == (
        2,
        "pretrain_dit.py: error: --lr: must be a positive number, got -0.001",
    )


@pytest.mark.slow
def test_labels_past_num_classes_are_caught_at_launch(tmp_path, capsys):
    """Some probed samples train, others would be skipped all run long for their label: a launch mistake."""
    data = _labelled(tmp_path / "data", [0, 7, 1, 9, 2, 3, 4, 5])  # the first 4 are probed
    status, line = _main(
        capsys, *TINY, "--data-path", data, "--validate-only", "--conditioning", "class", "--num-classes", "5"
    )
    assert (status, line) == (
        2,
        f"pretrain_dit.py: error: --num-classes: the labels of {data} need --num-classes 10 "
        "(or more) (2 of the 4 samples probed have a label past the last class)",
    )
    assert (
        _main(capsys, *TINY, "--data-path", data, "--validate-only", "--conditioning", "class", "--num-classes", "10")[
            0
        ]
        == 0
    )


@pytest.mark.slow
def test_validation_data_of_another_shape_is_named(tmp_path, dataset, capsys):
    valid = _labelled(tmp_path / "valid", [0] * 4, channels=3)
    status, line = _main(capsys, *TINY, "--data-path", dataset, "--validate-only", "--valid-data-path", valid)
    assert status == 2
    assert line.startswith(
        f"pretrain_dit.py: error: --valid-data-path: {valid} does not match the training data: "
        "none of its 4 samples probed fits this run's --latent-channels ("
    )
    assert line.endswith("give validation data prepared like --data-path")


def test_virtual_pipeline_flags_are_refused_in_a_recipe_too(tmp_path, dataset, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("virtual-pipeline-model-parallel-size: 2\n")
    assert _main(capsys, "--config", str(recipe)) == (
        2,
        f"pretrain_dit.py: error: --config: {recipe}: --virtual-pipeline-model-parallel-size: virtual pipeline "
        "stages are not supported (the conditioning embedders are not tied across model chunks); drop the flag",
    )


def test_a_bug_keeps_its_traceback(dataset):
    """Only ConfigError (and a run that must stop) is one line: a ValueError from the code is a bug."""
    import pretrain_dit
    from dit.training.main import main

    def broken(run):
        raise ValueError("a bug in the launch check")

    with pytest.raises(ValueError, match="a bug in the launch check"):
        main(replace(pretrain_dit.HOOKS, launch_check=broken), [*TINY, "--data-path", dataset])


@pytest.mark.slow
@pytest.mark.dist
def test_a_bad_data_stop_on_one_rank_ends_every_rank_quietly(tmp_path):
    """DP rank 1 reads only broken samples: both ranks stop at the same step with its line, printed once,
    and no rank dies inside a collective ("Connection closed by peer")."""
    broken = [(f"bad_{i:03d}", payloads((3, 2, 2), seed=i)) for i in range(8)]  # 3 latent channels, not 4
    data = str(write_dataset(tmp_path / "data", good_entries(8, seed=2) + broken, per_shard=8))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = subprocess.run(
        [
            *torchrun,
            str(ROOT / "pretrain_dit.py"),
            *TINY,
            "--data-path",
            data,
            "--max-bad-sample-fraction",
            "0.5",
            "--train-iters",
            "4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.startswith("pretrain_dit.py: error: ")]
    assert len(lines) == 1 and "--max-bad-sample-fraction 0.5" in lines[0], out.stderr
    assert "]: Traceback" not in out.stderr and "Connection closed" not in out.stderr  # no rank's own traceback
