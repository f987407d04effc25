"""Answer accuracy: exact match of extracted final answers (missing answers count as wrong)."""

import datasets
import evaluate


_DESCRIPTION = """
The fraction of problems whose extracted final answer equals the reference. `predictions` are the extracted answers as
strings (an empty string when no answer could be extracted), `references` the correct answers as strings; both are
compared after stripping surrounding whitespace.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): extracted answers ("" when missing).
    references (`list` of `str`): correct answers.
Returns:
    `dict`: `accuracy`, `missing` (fraction without an extracted answer) and `count`.
Examples:
    >>> acc = evaluate.load("answer_accuracy.py")  # doctest: +SKIP
    >>> acc.compute(predictions=["12", "", "7"], references=["12", "3", "8"])  # doctest: +SKIP
    {'accuracy': 0.3333333333333333, 'missing': 0.3333333333333333, 'count': 3}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AnswerAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("answer_accuracy needs at least one prediction.")
        correct = sum(p.strip() == r.strip() and p.strip() != "" for p, r in zip(predictions, references))
        missing = sum(p.strip() == "" for p in predictions)
        return {"accuracy": correct / len(predictions), "missing": missing / len(predictions), "count": len(predictions)}
