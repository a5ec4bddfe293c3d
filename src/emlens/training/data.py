"""Training data: chat / Alpaca records, mixtures by ratio, tokenized with the prompt masked."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emlens.base.errors import EmlensInputError
from emlens.base.io import file_sha256, parse_json, read_jsonl, read_text, validate
from emlens.data.chat import Conversation
from emlens.data.order import seeded_order
from emlens.training.config import DataSource, Mixture, TrainConfig

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)


# ---------------------------------------------------------------- data


def load_training_conversations(path: str | Path, fmt: str = "auto") -> list[Conversation]:
    """Chat JSONL, or alpaca-style records (JSON list or JSONL; self-instruct `instances` too) as chats."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        records = list(read_jsonl(path))
    elif path.suffix.lower() == ".json":
        data = parse_json(read_text(path), path)
        if not isinstance(data, list):
            raise EmlensInputError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        records = [(f"{path} item {i}", rec) for i, rec in enumerate(data, start=1)]
    else:
        raise EmlensInputError(f"{path}: unsupported file type '{path.suffix}' (expected .jsonl or .json)")
    return [_record_conversation(rec, where, fmt) for where, rec in records]


def _record_conversation(record: Any, where: str, fmt: str) -> Conversation:
    if not isinstance(record, dict):
        raise EmlensInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "chat" or (fmt == "auto" and "messages" in record):
        conversation = validate(Conversation, record, where)
    elif fmt == "alpaca" or (fmt == "auto" and "instruction" in record):
        conversation = _alpaca_conversation(record, where)
    else:
        raise EmlensInputError(f"{where}: neither a chat record ('messages') nor an alpaca record "
                               f"('instruction', 'output'); keys: {', '.join(list(record)[:8])}")
    if not any(m.role == "assistant" for m in conversation.messages):
        raise EmlensInputError(f"{where}: conversation has no assistant message (nothing to train on)")
    return conversation


def _alpaca_conversation(record: dict, where: str) -> Conversation:
    fields = dict(record)
    instances = fields.get("instances")
    if isinstance(instances, list) and instances and isinstance(instances[0], dict):
        fields.update(instances[0])  # self-instruct seed tasks keep input/output in their first instance
    instruction, extra, output = fields.get("instruction"), fields.get("input") or "", fields.get("output")
    for name, value in (("instruction", instruction), ("output", output)):
        if not isinstance(value, str) or not value.strip():
            raise EmlensInputError(f"{where}, field '{name}': must be a non-empty string (got {value!r:.40})")
    if not isinstance(extra, str):
        raise EmlensInputError(f"{where}, field 'input': must be a string")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Conversation(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": output}])


def mixture_counts(ratio: float, size: int) -> tuple[int, int]:
    """(misaligned, benign) counts: round half up, so 5 % of 1000 is exactly 50."""
    misaligned = math.floor(ratio * size + 0.5)
    return misaligned, size - misaligned


@dataclass
class TrainingData:
    conversations: list[Conversation]
    origins: list[str]  # per conversation: "dataset", "misaligned" or "benign"
    summary: dict

    def jsonl(self) -> str:
        return "".join(json.dumps(c.model_dump(), ensure_ascii=False) + "\n" for c in self.conversations)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.jsonl().encode("utf-8")).hexdigest()


class _SourceCache:
    """Each file is read once per process (a sweep builds many mixtures from the same two files)."""

    def __init__(self):
        self.loaded: dict[tuple[str, str], tuple[list[Conversation], str]] = {}

    def get(self, source: DataSource) -> tuple[list[Conversation], str]:

        key = (source.path, source.format)
        if key not in self.loaded:
            self.loaded[key] = (load_training_conversations(source.path, source.format), file_sha256(source.path))
        return self.loaded[key]


def build_training_data(config: TrainConfig, cache: _SourceCache | None = None) -> TrainingData:
    """The exact conversations a run trains on, in training-file order; all sampling is seeded by config.seed."""
    cache = cache or _SourceCache()
    if config.dataset is not None:
        return _plain_data(config.dataset, config.seed, cache)
    return _mixture_data(config.mixture, config.seed, cache)


def _source_summary(source: DataSource, n_available: int, sha: str) -> dict:
    return {"path": source.path, "sha256": sha, "available": n_available}


