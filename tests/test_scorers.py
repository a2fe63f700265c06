"""Detection and fuzzing scores (answers and log-odds), best-of-N and the shuffled baseline on constructed
cases; the log-odds scorer on a real SmolLM2-135M-Instruct (marked ``real``)."""

from __future__ import annotations

import numpy as np
import pytest

from neuronatlas.errors import NeuronAtlasError
from neuronatlas.explain import ExplainOptions, balanced_accuracy, context_text, judged
from neuronatlas.explain.exemplars import Exemplar
from neuronatlas.explain.neuron import add_baselines, explain_neuron, material_of
from neuronatlas.explain.scorers import auroc, by_origin, by_threshold, fuzzing_samples, judged_labelled, ranked_decisions

CAT = ["the", " cat", " sat", " on", " the", " mat"]
DOG = ["a", " dog", " ran", " far", " away", " now"]


def context(tokens, peak=None, value=5.0):
    activations = np.zeros(len(tokens), np.float32)
    if peak is not None:
        activations[peak] = value
    return tokens, activations


class RuleJudge:
    """Says yes when the text holds ``word`` (detection) or when the marked text is exactly ``word``
    (fuzzing); records how many texts it saw per call."""

    name = "rule"

    def __init__(self, word: str):
        self.word, self.calls = word, []

    def judge(self, explanation, texts, task):
        self.calls.append((explanation, task, len(texts)))
        if task == "detection":
            return [self.word in text for text in texts]
        return [f"<<{self.word}>>" in text and text.count("<<") == 1 for text in texts]


def test_balanced_accuracy():
    assert balanced_accuracy([True, True, False, False], [True, True, False, False]) == 1.0
    assert balanced_accuracy([True, True, False, False], [True, True, True, True]) == 0.5  # always yes: no skill
    assert balanced_accuracy([True, False, False, False], [True, True, False, False]) == pytest.approx((1 + 2 / 3) / 2)
    assert balanced_accuracy([True, True], [True, False]) is None  # no negative: undefined


def test_context_text_marks_and_joins_bytes():
    assert context_text(CAT, {1, 2}) == "the<< cat sat>> on the mat"
    assert context_text(CAT, {5}) == "the cat sat on the<< mat>>"
    # Byte tokens cut inside both Cyrillic letters of "Да": the three tokens show as one span, marked
    # when one of them is.
    pieces = [b" \xd0", b"\x94\xd0", b"\xb0", b"!"]
    assert context_text(pieces) == " Да!"
    assert context_text(pieces, {2}) == "<< Да>>!"
    assert context_text(pieces, {3}) == " Да<<!>>"
    assert "\ufffd" not in context_text(pieces, {0})


def test_detection_by_a_rule_gives_the_expected_accuracy():
    contexts = [context(CAT, 1)] * 3 + [context(DOG, 1), context(DOG)] + [context(CAT)] * 2
    # Active (max >= 1): the three cat contexts and one dog context. The judge says yes for "cat":
    # 3 of 4 active right; of 3 inactive (one dog, two cat texts) only the dog one is a right "no".
    score = judged(RuleJudge("cat"), "cats", "detection", contexts, threshold=1.0)
    assert (score.positives, score.negatives) == (4, 3)
    assert score.value == pytest.approx((3 / 4 + 1 / 3) / 2)
    perfect = judged(RuleJudge("cat"), "cats", "detection", [context(CAT, 1), context(DOG)], threshold=1.0)
    assert perfect.value == 1.0


def test_fuzzing_marks_true_tokens_and_random_ones():
    contexts = [context(CAT, 1)] * 4 + [context(DOG)] * 6
    samples = fuzzing_samples(by_threshold(contexts, 1.0), seed=3)
    assert [s.text for s in samples if s.truth] == ["the<< cat>> sat on the mat"] * 4
    wrong = [s.text for s in samples if not s.truth]
    assert len(wrong) == 6 and all(t.count("<<") == 1 and t.replace("<<", "").replace(">>", "") == "a dog ran far away now" for t in wrong)
    judge = RuleJudge(" cat")
    score = judged(judge, "cats", "fuzzing", contexts, threshold=1.0, seed=3)
    assert score.value == 1.0 and (score.positives, score.negatives) == (4, 6)
    assert judged(judge, "cats", "fuzzing", [context(DOG)] * 3, threshold=1.0).value is None  # no active context
    assert len(judge.calls) == 1  # nothing to tell apart: the judge was not asked


