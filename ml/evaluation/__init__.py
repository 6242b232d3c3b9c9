"""Model evaluation and the paired comparison a promotion gate relies on.

`evaluate` runs a classifier once over a labelled set and returns an `EvalReport`: summary metrics
(quality, calibration, CPU latency, size), per-class precision/recall/F1, the confusion matrix and
the per-example evidence (labels, predictions, probabilities). `compare` takes two reports computed
on the same data and returns, per metric, the difference candidate - champion with a paired
bootstrap confidence interval; `disagreement` how often the two predict differently on those rows.

Design:

- Every quality metric is a function of the per-example evidence only, and `evaluate` computes its
  numbers with the same vectorised code `compare` resamples (the full data is the identity
  resample). A report's `metrics["accuracy"]` and a comparison's `candidate` are therefore the
  same number, never two implementations that drift apart.
- The bootstrap is paired and refuses reports from different data (comparison.py); the metrics
  are vectorised over resamples, and macro-F1 averages over the classes in the true labels
  (resampling.py); roc_auc and pr_auc rank class 1's probability (binary) or average one-vs-rest
  over the classes present, NaN on labels of one class (ranking.py); latency is CPU wall-clock of
  the forward pass, batch 1 unless suffixed (cost.py).

Regression: `evaluate_regression` runs a model with float targets once and returns a
`RegressionReport` (targets and predictions [N, outputs] in the target's units, after the caller's
`inverse` transform; rmse, mae, r2, mape macro-averaged over outputs; the same cost figures);
`compare` takes two such reports with the same paired, chunked bootstrap
(ml/evaluation/regression_metrics.py). It refuses a regression report against a classification
one. `REGRESSION_METRICS` maps each regression metric to whether higher is better, as
`BUILTIN_METRICS` does for classification.

Where things live: `report.py` (EvalReport, MetricComparison), `scoring.py` (`evaluate`),
`resampling.py` (the built-in metrics over per-example evidence), `ranking.py` (roc_auc, pr_auc),
`cost.py` (latency, size, parameter count), `custom_metrics.py` (user metrics by import path),
`comparison.py` (`compare`), `regression.py` (`evaluate_regression`), `regression_metrics.py`
(the regression metrics over per-example evidence).
Import from this package; the names below are its public interface.
"""

from ml.evaluation.comparison import compare, disagreement
from ml.evaluation.regression import InverseTransform, evaluate_regression
from ml.evaluation.regression_metrics import REGRESSION_METRICS
from ml.evaluation.report import EvalReport, MetricComparison, RegressionReport
from ml.evaluation.resampling import BUILTIN_METRICS, ECE_BINS
from ml.evaluation.scoring import evaluate

__all__ = [
    "BUILTIN_METRICS",
    "ECE_BINS",
    "REGRESSION_METRICS",
    "EvalReport",
    "InverseTransform",
    "MetricComparison",
    "RegressionReport",
    "compare",
    "disagreement",
    "evaluate",
    "evaluate_regression",
]
