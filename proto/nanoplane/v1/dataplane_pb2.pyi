from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DataPlaneInfo(_message.Message):
    __slots__ = ("model_name", "model_path", "architecture", "vocab_size", "max_model_len", "block_size", "num_kv_blocks", "max_num_seqs", "max_num_batched_tokens", "eos_token_ids", "dtype", "device", "attention_backend", "kv_bytes_per_token", "host_id", "shm_socket", "shm_ticket")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    SHM_SOCKET_FIELD_NUMBER: _ClassVar[int]
    SHM_TICKET_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_path: str
    architecture: str
    vocab_size: int
    max_model_len: int
    block_size: int
    num_kv_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    device: str
    attention_backend: str
    kv_bytes_per_token: int
    host_id: str
    shm_socket: str
    shm_ticket: bytes
    def __init__(self, model_name: _Optional[str] = ..., model_path: _Optional[str] = ..., architecture: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_model_len: _Optional[int] = ..., block_size: _Optional[int] = ..., num_kv_blocks: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., attention_backend: _Optional[str] = ..., kv_bytes_per_token: _Optional[int] = ..., host_id: _Optional[str] = ..., shm_socket: _Optional[str] = ..., shm_ticket: _Optional[bytes] = ...) -> None: ...

class StepPlan(_message.Message):
    __slots__ = ("step_id", "drop_slots", "new_slots", "new_num_cached_tokens", "new_temperature", "new_top_p", "new_top_k", "new_seed", "new_has_seed", "block_slots", "block_indices", "block_ids", "run_slots", "run_num_tokens", "run_flags", "token_ids", "new_num_prompt_tokens", "new_min_p", "new_repetition_penalty", "new_presence_penalty", "new_frequency_penalty", "new_min_tokens", "new_num_logprobs", "new_num_prompt_logprobs", "new_num_stop_ids", "stop_ids", "cached_token_ids", "prompt_logprob_counts", "prompt_logprob_token_ids", "grammar_rows", "grammar_bitmask", "spec_num_drafts", "rewind_slots", "rewind_num_tokens")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    DROP_SLOTS_FIELD_NUMBER: _ClassVar[int]
    NEW_SLOTS_FIELD_NUMBER: _ClassVar[int]
    NEW_NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    NEW_TOP_P_FIELD_NUMBER: _ClassVar[int]
    NEW_TOP_K_FIELD_NUMBER: _ClassVar[int]
    NEW_SEED_FIELD_NUMBER: _ClassVar[int]
    NEW_HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SLOTS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_INDICES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    RUN_SLOTS_FIELD_NUMBER: _ClassVar[int]
    RUN_NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RUN_FLAGS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NEW_NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_MIN_P_FIELD_NUMBER: _ClassVar[int]
    NEW_REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    NEW_PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    NEW_FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    NEW_MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_NUM_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NEW_NUM_PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NEW_NUM_STOP_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROB_COUNTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROB_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_ROWS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_BITMASK_FIELD_NUMBER: _ClassVar[int]
    SPEC_NUM_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    REWIND_SLOTS_FIELD_NUMBER: _ClassVar[int]
    REWIND_NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    drop_slots: bytes
    new_slots: bytes
    new_num_cached_tokens: bytes
    new_temperature: bytes
    new_top_p: bytes
    new_top_k: bytes
    new_seed: bytes
    new_has_seed: bytes
    block_slots: bytes
    block_indices: bytes
    block_ids: bytes
    run_slots: bytes
    run_num_tokens: bytes
    run_flags: bytes
    token_ids: bytes
    new_num_prompt_tokens: bytes
    new_min_p: bytes
    new_repetition_penalty: bytes
    new_presence_penalty: bytes
    new_frequency_penalty: bytes
    new_min_tokens: bytes
    new_num_logprobs: bytes
    new_num_prompt_logprobs: bytes
    new_num_stop_ids: bytes
    stop_ids: bytes
    cached_token_ids: bytes
    prompt_logprob_counts: bytes
    prompt_logprob_token_ids: bytes
    grammar_rows: bytes
    grammar_bitmask: bytes
    spec_num_drafts: bytes
    rewind_slots: bytes
    rewind_num_tokens: bytes
    def __init__(self, step_id: _Optional[int] = ..., drop_slots: _Optional[bytes] = ..., new_slots: _Optional[bytes] = ..., new_num_cached_tokens: _Optional[bytes] = ..., new_temperature: _Optional[bytes] = ..., new_top_p: _Optional[bytes] = ..., new_top_k: _Optional[bytes] = ..., new_seed: _Optional[bytes] = ..., new_has_seed: _Optional[bytes] = ..., block_slots: _Optional[bytes] = ..., block_indices: _Optional[bytes] = ..., block_ids: _Optional[bytes] = ..., run_slots: _Optional[bytes] = ..., run_num_tokens: _Optional[bytes] = ..., run_flags: _Optional[bytes] = ..., token_ids: _Optional[bytes] = ..., new_num_prompt_tokens: _Optional[bytes] = ..., new_min_p: _Optional[bytes] = ..., new_repetition_penalty: _Optional[bytes] = ..., new_presence_penalty: _Optional[bytes] = ..., new_frequency_penalty: _Optional[bytes] = ..., new_min_tokens: _Optional[bytes] = ..., new_num_logprobs: _Optional[bytes] = ..., new_num_prompt_logprobs: _Optional[bytes] = ..., new_num_stop_ids: _Optional[bytes] = ..., stop_ids: _Optional[bytes] = ..., cached_token_ids: _Optional[bytes] = ..., prompt_logprob_counts: _Optional[bytes] = ..., prompt_logprob_token_ids: _Optional[bytes] = ..., grammar_rows: _Optional[bytes] = ..., grammar_bitmask: _Optional[bytes] = ..., spec_num_drafts: _Optional[bytes] = ..., rewind_slots: _Optional[bytes] = ..., rewind_num_tokens: _Optional[bytes] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step_id", "slots", "token_ids", "logprob_rows", "logprobs", "logprob_ranks", "top_token_ids", "top_logprobs", "prompt_logprobs", "prompt_logprob_ranks", "prompt_top_token_ids", "prompt_top_logprobs")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_ROWS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_RANKS_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROB_RANKS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    slots: bytes
    token_ids: bytes
    logprob_rows: bytes
    logprobs: bytes
    logprob_ranks: bytes
    top_token_ids: bytes
    top_logprobs: bytes
    prompt_logprobs: bytes
    prompt_logprob_ranks: bytes
    prompt_top_token_ids: bytes
    prompt_top_logprobs: bytes
    def __init__(self, step_id: _Optional[int] = ..., slots: _Optional[bytes] = ..., token_ids: _Optional[bytes] = ..., logprob_rows: _Optional[bytes] = ..., logprobs: _Optional[bytes] = ..., logprob_ranks: _Optional[bytes] = ..., top_token_ids: _Optional[bytes] = ..., top_logprobs: _Optional[bytes] = ..., prompt_logprobs: _Optional[bytes] = ..., prompt_logprob_ranks: _Optional[bytes] = ..., prompt_top_token_ids: _Optional[bytes] = ..., prompt_top_logprobs: _Optional[bytes] = ...) -> None: ...