class Backend:
    """An explainer that samples from a fixed list and a judge that knows which explanation is right."""

    name = "fake"

    def __init__(self, replies, right):
        self.replies, self.right, self.sampled = replies, right, []

    def explain(self, excerpts):
        return self.replies[0]

    def explain_samples(self, excerpts, count, temperature, seed=0):
        self.sampled.append((count, temperature))
        return self.replies[:count]

    def simulate(self, explanation, tokens):
        return np.arange(len(tokens), dtype=float)

    def judge(self, explanation, texts, task):
        right = explanation == self.right
        return [(" cat" in t) == right for t in texts]  # the right explanation answers right, others the reverse


def exemplars(tokens, peak, count, kind="top", value=5.0):
    return [Exemplar(list(range(len(tokens))), tokens, context(tokens, peak, value)[1], i, 0, kind) for i in range(count)]


def test_best_of_n_keeps_the_best_on_held_out_and_records_all():
    backend = Backend(["dogs", "cats", "mats"], right="cats")
    options = ExplainOptions(top=3, holdout=3, scorers=("detection", "simulation"), samples=3, temperature=0.9)
    options.check()
    material = material_of(exemplars(CAT, 1, 6), exemplars(DOG, None, 4, "random"), options)
    record = explain_neuron(0, 7, material, backend, backend, options)
    assert backend.sampled == [(3, 0.9)]
    assert [c["explanation"] for c in record["candidates"]] == ["dogs", "cats", "mats"]
    assert [c["score"] for c in record["candidates"]] == [0.0, 1.0, 0.0]
    assert record["explanation"] == "cats" and record["scores"]["detection"]["score"] == 1.0
    assert record["scores"]["detection"]["n_activating"] == 3 and record["scores"]["detection"]["n_non_activating"] == 4
    assert record["scores"]["simulation"]["n_contexts"] == 7


def test_baseline_is_another_neurons_explanation_on_this_neurons_contexts():
    options = ExplainOptions(top=3, holdout=3, scorers=("detection",))
    records, materials = [], []
    for index, (reply, tokens) in enumerate([("cats", CAT), ("dogs", DOG), ("mats", CAT)]):
        backend = Backend([reply], right=reply)
        materials.append(material_of(exemplars(tokens, 1, 6), exemplars(DOG if tokens is CAT else CAT, None, 3, "random"), options))
        records.append(explain_neuron(0, index, materials[-1], backend, backend, options))
    judge = Backend([""], right="cats")  # only "cats" judges right
    add_baselines(records, materials, judge, options)
    assert [r["baseline_from"]["explanation"] for r in records] == ["dogs", "mats", "cats"]  # the next neuron's, cyclically
    assert records[0]["scores"]["detection"]["baseline"] == 0.0  # "dogs" on neuron 0's cat contexts
    assert records[2]["scores"]["detection"]["baseline"] == 1.0  # "cats" on neuron 2's cat contexts
    single = [dict(records[0])]
    add_baselines(single, materials[:1], judge, options)
    assert single[0]["baseline_from"] is None and single[0]["scores"]["detection"]["baseline"] is None


def test_options_are_checked():
    for bad in (dict(scorers=("detection", "vibes")), dict(scorers=()), dict(samples=0), dict(samples=3, temperature=0),
                dict(active=0), dict(scorers=("fuzzing", "fuzzing"))):
        with pytest.raises(NeuronAtlasError):
            ExplainOptions(**bad).check()


# ---- scores from log-odds: AUROC and balanced accuracy at the ranked threshold ----------------------


def test_auroc_counts_pairs_and_ties():
    assert auroc([True, True, False, False], [3.0, 2.0, 1.0, 0.0]) == 1.0
    assert auroc([True, True, False, False], [0.0, 1.0, 2.0, 3.0]) == 0.0
    assert auroc([True, False, False], [1.0, 1.0, 0.0]) == pytest.approx((0.5 + 1) / 2)  # one tie of two pairs
    assert auroc([True, True], [1.0, 2.0]) is None
    truth = [True, True, False, False, False]
    answers = [True, False, True, False, False]
    assert auroc(truth, np.asarray(answers, float)) == pytest.approx(balanced_accuracy(truth, answers))


def test_ranked_decisions_say_yes_as_often_as_there_are_positives():
    truth = [True, False, True, False]
    assert ranked_decisions(truth, [5.0, 4.0, 6.0, 1.0]).tolist() == [True, False, True, False]  # the median splits
    assert ranked_decisions([True, False, False, False], [0.3, 0.1, 0.2, 0.4]).tolist() == [False, False, False, True]
    assert ranked_decisions(truth, [2.0] * 4).sum() == 0  # a constant judge: no information, no yes


class OddsJudge:
    """Log-odds that are positive for every text (its answer is always yes) but higher for ``word``."""

    name = "odds"

    def __init__(self, word):
        self.word, self.calls = word, 0

    def judge(self, explanation, texts, task):
        raise AssertionError("a log-odds judge is scored from its log-odds")

    def judge_log_odds(self, explanation, texts, task):
        self.calls += 1
        return np.array([3.0 + (self.word in text) + 0.01 * len(text) for text in texts])


