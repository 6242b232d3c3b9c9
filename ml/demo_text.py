"""A small labelled text set for the example text pipeline (pipelines/examples/text-minilm.yaml).

Short news-like sentences on three topics (0 sport, 1 finance, 2 weather), made from templates and
word lists with a seeded generator, so the data is the same on every machine and needs no
download. Some sentences mix a second topic's words in, so the task is not a keyword lookup.
The versions tell the story the flow test plays:

- `v1`: 150 rows (the first, small data drop);
- `v2`: 450 rows, v1's rows first (more data: a retrain warm-started from the champion).

Run `python -m ml.demo_text OUT_DIR` to write `topics_v1.csv` and `topics_v2.csv` (header `text,label`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from ml.demo_data import write_csv_atomically

DEFAULT_SEED = 11
TOPICS = ("sport", "finance", "weather")
ROWS = {"v1": 150, "v2": 450}
MIXED_FRACTION = 0.2

_SUBJECTS = (
    ("the home team", "our striker", "the young goalkeeper", "the coach", "the tennis champion", "the cyclists"),
    ("the central bank", "shareholders", "the tech company", "bond traders", "the pension fund", "the stock index"),
    ("a cold front", "the storm", "heavy rain", "the afternoon sun", "thick fog", "strong winds"),
)
_VERBS = (
    ("scored twice in", "won the final of", "trained hard before", "lost on penalties in", "celebrated after"),
    ("raised interest rates in", "reported record profits in", "sold shares during", "cut the dividend in"),
    ("brought snow to", "flooded the streets of", "cleared over", "swept across", "lingered over"),
)
_OBJECTS = (
    ("the league match", "the second half", "the championship", "the stadium", "the tournament"),
    ("the third quarter", "the market", "a volatile session", "the annual report", "the trading day"),
    ("the northern valleys", "the coast", "the city", "the mountain passes", "the weekend forecast"),
)


def topic_sentences(rows: int, seed: int = DEFAULT_SEED) -> tuple[list[str], list[int]]:
    """`rows` sentences and their topic ids, classes balanced in turn; the same for the same seed."""
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    labels: list[int] = []
    for row in range(rows):
        topic = row % len(TOPICS)
        subject = _SUBJECTS[topic][rng.integers(len(_SUBJECTS[topic]))]
        verb = _VERBS[topic][rng.integers(len(_VERBS[topic]))]
        # A mixed row borrows its object from another topic: the verb and subject still decide.
        other = (topic + 1 + int(rng.integers(len(TOPICS) - 1))) % len(TOPICS)
        source = other if rng.random() < MIXED_FRACTION else topic
        obj = _OBJECTS[source][rng.integers(len(_OBJECTS[source]))]
        texts.append(f"{subject} {verb} {obj}".capitalize() + ".")
        labels.append(topic)
    return texts, labels


def text_versions(out_dir: Path, seed: int = DEFAULT_SEED) -> dict[str, Path]:
    """Writes the versions as CSV into `out_dir` (atomically); returns {version: path}. v2 starts with v1's rows."""
    texts, labels = topic_sentences(max(ROWS.values()), seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for version, rows in ROWS.items():
        paths[version] = out_dir / f"topics_{version}.csv"
        write_csv_atomically(pa.table({"text": texts[:rows], "label": labels[:rows]}), paths[version])
    return paths


def main(argv: list[str]) -> int:
    """`python -m ml.demo_text OUT_DIR`: writes the versions and prints where."""
    if len(argv) != 1:
        print("usage: python -m ml.demo_text OUT_DIR", file=sys.stderr)
        return 2
    print("\n".join(f"{version}: {path}" for version, path in text_versions(Path(argv[0])).items()))
    return 0


if __name__ == "__main__":  # pragma: no cover - a convenience for users of the example
    sys.exit(main(sys.argv[1:]))
