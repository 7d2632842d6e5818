"""The control plane runs where torch (and the data plane's code) cannot be imported: a CPU host that
installed only `pip install nanoplane` (no `[dataplane]` extra) serves requests through a data plane elsewhere,
structured output's grammars included (xgrammar's torch-free parts, controlplane/structured/xgrammar_core.py)."""
import subprocess
import sys

import pytest

from client import Client, SamplingParams, StructuredOutput
from tests.stack import ROOT, DataPlaneProcess, free_port, wait_for_port

# Imported first by every interpreter whose sys.path has its folder (site.py's sitecustomize hook).
BLOCKER = '''
import importlib.machinery, sys
BLOCKED = ("torch", "triton", "dataplane")
_find_spec = importlib.machinery.PathFinder.find_spec
def find_spec(cls, name, path=None, target=None):
    return None if name.split(".")[0] in BLOCKED else _find_spec(name, path, target)
importlib.machinery.PathFinder.find_spec = classmethod(find_spec)  # as if they were not installed
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # pip install -e's finders
'''

pytestmark = pytest.mark.slow


def test_controlplane_serves_with_torch_unimportable(tiny_model_dir, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "sitecustomize.py").write_text(BLOCKER)
    env = {"PYTHONPATH": f"{blocked}:{ROOT}", "PATH": "/usr/bin:/bin", "NANOPLANE_LOG_FORMAT": "json"}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr

    model = str(tiny_model_dir("llama"))
    dataplane = DataPlaneProcess(model, tmp_path / "dataplane.log")
    port = free_port()
    with open(tmp_path / "controlplane.log", "w") as log:
        controlplane = subprocess.Popen(
            [sys.executable, "-m", "controlplane", "--dataplane", dataplane.target, "--port", str(port),
             "--tokenizer", model], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, controlplane, 120)
        with Client(f"127.0.0.1:{port}", timeout_s=60) as client:
            result = client.generate("Once upon a time", SamplingParams(max_tokens=6, temperature=0,
                                                                        ignore_eos=True))
            choice = client.generate("Pick", SamplingParams(max_tokens=8, temperature=0,
                                                            structured_output=StructuredOutput.choice(["yes", "no"])))
        assert len(result.token_ids) == 6 and result.finish_reason == "length"
        assert choice.text in ("yes", "no") and choice.finish_reason == "stop", choice
    finally:
        controlplane.terminate()
        controlplane.wait(20)
        dataplane.close()
