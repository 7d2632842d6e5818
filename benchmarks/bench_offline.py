"""Nano-vLLM's bench.py through the offline LLM: the same workload and the same printout.

    python benchmarks/bench_offline.py                               # Qwen3-0.6B architecture, random weights
    python benchmarks/bench_offline.py --model /models/Qwen3-0.6B
    python benchmarks/bench_offline.py --num-seqs 16 --max-input-len 200 --max-output-len 120 \\
        --engine-arg num_threads=2                                   # small enough for a CPU

random.seed(0); 256 sequences; prompt token ids U[0, 10000] of lengths U[100, 1024];
max_tokens U[100, 1024]; ignore_eos; temperature 0.6 -> 133,966 output tokens.
Without --model the data plane builds Qwen3-0.6B with random weights (load_format
dummy) and the control plane gets a stand-in word-level tokenizer of the same vocabulary
size, since the real one is not at hand offline; decoding speed is the same.
Unlike benchmarks/throughput.py, every request goes through the public gRPC API.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from random import randint, seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving import _engine_arg  # noqa: E402
from benchmarks.throughput import QWEN3_0_6B  # noqa: E402
from nanoplane import LLM, SamplingParams  # noqa: E402


def dummy_qwen3_folder(folder: Path) -> str:
    """config.json of Qwen3-0.6B and a word-level tokenizer with one token per id ("t0", "t1", ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    (folder / "config.json").write_text(json.dumps(QWEN3_0_6B))
    vocab = {f"t{i}": i for i in range(QWEN3_0_6B["vocab_size"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", bos_token=f"t{QWEN3_0_6B['bos_token_id']}",
                            eos_token=f"t{QWEN3_0_6B['eos_token_id']}").save_pretrained(str(folder))
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF folder; default: Qwen3-0.6B architecture with random weights")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--min-input-len", type=int, default=100)
    parser.add_argument("--max-input-len", type=int, default=1024)
    parser.add_argument("--min-output-len", type=int, default=100)
    parser.add_argument("--max-output-len", type=int, default=1024)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (Nano-vLLM's bench uses them)")
    parser.add_argument("--engine-arg", type=_engine_arg, action="append", default=[], metavar="KEY=VALUE",
                        help="another engine option (repeatable), e.g. max_num_seqs=128")
    args = parser.parse_args()
    if not 1 <= args.min_input_len <= args.max_input_len or not 1 <= args.min_output_len <= args.max_output_len:
        parser.error("lengths must satisfy 1 <= min <= max")

    with tempfile.TemporaryDirectory(prefix="nanoplane-bench-") as tmp:
        engine = {"enforce_eager": args.enforce_eager, "max_model_len": args.max_model_len, **dict(args.engine_arg)}
        if args.model is None:
            engine["load_format"] = "dummy"
        llm = LLM(args.model or dummy_qwen3_folder(Path(tmp)), **engine)
        try:
            seed(0)
            prompt_token_ids = [[randint(0, 10000) for _ in range(randint(args.min_input_len, args.max_input_len))]
                                for _ in range(args.num_seqs)]
            sampling_params = [SamplingParams(temperature=0.6, ignore_eos=True,
                                              max_tokens=randint(args.min_output_len, args.max_output_len))
                               for _ in range(args.num_seqs)]
            llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=16), use_tqdm=False)  # warm-up
            t = time.time()
            outputs = llm.generate(prompt_token_ids, sampling_params, use_tqdm=False)
            t = time.time() - t
        finally:
            llm.close()
    total_tokens = sum(sp.max_tokens for sp in sampling_params)
    assert sum(len(o["token_ids"]) for o in outputs) == total_tokens
    print(f"Total: {total_tokens}tok, Time: {t:.2f}s, Throughput: {total_tokens / t:.2f}tok/s "
          f"({llm.model_info.device}, {llm.model_info.dtype})")


if __name__ == "__main__":
    main()
