"""The chunked causal-LM loss equals the model's own loss and gradients; packed rows equal unpacked batches."""

import pytest
import torch

import loralab.fast.lm_loss as lm_loss
from loralab.data.collate import pack_batch, pad_batch
from loralab.errors import LoralabError
from loralab.fast.lm_loss import (
    LinearCrossEntropy,
    TrainingLoss,
    causal_lm_loss,
    check_packing,
    scored_positions,
    supports_chunked_loss,
)
from loralab.lora import LoraConfig, apply_lora
from loralab.train.step import train_step
from tiny_models import tiny_model


def examples(seed=0, n=5, vocab=128):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + 3 * i
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = 2 + i % 3  # the first tokens are prompt: not scored
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def lora_model(model_type, **kw):
    model = tiny_model(model_type, head="causal", **kw)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 would hide mistakes in the LoRA path's gradients
    return model.eval()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_linear_cross_entropy_matches_torch_in_value_and_gradients(monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", 500)  # several chunks of 10 rows
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    ours = LinearCrossEntropy.apply(hidden, weight, targets)
    (3 * ours).backward()
    ours_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
    (3 * reference).backward()
    assert torch.allclose(ours, reference, atol=1e-6)
    assert torch.allclose(ours_grads[0], hidden.grad, atol=1e-6)
    assert torch.allclose(ours_grads[1], weight.grad, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "bloom"])
def test_chunked_loss_equals_the_models_own_loss_and_gradients(model_type, monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", 128 * 7)  # 7 rows per chunk: several chunks
    model = lora_model(model_type)
    assert supports_chunked_loss(model)
    batch = pad_batch(examples(), pad_id=0)
    reference = model(**batch).loss
    reference.backward()
    expected = grads(model)
    model.zero_grad()
    ours = causal_lm_loss(model, batch)
    ours.backward()
    assert abs(ours.item() - reference.item()) < 1e-5
    for name, grad in grads(model).items():
        assert torch.allclose(grad, expected[name], atol=1e-5), name


def test_scored_positions_are_those_whose_next_token_is_labelled():
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    # row 0: positions 0 and 1 predict 5 and 6; row 1 (from 4 on): positions 5 and 6 predict 7 and 8
    assert scored_positions(labels).tolist() == [0, 1, 5, 6]
    assert scored_positions(torch.full((2, 3), -100)).numel() == 0


def test_models_with_logit_scaling_keep_their_own_loss():
    model = tiny_model("gemma2", head="causal")
    assert not supports_chunked_loss(model)
    batch = pad_batch(examples(), pad_id=0)
    assert torch.allclose(causal_lm_loss(model, batch), model(**batch).loss)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_packed_rows_give_the_unpacked_loss_and_gradients(model_type):
    model = lora_model(model_type)
    data = examples(seed=1, n=6)
    unpacked = causal_lm_loss(model, pad_batch(data, pad_id=0))
    unpacked.backward()
    expected = grads(model)
    model.zero_grad()
    rows = [[data[0], data[5]], [data[1], data[2], data[3]], [data[4]]]  # uneven rows: the last is padded
    batch = pack_batch(rows, pad_id=0)
    assert batch["position_ids"][1].tolist()[:10] == list(range(9)) + [0]  # data[1] has 9 tokens
    packed = causal_lm_loss(model, batch)
    packed.backward()
    assert abs(packed.item() - unpacked.item()) < 1e-5
    for name, grad in grads(model).items():
        assert torch.allclose(grad, expected[name], atol=1e-5), name
    check_packing(model, "cpu", torch.autocast("cpu", enabled=False))  # passes on a model that keeps rows apart


class RoundingLM(torch.nn.Module):
    """Keeps examples apart, but its logits carry rounding that depends on the row's length, as bf16 kernels'
    do (SmolLM2 in bf16: 2% of the largest logit between a 5-token row and a 12-token one)."""

    def __init__(self, rounding: float):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 8)
        self.rounding = rounding

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, position_ids, use_cache, **packed):
        logits = self.embed(input_ids) + position_ids[..., None]
        noise = torch.sin(torch.arange(logits.numel()).view_as(logits) * (1.0 + input_ids.shape[1]))
        return type("Output", (), {"logits": logits + self.rounding * noise * logits.abs().max()})


