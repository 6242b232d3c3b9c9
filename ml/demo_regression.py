"""Three versions of scikit-learn's bundled diabetes data, for the example regression pipeline.

The diabetes data (442 patients, 10 baseline measurements, the target a disease-progression score
from 25 to 346 one year later) ships inside scikit-learn, so the example works offline. As with the
digits demo (ml/demo_data.py) the versions tell a story a pipeline reacts to:

- `v1`: a seeded 60 % of the rows (the first, smaller data drop);
- `v2`: all rows (more data: a retrain should be about as good or better);
- `v3`: all rows with the targets shuffled among patients (a broken join upstream: the model
  trained on it predicts little better than the mean, and the RMSE gate refuses it).

The raw (unscaled) features are used, so the pipeline's own standardizers do the scaling, and the
target stays in its own units (RMSE is read in score points). Run `python -m ml.demo_regression
OUT_DIR` to write `diabetes_v1.csv` … `diabetes_v3.csv` (header: the 10 feature names, `progression`).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from domain.errors import InvalidInputError
from ml.demo_data import write_csv_atomically

DEFAULT_SEED = 7
SUBSET_FRACTION = 0.6
VERSIONS = ("v1", "v2", "v3")
TARGET = "progression"


def diabetes_arrays() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], list[str]]:
    """(features [442, 10] in their original units, targets [442], feature names)."""
    try:
        datasets = importlib.import_module("sklearn.datasets")  # optional dependency (retrainer[demo])
    except ImportError as exc:
        raise InvalidInputError(
            "the diabetes example data needs scikit-learn, which is not installed (module 'sklearn'); "
            "run `pip install retrainer[demo]`"
        ) from exc
    bunch = datasets.load_diabetes(scaled=False)
    return np.asarray(bunch.data, np.float64), np.asarray(bunch.target, np.float64), list(bunch.feature_names)


def diabetes_versions(out_dir: Path, seed: int = DEFAULT_SEED) -> dict[str, Path]:
    """Writes the three versions as CSV into `out_dir` (atomically); returns {version: path}."""
    features, targets, names = diabetes_arrays()
    rng = np.random.default_rng(seed)
    subset = np.sort(rng.choice(len(targets), size=round(SUBSET_FRACTION * len(targets)), replace=False))
    shuffled = targets[rng.permutation(len(targets))]
    rows = {"v1": (features[subset], targets[subset]), "v2": (features, targets), "v3": (features, shuffled)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for version in VERSIONS:
        x, y = rows[version]
        columns = {name: x[:, i] for i, name in enumerate(names)} | {TARGET: y}
        paths[version] = out_dir / f"diabetes_{version}.csv"
        write_csv_atomically(pa.table(columns), paths[version])
    return paths


if __name__ == "__main__":  # pragma: no cover - a convenience for users of the example
    if len(sys.argv) != 2:
        sys.exit("usage: python -m ml.demo_regression OUT_DIR")
    for version, written in diabetes_versions(Path(sys.argv[1])).items():
        print(f"{version}: {written}")
