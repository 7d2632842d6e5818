"""The offline LLM (nanoplane/llm.py) on a tiny model: Nano-vLLM's example unchanged but for its import,
input order, token-id prompts, one SamplingParams per prompt, chat(), errors, and no process left behind."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from client import Client, InvalidArgumentError, SamplingParams
from nanoplane import LLM

ROOT = Path(__file__).resolve().parents[1]

NANO_VLLM_EXAMPLE = """\
llm = LLM("/path/to/model", enforce_eager=True, tensor_parallel_size=1)
sampling_params = SamplingParams(temperature=0.6, max_tokens=256)
outputs = llm.generate(["Hello, Nano-vLLM."], sampling_params)
outputs[0]["text"]
"""


def processes_mentioning(text: str) -> list[int]:
    """Live (not zombie) processes whose command line contains `text`."""
    if not os.path.isdir("/proc"):
        pytest.skip("needs /proc to list processes")
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(pid))
    return found


@pytest.fixture
def own_model_copy(tiny_model_dir, tmp_path) -> str:
    """A copy of the tiny model under a unique path, so its data plane process can be recognised."""
    path = tmp_path / "model-copy"
    shutil.copytree(tiny_model_dir("qwen3"), path)
    return str(path)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with LLM(str(tiny_model_dir("qwen3")), enforce_eager=True, num_kv_blocks=128) as llm:
        yield llm


def test_nano_vllm_example_runs_with_only_the_import_changed(own_model_copy):
    script = ("from nanoplane import LLM, SamplingParams\n" + NANO_VLLM_EXAMPLE.replace("/path/to/model", own_model_copy)
              + "import json; print(json.dumps(outputs))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(outputs) == 1 and isinstance(outputs[0]["text"], str)
    assert 1 <= outputs[0]["usage"]["completion_tokens"] <= 256
    assert len(outputs[0]["token_ids"]) == outputs[0]["usage"]["completion_tokens"]
    assert "Generating" in done.stderr  # the progress bar
    assert processes_mentioning(own_model_copy) == []  # the script never called close(): exit cleaned up


def test_outputs_follow_input_order(llm):
    prompts = ["The sky is", "Once upon a time", "1, 2, 3,", "Hello"]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (7, 3, 11, 5)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o["token_ids"]) for o in outputs] == [7, 3, 11, 5]
    for prompt, p, out in zip(prompts, params, outputs):
        alone = llm.generate(prompt, p, use_tqdm=False)
        assert len(alone) == 1 and alone[0]["token_ids"] == out["token_ids"] and alone[0]["text"] == out["text"]
        assert out["finish_reason"] == "length" and out["usage"]["completion_tokens"] == p.max_tokens


def test_token_id_prompts(llm):
    with Client(llm.target) as client:
        ids = client.tokenize("Once upon a time")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    by_text = llm.generate("Once upon a time", params, use_tqdm=False)[0]
    one = llm.generate(ids, params, use_tqdm=False)  # a list of ints is one prompt
    many = llm.generate([ids, {"prompt_token_ids": ids}, tuple(ids)], params, use_tqdm=False)
    assert len(one) == 1 and len(many) == 3
    assert all(o["token_ids"] == by_text["token_ids"] for o in one + many)
    assert one[0]["usage"]["prompt_tokens"] == len(ids)


def test_chat_applies_the_template(llm):
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    longer = conversation + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    with Client(llm.target) as client:
        ids = client.tokenize(messages=conversation)
    one = llm.chat(conversation, params, use_tqdm=False)
    both = llm.chat([conversation, longer], params, use_tqdm=False)
    assert len(one) == 1 and len(both) == 2
    assert one[0]["token_ids"] == both[0]["token_ids"] == llm.generate(ids, params, use_tqdm=False)[0]["token_ids"]
    assert one[0]["usage"]["prompt_tokens"] == len(ids) < both[1]["usage"]["prompt_tokens"]


def test_n_samples_and_logprobs(llm):
    [out] = llm.generate("Hello", SamplingParams(n=3, max_tokens=4, seed=1, ignore_eos=True, logprobs=2),
                         use_tqdm=False)
    assert len(out["outputs"]) == 3 and out["token_ids"] == out["outputs"][0]["token_ids"]
    assert all(len(o["token_ids"]) == 4 for o in out["outputs"])
    assert len(out["logprobs"]) == 4 and len(out["logprobs"][0]["top"]) == 2
    assert out["logprobs"][0]["token"]["token_id"] == out["token_ids"][0]


def test_progress_bar_shows_prefill_and_decode_rates(llm, capsys):
    llm.generate(["a b c"] * 3, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    err = capsys.readouterr().err
    assert "Generating" in err and "3/3" in err and "Prefill=" in err and "Decode=" in err


def test_bad_input_gets_clear_errors(llm, tiny_model_dir):
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(["a", "b"], [SamplingParams()] * 3)
    with pytest.raises(TypeError, match="prompts\\[0\\]"):
        llm.generate([1.5])
    with pytest.raises(InvalidArgumentError, match="prompt 1: sampling.max_tokens"):
        llm.generate(["a", "b"], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=0)], use_tqdm=False)
    assert llm.generate([], use_tqdm=False) == []
    model = str(tiny_model_dir("qwen3"))
    with pytest.raises(ValueError, match="--tensor-parallel-size must be at least 1"):
        LLM(model, tensor_parallel_size=0)
    with pytest.raises(TypeError, match="unknown engine option 'not_an_option'"):
        LLM(model, not_an_option=1)
    with pytest.raises(ValueError, match="not both"):
        LLM(model, target=llm.target)
    with pytest.raises(FileNotFoundError):
        LLM("/no/such/model")


def test_attaches_to_a_running_server(llm):
    with LLM(target=llm.target) as attached:
        out = attached.generate("Hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                                use_tqdm=False)
    assert len(out[0]["token_ids"]) == 3
    assert llm.generate("Hello", SamplingParams(max_tokens=1), use_tqdm=False)  # closing it left llm's planes up


def test_close_leaves_no_child_process(own_model_copy):
    llm = LLM(own_model_copy, enforce_eager=True, num_kv_blocks=32)
    assert len(processes_mentioning(own_model_copy)) == 1  # the data plane
    llm.close()
    llm.close()  # idempotent
    assert processes_mentioning(own_model_copy) == []
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate("Hello")
