"""Tokenizer: text ↔ token ids for the control plane, loaded from a Hugging Face
folder or a .gguf file.

Wraps a transformers tokenizer behind the few calls the control plane makes
(validation encodes prompts and chat messages, the detokenizer decodes windows of
ids). Parsing a GGUF's metadata takes seconds, so the converted tokenizer is saved
as a Hugging Face folder in a cache keyed by the file's path, size and mtime.
Never imports torch: the control plane runs on a slim image.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

CHAT_ROLES = ("system", "user", "assistant", "tool")
GGUF_SUFFIX = ".gguf"

log = logging.getLogger("controlplane.serving.tokenizer")


class Tokenizer:
    """A loaded tokenizer and the facts about it the control plane needs."""

    def __init__(self, hf_tokenizer, name: str, generation_eos_ids: tuple[int, ...] = ()):
        self.hf = hf_tokenizer
        self.name = name
        # The Rust tokenizer decodes ~3x faster than the transformers wrapper and
        # never applies clean_up_tokenization_spaces, so a window-by-window decode
        # (the incremental detokenizer) agrees with a whole decode.
        self._backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        self.vocab_size: int = len(hf_tokenizer)
        self.all_special_ids: list[int] = list(hf_tokenizer.all_special_ids)
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        eos = [hf_tokenizer.eos_token_id] if hf_tokenizer.eos_token_id is not None else []
        self.eos_token_ids: list[int] = list(dict.fromkeys([*eos, *generation_eos_ids]))

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids})"

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not self.has_chat_template:
            raise ValueError(f"the model {self.name!r} has no chat template; send a plain prompt instead of messages")
        for i, message in enumerate(messages):
            role = message.get("role")
            if role not in CHAT_ROLES:
                raise ValueError(f"messages[{i}] has unknown role {role!r}; use one of {', '.join(CHAT_ROLES)}")
        ids = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                          tokenize=True, return_dict=False)
        return list(ids)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        if self._backend is not None:
            return self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    def decode_batch(self, batch: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        """decode() of each id list, in one call (the engine's per-step detokenisation)."""
        if self._backend is not None:
            return self._backend.decode_batch(batch, skip_special_tokens=skip_special_tokens)
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(token_ids))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load from a Hugging Face folder (tokenizer.json, …) or a .gguf file."""
    p = Path(path).expanduser()
    if p.is_file() and p.name.endswith(GGUF_SUFFIX):
        return Tokenizer(_load_gguf_cached(p), name=p.name[: -len(GGUF_SUFFIX)])
    if p.is_dir():
        return Tokenizer(_auto_tokenizer().from_pretrained(str(p)), name=p.name,
                         generation_eos_ids=_generation_eos_ids(p))
    raise FileNotFoundError(f"tokenizer path {str(p)!r} is neither a Hugging Face folder nor a {GGUF_SUFFIX} file")


def export_tokenizer(path: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Write the tokenizer at `path` (GGUF or folder) as a Hugging Face folder; returns out_dir."""
    load_tokenizer(str(path)).hf.save_pretrained(str(out_dir))
    return str(out_dir)


def cache_dir() -> Path:
    return Path(os.environ.get("NANOPLANE_CACHE_DIR") or Path.home() / ".cache" / "nanoplane")


def gguf_cache_path(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cache_dir() / "tokenizers" / f"{gguf_path.name[: -len(GGUF_SUFFIX)]}-{digest}"


def _auto_tokenizer():
    from transformers import AutoTokenizer  # deferred: importing transformers takes seconds

    return AutoTokenizer


def _load_gguf_cached(gguf_path: Path):
    cached = gguf_cache_path(gguf_path)
    if (cached / "tokenizer_config.json").is_file():
        try:
            return _auto_tokenizer().from_pretrained(str(cached))
        except Exception as e:  # a half-written or stale-format cache entry: rebuild it
            log.warning("rebuilding unreadable tokenizer cache %s: %s", cached, e)
            shutil.rmtree(cached, ignore_errors=True)
    hf = _auto_tokenizer().from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    _save_to_cache(hf, cached)
    return hf


def _save_to_cache(hf_tokenizer, cached: Path) -> None:
    # Write to a private folder and rename it into place, so a concurrent reader
    # never sees half a tokenizer and two writers do not mix their files.
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cached.name}-", dir=cached.parent))
        hf_tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, cached)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        log.warning("cannot cache the GGUF tokenizer under %s (%s); the next start will be slow", cached, e)


def _generation_eos_ids(folder: Path) -> tuple[int, ...]:
    config = folder / "generation_config.json"
    if not config.is_file():
        return ()
    eos = json.loads(config.read_text()).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)