def test_packing_check_tells_rounding_from_attention_across_examples():
    check_packing(RoundingLM(0.03), "cpu", torch.autocast("cpu", enabled=False))  # refused before: 3% > 1%


class OffsetRoundingLM(RoundingLM):
    """Keeps examples apart and rounds a row's first example exactly as when it runs alone, but not the examples
    after it, as torch's variable-length flash kernel does on an H100 (Llama-1B shapes in bf16: the second
    example's logits 1.3% of the largest away, the first's identical)."""

    def forward(self, input_ids, position_ids, use_cache, **packed):
        logits = self.embed(input_ids) + position_ids[..., None]
        later = position_ids != torch.arange(input_ids.shape[1])  # tokens of an example that starts further in
        return type("Output", (), {"logits": logits + self.rounding * later[..., None] * logits.abs().max()})


def test_packing_check_passes_rounding_that_spares_the_first_example():
    check_packing(OffsetRoundingLM(0.013), "cpu", torch.autocast("cpu", enabled=False))  # refused before: 1.3% > 1%
    with pytest.raises(LoralabError, match="moved by"):  # rounding as large as attending across is not rounding
        check_packing(OffsetRoundingLM(1.0), "cpu", torch.autocast("cpu", enabled=False))


class OwnCodeLM(RoundingLM):
    """A model of its own code (trust_remote_code) that takes no keyword arguments beyond its own."""

    def forward(self, input_ids, position_ids, use_cache):
        return super().forward(input_ids, position_ids, use_cache)


def test_packing_is_refused_for_a_model_that_takes_no_packed_row_arguments():
    with pytest.raises(LoralabError, match="OwnCodeLM does not take the arguments of packed rows") as error:
        check_packing(OwnCodeLM(0.0), "cpu", torch.autocast("cpu", enabled=False))
    assert "data.packing=false" in str(error.value)


class BrokenPackedLM(RoundingLM):
    """Takes the packed arguments but fails on them with a TypeError of its own."""

    def forward(self, input_ids, position_ids, use_cache, **packed):
        if packed:
            return None + 1
        return super().forward(input_ids, position_ids, use_cache)


def test_packing_check_lets_other_type_errors_through():
    with pytest.raises(TypeError, match="unsupported operand"):  # a bug of the model's, not a missing argument
        check_packing(BrokenPackedLM(0.0), "cpu", torch.autocast("cpu", enabled=False))


def test_packing_is_refused_for_a_model_whose_attention_crosses_examples():
    model = lora_model("bloom")  # ALiBi attention ignores position ids
    with pytest.raises(LoralabError, match="data.packing"):
        check_packing(model, "cpu", torch.autocast("cpu", enabled=False))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "bloom"])
def test_training_step_without_the_padding_mask_gives_the_masked_loss_and_gradients(model_type):
    """Training drops the attention mask of right-padded causal batches: the same loss and gradients as with it,
    for rotary, learned (OPT counts positions from the mask) and ALiBi positions alike."""
    model = lora_model(model_type)  # in eval mode: gpt2 and opt would draw dropout masks
    data = examples(seed=2, n=4)
    masked = model(**pad_batch(data, pad_id=0)).loss
    masked.backward()
    expected = grads(model)
    model.zero_grad()
    off = torch.autocast("cpu", enabled=False)
    loss, tokens = train_step(TrainingLoss(model, causal=True), [[[e] for e in data]], 0, torch.device("cpu"), off,
                              torch.amp.GradScaler("cpu", enabled=False), causal=True)
    assert tokens == sum(len(e["input_ids"]) for e in data)
    assert abs(loss - masked.item()) < 1e-5
    for name, grad in grads(model).items():
        assert torch.allclose(grad, expected[name], atol=1e-5), name
