"""Guidance dropout in the training step: the micro-batches a step hands to the network carry the dropped
samples' text as zeros and their class as the null class, each sample whole, at about --text-drop-prob."""

import torch

from dit.diffusion import build_objective
from dit.training.arguments import load_run_config
from dit.training.step import StepCounts, TrainingSetup, prepare_microbatches
from tests.model_setup import make_microbatch, tiny_config


def test_a_training_microbatch_drops_text_to_zeros_and_labels_to_the_null_class(single_process):
    run = load_run_config(["--text-drop-prob", "0.5", "--seed", "5"], need_data=False)
    config = tiny_config(conditioning="class")  # num_classes 10: label 10 is the null class
    setup = TrainingSetup(
        run=run,
        config=config,
        model=[],
        optimizer=None,
        scheduler=None,
        objective=build_objective("flow"),
        device=torch.device("cpu"),
    )
    packs = [make_microbatch(seed, [(1, 2, 2)] * 50).batch for seed in range(4)]  # 200 samples, text of 3 to 6 rows
    counts = StepCounts(packs=4, samples=200, real_tokens=200, flops=0.0)
    dropped = 0
    for pack, mb in zip(packs, prepare_microbatches(setup, packs, iteration=7, counts=counts)):
        for i in range(pack.num_samples):
            rows = slice(int(pack.cu_seqlens_text[i]), int(pack.cu_seqlens_text[i + 1]))
            text, label = mb.batch.text[rows], int(mb.batch.labels[i])
            if text.abs().sum() == 0:  # the original text is Gaussian: never zero
                dropped += 1
                assert label == config.num_classes, "text dropped but the class kept"
            else:
                assert torch.equal(text, pack.text[rows]) and label == int(pack.labels[i]), "a kept sample changed"
    assert abs(dropped - 100) < 4 * (200 * 0.5 * 0.5) ** 0.5  # binomial(200, 0.5): 4 standard deviations
