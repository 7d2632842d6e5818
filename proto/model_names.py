"""The name a model file is served under, written once: the data plane names a GGUF model by it, and the
HTTP gateway accepts a request naming the file itself.

Like a Hugging Face folder's name, the file name says which model it is; GGUF's general.name often does
not ("Smollm2 135M 8k Lc100K Mix1 Ep2", with spaces, for SmolLM2-135M-Instruct). The quantisation tag
(`.Q4_1`, `-Q4_K_M`, `.F16`, ...) is left out: it says how the weights are stored, not which model it is.
"""
from __future__ import annotations

import os
import re

_QUANT_TAG = re.compile(r"[.-](?:I?Q\d[\w]*|F16|F32|BF16)$", re.IGNORECASE)


def model_name_of_file(path: str) -> str:
    """'/x/SmolLM2-135M-Instruct.Q4_1.gguf' -> 'SmolLM2-135M-Instruct'."""
    name = os.path.basename(path.rstrip("/"))
    if name.lower().endswith(".gguf"):
        name = _QUANT_TAG.sub("", name[: -len(".gguf")])
    return name
