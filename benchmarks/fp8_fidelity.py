"""FP8 fidelity: teacher-forced top-1 agreement of FP8 weights and of the FP8 KV cache with bf16.

    python benchmarks/fp8_fidelity.py                          # SmolLM2-135M (the default model's GGUF) on a GPU
    python benchmarks/fp8_fidelity.py --model-arch qwen3-0.6b  # random-weight Qwen3-0.6B, random token ids
    python benchmarks/fp8_fidelity.py --device cpu --num-tokens 512   # a quick look on CPU

The same token sequences run through variants of one model: bf16 weights and KV cache
(the baseline), --quantization fp8 (bf16 KV), and --kv-cache-dtype fp8 (bf16 weights). Each
text runs as chunked prefills of --chunk tokens, so every chunk's attention reads the earlier
chunks back from the paged cache, as decode does. At every position the variant's argmax is
compared with the baseline's (teacher forcing: both see the same tokens, so one disagreement
does not derail the rest). A float32 run of the same model is compared too: its agreement with
bf16 is the floor that near-ties in the logits set for any variant. The texts are this repository's own files, prose (docs), Python,
protobuf IDL, YAML and TOML, cut into pieces of --text-tokens. Prints one JSON line per variant.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.roofline import ARCHS  # noqa: E402
from dataplane.context import AttentionMetadata, forward_context  # noqa: E402
from dataplane.kv_cache import allocate_kv_cache, bind_kv_cache  # noqa: E402
from dataplane.kv_fp8 import calibrate_kv_scales, kv_cache_dtype  # noqa: E402
from dataplane.layers.attention import set_attention_backend  # noqa: E402
from dataplane.loader import load_dummy_model, load_model  # noqa: E402

TEXT_FILES = ["README.md", "docs/architecture.md", "docs/sampling.md", "docs/reliability.md", "docs/operations.md",
              "dataplane/runner.py", "controlplane/core/scheduler.py", "proto/nanoplane/v1/generation.proto",
              "deploy/compose.yaml", "pyproject.toml"]
BLOCK_SIZE = 16


def text_sequences(tokenizer_path: str, num_tokens: int, text_tokens: int) -> list[list[int]]:
    from controlplane.serving.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    pieces: list[list[int]] = []
    per_file = max(text_tokens, num_tokens // len(TEXT_FILES))
    for name in TEXT_FILES:
        ids = tokenizer.encode((ROOT / name).read_text())[:per_file]
        pieces += [ids[i:i + text_tokens] for i in range(0, len(ids) - 1, text_tokens)]
    out, total = [], 0
    for piece in pieces:  # round-robin over kinds of text until num_tokens
        if total >= num_tokens:
            break
        out.append(piece)
        total += len(piece)
    return out


def random_sequences(num_tokens: int, text_tokens: int, vocab: int = 10000) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (text_tokens,), generator=g).tolist() for _ in range(-(-num_tokens // text_tokens))]


@torch.inference_mode()
def teacher_forced_argmax(model, config, tokens: list[int], kv_dtype: torch.dtype, chunk: int,
                          device: torch.device) -> torch.Tensor:
    """Chunked prefill of tokens through the paged cache -> the argmax at every position [len(tokens)]."""
    num_blocks = -(-len(tokens) // BLOCK_SIZE)
    bind_kv_cache(model, allocate_kv_cache(config, num_blocks, BLOCK_SIZE, kv_dtype, device))
    table = torch.arange(num_blocks, dtype=torch.int32, device=device)[None]
    out = []
    for start in range(0, len(tokens), chunk):
        ids = tokens[start:start + chunk]
        end = start + len(ids)
        positions = torch.arange(start, end, device=device)
        meta = AttentionMetadata(
            slot_mapping=positions.clone(),
            query_start_loc=torch.tensor([0, len(ids)], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([end], dtype=torch.int32, device=device), block_tables=table,
            max_query_len=len(ids), max_seq_len=end, query_start_loc_cpu=[0, len(ids)], seq_lens_cpu=[end])
        with forward_context(meta):
            hidden = model(torch.tensor(ids, device=device), positions)
            out.append(model.compute_logits(hidden).float().argmax(dim=-1).cpu())
    return torch.cat(out)


def load(args, device: torch.device, dtype: torch.dtype, quantization: str):
    if args.model_arch:
        folder = tempfile.mkdtemp(prefix="nanoplane-fidelity-")
        Path(folder, "config.json").write_text(json.dumps(ARCHS[args.model_arch]))
        return load_dummy_model(folder, dtype, device, seed=0, quantization=quantization)
    return load_model(args.model, dtype, device, quantization=quantization)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or .gguf; default: the default model SmolLM2-135M")
    parser.add_argument("--model-arch", choices=sorted(ARCHS), default=None,
                        help="a random-weight model of this architecture instead (fed random token ids)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-tokens", type=int, default=4096, help="positions compared per variant")
    parser.add_argument("--text-tokens", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--chunk", type=int, default=128, help="prefill chunk: later chunks read earlier ones' KV")
    parser.add_argument("--attention-backend", default="triton" if torch.cuda.is_available() else "torch")
    args = parser.parse_args()
    if args.model is None and args.model_arch is None:
        from nanoplane.default_model import default_model_path
        args.model = default_model_path()
    device = torch.device(args.device)
    if device.type == "cuda":
        import dataplane.attention.triton_backend  # noqa: F401  (registers the backend)
    set_attention_backend(args.attention_backend)
    dtype = torch.bfloat16

    base, config = load(args, device, dtype, "none")
    if args.model_arch:
        sequences = random_sequences(args.num_tokens, args.text_tokens)
    else:
        sequences = text_sequences(args.model, args.num_tokens, args.text_tokens)
    started = time.perf_counter()
    baseline = [teacher_forced_argmax(base, config, s, dtype, args.chunk, device) for s in sequences]

    fp8_weights, _ = load(args, device, dtype, "fp8")
    variants = {"fp8 weights": (fp8_weights, dtype)}
    fp8_kv = kv_cache_dtype("fp8", dtype)
    calibrate_kv_scales(base, config.vocab_size, device, dtype)  # base now stores an FP8 cache with its scales
    variants["fp8 kv cache"] = (base, fp8_kv)
    # the noise floor: how often float32, the more exact model, disagrees with the bf16 baseline (near-ties)
    fp32, _ = load(args, device, torch.float32, "none")
    variants["fp32 (noise floor)"] = (fp32, torch.float32)
    name = args.model_arch or Path(args.model).name
    for variant, (model, kv_dtype) in variants.items():
        agree = total = 0
        for seq, want in zip(sequences, baseline):
            got = teacher_forced_argmax(model, config, seq, kv_dtype, args.chunk, device)
            agree += int((got == want).sum())
            total += len(seq)
        print(json.dumps({"model": name, "variant": variant, "device": torch.cuda.get_device_name(device)
                          if device.type == "cuda" else "cpu", "attention_backend": args.attention_backend,
                          "positions": total, "sequences": len(sequences), "chunk": args.chunk,
                          "top1_agreement": round(agree / total, 4)}), flush=True)
    print(f"{time.perf_counter() - started:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
