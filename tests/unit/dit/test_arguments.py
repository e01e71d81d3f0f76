"""The command line: each user mistake gives one line naming the flag, before any heavy work."""

import subprocess
import sys
from pathlib import Path

import pytest

from data.shards import energon_prepare, write_shard
from dit.errors import ConfigError
from dit.model import te
from dit.runtime.mcore019 import megatron_fsdp_missing
from dit.training.arguments import MIN_ROPE_HEAD_DIM, load_run_config, parse_args
from dit.training.dataset_folder import check_energon_dataset
from tests.tiny_data import good_entries

ROOT = Path(__file__).resolve().parents[3]
TINY = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4"]
FITS_TINY_DATA = ["--latent-channels", "4", "--text-embed-dim", "8", "--max-seq-length", "32", "--num-workers", "0"]


@pytest.fixture
def dataset(tiny_dataset: str) -> str:
    """The session's tiny dataset (tests/conftest.py): 16 samples, latents [4, ...], text width 8, up to 24 tokens."""
    return tiny_dataset


def check(argv, world_size=1, **kw):
    return load_run_config(argv, world_size, **kw)


@pytest.mark.parametrize(
    "argv, world, flag, words",
    [
        (
            ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
            6,
            "--tensor-model-parallel-size",
            "world size 6 is not divisible by tp*pp*cp = 2*2*1 = 4",
        ),
        (
            ["--tensor-model-parallel-size", "3"],
            3,
            "--tensor-model-parallel-size",
            "4 attention heads are not divisible by tp=3",
        ),
        (
            ["--pipeline-model-parallel-size", "3"],
            3,
            "--pipeline-model-parallel-size",
            "4 layers are not divisible into 3",
        ),
        (
            ["--pipeline-model-parallel-size", "8"],
            8,
            "--pipeline-model-parallel-size",
            "not divisible into 8 pipeline stages",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"],
            2,
            "--virtual-pipeline-model-parallel-size",
            "virtual pipeline stages are not supported",
        ),
        (["--sequence-parallel"], 1, "--sequence-parallel", "needs --tensor-model-parallel-size > 1"),
        (["--global-batch-size", "3"], 2, "--global-batch-size", "not a multiple of micro batch x DP = 1x2"),
        (["--context-parallel-size", "0"], 1, "--context-parallel-size", "must be >= 1"),
        (["--save-interval", "5"], 1, "--save-interval", "needs --save"),
    ],
)
def test_parallel_and_training_mistakes(dataset, argv, world, flag, words):
    with pytest.raises(ConfigError) as e:
        check(TINY + ["--data-path", dataset] + argv, world)
    assert e.value.flag == flag
    assert words in str(e.value)


FSDP = ["--use-megatron-fsdp"]


@pytest.mark.skipif(megatron_fsdp_missing() is None, reason="this stack runs Megatron-FSDP")
def test_megatron_fsdp_refused_where_the_stack_lacks_it(dataset):
    """megatron-core 0.16 (Python 3.11): one line naming the flag and what it needs."""
    with pytest.raises(ConfigError, match="needs ") as e:
        check(TINY + ["--data-path", dataset] + FSDP, 2)
    assert e.value.flag == "--use-megatron-fsdp"


@pytest.mark.skipif(megatron_fsdp_missing() is not None, reason="Megatron-FSDP needs megatron-core 0.17+")
@pytest.mark.parametrize(
    "argv, words",
    [
        (FSDP + ["--pipeline-model-parallel-size", "2"], "not proven with pipeline parallelism"),
    ],
)
def test_megatron_fsdp_mistakes(dataset, argv, words):
    with pytest.raises(ConfigError) as e:
        check(TINY + ["--data-path", dataset] + argv, 2)
    assert e.value.flag == "--use-megatron-fsdp"
    assert words in str(e.value)


@pytest.mark.skipif(megatron_fsdp_missing() is not None, reason="Megatron-FSDP needs megatron-core 0.17+")
def test_megatron_fsdp_implies_the_distributed_optimizer(dataset):
    """Megatron's DistributedOptimizer steps FSDP's main-weight shards (as Megatron-LM sets it)."""
    assert check(TINY + ["--data-path", dataset] + FSDP, 2).optimizer.use_distributed_optimizer


