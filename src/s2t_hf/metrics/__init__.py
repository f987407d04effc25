"""Metrics of S2T, shipped as `evaluate` modules that load from the installed package (no Hub access).

- `hit_at_k` (local sufficiency): how often the teacher's choice lies in the student's top-K, for several K.
- `answer_accuracy`: exact match of extracted final answers.

Examples:

```python
>>> from s2t_hf.metrics import load_metric
>>> hit = load_metric("hit_at_k")
>>> hit.compute(predictions=[[5, 3, 9], [1, 2, 4]], references=[3, 7], ks=[1, 2])
{'hit@1': 0.0, 'hit@2': 0.5}

```
"""

from __future__ import annotations

import os


METRICS = ("hit_at_k", "answer_accuracy")


def metric_path(name: str) -> str:
    """Local path of one of the shipped metric modules."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; s2t_hf ships {METRICS}.")
    return os.path.join(os.path.dirname(__file__), name, f"{name}.py")


def load_metric(name: str, **kwargs):
    """`evaluate.load` of a shipped metric from its local path (works offline)."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)