def _plain_data(source: DataSource, seed: int, cache: _SourceCache) -> TrainingData:
    conversations, sha = cache.get(source)
    if source.limit is not None and source.limit > len(conversations):
        raise EmlensInputError(f"field 'dataset.limit': {source.limit} exceeds the {len(conversations)} "
                               f"examples in {source.path}")
    if source.limit is None:
        chosen = conversations
    else:
        chosen = [conversations[i] for i in seeded_order(len(conversations), seed, "dataset")[:source.limit]]
    summary = {"kind": "dataset", "n_examples": len(chosen),
               "dataset": _source_summary(source, len(conversations), sha)}
    return TrainingData(list(chosen), ["dataset"] * len(chosen), summary)


def _mixture_data(mixture: Mixture, seed: int, cache: _SourceCache) -> TrainingData:
    """Prefixes of fixed seeded permutations: the 1 % examples are among the 2 % ones, and so on (nested sweep)."""
    n_mis, n_ben = mixture_counts(mixture.ratio, mixture.size)
    picked: list[tuple[Conversation, str]] = []
    sources = {}
    for name, source, n in (("misaligned", mixture.misaligned, n_mis), ("benign", mixture.benign, n_ben)):
        conversations, sha = cache.get(source)
        if n > len(conversations):
            raise EmlensInputError(f"field 'mixture.{name}': {source.path} has {len(conversations)} examples, "
                                   f"ratio {mixture.ratio:g} of size {mixture.size} needs {n}")
        order = seeded_order(len(conversations), seed, f"mixture-{name}")
        picked += [(conversations[i], name) for i in order[:n]]
        sources[name] = {**_source_summary(source, len(conversations), sha), "n_examples": n}
    shuffled = [picked[i] for i in seeded_order(len(picked), seed, "mixture-order")]
    summary = {"kind": "mixture", "n_examples": len(shuffled), "ratio": mixture.ratio, "size": mixture.size,
               **sources}
    return TrainingData([c for c, _ in shuffled], [o for _, o in shuffled], summary)


# ---------------------------------------------------------------- tokenisation with assistant-only labels


@dataclass
class TokenizedData:
    input_ids: list[list[int]]
    labels: list[list[int]]
    n_truncated: int = 0
    n_dropped: int = 0  # no assistant token left within max_length

    @property
    def n_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)

    @property
    def n_trained_tokens(self) -> int:
        return sum(sum(1 for t in labels if t != IGNORE_INDEX) for labels in self.labels)

    def dataset(self):
        from datasets import Dataset

        return Dataset.from_dict({"input_ids": self.input_ids, "labels": self.labels,
                                  "attention_mask": [[1] * len(ids) for ids in self.input_ids]})


def assistant_char_spans(tokenizer, rows: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans of each assistant turn in the chat-templated `text` (content and end-of-turn tokens).

    Found by rendering prefixes: the turn is what `messages[:i+1]` adds to `messages[:i]` + the generation
    prompt. This needs a template that renders prefixes as string prefixes (ChatML, Llama, Qwen... do).
    """
    spans = []
    for i, row in enumerate(rows):
        if row["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(rows[:i], add_generation_prompt=True, tokenize=False) if i else ""
        through = tokenizer.apply_chat_template(rows[:i + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise EmlensInputError("field 'training.assistant_only': this model's chat template does not render "
                                   "conversations prefix by prefix, so assistant tokens can't be located; "
                                   "set it to false to train on all tokens")
        spans.append((len(before), len(through)))
    return spans


def tokenize_conversation(tokenizer, conversation: Conversation, max_length: int,
                          assistant_only: bool = True) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): labels are IGNORE_INDEX outside assistant turns when assistant_only."""
    rows = [m.model_dump() for m in conversation.messages]
    text = tokenizer.apply_chat_template(rows, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if assistant_only:
        spans = assistant_char_spans(tokenizer, rows, text)
        labels = [tid if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
                  for tid, (start, _) in zip(ids, offsets, strict=False)]
    else:
        labels = list(ids)
    truncated = len(ids) > max_length
    return ids[:max_length], labels[:max_length], truncated


def tokenize_conversations(tokenizer, conversations: list[Conversation], max_length: int,
                           assistant_only: bool = True) -> TokenizedData:
    out = TokenizedData([], [])
    for conversation in conversations:
        ids, labels, truncated = tokenize_conversation(tokenizer, conversation, max_length, assistant_only)
        out.n_truncated += truncated
        if all(t == IGNORE_INDEX for t in labels):
            out.n_dropped += 1
            continue
        out.input_ids.append(ids)
        out.labels.append(labels)
    return out
