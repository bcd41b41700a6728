"""The label distribution and majority-class baseline a classification run reports beside its metrics."""

from loralab.tasks.classification import label_baseline


def test_the_majority_baseline_is_the_validation_share_of_the_most_frequent_training_label():
    labels = ["neg", "neu", "pos"]
    train = [{"labels": 2}] * 6 + [{"labels": 0}] * 2  # 'neu' never occurs in training
    validation = [{"labels": 2}] * 3 + [{"labels": 0}] * 1 + [{"labels": 1}] * 1
    stats = label_baseline(train, validation, labels)
    assert stats["label_counts"] == {"neg": 2, "neu": 0, "pos": 6}
    assert stats["majority_label"] == "pos" and stats["majority_baseline_accuracy"] == 3 / 5
    assert "majority_baseline_accuracy" not in label_baseline(train, [], labels)
