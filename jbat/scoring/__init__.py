"""Scoring: pure per-example ALBAT scores of backbone examples (kernels) and the DSIR anchor."""

from jbat.scoring.dsir import dsir_scores, fit_ngram_model, hash_ngrams
from jbat.scoring.kernels import (
    PROJECTION_VERSION,
    align,
    check_same_structure,
    cosine,
    finish_mean,
    flatten_batched,
    grad_norm,
    grad_sum,
    jit_kernel,
    less,
    loss_diff,
    mean_grad,
    per_example_grads,
    per_example_losses_and_grads,
    project,
    project_flat,
    project_target,
    rademacher_projection,
    rademacher_words,
    random_scores,
    rel_loss_diff,
    relative_diff,
    surrogate_fit,
    tree_dot,
    tree_norm,
    tree_sub,
    words_nbytes,
)
from jbat.scoring.stream import SCORE_NAMES, ScoreTable, load_table, score_pool

__all__ = [
    "PROJECTION_VERSION", "SCORE_NAMES", "ScoreTable", "load_table", "score_pool",
    "align", "check_same_structure", "cosine", "dsir_scores", "finish_mean", "fit_ngram_model",
    "flatten_batched", "grad_norm", "grad_sum", "hash_ngrams", "jit_kernel", "less",
    "loss_diff", "mean_grad", "per_example_grads", "per_example_losses_and_grads", "project",
    "project_flat", "project_target", "rademacher_projection", "rademacher_words",
    "random_scores", "rel_loss_diff", "relative_diff", "surrogate_fit", "tree_dot",
    "tree_norm", "tree_sub", "words_nbytes",
]
