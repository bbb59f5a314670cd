"""Wire messages between the learner and the rollout server.

Every message is a msgspec Struct, encoded as msgpack. Tensors travel only as safetensors bytes.
Nothing received from the network is ever unpickled: decoding goes through `decode_request` /
`decode_reply`, which accept exactly the tagged types below and nothing else.

The same structs are used by every transport (ZeroMQ, Ray, in-process), so a transport is just a
way of moving bytes.
"""

from __future__ import annotations

import msgspec

# A hard ceiling on any single message. Adapters of a 0.5B model at r=64 are ~70 MB in fp32; the
# server can lower it with --max_message_mb.
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024


class SamplingSpec(msgspec.Struct, kw_only=True):
    """Sampling settings, as the seed uses them (temperature, top_k off, max_new_tokens)."""

    temperature: float = 0.9  # 0 means greedy
    top_k: int = 0  # 0 = off (the seed's setting); vLLM's -1
    top_p: float = 1.0  # nucleus sampling; 1.0 = off
    max_new_tokens: int = 128  # tokens generated per completion, at most
    seed: int | None = None  # per-request seed; prompt i uses seed + i, for reproducibility
    stop_token_ids: list[int] = []  # extra ids that end a completion (EOS always does)


class Prompt(msgspec.Struct, kw_only=True):
    """One prompt to complete."""

    prompt_id: str  # caller's id, echoed back in the Completion
    token_ids: list[int]  # the prompt, already chat-templated and tokenized


class GenerateRequest(msgspec.Struct, tag="generate", kw_only=True):
    """Ask for one sampled completion per prompt."""

    request_id: str  # caller's id, echoed back in the GenerateReply
    prompts: list[Prompt]  # the batch; completions come back in the same order
    sampling: SamplingSpec = msgspec.field(default_factory=SamplingSpec)
    min_version: int = 0  # refuse to serve with weights older than this (server waits for them)


class Completion(msgspec.Struct, kw_only=True):
    """One sampled completion."""

    prompt_id: str  # the Prompt.prompt_id it answers
    token_ids: list[int]  # the sampled tokens (no prompt)
    logprobs: list[float]  # log p(token) under the sampling policy; same length as token_ids
    finish_reason: str  # "stop" (EOS/stop id) or "length" (hit max_new_tokens)


class GenerateReply(msgspec.Struct, tag="generated", kw_only=True):
    """Completions for a GenerateRequest, all produced by one policy version."""

    request_id: str  # GenerateRequest.request_id
    policy_version: int  # version of the weights that produced every completion here
    completions: list[Completion]  # same length and order as GenerateRequest.prompts
    generate_s: float = 0.0  # wall seconds the engine spent on this batch


class LoraSpec(msgspec.Struct, kw_only=True):
    """The LoRA hyper-parameters the adapter was trained with (as in adapter_config.json)."""

    r: int  # rank
    lora_alpha: float  # scale = lora_alpha / r (or / sqrt(r) with use_rslora)
    target_modules: list[str]  # module names the adapter touches, e.g. ["q_proj", "v_proj"]
    use_rslora: bool = False  # rank-stabilised scaling


class PushAdapter(msgspec.Struct, tag="push_adapter", kw_only=True):
    """A new student adapter; the server merges it into its pristine base and reloads in place."""

    version: int  # the policy version this adapter becomes; must be > the server's current one
    adapter: bytes  # safetensors bytes with PEFT names (…q_proj.lora_A.weight / lora_B.weight)
    sha256: str  # hex digest of `adapter`; checked before anything else
    lora: LoraSpec | None = None  # how to scale and where to apply the adapter; None when kind == "full"
    canary_ids: list[int] = []  # token ids to score after the reload; empty = skip the canary
    # "lora": `adapter` holds lora_A/lora_B pairs, merged into the pristine base (or loaded as a vLLM LoRA).
    # "full": `adapter` holds whole weight tensors under the HF model's own names (full fine-tuning);
    # they replace those tensors of the pristine base as they are.
    kind: str = "lora"


class PushReply(msgspec.Struct, tag="pushed", kw_only=True):
    """The server now serves `version`."""

    version: int  # the policy version now serving
    reload_s: float  # push received -> new weights serving, in seconds
    canary_logprobs: list[float]  # log p(canary_ids[i] | canary_ids[:i]) for i >= 1; len(canary_ids) - 1
    serving_dtype: str  # dtype the engine computes in, so the learner can pick a tolerance


class StatusRequest(msgspec.Struct, tag="status", kw_only=True):
    """Ask for the server's status."""


