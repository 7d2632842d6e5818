"""The data plane's start-up warm-up (dataplane/warmup.py) leaves the runner exactly as it found it: the
same greedy tokens and logprobs, and the same temperature-sampled tokens, as a runner that did not warm up."""
from __future__ import annotations

import numpy as np
import pytest
from structlog.testing import capture_logs

from dataplane.config import DataPlaneConfig
from dataplane.runner import ModelRunner
from dataplane.warmup import warm_up_plans
from tests.test_tensor_parallel import DATAPLANE_OPTIONS, generate, prompts
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3-warmup"), vocab_size=512, seed=4)


def runner(model, warm: str, **overrides) -> ModelRunner:
    return ModelRunner(DataPlaneConfig(model=str(model), device="cpu", warm_up=warm, **DATAPLANE_OPTIONS | overrides))


def sampled(runner: ModelRunner) -> list[np.ndarray]:
    """The warm-up's own steps as traffic: unseeded temperature and top-p rows, so the generator's state shows."""
    return [runner.execute(plan).token_ids for plan in warm_up_plans(16, 512)]


def test_a_warmed_up_runner_gives_what_a_cold_one_does(model):
    with capture_logs() as events:
        warm = runner(model, "on")
    assert any(e["event"] == "warmed up" for e in events)
    cold = runner(model, "off")
    batch = prompts(6, 512, seed=5)
    assert generate(warm.execute, warm.facts(), batch, 10)[0] == generate(cold.execute, cold.facts(), batch, 10)[0]
    warm.reset(), cold.reset()
    for got, want in zip(sampled(warm), sampled(cold)):
        np.testing.assert_array_equal(got, want)


def test_warm_up_is_skipped_when_the_cache_cannot_hold_it(model):
    with capture_logs() as events:
        small = runner(model, "on", num_kv_blocks=4)
    assert any(e["event"].startswith("warm-up skipped") for e in events)
    assert generate(small.execute, small.facts(), [[1, 2, 3]], 4)[0][0]  # still serves


def test_a_bad_warm_up_value_is_a_clear_error():
    with pytest.raises(ValueError, match="--warm-up must be auto, on or off, got 'maybe'"):
        DataPlaneConfig(model="m", warm_up="maybe").validate()
    with pytest.raises(ValueError, match="--warm-up on needs --tensor-parallel-size 1"):
        DataPlaneConfig(model="m", warm_up="on", tensor_parallel_size=2).validate()
