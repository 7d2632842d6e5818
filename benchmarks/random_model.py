"""A Qwen3-0.6B-architecture model folder to serve with random weights (`--load-format dummy`).

    python benchmarks/random_model.py /tmp/qwen3-0.6b-random
    python benchmarks/serving.py --model /tmp/qwen3-0.6b-random --engine-arg load_format=dummy --sweep 4,8,16

Writes config.json (benchmarks/throughput.py's QWEN3_0_6B) and a word-level tokenizer with one
made-up word per id of the full 151,936-token vocabulary ("t0", "t1", ...): the weights are
random, so only the shapes and the per-token costs of the real model matter, and the control
plane still tokenises, detokenises and streams text as it would for the real one.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import QWEN3_0_6B  # noqa: E402


def write_random_model(out: Path, config: dict = QWEN3_0_6B) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    vocab = {f"t{i}": i for i in range(config["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.save(str(out / "tokenizer.json"))
    eos = f"t{config['eos_token_id']}"
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "unk_token": "t0",
        "model_max_length": config["max_position_embeddings"]}))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(write_random_model(Path(sys.argv[1])))