class Status(msgspec.Struct, tag="status_reply", kw_only=True):
    """What the server is doing."""

    policy_version: int  # version of the weights serving now (0 = the base model)
    queue_depth: int  # generate requests waiting for the engine
    tokens_per_s: float  # generated tokens per second over the recent window
    last_reload_s: float  # latency of the last adapter reload, seconds (0 if none)
    healthy: bool  # the engine answered its last call
    model: str  # the base model path the server serves
    sync_mode: str  # "merged" or "lora"
    dtype: str  # serving dtype
    max_lora_rank: int  # the largest adapter rank the server accepts
    uptime_s: float  # seconds since the server started
    # sha256 over the served base model's config.json and tokenizer files, so a learner can refuse a
    # server that runs another model before it pushes anything; "" from a server that cannot tell.
    model_fingerprint: str = ""
    role: str = "student"  # "student" (samples, takes pushes) or "teacher" (scores, refuses pushes)
    # sha256 of the served vocabulary (shared.vocab.tokenizer_fingerprint); "" from a server that cannot tell.
    tokenizer_fingerprint: str = ""

    served_requests: int = 0  # generate requests answered with completions since the server started
    served_sequences: int = 0  # completions (one per prompt) in those replies


class ScoreSequence(msgspec.Struct, kw_only=True):
    """One sequence for the teacher to score: a prompt and the completion that follows it."""

    prompt_ids: list[int]  # the prompt, tokenized like the student's (at least 1 token)
    completion_ids: list[int]  # the tokens whose positions are scored (at least 1 token)


class ScoreRequest(msgspec.Struct, tag="score", kw_only=True):
    """Ask a teacher server for its next-token distribution at every completion position."""

    request_id: str  # caller's id, echoed back in the ScoreReply
    sequences: list[ScoreSequence]  # the batch; scores come back in the same order
    k: int = 20  # top-k entries per position, 1 <= k <= the teacher server's --max_logprobs


class SequenceScores(msgspec.Struct, kw_only=True):
    """The teacher's view of one sequence; row i is the position that predicts completion_ids[i]."""

    # len(completion_ids) rows of exactly k distinct ids each, most likely first.
    topk_ids: list[list[int]]
    # Same shape as topk_ids: log p_teacher(id | prompt, completion[:i]) at temperature 1.
    topk_logprobs: list[list[float]]
    # len(completion_ids): log p_teacher(completion_ids[i] | prompt, completion[:i]), temperature 1
    # (present whether or not that token is in the top-k).
    token_logprobs: list[float]


class ScoreReply(msgspec.Struct, tag="scored", kw_only=True):
    """Teacher scores for a ScoreRequest."""

    request_id: str  # ScoreRequest.request_id
    scores: list[SequenceScores]  # same length and order as ScoreRequest.sequences
    model: str  # the teacher model the server runs (its path or hub id)
    # sha256 of the teacher's vocabulary (shared.vocab.tokenizer_fingerprint); the learner refuses a
    # teacher whose value differs from its student tokenizer's.
    tokenizer_fingerprint: str
    score_s: float = 0.0  # wall seconds the engine spent on this request


# ErrorReply.code of a server whose port is up while its engine still starts; clients retry.
STARTING = "starting"


class ErrorReply(msgspec.Struct, tag="error", kw_only=True):
    """A request failed; the server keeps running."""

    # short machine-readable kind: bad_request, unauthorized, checksum, invalid_adapter, too_large,
    # internal, teacher_role (a push sent to a teacher server), not_teacher (a score sent to a student),
    # starting (the engine is still starting: retry)
    code: str
    message: str  # one human-readable line saying what was wrong and what to do
    request_id: str = ""  # the failing request's id, when it had one


Request = GenerateRequest | PushAdapter | StatusRequest | ScoreRequest
Reply = GenerateReply | PushReply | Status | ScoreReply | ErrorReply


class Envelope(msgspec.Struct, kw_only=True):
    """What actually crosses the wire from a client: a token plus one request."""

    token: str = ""  # shared secret; required when the server is bound beyond loopback
    body: Request  # the request itself


class _BodyId(msgspec.Struct):
    request_id: str = ""  # the only field read from a malformed request's body


class _IdOnly(msgspec.Struct):
    """Just enough of an Envelope to find its request id (every other field is skipped unread)."""

    body: _BodyId


_enc = msgspec.msgpack.Encoder()
_env_dec = msgspec.msgpack.Decoder(Envelope)
_reply_dec = msgspec.msgpack.Decoder(Reply)
_id_dec = msgspec.msgpack.Decoder(_IdOnly)


def encode(msg: Envelope | Reply) -> bytes:
    return _enc.encode(msg)


def decode_request(data: bytes) -> Envelope:
    """Decode client bytes; raises msgspec.DecodeError/ValidationError on anything malformed."""
    return _env_dec.decode(data)


def request_id_of(data: bytes) -> str:
    """The request id of a message that failed to decode as an Envelope, or "" if it has none.

    A request with one malformed field (a token id that is not an int, say) is answered with its
    own id, so its client fails at once instead of waiting out its timeout for a reply it can
    never match. Typed decoding only: nothing else in the message is turned into objects.
    """
    try:
        return _id_dec.decode(data).body.request_id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""


def decode_reply(data: bytes) -> Reply:
    return _reply_dec.decode(data)
