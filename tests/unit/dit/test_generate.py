"""Sampling from checkpoints: guidance against separate forward passes, the EMA of a TP=2 checkpoint
loaded whole in one CPU process, and the CLI from checkpoint to latents and grid."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import pretrain_dit
from dit import generate, inference
from dit.checkpoint.files import find_checkpoint
from dit.diffusion import build_objective
from dit.diffusion.flow import TIMESTEP_SCALE
from dit.diffusion.guidance import Condition, GuidedPrediction
from dit.model.model import DiTModel
from dit.training.arguments import load_run_config
from dit.training.pretrain import pretrain
from tests.distributed import run_distributed
from tests.launch import ROOT
from tests.model_setup import full_weights, randomize, tiny_config
from tests.tiny_data import TINY_RUN, good_entries, write_dataset


@pytest.mark.slow
@pytest.mark.parametrize("conditioning", ["text", "class"])
def test_guidance_is_uncond_plus_g_times_the_difference(single_process, conditioning):
    config = tiny_config(conditioning=conditioning)
    model = DiTModel(config).eval()
    randomize(model, seed=3)
    flow = build_objective("flow", flow_shift=1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 1, 4, 6, generator=g, dtype=torch.float64)
    text = [torch.randn(2 + i, 16, generator=g) for i in range(3)]
    conds = [Condition(text=t, label=i) for i, t in enumerate(text)]
    null = [Condition(text=torch.zeros(1, 16), label=config.num_classes)] * 3

    def run(conditions, guidance):
        return GuidedPrediction(model, flow, config, conditions, guidance, torch.device("cpu"))(x, 0.4)

    cond, uncond = run(conds, 1.0), run(null, 1.0)  # G = 1: the conditional model alone, one pass each
    assert not torch.allclose(cond, uncond)
    assert torch.allclose(run(conds, 2.5), uncond + 2.5 * (cond - uncond), atol=1e-5)  # one pass of 2 x 3 samples


@pytest.mark.parametrize(
    "flow_shift, shift",
    [(3.0, 3.0), ("auto", (6 / 256) ** 0.5)],  # 1 x 4 x 6 at patch 2: 6 tokens
    ids=["fixed", "auto"],
)
def test_the_flow_samplers_time_grid_is_the_training_shift(single_process, flow_shift, shift):
    """The network sees t' = a t / (1 + (a - 1) t) of t uniform from 1 to 0 (SD3's shift), a = --flow-shift or
    sqrt(tokens / 256): every level the Euler sampler of ``dit.generate`` asks for, written out by hand."""
    config = tiny_config(conditioning="class")
    model = DiTModel(config).eval()
    randomize(model, seed=3)
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[1] / TIMESTEP_SCALE))  # (x, timesteps, batch)
    args = generate.build_parser().parse_args(
        [
            "--load",
            "x",
            "--latent-shape",
            "4,1,4,6",
            "--output",
            "x",
            "--sampler",
            "euler",
            "--steps",
            "4",
            "--guidance",
            "1",
            "--num-samples",
            "1",
        ]
    )
    inference.sample(
        generate.options(args),
        model,
        build_objective("flow", flow_shift=flow_shift),
        config,
        [Condition(label=1)],
        torch.device("cpu"),
    )
    uniform = [1.0, 0.75, 0.5, 0.25]  # Euler evaluates at every time but the last (t = 0)
    expected = torch.tensor([shift * t / (1 + (shift - 1) * t) for t in uniform])
    assert len(seen) == len(uniform)
    assert torch.allclose(torch.stack(seen).flatten(), expected, rtol=1e-6), (torch.stack(seen).flatten(), expected)


def test_the_edm_sampler_walks_karras_levels_with_heun(single_process):
    """EDM's Heun (Algorithm 2) evaluates at sigma_0, then twice at each later level (the correction of the step
    that reached it and the start of the next), with no correction on the last step, to 0; the network sees
    c_noise = ln(sigma) / 4 of Karras' eq. 5 levels, written out by hand for --sigma-min/--sigma-max/--rho."""
    config = tiny_config(conditioning="class")
    model = DiTModel(config).eval()
    randomize(model, seed=3)
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[1]))
    flags = "--sigma-min 0.5 --sigma-max 10 --rho 3 --steps 3 --guidance 1 --num-samples 1 --sampler euler"
    args = generate.build_parser().parse_args(
        ["--load", "x", "--latent-shape", "4,1,4,6", "--output", "x"] + flags.split()
    )
    inference.sample(
        generate.options(args), model, build_objective("edm"), config, [Condition(label=1)], torch.device("cpu")
    )
    levels = [(10 ** (1 / 3) + i / 2 * (0.5 ** (1 / 3) - 10 ** (1 / 3))) ** 3 for i in range(3)]  # 10 ... 0.5
    calls = [levels[0], levels[1], levels[1], levels[2], levels[2]]  # --sampler is the flow's: EDM takes Heun
    expected = torch.tensor(calls).log() / 4
    assert torch.allclose(torch.stack(seen).flatten(), expected, rtol=1e-6), (torch.stack(seen).flatten(), expected)


