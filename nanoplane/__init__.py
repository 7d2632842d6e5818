"""The one place that knows both planes: the `nanoplane` command, the embedded default model, the offline LLM.

    from nanoplane import LLM, SamplingParams
"""
from client.types import SamplingParams
from nanoplane.llm import LLM

__all__ = ["LLM", "SamplingParams"]
