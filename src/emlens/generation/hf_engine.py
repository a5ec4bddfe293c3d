"""The hf engine: emlens's own batched decode loop on a transformers model (the reference every engine matches).

Before every forward pass the loop publishes, in a `ForwardContext`, which of the current input positions are
prompt tokens and which are response tokens (padding is neither), so an intervention never touches padding.
Each sample carries its own seed and torch.Generator, so a sample's text does not depend on which other
samples share its batch: a resumed run reproduces exactly the samples an interrupted one would have made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from emlens.generation.context import Intervention, describe, intervene
from emlens.generation.distributions import hf_next_top
from emlens.generation.requests import (
    Completion,
    GenerationConfig,
    Request,
    TokenLogprob,
    decode_completion,
    eos_token_ids,
    kv_cache,
    left_pad,
    prompt_token_ids,
)
from emlens.generation.reserved_cache import reserved_cache
from emlens.model import Model
from emlens.sites import hook_site, site_name


class HF:
    """The hf engine as the registry knows it (`emlens.generation.engines.Engine`): the reference, which runs every
    op and any intervention that hooks the transformers model itself."""

    name = "hf"

    def unavailable(self, handle: Model) -> str | None:
        return None

    def supports(self, handle: Model, ops) -> bool:
        return True

    def generate(self, handle: Model, requests: Sequence[Request], config: GenerationConfig,
                 interventions: Iterable[Intervention] = (), progress: bool = True,
                 on_batch: Callable[[list[int], list[Completion]], None] | None = None) -> list[Completion]:
        return generate_hf(handle, requests, config, interventions, progress, on_batch)

    def capture(self, handle: Model, sequences: Sequence[tuple[list[int], int]], sites: Sequence[tuple[int, str]],
                position: str, interventions: Iterable[Intervention] = ()) -> list[dict[str, Tensor]]:
        return capture_hf(handle, sequences, sites, position, interventions)

    def logprobs(self, handle: Model, sequences: Sequence[list[int]], k: int) -> list[dict[int, float]]:
        return hf_next_top(handle, k)(list(sequences))


@torch.inference_mode()
def capture_hf(handle: Model, sequences: Sequence[tuple[list[int], int]], sites: Sequence[tuple[int, str]],
               position: str, interventions: Iterable[Intervention] = ()) -> list[dict[str, Tensor]]:
    """Pooled vectors of each (token ids, prompt length) sequence at each (layer, kind) site, as vLLM's `capture`
    returns them: one sequence per pass (no padding), tokens from the prompt length on are response tokens."""
    found = []
    with intervene(handle, list(interventions)):
        for ids, prompt_len in sequences:
            seen: dict[str, Tensor] = {}
            readers = [hook_site(handle.base_model, layer, kind, _reader(seen, site_name(layer, kind)))
                       for layer, kind in sites]
            prompt = torch.arange(len(ids), device=handle.device)[None] < prompt_len
            try:
                with describe(handle, prompt, ~prompt, -1):
                    handle.model(input_ids=torch.tensor([ids], device=handle.device))
            finally:
                for reader in readers:
                    reader.remove()
            found.append({name: _pooled(value, position, prompt_len) for name, value in seen.items()})
    return found


def _reader(seen: dict, name: str):
    def read(hidden: Tensor) -> None:
        seen[name] = hidden[0].detach().float().cpu()
    return read


def _pooled(value: Tensor, position: str, prompt_len: int) -> Tensor:
    if position == "last_prompt":
        return value[prompt_len - 1][None]
    if position == "mean_response":
        return value[prompt_len:].mean(0, keepdim=True)
    return value


def generate_hf(handle: Model, requests: Sequence[Request], config: GenerationConfig,
                interventions: Iterable[Intervention] = (), progress: bool = True,
                on_batch: Callable[[list[int], list[Completion]], None] | None = None) -> list[Completion]:
    """Requests of similar prompt length share a batch; requests with their own interventions run as groups."""
    prompt_ids = prompt_token_ids(handle, requests)
    results: list[Completion | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="generate", unit="sample", disable=not progress)
    groups: dict[tuple, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(tuple(id(iv) for iv in request.interventions), []).append(i)
    for members in groups.values():
        own = list(requests[members[0]].interventions)
        order = sorted(members, key=lambda i: len(prompt_ids[i]))  # length grouping: little padding
        with intervene(handle, [*interventions, *own]):
            for start in range(0, len(order), config.batch_size):
                batch = order[start:start + config.batch_size]
                completions = _generate_batch(handle, [prompt_ids[i] for i in batch],
                                              [requests[i].seed for i in batch], config,
                                              [requests[i].logprobs for i in batch],
                                              [requests[i].on_token for i in batch])
                for i, completion in zip(batch, completions, strict=True):
                    results[i] = completion
                if on_batch is not None:
                    on_batch(batch, completions)
                bar.update(len(batch))
    bar.close()
    return results  # type: ignore[return-value]


@torch.inference_mode()
def _generate_batch(handle: Model, prompts: list[list[int]], seeds: list[int], config: GenerationConfig,
                    logprobs: list[int | None] | None = None, on_token: list | None = None) -> list[Completion]:
    model, device = handle.model, handle.device
    logprobs = logprobs or [None] * len(prompts)
    on_token = on_token or [None] * len(prompts)
    recorded: list[list[TokenLogprob] | None] = [None if k is None else [] for k in logprobs]
    eos = torch.tensor(sorted(eos_token_ids(handle)), device=device)
    input_ids, attention = left_pad(prompts, handle.tokenizer.pad_token_id, device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    room = input_ids.shape[1] + config.max_new_tokens  # the most any row can hold: reserved, never concatenated
    cache = reserved_cache(handle.base_model.config, room)

    live = list(range(len(prompts)))  # original row of each row still decoding
    tokens: list[list[int]] = [[] for _ in prompts]
    finish = ["length"] * len(prompts)
    prompt_mask, response_mask = attention.bool(), torch.zeros_like(attention, dtype=torch.bool)
    padded = not bool(attention.all())  # rows of one length never need a mask: the model skips building one
    groups = prefill_groups(handle, prompts, config) if padded else [list(range(len(prompts)))]
    for step in range(-1, config.max_new_tokens - 1):
        if step == -1 and len(groups) > 1:
            logits, stacked = _prefill_in_groups(handle, prompts, groups)
            cache = reserved_cache(handle.base_model.config, room, stacked)
        else:
            with describe(handle, prompt_mask, response_mask, step):
                logits = model(input_ids=input_ids, attention_mask=attention if padded else None,
                               position_ids=positions, **kv_cache(handle, cache), use_cache=True,
                               logits_to_keep=1).logits[:, -1, :].float()
        raw = _log_probs(logits, [logprobs[r] for r in live])  # the model's, before EOS suppression
        if step + 1 < config.min_new_tokens:
            logits[:, eos] = float("-inf")
        next_ids = _pick_tokens(logits, config, [generators[r] for r in live])
        if raw is not None:
            _record_logprobs(raw, next_ids, [logprobs[r] for r in live], [recorded[r] for r in live])
        done = torch.isin(next_ids, eos)
        for row, (token, is_done) in enumerate(zip(next_ids.tolist(), done.tolist(), strict=False)):
            original = live[row]
            tokens[original].append(token)
            if is_done:
                finish[original] = "eos"
            elif on_token[original] is not None and on_token[original](
                    token, recorded[original][-1] if recorded[original] else None):
                finish[original], done[row] = "stop", True
        if step + 2 >= config.max_new_tokens or bool(done.all()):
            break
        keep = (~done).nonzero().squeeze(-1)
        if len(keep) < len(live):  # drop finished rows so they cost nothing more
            cache.batch_select_indices(keep)
            attention, positions, next_ids = attention[keep], positions[keep], next_ids[keep]
            live = [live[i] for i in keep.tolist()]
        input_ids = next_ids[:, None]
        attention = torch.cat([attention, attention.new_ones((len(live), 1))], dim=1)
        positions = positions[:, -1:] + 1
        prompt_mask = torch.zeros((len(live), 1), dtype=torch.bool, device=device)
        response_mask = torch.ones((len(live), 1), dtype=torch.bool, device=device)
    return [decode_completion(handle, tokens[i], len(prompts[i]), finish[i], recorded[i]) for i in range(len(prompts))]


def _log_probs(logits: Tensor, wanted: list[int | None]) -> Tensor | None:
    """The next-token log-probabilities of the rows, where any row asked for them."""
    return None if all(k is None for k in wanted) else logits.log_softmax(-1)


def _record_logprobs(raw: Tensor, picked: Tensor, wanted: list[int | None], into: list) -> None:
    chosen = raw.gather(-1, picked[:, None]).squeeze(-1).tolist()
    top_values, top_ids = raw.topk(max(k or 0 for k in wanted), dim=-1)
    for row, k in enumerate(wanted):
        if k is not None:
            top = dict(zip(top_ids[row, :k].tolist(), top_values[row, :k].tolist(), strict=True))
            into[row].append(TokenLogprob(int(picked[row]), chosen[row], top))


PREFILL_FORWARD_COST = 32  # one more prefill forward pass costs about as much as this many padded prompt tokens


def prefill_groups(handle: Model, prompts: list[list[int]], config: GenerationConfig) -> list[list[int]]:
    """How a padded batch reads its prompts: in groups of rows, one forward pass each, whose KV caches are then
    left-padded to the longest and stacked for the batch's decode steps.

    One padded forward computes every row at the longest prompt's length, and a padded prefill needs an explicit
    attention mask, which takes attention off the fused causal kernel: prompts of mixed lengths (a short question
    beside a long one) can cost twice their tokens. So rows are split, in order of length, into the groups that
    minimise padded tokens plus PREFILL_FORWARD_COST per forward; a batch whose longest prompt has
    `serial_prefill_from` tokens reads each row alone (`emlens bench generate --long-prompts`), and
    `serial_prefill_from=None` keeps one padded batch. Caches of sliding-window layers keep only their window, so
    rows of other lengths cannot be stacked: those batches stay whole."""
    whole = [list(range(len(prompts)))]
    if config.serial_prefill_from is None or not _stackable(handle):
        return whole
    if max(len(p) for p in prompts) >= config.serial_prefill_from:
        return [[i] for i in range(len(prompts))]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    lengths = [len(prompts[i]) for i in order]
    best, cut = [0.0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):  # best[end]: the cheapest split of the `end` shortest rows
        for start in range(end):
            cost = best[start] + (end - start) * lengths[end - 1] + PREFILL_FORWARD_COST
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(order)
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def _stackable(handle: Model) -> bool:
    from transformers import DynamicCache

    return not any(DynamicCache(config=handle.base_model.config).is_sliding)


def _prefill_in_groups(handle: Model, prompts: list[list[int]], groups: list[list[int]]):
    """Each group of prompts read by one forward pass (no mask where its rows are of one length: the causal
    kernel), its KV cache then left-padded to the longest prompt and the rows stacked, in batch order, into one
    cache for the batch's decode steps (which mask the padding). Returns every row's next-token logits and the
    stacked cache."""
    from transformers import DynamicCache

    width, device = max(len(p) for p in prompts), handle.device
    logits: list[Tensor | None] = [None] * len(prompts)
    rows: list[list[tuple[Tensor, Tensor]] | None] = [None] * len(prompts)  # per row, per layer: (keys, values)
    for group in groups:
        ids, mask = left_pad([prompts[i] for i in group], handle.tokenizer.pad_token_id, device)
        padded = not bool(mask.all())
        cache = DynamicCache(config=handle.base_model.config)
        with describe(handle, mask.bool(), torch.zeros_like(mask, dtype=torch.bool), -1):
            out = handle.model(input_ids=ids, attention_mask=mask if padded else None,
                               position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **kv_cache(handle, cache),
                               use_cache=True, logits_to_keep=1)
        shift = width - ids.shape[1]
        layers = [(F.pad(layer.keys, (0, 0, shift, 0)), F.pad(layer.values, (0, 0, shift, 0))) for layer in cache.layers]
        for row, i in enumerate(group):
            logits[i] = out.logits[row, -1, :].float()
            rows[i] = [(keys[row:row + 1], values[row:row + 1]) for keys, values in layers]
    stacked = [(torch.cat([r[layer][0] for r in rows]), torch.cat([r[layer][1] for r in rows]))
               for layer in range(len(rows[0]))]
    return torch.stack(logits), DynamicCache(stacked, config=handle.base_model.config)


NUCLEUS_CANDIDATES = 512  # the top-p set is looked for among this many most likely tokens (a full sort if not there)


def _pick_tokens(logits: Tensor, config: GenerationConfig, generators: list[torch.Generator]) -> Tensor:
    """Greedy, or one draw per row by inverse CDF from that row's own generator (one uniform per row and step).

    A row's draw never depends on the other rows of the batch. Sampling among the nucleus candidates (not the
    whole vocabulary) and one batched search replace a full-vocabulary sort and a multinomial call per row.
    """
    if config.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits / config.temperature, dim=-1)
    candidates = None
    if config.top_p < 1.0:
        probs, candidates = _nucleus(probs, config.top_p)
    uniforms = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators])
    cdf = probs.cumsum(-1)
    picked = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None]).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    return picked if candidates is None else candidates.gather(-1, picked[:, None]).squeeze(-1)


def _nucleus(probs: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """The smallest set of most likely tokens whose mass reaches top_p: (their probabilities, their token ids)."""
    k = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    top, ids = probs.topk(k, dim=-1)  # sorted, most likely first
    if k < probs.shape[-1] and bool((top.sum(-1) < top_p).any()):
        top, ids = probs.sort(dim=-1, descending=True)
    outside = top.cumsum(-1) - top > top_p
    return top.masked_fill(outside, 0.0), ids
