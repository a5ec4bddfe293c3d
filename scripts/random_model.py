"""Write a random-weight model of a real architecture's shape, for throughput checks where no weights can be
downloaded (the GPU machines lent to sessions):

    .venv/bin/python scripts/random_model.py qwen2.5-7b /tmp/qwen7b-random
    .venv/bin/emlens bench generate --model /tmp/qwen7b-random --engine vllm --batches 1,8,32
    .venv/bin/emlens bench steer --model /tmp/qwen7b-random --engine vllm

The tokenizer is the embedded SmolLM2's (49,152 tokens), so the embedding and LM head are that wide; every other
shape is the named model's. Text from random weights is noise: only the speed means anything.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from emlens.model import embedded_checkpoint

SHAPES = {
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1_000_000.0),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1_000_000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,  # checks scripts
                 num_key_value_heads=1, max_position_embeddings=2048),
}


def write_random_model(shape: str, out: Path, dtype: str = "bfloat16") -> int:
    """The named shape with random weights (seed 0) and the embedded tokenizer, saved to OUT; its parameter count."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_checkpoint())
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    count = write_random_model(args.shape, args.out, args.dtype)
    print(f"wrote {args.out}: {count / 1e9:.2f} B parameters ({args.dtype})")


if __name__ == "__main__":
    main()
