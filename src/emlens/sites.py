"""Sites: TransformerLens names (`blocks.{l}.hook_{kind}`) and the one table from site kind to module and hook."""

from __future__ import annotations

import itertools
import re
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from emlens.base.errors import EmlensInputError

SITE_KINDS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")  # in execution order within a layer
_SITE_RE = re.compile(r"^blocks\.(\d+|\*)\.hook_([a-z_]+)$")


# ---------------------------------------------------------------- sites


def site_name(layer: int, kind: str = "resid_post") -> str:
    """The TransformerLens name of a site: `site_name(15) == "blocks.15.hook_resid_post"`."""
    if kind not in SITE_KINDS:
        raise EmlensInputError(f"site kind '{kind}': unknown (known: {', '.join(SITE_KINDS)})")
    return f"blocks.{layer}.hook_{kind}"


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    order: int  # position of the kind within a layer's forward pass, so sorted sites are in execution order

    @property
    def kind(self) -> str:
        return SITE_KINDS[self.order]

    @property
    def name(self) -> str:
        return site_name(self.layer, self.kind)

    @classmethod
    def of(cls, layer: int, kind: str) -> Site:
        site_name(layer, kind)  # validates the kind
        return cls(layer, SITE_KINDS.index(kind))


def parse_layers(text: str | int | Sequence[int] | None, n_layers: int) -> list[int]:
    """`all`, `15`, `-1`, `0-5,10,20-29` or a list of ints -> sorted layer indices, checked against the model."""
    if text is None or (isinstance(text, str) and text.strip() == "all"):
        return list(range(n_layers))
    parts: list = [text] if isinstance(text, int) else (list(text) if not isinstance(text, str) else
                                                         [p.strip() for p in text.split(",") if p.strip()])
    layers: set[int] = set()
    for part in parts:
        try:
            if isinstance(part, str) and re.fullmatch(r"\d+-\d+", part):
                lo, hi = (int(x) for x in part.split("-"))
                chosen = range(lo, hi + 1)
            else:
                chosen = [int(part)]
        except (TypeError, ValueError):
            raise EmlensInputError(f"layers '{text}': '{part}' is not a layer number or range like 3-7") from None
        for layer in chosen:
            resolved = layer + n_layers if layer < 0 else layer
            if not 0 <= resolved < n_layers:
                raise EmlensInputError(f"layers '{text}': layer {layer} out of range (the model has {n_layers}: "
                                       f"0-{n_layers - 1})")
            layers.add(resolved)
    if not layers:
        raise EmlensInputError(f"layers '{text}': no layer selected")
    return sorted(layers)


def parse_site(name: str, n_layers: int) -> Site:
    """One full TransformerLens site name -> Site; unknown layers or kinds are a one-line error."""
    match = _SITE_RE.match(name.strip())
    if not match or match.group(1) == "*":
        raise EmlensInputError(f"site '{name}': expected blocks.<layer>.hook_<kind> with kind one of "
                               f"{', '.join(SITE_KINDS)}")
    kind = match.group(2)
    if kind not in SITE_KINDS:
        raise EmlensInputError(f"site '{name}': unknown kind 'hook_{kind}' (known: "
                               f"{', '.join('hook_' + k for k in SITE_KINDS)})")
    layer = int(match.group(1))
    if layer >= n_layers:
        raise EmlensInputError(f"site '{name}': layer {layer} out of range (the model has {n_layers} layers: "
                               f"0-{n_layers - 1})")
    return Site.of(layer, kind)


def resolve_sites(sites: str | Iterable[str], n_layers: int, layers: str | Sequence[int] | None = None) -> list[Site]:
    """Sites from full names (`blocks.3.hook_resid_post`), patterns (`blocks.*.hook_mlp_out`) or kinds
    (`resid_post`); patterns and kinds expand over `layers` (default: all). Sorted in execution order."""
    entries = [sites] if isinstance(sites, str) else list(sites)
    if not entries:
        raise EmlensInputError("sites: none given")
    chosen: set[Site] = set()
    for entry in entries:
        entry = entry.strip()
        if entry in SITE_KINDS or entry.removeprefix("hook_") in SITE_KINDS:
            kind = entry.removeprefix("hook_")
            chosen.update(Site.of(layer, kind) for layer in parse_layers(layers, n_layers))
        elif entry.startswith("blocks.*."):
            kind = entry.removeprefix("blocks.*.hook_")
            if kind not in SITE_KINDS:
                raise EmlensInputError(f"site '{entry}': unknown kind (known: {', '.join(SITE_KINDS)})")
            chosen.update(Site.of(layer, kind) for layer in parse_layers(layers, n_layers))
        else:
            chosen.add(parse_site(entry, n_layers))
    return sorted(chosen)


