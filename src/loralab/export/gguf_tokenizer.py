"""The tokenizer as GGUF metadata (`tokenizer.ggml.*`), and the chat template training used.

A model trained from a GGUF file gets its tokenizer fields back verbatim, so llama.cpp tokenizes exactly as it did
before. A transformers tokenizer is written from its tokenizer.json: byte-level BPE as llama.cpp's "gpt2" model,
sentencepiece-style BPE with byte fallback as its "llama" model.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from loralab.errors import LoralabError

log = logging.getLogger("loralab")
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def copy_tokenizer_fields(writer, source_gguf: Path) -> None:
    """Every tokenizer.ggml.* key of the GGUF the model was trained from, as it is there."""
    import gguf

    reader = gguf.GGUFReader(str(source_gguf))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.ggml."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def write_tokenizer_fields(writer, tokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.* from a transformers fast tokenizer, padded to the model's embedding rows."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    byte_level = "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if model.get("type") != "BPE" or not (byte_level or model.get("byte_fallback")):
        raise LoralabError(f"the tokenizer is a {model.get('type')} model without byte-level or byte-fallback "
                           "encoding, which the GGUF export cannot describe to llama.cpp", field="--model",
                           fix="use `loralab merge` and llama.cpp's convert_hf_to_gguf.py")
    by_id = {i: t for t, i in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True).items()}
    added = {t.content: t.special for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values()}
    tokens, types = [], []
    for i in range(max(vocab_size, len(by_id))):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
        elif not byte_level and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            tokens.append(token)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.UNKNOWN if i == tokenizer.unk_token_id else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2" if byte_level else "llama")
    if byte_level:
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    else:
        # sentencepiece merges the highest-scoring pair first; the vocabulary is in merge order
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
        writer.add_add_space_prefix("Prepend" in json.dumps(spec.get("normalizer"))
                                    or "Metaspace" in json.dumps(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    # whether the tokenizer adds BOS / EOS to plain text, as llama.cpp should
    probe = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    writer.add_add_bos_token(bos is not None and bool(probe) and probe[0] == bos)
    writer.add_add_eos_token(eos is not None and bool(probe) and probe[-1] == eos)


def write_chat_template(writer, tokenizer, template: str | None) -> None:
    """The template training rendered conversations with, and its end-of-turn token for llama.cpp to stop at."""
    if template:
        writer.add_chat_template(template)
    vocab = tokenizer.get_vocab()
    for marker in END_OF_TURN:
        if template and marker in template and marker in vocab and vocab[marker] != tokenizer.eos_token_id:
            writer.add_eot_token_id(vocab[marker])
            break


def _pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for how this byte-level tokenizer splits text before its merges."""
    pre_tokenizer = pre_tokenizer or {}
    parts = pre_tokenizer.get("pretokenizers", [pre_tokenizer])
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's own split
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"  # digits one at a time, then GPT-2's split (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"]:
        pattern = parts[0].get("pattern", {}).get("Regex")
        for name, regex in SPLITS.items():
            if pattern == regex:
                return name
    log.warning("the tokenizer's pre-tokenizer is not one llama.cpp names; llama.cpp will split text its default "
                "way, which may tokenize some text differently from training")
    return "default"


# the split regexes of the Llama 3 and Qwen2 tokenizers, under llama.cpp's names for them
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLITS = {"llama-bpe": _WORDS + r"\p{N}{1,3}" + _REST, "qwen2": _WORDS + r"\p{N}" + _REST}