def test_transformer_engine_asked_without_te(dataset, monkeypatch):
    monkeypatch.setattr(te, "have_transformer_engine", lambda: False)
    with pytest.raises(ConfigError, match="transformer_engine is not importable") as e:
        check(TINY + ["--data-path", dataset, "--transformer-impl", "transformer_engine"])
    assert e.value.flag == "--transformer-impl"


def test_fp8_without_te(dataset, monkeypatch):
    monkeypatch.setattr(te, "have_transformer_engine", lambda: False)
    with pytest.raises(ConfigError, match="FP8 needs Transformer Engine") as e:
        check(TINY + ["--data-path", dataset, "--fp8-format", "hybrid"])
    assert e.value.flag == "--fp8-format"


def test_transformer_engine_with_te_but_no_gpu(dataset, monkeypatch):
    """TE importable (mocked: it cannot be installed here) but no CUDA device, with or without FP8."""
    monkeypatch.setattr(te, "have_transformer_engine", lambda: True)
    for fp8 in ([], ["--fp8-format", "e4m3"]):
        with pytest.raises(ConfigError, match="transformer_engine needs a CUDA GPU") as e:
            check(TINY + ["--data-path", dataset, "--transformer-impl", "transformer_engine", "--bf16"] + fp8)
        assert e.value.flag == "--transformer-impl"


def test_transformer_engine_needs_bf16(dataset, monkeypatch):
    """TE and a GPU (both mocked): fp32 is refused, TE's THD attention and context parallel need bf16."""
    monkeypatch.setattr(te, "have_transformer_engine", lambda: True)
    monkeypatch.setattr(te, "te_version", lambda: "2.9.0")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="add --bf16") as e:
        check(TINY + ["--data-path", dataset, "--transformer-impl", "transformer_engine"])
    assert e.value.flag == "--bf16"
    check(TINY + ["--data-path", dataset, "--transformer-impl", "transformer_engine", "--bf16"])


def test_transformer_engine_before_pad_between_seqs_is_refused(dataset, monkeypatch):
    """TE (mocked) older than 2.2 cannot be told pad_between_seqs (dit.model.te_attention)."""
    monkeypatch.setattr(te, "have_transformer_engine", lambda: True)
    monkeypatch.setattr(te, "te_version", lambda: "2.1.0")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"--transformer-impl: Transformer Engine 2.1.0 is older than 2.2.0"):
        check(TINY + ["--data-path", dataset, "--transformer-impl", "transformer_engine", "--bf16"])


def test_default_backend_follows_te_availability(monkeypatch):
    monkeypatch.setattr(te, "have_transformer_engine", lambda: False)
    assert parse_args([]).transformer_impl == "local"
    monkeypatch.setattr(te, "have_transformer_engine", lambda: True)
    assert parse_args([]).transformer_impl == "transformer_engine"


def test_data_path_mistakes(tmp_path, dataset):
    with pytest.raises(ConfigError, match="is required") as e:
        check(TINY)
    assert e.value.flag == "--data-path"
    with pytest.raises(ConfigError, match="does not exist"):
        check(TINY + ["--data-path", str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match=r"not an energon dataset \(no .nv-meta\); run `energon prepare"):
        check(TINY + ["--data-path", str(tmp_path)])


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda ds, tmp: f"{ds}/shard_000000.tar", "is one shard; give the folder that holds the shards and .nv-meta"),
        (lambda ds, tmp: (tmp / "x.txt").write_text("x") and tmp / "x.txt", "is a file, not an energon dataset folder"),
        (lambda ds, tmp: (tmp / "m.yaml").write_text("- a\n") and tmp / "m.yaml", "is not an energon metadataset"),
        (
            lambda ds, tmp: (tmp / "e" / ".nv-meta").mkdir(parents=True) or tmp / "e",
            ".nv-meta lacks dataset.yaml, split.yaml, .info.json, index.sqlite: an interrupted prepare?"
            " run `energon prepare",
        ),
    ],
)
def test_data_path_that_is_a_file_a_shard_or_an_empty_index(tmp_path, dataset, make, words):
    with pytest.raises(ConfigError) as e:
        check_energon_dataset(make(dataset, tmp_path))
    assert e.value.flag == "--data-path" and words in str(e.value)