# ---------------------------------------------------------------- the site table
#
# THE one place that knows where a TransformerLens site lives in a Hugging Face model. Every hook emlens places
# (extraction, steering, ablation) goes through `hook_site`. `hook_resid_post` of layer l is the output of
# decoder layer l, which is HF `hidden_states[l + 1]` (HF's last entry is after the final norm; emlens never
# applies that norm).


@dataclass(frozen=True)
class Hook:
    """A module under a decoder layer ("" is the layer itself) and whether the site is its input or output."""

    module: str
    where: Literal["input", "output"]


@dataclass(frozen=True)
class Family:
    """How one architecture family lays out its residual stream.

    `read` says where each site kind is read. `write` says where an ADDITION to the site is made when that
    differs from `read`: adding v to resid_mid is adding v to the attention output that resid_mid sums
    (resid_mid = resid_pre + attn_out), since the layer keeps its own copy of the residual before the
    post-attention norm, and changing the norm's input would reach the MLP only.
    """

    name: str
    decoder: str  # path from the causal LM to the module that holds `.layers`
    read: dict[str, Hook]
    write: dict[str, Hook]
    model_types: tuple[str, ...]
    refused: str = ""  # why the site kinds missing from `read` cannot be served (one line)
    heads: str = "self_attn.o_proj"  # the module whose input is the attention heads' outputs, concatenated (hook_z)
    vllm: dict[str, VLLMPoint] = field(default_factory=dict)  # where vLLM's worker sees each kind ({}: not served)


@dataclass(frozen=True)
class VLLMPoint:
    """Where vLLM's worker (`emlens.generation.vllm_worker`) sees a site kind of layer l: at hook point `point`
    (embed / mid / post) of layer l + `offset`, as the sublayer output alone (`part` hidden) or the stream (sum);
    `rank` orders the sites seen at one point."""

    point: Literal["embed", "mid", "post"]
    offset: int
    part: Literal["hidden", "sum"]
    rank: int


# vLLM's Llama-layout layers return (hidden, residual); the worker hooks the post-attention norm's input
# (attn_out, resid_pre) and the layer's output (mlp_out, resid_mid). resid_pre of layer 0 is the embedding's output.
LLAMA_VLLM = {"attn_out": VLLMPoint("mid", 0, "hidden", 0), "resid_mid": VLLMPoint("mid", 0, "sum", 1),
              "mlp_out": VLLMPoint("post", 0, "hidden", 0), "resid_post": VLLMPoint("post", 0, "sum", 1),
              "resid_pre": VLLMPoint("post", -1, "sum", 2)}


