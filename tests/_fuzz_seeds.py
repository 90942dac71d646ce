"""A small-vocabulary Llama for the fuzz suite's GGUF seed.

Rebuilding a tokenizer from a GGUF's 49152-token metadata costs about 10 s of CPU per run, which a
mutant that leaves the file valid pays in full; a 384-token byte-level BPE (trained here, in
milliseconds, deterministically) keeps every run of the GGUF target under a second or two while the
header keeps all its kinds of fields (token, type and merge arrays, special ids, the chat template).
"""
from __future__ import annotations

import json
from pathlib import Path

VOCAB_SIZE = 384


def write_small_tokenizer(folder: Path, text: str) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([text], trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "model_max_length": 2048,
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"}))
    return folder


def write_small_llama(folder: Path, text: str) -> Path:
    """hidden 64, 2 layers, 4 heads / 2 kv heads, vocab 384, bf16, one shard, with that tokenizer."""
    from qtool.synthetic import write_synthetic_llama

    tokenizer_dir = write_small_tokenizer(folder / "tokenizer", text)
    vocab_size = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    return write_synthetic_llama(folder / "model", hidden_size=64, intermediate_size=128, num_layers=2,
                                 num_heads=4, num_kv_heads=2, vocab_size=vocab_size, tokenizer_from=tokenizer_dir)
