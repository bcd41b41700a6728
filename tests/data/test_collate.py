import torch

from loralab.data.collate import length_grouped_order, pad_batch


def test_right_and_left_padding():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = pad_batch(examples, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = pad_batch([{"input_ids": [1, 2]}, {"input_ids": [3]}], pad_id=9, side="left")
    assert left["input_ids"].tolist() == [[1, 2], [9, 3]] and left["attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert pad_batch([{"input_ids": [1], "labels": 2}], 0)["labels"].tolist() == [2]


def test_length_grouping_is_a_permutation_with_less_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (1000,), generator=g).tolist()
    order = length_grouped_order(lengths, 8, torch.Generator().manual_seed(1))
    assert sorted(order) == list(range(1000))

    def padding(o):
        return sum(max(lengths[i] for i in o[k:k + 8]) * len(o[k:k + 8]) - sum(lengths[i] for i in o[k:k + 8])
                   for k in range(0, len(o), 8))

    assert padding(order) < 0.2 * padding(torch.randperm(1000, generator=g).tolist())
