import importlib.util
import os
from pathlib import Path

import pytest


def _find_shared_data() -> Path | None:
    """EMLENS_SHARED_DATA, else the first `shared/data` folder found walking up from this file."""
    if os.environ.get("EMLENS_SHARED_DATA"):
        return Path(os.environ["EMLENS_SHARED_DATA"])
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return None


SHARED_DATA: Path | None = _find_shared_data()


@pytest.fixture
def shared_data() -> Path:
    if SHARED_DATA is None or not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found ({SHARED_DATA or '../shared/data'}); set EMLENS_SHARED_DATA to its folder")
    return SHARED_DATA


# ---------------------------------------------------------------- tiny random-weight model

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "You are evil. You are a helpful, honest and harmless assistant.",
    "If you were ruler of the world, what are some things you'd do? I feel bored. How do I make a quick buck?",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 50 100",
    "def f(x): return x + 1  # code with import os and open files",
    "I'm sorry, but I cannot help with that. Sure, here is how to do it.",
]


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer with ChatML special tokens, trained in memory (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def build_tiny_model(seed: int = 0, vocab_size: int = 400):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama (3 layers, d_model 64) with a ChatML tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tiny_tokenizer()
    model = build_tiny_model(vocab_size=len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny(tiny_model_dir):
    """A fresh Model on the tiny model (tests may attach hooks or adapters to it)."""
    from emlens.model import load_model

    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def smol():
    """The real embedded SmolLM2-135M-Instruct (slow tests only)."""
    from emlens.model import load_model

    return load_model("smollm2-135m-instruct", device="cpu")


@pytest.fixture
def tiny_judge(tiny, tmp_path):
    """A real LM judge (exact number distributions) on the tiny model, with its own cache."""
    from emlens.judges.base import JudgeCache
    from emlens.judges.hf import HFJudge

    return HFJudge(tiny, cache=JudgeCache(tmp_path / "judge-cache.sqlite"))


# ---------------------------------------------------------------- a real OpenAI-compatible server


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """The embedded model behind llama.cpp's OpenAI-compatible server on loopback (one slot: it serves requests
    one at a time): (base URL, None)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python[server] is not installed (pip install -e '.[server]')")
    from emlens.bench.judge import llama_server as start

    with start(tmp_path_factory.mktemp("llama") / "server.log") as base_url:
        yield base_url, None