FLAGS = TINY_RUN + ["--lr", "1e-2", "--ema-decay", "0.5", "--global-batch-size", "2", "--train-iters", "3"]


def _train(data_path: str, save: str) -> dict:
    import torch.distributed as dist

    run = load_run_config(
        FLAGS + ["--data-path", data_path, "--save", save, "--tensor-model-parallel-size", "2"], dist.get_world_size()
    )
    result = pretrain(run, pretrain_dit.HOOKS)
    with result.ema.applied():
        return full_weights(result.setup.model[0].module, result.setup.config)


def _loaded(save: str, no_ema: bool) -> dict:
    args = generate.build_parser().parse_args(
        ["--load", save, "--latent-shape", "4,4,4", "--output", "x.pt"] + (["--no-ema"] if no_ema else [])
    )
    model, _, which = inference.load_model(generate.options(args), find_checkpoint(args.load), torch.device("cpu"))
    assert which == ("raw" if no_ema else "EMA")
    return {n: p.detach().clone().numpy() for n, p in model.named_parameters()}


@pytest.mark.dist
@pytest.mark.slow
def test_a_tp2_checkpoint_samples_in_one_cpu_process(tmp_path):
    data = str(write_dataset(tmp_path / "ds", good_entries(24, seed=6)))
    ema = _merged(run_distributed(_train, 2, data, str(tmp_path / "ckpt")))
    loaded = run_distributed(_loaded, 1, str(tmp_path / "ckpt"), False)[0]
    raw = run_distributed(_loaded, 1, str(tmp_path / "ckpt"), True)[0]
    assert loaded.keys() == ema.keys()
    for name, weights in ema.items():
        assert (loaded[name] == weights).all(), name  # the TP=2 shards of the EMA, put together
    assert any((raw[n] != ema[n]).any() for n in ema)  # and the raw weights are other weights
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dit.generate",
            "--load",
            str(tmp_path / "ckpt"),
            "--latent-shape",
            "4,2,4,4",
            "--num-samples",
            "3",
            "--steps",
            "4",
            "--guidance",
            "2",
            "--seed",
            "1",
            "--output",
            str(tmp_path / "x.pt"),
            "--text-embedding",
            *_prompts(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    latents = torch.load(tmp_path / "x.pt")
    assert latents.shape == (6, 4, 2, 4, 4) and torch.isfinite(latents).all()
    assert "EMA weights, flow, 4 steps, guidance 2.0" in out.stdout


def _merged(results: list[dict]) -> dict:
    return {name: w for r in results for name, w in r.items()}


def _prompts(tmp_path) -> list[str]:
    import pickle

    import numpy as np

    paths = []
    for i in range(2):
        path = tmp_path / f"prompt_{i}.pickle"
        path.write_bytes(pickle.dumps(np.random.default_rng(i).standard_normal((3, 8)).astype(np.float32)))
        paths.append(str(path))
    return paths


def test_the_png_grid_has_a_gap_between_cells_and_each_rows_label(tmp_path):
    """2 rows of 3 cells of 4 x 4 pixels (16 x 16 px each, scaled to 64): every cell where the gaps put it, with its
    own value; the gaps and the margin the background; each row's label written left of its first cell."""
    from PIL import Image

    values = torch.linspace(-1, 0.9, 6)  # [-1, 1]: pixel (v + 1) * 127.5, none of them the background's 255
    latents = values[:, None, None, None, None].expand(6, 1, 1, 4, 4)
    inference.write_grid(latents, ["class 0", "class 1"], str(tmp_path / "grid.png"))
    image = torch.from_numpy(np.array(Image.open(tmp_path / "grid.png"))).int()  # [height, width]
    gap, cell, bg = inference.GRID_GAP, 64, inference.GRID_BACKGROUND
    assert gap >= 2  # a gap that shows
    left = image.shape[1] - 3 * (cell + gap) - gap  # the label column
    assert image.shape[0] == gap + 2 * (cell + gap) and left > gap
    painted = torch.full_like(image, bg)
    for r in range(2):
        top = gap + r * (cell + gap)
        for k in range(3):
            x = left + gap + k * (cell + gap)
            painted[top : top + cell, x : x + cell] = round((float(values[3 * r + k]) + 1) * 127.5)
    cells = painted != bg
    assert torch.equal(image[cells], painted[cells])  # each cell in its place, its own value
    labels = image[:, :left]
    assert torch.equal(image[:, left:][~cells[:, left:]], painted[:, left:][~cells[:, left:]])  # gaps: background
    bands = [labels[gap + r * (cell + gap) : gap + r * (cell + gap) + cell] for r in range(2)]
    assert all((band != bg).any() for band in bands)  # a label in each row's band
    assert not torch.equal(bands[0], bands[1])  # and not the same one
    assert (labels[:gap] == bg).all() and (labels[gap + cell : 2 * gap + cell] == bg).all()  # none in the margins


def test_the_command_line_answers_before_torch_loads():
    """--help and a flag mistake answer at once: dit.generate loads torch and Megatron-Core (seconds, and their
    import-time warnings) only in options(), once the flags are understood."""
    probe = "import sys, dit.generate; print(sorted(m for m in ('megatron', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
