"""Generation during training and inference stays within the model's positions."""

import torch

from loralab.tasks.evaluation import fit_to_positions, generate
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer


def test_fit_to_positions_cuts_the_answer_then_the_prompt_start():
    assert fit_to_positions(40, 16, None) == (40, 16)  # no limit
    assert fit_to_positions(40, 16, 64) == (40, 16)  # fits
    assert fit_to_positions(56, 16, 64) == (48, 16)  # 8 free < a quarter of 64: the prompt loses 8 at its start
    assert fit_to_positions(40, 64, 64) == (40, 24)  # the answer takes the room the prompt leaves
    assert fit_to_positions(100, 16, 64) == (48, 16)
    for width, new, limit in [(1, 1, 2), (63, 100, 64), (5, 3, 8), (500, 500, 64)]:
        keep, fitted = fit_to_positions(width, new, limit)
        assert 0 < keep <= width and 0 < fitted <= new and keep + fitted <= limit


def test_generate_past_a_learned_position_table_does_not_crash():
    # gpt2's positions are a learned table of n_positions rows: one past it is an index error in the embedding
    tokenizer = tiny_tokenizer()
    model = tiny_model("gpt2", vocab_size=len(tokenizer), n_positions=32)
    prompts = [{"input_ids": list(range(5, 35))}, {"input_ids": list(range(5, 12))}]  # 30 and 7 tokens
    answers = generate(model, tokenizer, prompts, 2, 16, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert len(answers) == 2
