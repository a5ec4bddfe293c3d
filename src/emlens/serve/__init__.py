"""`emlens serve`: steered and fine-tuned models behind an OpenAI-compatible API (`emlens.serve.app`)."""
