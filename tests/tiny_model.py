"""Write a tiny random-weight llama GGUF (2 layers, 64 wide) for fast real-backend tests.

llama.cpp loads it in milliseconds and generates thousands of tokens per second; under
greedy sampling its output is a deterministic function of the prompt. It has a
SentencePiece vocabulary with all 256 byte tokens (so any text tokenizes), ChatML
control tokens and a ChatML chat template, like a real chat model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["CHATML", "write_tiny_model"]

_WORDS = (
    "the a and to of in is it you that he was for on are with as I his they be at one "
    "have this from or had by hot word but what some we can out other were all there "
    "when up use your how said an each she which do their time if will way about many "
    "then them write would like so these her long make thing see him two has look more "
    "day could go come did number sound no most people my over know water than call "
    "first who may down side been now find hello world pi cluster chat model worker"
).split()


CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_tiny_model(path: Path, *, n_ctx: int = 1024, seed: int = 0,
                     chat_template: str = CHATML, n_head: int = 4,
                     endless: bool = False) -> Path:
    """`n_head` 2 makes heads of 32 values, which a quantized KV cache needs. `endless`:
    the control tokens' logits are always 0, below the best of the others, so a greedy
    answer runs to `max_tokens` (a request that keeps a worker busy)."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>", b"<|im_start|>", b"<|im_end|>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
             gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>".encode())
        types.append(gguf.TokenType.BYTE)
    pieces = ["\u2581" + w for w in _WORDS] + list(".,!?:\n") + ["\u2581"]
    pieces += ["user", "assistant", "system"]
    for piece in dict.fromkeys(pieces):
        tokens.append(piece.encode())
        types.append(gguf.TokenType.NORMAL)
    scores = [0.0] * 5 + [-1000.0] * 256 + [-float(i) for i in range(len(tokens) - 261)]

    n_vocab, n_embd, n_head_kv, n_ff, n_layer = len(tokens), 64, n_head // 2, 128, 2
    head_dim = n_embd // n_head

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("pichat-tiny-test")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(4)  # <|im_end|>: the end of an assistant turn
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template(chat_template)

    def tensor(name: str, *shape: int, scale: float = 0.3) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    tensor("token_embd.weight", n_vocab, n_embd, scale=1.0)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    output = (rng.standard_normal((n_vocab, n_embd)) * 0.3).astype(np.float32)
    if endless:
        output[:5] = 0.0  # the control tokens: llama.cpp ends a turn at </s> too
    w.add_tensor("output.weight", output)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        tensor(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        tensor(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd)
        tensor(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        tensor(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        tensor(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        tensor(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        tensor(f"blk.{i}.ffn_down.weight", n_embd, n_ff)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


if __name__ == "__main__":
    import sys

    print(write_tiny_model(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf")))
