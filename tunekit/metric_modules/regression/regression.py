"""Regression metrics over rows of targets: MSE and MAE (scikit-learn), Pearson and Spearman correlation
(scipy). Averaged over the targets, and per target (`<name>_<metric>`) when there are several. A
correlation is NaN when either side is constant or there is one example (undefined, as scipy says).
"""

import warnings

import datasets
import evaluate
import numpy as np
from scipy.stats import ConstantInputWarning
from scipy.stats import pearsonr
from scipy.stats import spearmanr
from sklearn.metrics import mean_absolute_error
from sklearn.metrics import mean_squared_error

_KWARGS = """
Args:
    predictions (list of list of float): predicted values, one row of targets per example.
    references (list of list of float): true values, the same shape.
    names (list of str, optional): target names for the per-target keys (default target_<i>).
Returns:
    mse, mae, pearson, spearman (floats), and <name>_<metric> per target when there are several.
"""


class Regression(evaluate.Metric):
    def _info(self):
        row = datasets.Sequence(datasets.Value("float64"))
        return evaluate.MetricInfo(description=__doc__, citation="", inputs_description=_KWARGS,
                                   features=datasets.Features({"predictions": row, "references": row}))

    def _compute(self, predictions, references, names=None):
        true, pred = np.asarray(references, dtype=float), np.asarray(predictions, dtype=float)
        if true.shape != pred.shape or true.ndim != 2:
            raise ValueError(f"targets {true.shape} and predictions {pred.shape} must both be [examples, targets]")
        per_target = []
        for column in range(true.shape[1]):
            t, p = true[:, column], pred[:, column]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConstantInputWarning)
                correlations = ((float(pearsonr(t, p).statistic), float(spearmanr(t, p).statistic)) if len(t) > 1
                                else (float("nan"), float("nan")))
            per_target.append({"mse": float(mean_squared_error(t, p)), "mae": float(mean_absolute_error(t, p)),
                               "pearson": correlations[0], "spearman": correlations[1]})
        metrics = {key: float(np.mean([m[key] for m in per_target])) for key in ("mse", "mae", "pearson", "spearman")}
        if len(per_target) > 1:
            for name, values in zip(names or [f"target_{i}" for i in range(len(per_target))], per_target):
                metrics.update({f"{name}_{key}": value for key, value in values.items()})
        return metrics