def test_log_odds_judge_is_scored_by_rank_not_by_its_answer():
    contexts = [context(CAT, 1), context(CAT, 2), context(DOG), context(DOG), context(DOG)]
    score = judged(OddsJudge("cat"), "cats", "detection", contexts, threshold=1.0).as_dict()
    assert score["score_at_zero"] == 0.5  # it answers yes everywhere: the old score
    assert score["auc"] == 1.0 and score["score"] == 1.0 and score["judged_by"] == "log-odds"
    wrong = judged(OddsJudge("zebra"), "zebras", "detection", contexts, threshold=1.0).as_dict()
    assert wrong["auc"] == pytest.approx(auroc([True, True, False, False, False], [0.01 * len("the cat sat on the mat")] * 2
                                               + [0.01 * len("a dog ran far away now")] * 3))
    judge = OddsJudge("cat")
    assert judged(judge, "cats", "detection", [context(DOG)] * 3, threshold=1.0).auc is None and judge.calls == 0


def test_by_origin_labels_as_drawn_and_marks_near_each_peak():
    weak = (CAT, np.array([0, 0.1, 0.04, 0, 0, 0.02], np.float32))  # a weak band: peak 0.1
    strong = (DOG, np.array([0, 4.0, 0, 3.0, 0, 0], np.float32))
    quiet = (DOG, np.zeros(6, np.float32))
    labelled = by_origin([weak, strong, quiet], [True, True, False], fraction=0.3)
    assert [c.active for c in labelled] == [True, True, False]
    assert [c.marks for c in labelled] == [[1, 2], [1, 3], []]  # >= 0.3 x its own peak
    assert by_threshold([weak, strong, quiet], 1.0)[0].active is False  # an absolute threshold misses the weak band


# ---- the log-odds scorer on a real instruction-tuned model --------------------------------------------

CAT_TEXTS = ["The cat sat on the mat.", "My cat likes fish.", "A black cat crossed the road.", "Feed the cat now.",
             "The cat is asleep.", "Her cat ran away.", "That cat is very old.", "We found a cat in the garden."]
OTHER_TEXTS = ["The train leaves at noon.", "Rain fell all day.", "He paid the bill.", "The bus was late again.",
               "She reads a book.", "Open the window please.", "The soup is hot.", "They play football on Sunday."]


class Recorded:
    """A judge that keeps the texts and log-odds of its last call."""

    def __init__(self, judge):
        self.inner, self.name, self.seen = judge, judge.name, None

    def judge_log_odds(self, explanation, texts, task):
        odds = self.inner.judge_log_odds(explanation, texts, task)
        self.seen = (texts, odds)
        return odds

    def judge(self, explanation, texts, task):
        return self.inner.judge(explanation, texts, task)


@pytest.mark.real
def test_smollm2_log_odds_detect_a_named_word_above_shuffled_controls():
    """A neuron that fires on "cat": SmolLM2-135M-Instruct judges 8 cat and 8 other sentences with the
    right explanation and with another neuron's ("the word train", the shuffled-explanation baseline).
    Its yes/no answers do not tell them apart (measured: the same answer everywhere, balanced accuracy
    0.5); the AUROC of its log-odds does: above 95% of label shuffles and 0.15 above the baseline."""
    from neuronatlas.explain import LocalModel
    from neuronatlas.real_models import real_model_path

    path = real_model_path("smollm2-135m")
    if path is None:
        pytest.skip("SmolLM2-135M is not fetched (make real-models)")
    model = Recorded(LocalModel(str(path), batch_size=16, quiet=True))
    contexts = [([text], np.array([5.0 if text in CAT_TEXTS else 0.0])) for text in CAT_TEXTS + OTHER_TEXTS]
    right = judged_labelled(model, "the word cat", "detection", by_threshold(contexts, 1.0))
    texts, odds = model.seen
    truth = [text in CAT_TEXTS for text in texts]
    shuffled = judged_labelled(model, "the word train", "detection", by_threshold(contexts, 1.0))
    rng = np.random.default_rng(0)
    null = [auroc(rng.permutation(truth), odds) for _ in range(2000)]
    print(f"\nSmolLM2 detection: right AUC {right.auc:.3f} BA {right.value:.3f} (at zero {right.at_zero:.3f}); "
          f"shuffled explanation AUC {shuffled.auc:.3f} BA {shuffled.value:.3f}; label-shuffle 95% {np.quantile(null, 0.95):.3f}")
    assert right.auc > np.quantile(null, 0.95)
    assert right.auc > shuffled.auc + 0.15
    assert right.value > 0.5
