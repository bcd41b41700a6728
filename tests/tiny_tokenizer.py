"""A small byte-level BPE tokenizer trained in memory, with chat special tokens: no hub needed."""

from __future__ import annotations

from functools import cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>", "[gMASK]", "sop", "<|user|>", "<|assistant|>", "<|system|>"]
CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Response: [INST] [/INST] <<SYS>> <</SYS>> system user assistant",
    "Give three tips for staying healthy. Eat well, sleep enough and exercise every day.",
    "What is the capital of France? Paris is the capital of France. positive negative neutral complaint",
    "The quick brown fox jumps over the lazy dog 0123456789 hello world translate summarise answer question",
]
# ChatML, as SmolLM2 and Qwen tokenizers carry it
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@cache
def _trained() -> str:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return tokenizer.to_str()


def tiny_tokenizer(chat_template: str | None = CHATML, pad: bool = True) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained()), bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", pad_token="<pad>" if pad else None,
                                        additional_special_tokens=SPECIAL[4:])
    tokenizer.chat_template = chat_template
    return tokenizer