@pytest.mark.parametrize(
    "shards, words",
    [
        (
            {"a.tar": 4, "sub/b.tar": 4},
            "sample key 'samples/good_0000' is in both a.tar and sub/b.tar, and energon prepare "
            "refuses a key seen twice: write one of them with other keys",
        ),
        ({"a.tar": 4, "b.tar": 0}, "b.tar holds no sample, which energon prepare refuses: move it out"),
        (
            {"a.tar": -4},
            "the .json of sample 'samples/good_0001', one of the first two of the first shard (energon prepare "
            "prints them), is not JSON (JSONDecodeError): fix that member or move the sample out",
        ),
    ],
)
@pytest.mark.slow
def test_a_dataset_energon_prepare_refused_names_the_real_fix(tmp_path, shards, words):
    """Running prepare again would fail the same way: the line says what in the shards to fix."""
    for name, n in shards.items():  # n < 0: -n samples, the second with a .json cut short
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        entries = good_entries(abs(n))
        if n < 0:
            entries[1] = (entries[1][0], {**entries[1][1], "json": entries[1][1]["json"][:5]})
        write_shard(tmp_path / name, entries)
    with pytest.raises(subprocess.CalledProcessError):
        energon_prepare(tmp_path)
    with pytest.raises(ConfigError) as e:
        check_energon_dataset(tmp_path)
    assert f": energon prepare refused the dataset: {words}" in str(e.value), str(e.value)


def test_a_metadataset_yaml_is_a_dataset(tmp_path, dataset):
    (tmp_path / "m.yaml").write_text(
        f"__module__: megatron.energon\n__class__: MetadatasetV2\nsplits: {{train: {{path: {dataset}}}}}\n"
    )
    check_energon_dataset(tmp_path / "m.yaml")


@pytest.mark.parametrize(
    "hidden, heads, ok", [(48, 4, True), (64, 4, True), (32, 4, False), (52, 4, False), (90, 6, False), (96, 8, True)]
)
def test_rope_needs_a_head_dim_that_gives_every_axis_a_pair(dataset, hidden, heads, ok):
    """At head dim 8 (hidden 32 / 4 heads) 3D RoPE gives h and w no rotary pair: positions would be half-blind."""
    argv = [
        "--num-layers",
        "2",
        "--hidden-size",
        str(hidden),
        "--num-attention-heads",
        str(heads),
        "--data-path",
        dataset,
    ]
    if ok:
        check(argv)
    else:
        with pytest.raises(ConfigError, match="3D RoPE needs an even head dim") as e:
            check(argv)
        assert e.value.flag == "--hidden-size"
    sincos = argv[:-2] + ["--position-embedding", "sincos3d", "--data-path", dataset]  # splits the hidden size
    if hidden % 4:
        with pytest.raises(ConfigError, match="--hidden-size: sincos3d splits the channels .* multiple of 4"):
            check(sincos)
    else:
        check(sincos)


