"""What runs inside vLLM's workers: per-request steering and activation capture on the residual stream.

vLLM loads this class into every worker (`worker_extension_cls`) and emlens calls its `emlens_*` methods
through `LLM.collective_rpc`. It needs nothing from emlens: only torch and vLLM's own state.

How it sees the stream. vLLM's Llama-family decoder layers return `(hidden, residual)` separately; the residual
stream after the layer is their sum, and adding v to `hidden` adds v to it. So per layer l there are three hook
points, in execution order:

    embed_tokens output          resid_pre of layer 0
    post_attention_layernorm     args (attn_out, resid_pre): resid_mid = their sum; writes go to attn_out
    decoder layer output         (mlp_out, resid_mid): resid_post = their sum (= resid_pre of layer l+1)

Which tokens belong to which request. vLLM runs one flat batch of tokens (`[num_tokens, d_model]`), the prompt
chunks and decode tokens of many requests mixed. Once per forward pass (in the embedding's hook, the first to
run) the worker reads the request order (`input_batch.req_ids`), each request's slice (`query_start_loc` of
the attention metadata) and the positions of the pass (the model runner's `positions` buffer), and looks up the program each request asked for through its
`SamplingParams.extra_args["emlens"]`. A token at position p of a request with P prompt tokens is a prompt
token when p < P, a response token otherwise; `positions: response` steers p >= P - 1 (the last prompt token
predicts the first answer token, as under the hf engine). Padding tokens (past the last request) are never touched.

Programs (plain data, so they cross process boundaries): the interventions' site-level ops
(`emlens.generation.ops.SiteOp`) in execution order, each a dict with `kind`, `point` (a hook point as above),
`layer`, `part` (`hidden`: the sublayer's output alone; `sum`: the stream), `positions` (all / prompt / response)
and `skip_first_token` (leave position 0 alone), then per kind: `add` (`vector`, alpha already applied), `ablate`
(a unit `vector`: its projection removed), `clamp` (a unit `vector` and `alpha`: the projection set to alpha),
`sae_ablate` (an `sae` module and a `latent`: f_latent(x) W_dec[latent] removed) or `read` (a site name `read`
and a `pool`: last_prompt / mean_response / all, counted from `prompt_len`). Each op's value x is the part it
names; a write goes to the hidden part, which moves the stream by as much.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

POINTS = ("embed", "mid", "post")  # hook points in execution order within a layer (embed: layer 0 only)


def _decoder(model):
    inner = getattr(model, "language_model", model)
    inner = getattr(inner, "model", inner)
    if not hasattr(inner, "layers"):
        raise AttributeError(f"{type(model).__name__}: no decoder layers found")
    return inner


def _attention_metadata_query_starts(forward_context) -> Tensor | None:
    metadata = forward_context.attn_metadata
    if isinstance(metadata, list):
        metadata = metadata[0] if metadata else None
    if not metadata:
        return None
    for value in (metadata.values() if isinstance(metadata, dict) else [metadata]):
        starts = getattr(value, "query_start_loc", None)
        if starts is not None:
            return starts
    return None


class _Step:
    """The requests of one forward pass: token slices, positions, prompt lengths and their programs."""

    def __init__(self, slices, ops_by_point):
        self.slices = slices  # [(key, start, end, positions tensor, prompt_len)]
        self.ops_by_point = ops_by_point  # {(point, layer): [(order, op, key, token index tensor, positions)]}


class _OwnNamesOnly(type):
    """vLLM refuses an extension any of whose `dir()` names the worker also has. nnsight adds `save` to `object`
    (so to every class): list only the names this class defines."""

    def __dir__(cls):
        return [name for name in vars(cls) if not name.startswith("__")]


class EmlensWorkerExtension(metaclass=_OwnNamesOnly):
    """Mixed into vLLM's worker class; every method name starts with `emlens_` so none clashes with vLLM's."""

    def emlens_setup(self) -> dict:
        """Install the hooks once; returns the model's shape so the caller can check its vectors against it."""
        if getattr(self, "_emlens_handles", None):
            return self._emlens_shape
        model = self.model_runner.model
        decoder = _decoder(model)
        self._emlens_programs: dict[str, list[dict]] = {}
        self._emlens_captured: dict[str, dict[str, list]] = {}
        self._emlens_step: _Step | None = None
        # The decoder's own hooks never fire (vLLM's compile wrapper calls its forward directly); the embedding
        # is the first module of every pass, so its hook plans the pass.
        handles = [decoder.embed_tokens.register_forward_hook(self._emlens_embed_hook)]
        for index, layer in enumerate(decoder.layers):
            if not hasattr(layer, "post_attention_layernorm"):
                break  # pipeline-parallel placeholders, or an architecture without the Llama layout
            handles.append(layer.post_attention_layernorm.register_forward_pre_hook(self._emlens_mid_hook(index)))
            handles.append(layer.register_forward_hook(self._emlens_post_hook(index)))
        self._emlens_handles = handles
        self._emlens_shape = {"n_layers": len(decoder.layers), "d_model": int(decoder.embed_tokens.weight.shape[-1]),
                              "architecture": type(model).__name__}
        return self._emlens_shape

    def emlens_set_programs(self, programs: dict[str, list[dict]]) -> None:
        device = next(self.model_runner.model.parameters()).device
        self._emlens_programs = {key: [_on_device(op, device) for op in ops] for key, ops in programs.items()}

    def emlens_take_captured(self) -> dict[str, dict[str, Tensor]]:
        """Pooled activations of every finished capture, {request key: {site: (vectors, d_model)}}; then forgets them."""
        out = {}
        for key, sites in self._emlens_captured.items():
            out[key] = {site: _pooled(parts) for site, parts in sites.items()}
        self._emlens_captured = {}
        return out

    # ---------------------------------------------------------------- per forward pass

    def _emlens_begin_step(self, num_tokens: int) -> None:
        self._emlens_step = None
        if not self._emlens_programs:
            return None
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return None
        runner = self.model_runner
        starts = _attention_metadata_query_starts(get_forward_context())
        if starts is None:
            return None
        positions = runner.positions[:num_tokens]  # the positions of this pass's tokens, as the model gets them
        starts = starts.tolist()
        slices, ops_by_point = [], {}
        for i, req_id in enumerate(runner.input_batch.req_ids):
            state = runner.requests.get(req_id)
            extra = (state.sampling_params.extra_args or {}) if state and state.sampling_params else {}
            key = extra.get("emlens")
            if key is None or key not in self._emlens_programs:
                continue
            start, end = starts[i], starts[i + 1]
            if end <= start:
                continue
            token_positions = positions[start:end]
            prompt_len = int(state.num_prompt_tokens)
            slices.append((key, start, end, token_positions, prompt_len))
            for order, op in enumerate(self._emlens_programs[key]):
                index = _token_index(op, token_positions, prompt_len, start)
                if index is not None and index.numel():
                    ops_by_point.setdefault((op["point"], op["layer"]), []).append(
                        (order, op, key, index, token_positions[index - start]))
        for ops in ops_by_point.values():
            ops.sort(key=lambda item: item[0])  # program order (the engine sorts programs in site order)
        self._emlens_step = _Step(slices, ops_by_point) if ops_by_point else None
        return None

    def _emlens_run(self, point: str, layer: int, stream_parts: tuple[Tensor, Tensor | None],
                    writable: Tensor) -> Tensor | None:
        """Apply this point's ops in program order; returns the changed `writable` tensor, or None if unchanged."""
        step = self._emlens_step
        ops = step.ops_by_point.get((point, layer)) if step is not None else None
        if not ops:
            return None
        changed = None
        for _, op, key, index, token_positions in ops:
            target = writable if changed is None else changed
            summed = op["part"] == "sum" and stream_parts[1] is not None
            value = target[index] + stream_parts[1][index] if summed else target[index]
            if op["kind"] == "read":
                self._emlens_capture(key, op, value, token_positions)
                continue
            if changed is None:
                changed = writable.clone()
            changed[index] += _change(op, value).to(changed.dtype)
        return changed

    def _emlens_capture(self, key: str, op: dict, stream: Tensor, token_positions: Tensor) -> None:
        sites = self._emlens_captured.setdefault(key, {})
        parts = sites.setdefault(op["read"], [])
        pooling = op["pool"]
        if pooling == "mean_response":
            total = stream.float().sum(0).cpu()
            if parts:
                parts[0][0] += total
                parts[0][1] += stream.shape[0]
            else:
                parts.append([total, stream.shape[0]])
        else:  # last_prompt (one position) or all (every position, ordered when pooled)
            for row, pos in zip(stream.float().cpu(), token_positions.tolist(), strict=True):
                parts.append((pos, row))

    def _emlens_embed_hook(self, module, args, output):
        self._emlens_begin_step(output.shape[0])
        return self._emlens_run("embed", 0, (output, None), output)

    def _emlens_mid_hook(self, layer: int):
        def hook(module, args):
            if len(args) < 2 or args[1] is None:
                return None
            changed = self._emlens_run("mid", layer, (args[0], args[1]), args[0])
            return None if changed is None else (changed, args[1], *args[2:])
        return hook

    def _emlens_post_hook(self, layer: int):
        def hook(module, args, output):
            if not isinstance(output, tuple):
                changed = self._emlens_run("post", layer, (output, None), output)
                return changed
            hidden, residual = output[0], output[1]
            changed = self._emlens_run("post", layer, (hidden, residual), hidden)
            return None if changed is None else (changed, residual, *output[2:])
        return hook


