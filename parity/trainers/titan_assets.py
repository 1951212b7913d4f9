"""Deterministic, offline assets for torchtitan's llama3 debug model: a tokenizer and a dataset.

torchtitan's wheel ships no `tests/assets`, so `write_assets(dest)` makes both, byte-identical on
every call (fixed seed, single-threaded BPE training, no network):

- `dest/tokenizer/`: tokenizer.json + tokenizer_config.json, a ByteLevel BPE (vocab <= VOCAB_SIZE,
  which fits llama3_debugmodel's 2048) with `<|begin_of_text|>` / `<|end_of_text|>` as bos/eos.
- `dest/c4_test/data.json`: JSON lines `{"text": ...}`, the format torchtitan's `c4_test` loader
  (`datasets.load_dataset(dir, split="train")`) reads.

It returns a sha256 over the files in sorted relative-name order (each: name, NUL, 8-byte length,
bytes); `asset_args(dest)` gives the torchtitan flags that point at the assets.
"""

import hashlib
import json
import os
import random
from pathlib import Path

VOCAB_SIZE = 1024  # <= llama3_debugmodel's vocab (2048), special tokens included
N_DOCS = 1000
SEED = 1234
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def _documents() -> list[str]:
    """Synthetic text with structure to learn: Zipf-distributed made-up words, sentences."""
    rng = random.Random(SEED)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    words = sorted({"".join(rng.choice(letters[: rng.randint(8, 26)]) for _ in range(rng.randint(2, 9)))
                    for _ in range(1500)})
    weights = [1.0 / (i + 1) for i in range(len(words))]
    docs = []
    for _ in range(N_DOCS):
        sentences = []
        for _ in range(rng.randint(2, 8)):
            sentence = " ".join(rng.choices(words, weights, k=rng.randint(4, 16)))
            sentences.append(sentence[0].upper() + sentence[1:] + rng.choice(".!?"))
        docs.append(" ".join(sentences))
    return docs


def _tokenizer_json(docs: list[str]) -> str:
    # Single-threaded training (effective unless tokenizers' thread pool already started; the
    # output was identical across processes either way).
    os.environ["RAYON_NUM_THREADS"] = "1"
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok.to_str(pretty=True)


def write_assets(dest: Path) -> str:
    """Write tokenizer/ and c4_test/ under `dest`; return sha256 over what was written."""
    dest = Path(dest)
    docs = _documents()
    files = {
        "tokenizer/tokenizer.json": _tokenizer_json(docs),
        "tokenizer/tokenizer_config.json": json.dumps(
            {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "add_eos_token": False,
             "model_max_length": 1_000_000, "tokenizer_class": "PreTrainedTokenizerFast"},
            indent=2, sort_keys=True) + "\n",
        "c4_test/data.json": "".join(json.dumps({"text": d}) + "\n" for d in docs),
    }
    digest = hashlib.sha256()
    for rel in sorted(files):
        data = files[rel].encode()
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        digest.update(rel.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def asset_args(dest: Path) -> list[str]:
    """torchtitan flags that point the llama3 debug config at the assets under `dest`."""
    dest = Path(dest).resolve()
    return ["--hf-assets-path", str(dest / "tokenizer"),
            "--dataloader.dataset", "c4_test", "--dataloader.dataset-path", str(dest / "c4_test")]


ASSET_ARGS = asset_args