_PRE, _POST = Hook("", "input"), Hook("", "output")
LLAMA = Family(
    "llama", "model",
    read={"resid_pre": _PRE, "attn_out": Hook("self_attn", "output"),
          "resid_mid": Hook("post_attention_layernorm", "input"), "mlp_out": Hook("mlp", "output"), "resid_post": _POST},
    write={"resid_mid": Hook("self_attn", "output")},
    model_types=("llama", "qwen2", "qwen3", "mistral", "gemma", "olmo", "phi3", "smollm3"),
    vllm=LLAMA_VLLM,
)
OLMO2 = Family(  # OLMo-2 norms each sublayer's output (no norm before it): the MLP reads resid_mid itself
    "olmo2", "model",
    read={"resid_pre": _PRE, "attn_out": Hook("post_attention_layernorm", "output"), "resid_mid": Hook("mlp", "input"),
          "mlp_out": Hook("post_feedforward_layernorm", "output"), "resid_post": _POST},
    write={"resid_mid": Hook("post_attention_layernorm", "output")},
    model_types=("olmo2",),
)
GRANITE = Family(  # the stream gets residual_multiplier x each sublayer's output, which no module returns
    "granite", "model", read={"resid_pre": _PRE, "resid_post": _POST}, write={}, model_types=("granite",),
    refused="Granite adds residual_multiplier x the attention and MLP outputs, which no module returns; read or "
            "steer resid_pre or resid_post",
)
GEMMA2 = Family(  # Gemma-2/3 norm each sublayer's output before adding it to the residual
    "gemma2", "model",
    read={"resid_pre": _PRE, "attn_out": Hook("post_attention_layernorm", "output"),
          "resid_mid": Hook("pre_feedforward_layernorm", "input"),
          "mlp_out": Hook("post_feedforward_layernorm", "output"), "resid_post": _POST},
    write={"resid_mid": Hook("post_attention_layernorm", "output")},
    model_types=("gemma2", "gemma3_text"),
)
GEMMA3_MULTIMODAL = Family("gemma3", "model.language_model", GEMMA2.read, GEMMA2.write, ("gemma3",))
GPT_NEOX = Family(  # resid_mid exists only without the parallel residual (Pythia uses the parallel one)
    "gpt_neox", "gpt_neox",
    read={"resid_pre": _PRE, "attn_out": Hook("post_attention_dropout", "output"),
          "resid_mid": Hook("post_attention_layernorm", "input"), "mlp_out": Hook("post_mlp_dropout", "output"),
          "resid_post": _POST},
    write={"resid_mid": Hook("post_attention_dropout", "output")},
    model_types=("gpt_neox",),
    heads="attention.dense",
)
FAMILIES = (LLAMA, OLMO2, GRANITE, GEMMA2, GEMMA3_MULTIMODAL, GPT_NEOX)


def vllm_point(config, layer: int, kind: str) -> tuple[str, int, str, tuple[int, int, int]]:
    """(hook point, its layer, part, execution order) where vLLM's worker sees a site; one line where the family
    has no vLLM placement."""
    family = family_of(config)
    if not family.vllm:
        served = ", ".join(f.name for f in FAMILIES if f.vllm)
        raise EmlensInputError(f"engine vllm: steering and capture support {served}-family models; "
                               f"{config.model_type} needs --engine hf")
    if kind == "resid_pre" and layer == 0:
        return "embed", 0, "sum", (0, 0, 0)
    where = family.vllm[kind]
    return where.point, layer + where.offset, where.part, (layer + where.offset, _POINT_RANK[where.point], where.rank)


_POINT_RANK = {"embed": 0, "mid": 1, "post": 2}