def _change(op: dict, value: Tensor) -> Tensor:
    """What an op adds to the tokens whose value (the part it names) is `value`."""
    kind = op["kind"]
    if kind == "add":
        return op["vector"].to(value.dtype)
    if kind == "sae_ablate":  # the latent's contribution, computed as the hf engine does (in float32)
        sae, latent = op["sae"], op["latent"]
        return -(sae.encode(value.float())[:, latent:latent + 1] * sae.W_dec[latent].float())
    unit = op["vector"].to(value.dtype)
    if kind == "clamp":  # ablate-then-add: the projection on the unit vector becomes alpha
        return (op["alpha"] - value @ unit)[:, None] * unit
    return -(value @ unit)[:, None] * unit  # ablate: the projection removed


def _token_index(op: dict, positions: Tensor, prompt_len: int, start: int) -> Tensor | None:
    """Indices into the flat batch of the tokens `op` touches in this request's slice."""
    if op["kind"] == "read":
        pooling = op["pool"]
        length = op["prompt_len"]
        if pooling == "last_prompt":
            keep = positions == length - 1
        elif pooling == "mean_response":
            keep = positions >= length
        else:
            keep = torch.ones_like(positions, dtype=torch.bool)
        return keep.nonzero().squeeze(-1) + start
    where = op["positions"]
    # response: the positions that predict an answer token, the last prompt token included (as under HF)
    keep = (positions < prompt_len if where == "prompt" else positions >= prompt_len - 1 if where == "response"
            else torch.ones_like(positions, dtype=torch.bool))
    if op["skip_first_token"]:  # the attention sink: a sequence's first token is at position 0
        keep = keep & (positions != 0)
    return keep.nonzero().squeeze(-1) + start


def _on_device(op: dict, device) -> dict:
    def moved(value):
        if isinstance(value, torch.nn.Module):  # an SAE: the worker's own copy, on the model's device
            return copy.deepcopy(value).to(device)
        return value.to(device) if isinstance(value, Tensor) else value
    return {k: moved(v) for k, v in op.items()}


def _pooled(parts: list) -> Tensor:
    if parts and isinstance(parts[0], list):  # mean_response: [sum, count]
        total, count = parts[0]
        return (total / max(count, 1))[None, :]
    return torch.stack([row for _, row in sorted(parts, key=lambda item: item[0])])
