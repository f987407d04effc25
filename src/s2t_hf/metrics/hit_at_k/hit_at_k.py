"""Hit@K (local sufficiency): the fraction of steps where the reference token lies in the top-K predictions."""

import datasets
import evaluate


_DESCRIPTION = """
Local sufficiency (Select to Think, arXiv 2604.26940): at divergence points the teacher's preferred token is almost
always among the student's top-K candidates. `predictions` are the student's candidate ids ranked best first,
`references` the teacher's chosen id; hit@K is the fraction of steps whose reference is among the first K predictions.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): ranked candidate ids per step (at least max(ks) of them).
    references (`list` of `int`): the teacher's choice per step.
    ks (`list` of `int`, *optional*, defaults to `[1, 2, 4, 8, 16]`): the K values; those above the number of
        candidates given are skipped.
Returns:
    `dict`: `hit@K` for each K.
Examples:
    >>> import evaluate
    >>> hit = evaluate.load("hit_at_k.py")  # doctest: +SKIP
    >>> hit.compute(predictions=[[5, 3, 9]], references=[3], ks=[1, 2])  # doctest: +SKIP
    {'hit@1': 0.0, 'hit@2': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class HitAtK(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, ks=(1, 2, 4, 8, 16)):
        if len(predictions) == 0:
            raise ValueError("hit_at_k needs at least one step; got no predictions.")
        width = min(len(p) for p in predictions)
        out = {}
        for k in ks:
            if k > width:
                continue
            hits = sum(int(ref in list(pred)[:k]) for pred, ref in zip(predictions, references))
            out[f"hit@{k}"] = hits / len(predictions)
        return out