def family_of(config) -> Family:
    """The architecture family of an HF config (by `model_type`); an unknown one is a one-line error."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise EmlensInputError(f"model type '{model_type}': emlens has no site table for it (known: {known})")


def _attribute(root, path: str):
    for part in filter(None, path.split(".")):
        root = getattr(root, part)
    return root


def decoder_of(causal_lm):
    """The module that holds the decoder layers (the model without its LM head)."""
    return _attribute(causal_lm, family_of(causal_lm.config).decoder)


def decoder_layers(causal_lm):
    return decoder_of(causal_lm).layers


def check_site_kind(causal_lm, kind: str) -> None:
    """A site kind the model does not have (resid_mid under GPT-NeoX's parallel residual) is a one-line error."""
    if kind not in SITE_KINDS:
        raise EmlensInputError(f"site kind '{kind}': unknown (known: {', '.join(SITE_KINDS)})")
    config = causal_lm.config
    if kind == "resid_mid" and getattr(config, "use_parallel_residual", False):
        raise EmlensInputError(f"site kind 'resid_mid': {config.model_type} with a parallel residual has no "
                               "resid_mid (attention and MLP both read resid_pre)")
    family = family_of(config)
    if kind not in family.read:
        raise EmlensInputError(f"site kind '{kind}': not served for {config.model_type} ({family.refused})")


def head_layout(causal_lm) -> tuple[int, int]:
    """(heads, head dimension) of the attention whose concatenated head outputs `hook_heads` sees."""
    config = causal_lm.config.get_text_config()
    heads = config.num_attention_heads
    return heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def hook_heads(causal_lm, layer: int, change: Callable[[Tensor], Tensor | None]):
    """Call `change(z)` on the attention heads' outputs of a layer, concatenated (batch, positions, heads x
    head_dim), before the output projection mixes them (TransformerLens's hook_z, flattened); a returned tensor
    replaces them. Returns a handle (`.remove()` it)."""
    module = _attribute(decoder_layers(causal_lm)[layer], family_of(causal_lm.config).heads)

    def pre_hook(module, args, kwargs):
        new = change(args[0] if args else kwargs["input"])
        if new is None:
            return None
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "input": new})
    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def hook_site(causal_lm, layer: int, kind: str, change: Callable[[Tensor], Tensor | None], write: bool = False):
    """Call `change(hidden)` at a site on every forward pass; a returned tensor replaces the value there.

    `write=True` places the hook where an addition to the site belongs (see `Family`). Returns a handle
    (`.remove()` it). `causal_lm` is the plain HF model (under any PEFT wrapper).

    Several sites can share one module: the attention output is where attn_out is read and written AND where
    an addition to resid_mid is made. The hooks on one module therefore run in site order (then in the order
    they were placed), so a read of attn_out never sees an addition made to resid_mid, whichever came first.
    """
    check_site_kind(causal_lm, kind)
    family = family_of(causal_lm.config)
    hook = (family.write.get(kind) if write else None) or family.read[kind]
    module = _attribute(decoder_layers(causal_lm)[layer], hook.module)
    hooks = _SITE_HOOKS.setdefault(module, {})
    if hook.where not in hooks:
        hooks[hook.where] = _SiteHooks(module, hook.where)
    return hooks[hook.where].add(SITE_KINDS.index(kind), change)


class _SiteHooks:
    """Every emlens hook on one module's input (or output), run by ONE torch hook in site order."""

    def __init__(self, module, where: Literal["input", "output"]):
        self.module, self.where = module, where
        self.changes: list[tuple[int, int, Callable[[Tensor], Tensor | None]]] = []  # (site order, seq, change)
        self.count = itertools.count()
        # plain functions, not bound methods: a deepcopy of the model shares them, as it shares any closure
        if where == "input":
            def pre_hook(module, args, kwargs):
                return self._pre_hook(args, kwargs)
            self.torch_handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:
            def post_hook(module, args, output):
                return self._post_hook(output)
            self.torch_handle = module.register_forward_hook(post_hook)

    def add(self, order: int, change: Callable[[Tensor], Tensor | None]) -> _SiteHandle:
        entry = (order, next(self.count), change)
        self.changes.append(entry)
        self.changes.sort(key=lambda e: e[:2])
        return _SiteHandle(self, entry)

    def remove(self, entry) -> None:
        if entry in self.changes:
            self.changes.remove(entry)
        if not self.changes:
            self.torch_handle.remove()
            hooks = _SITE_HOOKS.get(self.module, {})
            if hooks.get(self.where) is self:
                del hooks[self.where]
            if not hooks:
                _SITE_HOOKS.pop(self.module, None)

    def _run(self, hidden: Tensor) -> Tensor | None:
        changed = False
        for _, _, change in list(self.changes):
            new = change(hidden)
            if new is not None:
                hidden, changed = new, True
        return hidden if changed else None

    def _pre_hook(self, args, kwargs):
        new = self._run(args[0] if args else kwargs["hidden_states"])
        if new is None:
            return None
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    def _post_hook(self, output):
        new = self._run(output[0] if isinstance(output, tuple) else output)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new


class _SiteHandle:
    """What `hook_site` returns: `.remove()` takes the hook off (a second call does nothing)."""

    def __init__(self, hooks: _SiteHooks, entry):
        self.hooks, self.entry = hooks, entry

    def remove(self) -> None:
        if self.hooks is not None:
            self.hooks.remove(self.entry)
            self.hooks = None

    def __enter__(self) -> _SiteHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


_SITE_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> {"input"/"output": _SiteHooks}
