import torch

from loralab.data.collate import length_grouped_order, pack_batch, packed_rows, pad_batch, to_device


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


def test_packed_rows_restart_positions_and_say_where_the_examples_begin():
    def example(n):
        return {"input_ids": list(range(10, 10 + n)), "labels": list(range(10, 10 + n))}

    batch = pack_batch([[example(3), example(2)], [example(4)]], pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 10, 11], [10, 11, 12, 13, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]  # padding gets its own
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, 11], [-100, 11, 12, 13, -100]]
    # the rows end to end: examples at 0 and 3, the second row's at 5, its padding at 9; 10 tokens in all
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 10]
    assert batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"]
    assert batch["max_length_q"] == batch["max_length_k"] == 4
    moved = to_device(batch, torch.device("meta"))  # tensors moved, the lengths left as ints
    assert moved["cu_seq_lens_q"].is_meta and moved["max_length_q"] == 4


def test_packed_rows_are_full_and_mix_other_examples_each_epoch():
    lengths = torch.randint(20, 750, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    epochs = [packed_rows(lengths, 2048, torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    for rows in epochs:
        assert sorted(i for row in rows for i in row) == list(range(200))  # every example once
        assert all(sum(lengths[i] for i in row) <= 2048 for row in rows)
        assert len(rows) <= sum(lengths) / 2048 / 0.95 + 1  # rows ~full
    # another mix each epoch: sorted by length first, most rows came out the same in every epoch
    shared = {frozenset(r) for r in epochs[0]} & {frozenset(r) for r in epochs[1]}
    assert len(shared) <= 1