def test_the_rope_head_dim_limit_is_the_one_axis_split_gives():
    from dit.model.embeddings import axis_split

    for head_dim in range(2, 64, 2):
        assert (min(axis_split(head_dim // 2)) >= 1) == (head_dim >= MIN_ROPE_HEAD_DIM), head_dim


def test_model_size_fills_and_flags_override(dataset):
    a = check(["--model-size", "DiT-B", "--data-path", dataset]).model
    assert (a.num_layers, a.hidden_size, a.num_attention_heads) == (12, 768, 12)
    run = check(["--model-size", "DiT-B", "--num-layers", "2", "--data-path", dataset])
    assert (run.model.num_layers, run.model.hidden_size) == (2, 768)
    assert run.training.global_batch_size == 1  # micro batch 1 x DP 1


def test_yaml_recipe_and_command_line_override(tmp_path, dataset):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model-size: DiT-S\nlr: 3.0e-4\ndata_path: {dataset}\nsequence-parallel: true\ntensor-model-parallel-size: 2\n"
    )
    a = check(["--config", str(recipe), "--lr", "1e-3"], world_size=2)
    assert a.optimizer.lr == 1e-3 and a.model.hidden_size == 384 and a.model.sequence_parallel
    assert a.data.data_path == dataset
    recipe.write_text("learning-rate: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'learning-rate'"):
        parse_args(["--config", str(recipe)])
    recipe.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parse_args(["--config", str(recipe)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize(
    "line, words",
    [
        ("model-size: DiT-XXL", ": --model-size: invalid choice: 'DiT-XXL'"),
        ("max-latent-grid: 8", ": --max-latent-grid: expected 3 arguments"),
        ("objective: foo", ": --objective: invalid choice: 'foo'"),
        ("lr: fast", ": --lr: invalid float value: 'fast'"),
        ("sequence-parallel: 'no'", "'sequence-parallel' takes true or false, got 'no'"),
        ("lr: [1.0e-4, 2.0e-4]", "'lr' takes one value, got [0.0001, 0.0002]"),
        ("num-layers: {a: 1}", "'num-layers' takes one value, got {'a': 1}"),
        ("lr:", "'lr' is null; give it a value or delete the line (its default is 0.0001)"),
    ],
)
def test_recipe_values_are_checked_like_flags(tmp_path, line, words):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(line + "\n")
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", str(recipe)])
    assert e.value.flag == "--config" and words in str(e.value)


def test_recipe_lists_and_negated_booleans(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max-latent-grid: [4, 8, 16]\nqk-layernorm: false\nsequence-parallel: false\n")
    a = parse_args(["--config", str(recipe)])
    assert a.max_latent_grid == [4, 8, 16] and a.qk_layernorm is False and a.sequence_parallel is False
    assert parse_args(["--config", str(recipe), "--qk-layernorm"]).qk_layernorm is True


def test_recipe_null_leaves_an_unset_flag_unset(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("global-batch-size: null\nload: ~\n")
    a = parse_args(["--config", str(recipe)])
    assert a.global_batch_size is None and a.load is None  # not the string "None"


@pytest.mark.parametrize(
    "argv, flag, words",
    [
        (["--lr-warmup", "5"], "--lr-warmup", "not a flag of this command"),  # no abbreviations: not --lr-warmup-iters
        (["--lr"], "--lr", "expected one argument"),
        (["--train-iters", "1.5"], "--train-iters", "invalid int value: '1.5'"),
    ],
)
def test_flag_syntax_mistakes_are_config_errors(argv, flag, words):
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    assert e.value.flag == flag and words in str(e.value)


def run_entry(*argv, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "pretrain_dit.py"), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_help_without_gpu_dataset_or_torchrun():
    out = run_entry("--help")
    assert out.returncode == 0
    for flag in (
        "--tensor-model-parallel-size",
        "--model-size",
        "--objective",
        "--fp8-recipe",
        "--packing-buffer-size",
        "--config",
    ):
        assert flag in out.stdout
    assert "(default: 1)" in out.stdout  # defaults are listed


def _main(capsys, *argv: str) -> tuple[int, str]:
    """pretrain_dit.py's main in this process (these mistakes stop it before any process group): status, stderr."""
    import pretrain_dit
    from dit.training.main import main

    capsys.readouterr()
    status = main(pretrain_dit.HOOKS, list(argv))
    return status, capsys.readouterr().err


def test_user_mistake_is_one_line_without_traceback(tmp_path, capsys):
    assert _main(capsys, "--data-path", str(tmp_path / "missing")) == (
        2,
        f"pretrain_dit.py: error: --data-path: {tmp_path / 'missing'} does not exist\n",
    )
    # argparse's own mistakes too: no usage dump
    assert _main(capsys, "--lr", "fast") == (2, "pretrain_dit.py: error: --lr: invalid float value: 'fast'\n")


def test_command_line_does_not_import_megatron():
    """--help and config mistakes answer at once: the parser must not pull in Megatron-Core or torch."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, dit.training.arguments; print(sorted(m for m in ('megatron', 'torch') if m in sys.modules))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_model_config_mistake_is_one_line_too(dataset, capsys):
    status, err = _main(
        capsys,
        *TINY,
        *FITS_TINY_DATA,
        "--data-path",
        dataset,
        "--recompute-granularity",
        "full",
        "--recompute-num-layers",
        "3",
    )
    assert status == 2 and "Traceback" not in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("pretrain_dit.py: error: --recompute-num-layers: uniform recompute groups 3 layers")
    )
