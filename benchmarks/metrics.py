"""LongBench's quality metrics, re-implemented in plain Python (no nltk, rouge or fuzzywuzzy).

Every metric maps `(prediction, ground_truth)` to a float in [0, 1]; `score` applies LongBench's
per-dataset metric and takes the maximum over the reference answers, as LongBench's `eval.py` does.

Deliberate differences from LongBench's reference code, each small:
- `rouge_l_score` is the sentence-level LCS F1 on lowercased word tokens; the `rouge` package
  LongBench uses splits on "." for a summary-level LCS and weights F by beta = P/R.
- `code_sim_score` uses `difflib.SequenceMatcher.ratio` where LongBench uses `fuzz.ratio`
  (python-Levenshtein); both are 2*matches/total and agree on most inputs.
- `classification_score` drops every partial match at once; LongBench removes from the list
  while iterating over it, which skips an element now and then.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase; drop punctuation, the articles a/an/the and extra whitespace (SQuAD/LongBench)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    common = Counter(prediction_tokens) & Counter(reference_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """Bag-of-tokens F1 between the normalized prediction and ground truth."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 when both strings normalize to the same answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def contains_answer(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalized ground truth occurs in the normalized prediction as whole words.

    For short-answer QA where a chatty model answers in a sentence ("Maria Holm founded it in
    1998." contains "Maria Holm"); "3" does not occur in "13 lamps".
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    if not ref:
        return 0.0
    return float(any(pred[i:i + len(ref)] == ref for i in range(len(pred) - len(ref) + 1)))


def token_f1(a: str, b: str) -> float:
    """Symmetric token F1 between two outputs (e.g. cached vs. uncached); two empty outputs agree."""
    a_tokens, b_tokens = normalize_answer(a).split(), normalize_answer(b).split()
    if not a_tokens and not b_tokens:
        return 1.0
    return _f1(a_tokens, b_tokens)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    # One row of the classic DP table; O(len(a) * len(b)) time, O(len(b)) memory.
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _rouge_tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l_score(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F1: longest common subsequence of lowercased word tokens."""
    pred, ref = _rouge_tokens(prediction), _rouge_tokens(ground_truth)
    if not pred or not ref:
        return 0.0
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] | None) -> float:
    """LongBench classification: credit 1/len(matches) if the ground truth is among the matched classes.

    A class matches when it occurs as a substring of the prediction; matches that are strict
    substrings of the ground truth ("location" inside "other location") are discarded first.
    """
    if not all_classes:
        raise ValueError(f"classification_score needs all_classes, got {all_classes!r}")
    matches = [c for c in all_classes if c in prediction]
    matches = [c for c in matches if c == ground_truth or c not in ground_truth]
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _share_of_numbers_equal_to(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == target for n in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str) -> float:
    """LongBench passage_retrieval: share of the numbers in the prediction equal to "Paragraph N"'s N."""
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    if not found:
        raise ValueError(f"retrieval ground truth must look like 'Paragraph N', got {ground_truth!r}")
    return _share_of_numbers_equal_to(prediction, found[0])


def count_score(prediction: str, ground_truth: str) -> float:
    """LongBench passage_count: share of the numbers in the prediction equal to the ground truth."""
    return _share_of_numbers_equal_to(prediction, str(ground_truth).strip())


def code_sim_score(prediction: str, ground_truth: str) -> float:
    """Edit similarity of the first line of code in the prediction (skipping fences and comments)."""
    first_code_line = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            first_code_line = line
            break
    return difflib.SequenceMatcher(None, first_code_line, ground_truth, autojunk=False).ratio()


Metric = Callable[[str, str, Sequence[str] | None], float]


def _without_classes(metric: Callable[[str, str], float]) -> Metric:
    return lambda prediction, ground_truth, all_classes=None: metric(prediction, ground_truth)


DATASET_METRIC: dict[str, Metric] = {
    **{name: _without_classes(qa_f1_score) for name in (
        "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa")},
    **{name: _without_classes(rouge_l_score) for name in ("gov_report", "qmsum", "multi_news", "samsum")},
    "trec": classification_score,
    "passage_retrieval_en": _without_classes(retrieval_score),
    "passage_count": _without_classes(count_score),
    "lcc": _without_classes(code_sim_score),
    "repobench-p": _without_classes(code_sim_score),
}
"""LongBench dataset name -> metric(prediction, ground_truth, all_classes)."""

# Few-shot datasets: the model tends to continue with the next example, so only its first line counts.
_FIRST_LINE_ONLY = frozenset({"trec", "triviaqa", "samsum"})


def metric_for(dataset: str) -> Metric:
    """The metric of a LongBench dataset; LongBench-E names ("hotpotqa_e") map to their base."""
    base = dataset[:-2] if dataset.endswith("_e") and dataset[:-2] in DATASET_METRIC else dataset
    if base not in DATASET_METRIC:
        raise KeyError(f"no metric for dataset {dataset!r}; known: {sorted(DATASET_METRIC)}")
    return DATASET_METRIC[base]


def score(dataset: str, prediction: str, answers: Sequence[str],
          all_classes: Sequence[str] | None = None) -> float:
    """Score one prediction as LongBench does: best metric value over the reference answers.

    Args:
        dataset: LongBench dataset name (a key of `DATASET_METRIC`, optionally with "_e").
        prediction: the model's output.
        answers: the reference answers; an empty list scores 0.0.
        all_classes: the label set, needed by classification datasets (trec).

    Returns:
        A float in [0, 1] (LongBench reports 100 times the mean of these).
    """
    metric = metric_for(dataset)
    base = dataset[:-2] if dataset.endswith("_e") else dataset
    if base in _FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max((metric(prediction, answer, all_classes) for answer in answers), default=0.0)
