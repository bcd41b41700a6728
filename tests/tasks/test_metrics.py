import random

from seqeval.metrics import f1_score, precision_score, recall_score

from loralab.tasks.metrics import bio_entities, classification_metrics, entity_metrics


def test_entity_metrics_equal_seqeval_on_random_sequences():
    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG", "B-ORG"]
    for _ in range(300):
        gold = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(5)]
        predicted = [[rng.choice(tags) for _ in row] for row in gold]
        ours = entity_metrics(gold, predicted)
        assert abs(ours["precision"] - precision_score(gold, predicted)) < 1e-12
        assert abs(ours["recall"] - recall_score(gold, predicted)) < 1e-12
        assert abs(ours["f1"] - f1_score(gold, predicted)) < 1e-12


def test_bio_chunks():
    assert bio_entities(["B-A", "I-A", "O", "I-B", "B-B", "I-A"]) == {("A", 0, 1), ("B", 3, 3), ("B", 4, 4),
                                                                     ("A", 5, 5)}


def test_classification_metrics_by_hand():
    m = classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", "b"])
    assert m["accuracy"] == 0.75
    # a: p=1, r=0.5, f1=2/3; b: p=2/3, r=1, f1=0.8
    assert abs(m["macro_precision"] - (1 + 2 / 3) / 2) < 1e-12
    assert abs(m["macro_recall"] - 0.75) < 1e-12
    assert abs(m["macro_f1"] - (2 / 3 + 0.8) / 2) < 1e-12
