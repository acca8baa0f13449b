"""Evaluation of generated MNIST digits: FID on a project-trained classifier's features and
class-conditional accuracy, beside real-data / noise / class-mean baselines.

    from flagdit_jax.eval import evaluate, baselines
    evaluate(workdir, images, labels)   # images [N, 32, 32, 1] in [-1, 1], labels [N] in 0..9
"""

from flagdit_jax.eval.classifier import DigitCNN, digits, features, load_or_train, logits, train_classifier
from flagdit_jax.eval.fid import fid_from_features, frechet_distance, statistics
from flagdit_jax.eval.mnist_eval import baselines, evaluate, report, write_report

__all__ = ["DigitCNN", "baselines", "digits", "evaluate", "features", "fid_from_features", "frechet_distance",
           "load_or_train", "logits", "report", "statistics", "train_classifier", "write_report"]
