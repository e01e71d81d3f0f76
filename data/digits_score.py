"""How recognisable generated digits are: a classifier trained on the real digits names each sample's class.

    python -m data.digits_score SAMPLES.pt [--rows-are-classes]

SAMPLES.pt holds ``dit.generate``'s latents ``[N, 1, 1, 8, 8]`` (pixels in [-1, 1]) with its rows (one per
requested class, in class order 0..9, the quick start's layout). It prints the share the classifier gives
the requested class (chance: 10%) and, for reference, its accuracy on held-out real digits.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def digit_classifier():
    """An RBF support-vector classifier on scikit-learn's digits, with its accuracy on a held-out quarter."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    digits = load_digits()
    x = digits.images.reshape(len(digits.images), -1) / 8.0 - 1.0  # the dataset's scaling to [-1, 1]
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0)
    classifier = SVC(gamma="scale").fit(x_train, y_train)
    return classifier, float(classifier.score(x_test, y_test))


def score(latents: torch.Tensor, classes: int = 10) -> dict:
    """Accuracy of the requested class over the rows of ``latents`` ``[classes * n, 1, 1, 8, 8]``."""
    classifier, real = digit_classifier()
    n = latents.shape[0] // classes
    wanted = np.repeat(np.arange(classes), n)
    predicted = classifier.predict(latents.reshape(latents.shape[0], -1).clamp(-1, 1).numpy())
    per_class = [(predicted[wanted == k] == k).mean() for k in range(classes)]
    return {
        "accuracy": float((predicted == wanted).mean()),
        "chance": 1 / classes,
        "per_class": [round(float(a), 3) for a in per_class],
        "classifier_on_real_digits": round(real, 4),
        "samples": int(latents.shape[0]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="Latents written by python -m dit.generate (rows in class order 0..9).")
    a = p.parse_args()
    result = score(torch.load(a.samples, weights_only=True))
    print(json.dumps(result))
    print(
        f"{result['accuracy']:.1%} of {result['samples']} generated digits are read as the class they were asked "
        f"for (chance {result['chance']:.0%}; the classifier reads {result['classifier_on_real_digits']:.1%} of real "
        "held-out digits right)"
    )


if __name__ == "__main__":
    main()
