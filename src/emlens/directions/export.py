"""Exports that let other tools steer with an emlens direction: llama.cpp, repeng, steering-vectors, Neuronpedia.

    em.export_direction(direction, "gguf", "refusal.gguf", scale=2.0)   # or: emlens export DIR --format gguf ...

Every format holds ONE vector at ONE layer: the vector emlens's own steering adds there, so the same number means
the same thing everywhere. `em.steer(model, d.add(scale=S, layer=l))` adds `S * raw_norm(l) * unit(l)` at the
direction's site (`absolute=True`: `S * unit(l)`); an export written with `scale=S` holds exactly that vector:

| format | file | what it is for | the same as emlens's `d.add(scale=S)` |
|---|---|---|---|
| `gguf` | llama.cpp control vector | `llama-server -m MODEL.gguf --control-vector FILE` | as it is; `--control-vector-scaled FILE:c` is `d.add(scale=c*S)` |
| `repeng` | the same GGUF layout (`ControlVector.import_gguf(FILE)`) | `ControlModel(model, [block]).set_control(cv, coeff=c)` | at `coeff=1`; `coeff=c` is `c*S` |
| `steering-vectors` | safetensors (`read_steering_vector(FILE)`) | `SteeringVector(**read_steering_vector(FILE)).apply(model, multiplier=c)` | at `multiplier=1`; `c` is `c*S` |
| `neuronpedia` | JSON: hook name, layer, vector, default strength | Neuronpedia-style vector upload / steering | `strength * vector`: `vector` is the natural-scale one (`raw_norm * unit`), `default_steer_strength` is S |

Where they add it. llama.cpp adds `direction.N` of a control-vector GGUF to the OUTPUT of decoder layer N (0-based;
`llama_adapter_cvec::apply_to` at `l_out` of layer il, with the file's `direction.N` stored at the buffer offset of
layer N by `common_control_vector_load`), and it has no vector for layer 0 (`direction.0` is refused when loaded). repeng
(`model.model.layers[N]`'s output, its vectors read from `hidden_states[N + 1]`) and steering-vectors
(`layer_type="decoder_block"`: a forward hook on decoder block N) add at the same point. That point is emlens's
`blocks.N.hook_resid_post`, which is also `blocks.{N+1}.hook_resid_pre`; so a resid_post direction of layer l goes
to block l and a resid_pre direction of layer l to block l - 1. Other sites (attn_out, resid_mid, mlp_out) are
not a block's output and are refused (Neuronpedia's JSON names any TransformerLens hook, so it takes every site).
All of them add at every position, prompt and answer (emlens's `positions="all"`); repeng and emlens leave
left padding alone. (llama.cpp's own cvector-generator names the vector read at layer il's output
`direction.{il+1}`; what counts is where the loader adds it, above.)

Tested in llama.cpp itself (tests/test_export.py, on the embedded SmolLM2 Q4_1 GGUF, which emlens runs dequantized):
llama-cpp-python's OpenAI server has no control-vector setting, and it binds `llama_set_adapter_cvec` but not the GGUF
loader, so one test lays the file out as `common_control_vector_load` does and applies it through that binding; a
second runs llama.cpp's own `llama-server --control-vector FILE` where the binary is there (`LLAMA_SERVER`).
Teacher-forced on emlens's steered answers (layer 15, scale 2), the logit shift the control vector causes correlates
0.996 with emlens's at the exported layer and scale, against at most 0.90 at the next layer or at half or twice the
scale; the same next token 0.96 of the time (llama-server: 0.94), against at most 0.66. Free-running greedy answers
agree less: Q4 arithmetic makes near-ties fall the other way and a run that diverges once stays apart (0.60-0.80 of
the tokens unsteered, 0.15-0.87 steered, by scale and prompts); scale 0 gives exactly the unsteered tokens in both.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from jaxtyping import Float
from torch import Tensor

from emlens.base.errors import EmlensInputError
from emlens.base.io import atomic_file, fail, json_text
from emlens.base.version import __version__
from emlens.directions.artifact import Direction
from emlens.model import Model, folder_fingerprint, resolve_checkpoint

Format = Literal["gguf", "repeng", "steering-vectors", "neuronpedia"]
FORMATS: tuple[str, ...] = ("gguf", "repeng", "steering-vectors", "neuronpedia")
CONTROL_VECTOR_ARCH = "controlvector"  # llama.cpp's general.architecture for a control vector
DECODER_BLOCK = "decoder_block"  # steering-vectors' layer type for a decoder block's output
BLOCK_OUTPUT_SITES = ("resid_post", "resid_pre")  # the sites a decoder block's output can stand for


@dataclass(frozen=True)
class Target:
    """The model an export is for, read from its config (no weights loaded)."""

    name: str
    model_type: str  # HF model_type or GGUF architecture: repeng's model_type, llama.cpp's model_hint
    n_layers: int
    d_model: int
    base_fingerprint: str | None  # None where it cannot be had without loading the weights (a GGUF, a hub id)


@dataclass(frozen=True)
class SteeringExport:
    """One layer's steering vector as every format writes it, with where it is added and what it came from."""

    vector: Float[Tensor, " d_model"]  # what is added: scale * raw_norm * unit (absolute: scale * unit)
    natural: Float[Tensor, " d_model"]  # the vector of scale 1 (Neuronpedia's vector; strength = scale)
    layer: int  # the direction's layer
    site: str  # the direction's TransformerLens hook name, e.g. blocks.15.hook_resid_post
    block: int | None  # the decoder block whose output is that site (None: not a block's output)
    scale: float
    scale_unit: str  # raw_norm (emlens steer's default) or absolute
    target: Target
    provenance: dict


# ---------------------------------------------------------------- what is exported


def steering_export(direction: Direction, layer: int | None = None, scale: float = 1.0, absolute: bool = False,
                    model: Model | str | None = None, force: bool = False) -> SteeringExport:
    """The vector `direction.add(scale, layer, absolute=absolute)` adds, checked against the target model (default:
    the one the direction was fitted on): its width and depth always, its base model unless `force`."""
    where = direction.path or direction.name
    if not math.isfinite(scale):
        raise fail(where, f"scale {scale} is not a finite number")
    layer = direction.best_layer if layer is None else int(layer)
    unit = direction.vector(layer).float()  # one line for a layer the direction does not have
    natural = unit if absolute else unit * direction.raw_norm(layer)
    target = describe_target(model, direction)
    check_target(direction, target, layer, force)
    return SteeringExport(vector=natural * float(scale), natural=natural, layer=layer, site=direction.site(layer),
                          block=block_of(direction.site_kind, layer), scale=float(scale),
                          scale_unit="absolute" if absolute else "raw_norm", target=target,
                          provenance=provenance(direction, layer))


def block_of(site_kind: str, layer: int) -> int | None:
    """The decoder block whose output is `blocks.{layer}.hook_{site_kind}` (resid_pre of l is the output of l - 1)."""
    if site_kind == "resid_post":
        return layer
    if site_kind == "resid_pre" and layer > 0:
        return layer - 1
    return None  # attention / MLP outputs, resid_mid, and resid_pre of layer 0 (the embeddings)


def provenance(direction: Direction, layer: int) -> dict:
    model = direction.cfg.model
    return {"direction": direction.name, "method": direction.method, "site": direction.site(layer),
            "raw_norm": direction.raw_norm(layer), "model": model.get("model"), "adapter": model.get("adapter"),
            "fingerprint": model.get("fingerprint"), "base_fingerprint": model.get("base_fingerprint"),
            "emlens_version": __version__}


# ---------------------------------------------------------------- the target model


def describe_target(model: Model | str | None, direction: Direction) -> Target:
    """A loaded Model, a model spec (embedded name, local folder, HF id), a model's .gguf file, or None for the
    model the direction was fitted on."""
    if isinstance(model, Model):
        return Target(model.spec, model.config.model_type, model.n_layers, model.d_model, model.base_fingerprint)
    if model is None:
        model = direction.cfg.model.get("model")
        if not model:
            raise fail(direction.path or direction.name, "records no model it was fitted on; name the target model "
                                                         "(--model)")
    if str(model).endswith(".gguf"):
        return _gguf_target(Path(model))
    return _config_target(str(model))


def _config_target(spec: str) -> Target:
    from transformers import AutoConfig

    checkpoint = resolve_checkpoint(spec)
    try:
        config = AutoConfig.from_pretrained(checkpoint).get_text_config()  # multimodal: the text model's
    except (OSError, ValueError) as error:
        raise fail(f"model '{spec}'", f"cannot read its config ({str(error).splitlines()[0]})") from None
    local = Path(checkpoint)
    fingerprint = folder_fingerprint(local) if local.is_dir() else None  # as load_model takes it
    return Target(spec, config.model_type, config.num_hidden_layers, config.hidden_size, fingerprint)


def _gguf_target(path: Path) -> Target:
    """Width and depth from a model GGUF's metadata (`{arch}.embedding_length`, `{arch}.block_count`)."""
    import gguf

    if not path.is_file():
        raise fail(path, "no such model GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as error:
        raise fail(path, f"not a GGUF file ({error})") from None
    arch = _gguf_string(reader, "general.architecture")
    if arch is None or arch == CONTROL_VECTOR_ARCH:
        raise fail(path, f"not a model GGUF (general.architecture: {arch})")
    width, depth = _gguf_int(reader, f"{arch}.embedding_length"), _gguf_int(reader, f"{arch}.block_count")
    if width is None or depth is None:
        raise fail(path, f"has no {arch}.embedding_length / {arch}.block_count")
    return Target(str(path), arch, depth, width, None)


def check_target(direction: Direction, target: Target, layer: int, force: bool) -> None:
    """One line for another width or depth (never forceable) or another base model (unless force)."""
    where = direction.path or direction.name
    if target.d_model != direction.d_model:
        raise fail(where, f"direction width {direction.d_model} does not match the d_model {target.d_model} of "
                          f"{target.name} (another model family)")
    if layer >= target.n_layers:
        raise fail(where, f"layer {layer} is past the {target.n_layers} layers of {target.name}")
    fitted = direction.cfg.model.get("base_fingerprint")
    if fitted and target.base_fingerprint and fitted != target.base_fingerprint and not force:
        raise fail(where, f"fitted on base model {direction.cfg.model.get('model')} (base fingerprint {fitted}), not "
                          f"on {target.name} (base fingerprint {target.base_fingerprint}); pass force=True (--force) "
                          "to export it anyway")


# ---------------------------------------------------------------- the formats as objects


def block_for(export: SteeringExport, fmt: str) -> int:
    """The decoder block a block-output format adds at, or one line saying why this site cannot be expressed."""
    if export.block is None:
        raise EmlensInputError(f"{export.provenance['direction']}: {fmt} adds to a decoder layer's output "
                               f"(resid_post, or resid_pre of the next layer); {export.site} is not one (export it "
                               "as neuronpedia, or fit the direction at resid_post)")
    if fmt == "gguf" and export.block == 0:
        raise EmlensInputError(f"{export.provenance['direction']}: llama.cpp has no control vector for layer 0's "
                               f"output ({export.site}); export another layer (--layer)")
    return export.block


def repeng_vector(export: SteeringExport) -> dict:
    """What repeng's `ControlVector(model_type=..., directions={layer: np.ndarray})` takes: `ControlVector(**d)`."""
    block = block_for(export, "repeng")
    return {"model_type": export.target.model_type, "directions": {block: export.vector.numpy().astype(np.float32)}}


def steering_vector(export: SteeringExport) -> dict:
    """What steering-vectors' `SteeringVector(layer_activations={layer: Tensor}, layer_type=...)` takes."""
    block = block_for(export, "steering-vectors")
    return {"layer_activations": {block: export.vector.clone()}, "layer_type": DECODER_BLOCK}


def neuronpedia_vector(export: SteeringExport, label: str | None = None) -> dict:
    """A Neuronpedia-style vector: the fields of its vector upload (label, model_id, layer_num, hook_type, vector,
    default_steer_strength), the TransformerLens hook name, and emlens's provenance. Steering adds
    `strength * vector`, so `vector` is the natural-scale one and the default strength is emlens's scale."""
    layer, kind = export.layer, export.site.rsplit(".", 1)[1]
    return {"label": label or export.provenance["direction"], "model_id": export.target.name,
            "hook_name": export.site, "layer_num": layer, "hook_type": kind,
            "vector": export.natural.tolist(), "default_steer_strength": export.scale,
            "strength_unit": "emlens steer scale: strength * vector is what emlens adds at scale = strength"
                             + (" (absolute: vector is the unit direction)" if export.scale_unit == "absolute" else ""),
            "emlens": {**export.provenance, "scale_unit": export.scale_unit, "target": export.target.name,
                       "target_base_fingerprint": export.target.base_fingerprint}}


# ---------------------------------------------------------------- writing


def export_direction(direction: Direction | str | Path, fmt: Format, out: str | Path, layer: int | None = None,
                     scale: float = 1.0, absolute: bool = False, model: Model | str | None = None,
                     force: bool = False) -> Path:
    """Write `direction` (an artifact or its folder) at `layer` (default: its best) for another tool, as the vector
    emlens's `direction.add(scale, layer)` adds; see the module doc for each format and how to load it."""
    if fmt not in FORMATS:
        raise EmlensInputError(f"export format '{fmt}': unknown (known: {', '.join(FORMATS)})")
    loaded = direction if isinstance(direction, Direction) else Direction.load(direction)
    export = steering_export(loaded, layer, scale, absolute, model, force)
    out = writable_file(out)
    write = {"gguf": write_control_vector, "repeng": write_control_vector, "steering-vectors": write_steering_vector,
             "neuronpedia": write_neuronpedia}[fmt]
    try:
        write(export, out, fmt)
    except OSError as error:
        raise fail(out, f"cannot write ({error.strerror or error})") from None
    return out


def writable_file(out: str | Path) -> Path:
    """`out` as a file path to write, with one line for a folder in its place or a parent that is not a folder."""
    out = Path(out)
    if out.is_dir():
        raise fail(out, "is a folder; name the file to write")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise fail(out, f"cannot be written: {parent} is a file, not a folder")
    return out


def write_control_vector(export: SteeringExport, out: Path, fmt: str = "gguf") -> None:
    """A control-vector GGUF, as llama.cpp's cvector-generator and repeng's export_gguf write it: architecture
    `controlvector`, `controlvector.model_hint`, `controlvector.layer_count`, an F32 tensor `direction.{block}`; and
    emlens's provenance under `emlens.*` (llama.cpp and repeng read only the keys they know)."""
    import gguf

    block = block_for(export, fmt)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), CONTROL_VECTOR_ARCH)
        writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", export.target.model_type)
        writer.add_int32(f"{CONTROL_VECTOR_ARCH}.layer_count", 1)  # llama.cpp writes it as int32
        writer.add_name(export.provenance["direction"])
        for key, value in _metadata(export).items():
            writer.add_string(f"emlens.{key}", value)
        writer.add_tensor(f"direction.{block}", export.vector.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def write_steering_vector(export: SteeringExport, out: Path, fmt: str = "steering-vectors") -> None:
    """safetensors: `layer_activations.{block}` and the layer type in its metadata (`read_steering_vector`)."""
    from safetensors.torch import save_file

    fields = steering_vector(export)
    tensors = {f"layer_activations.{block}": v.contiguous() for block, v in fields["layer_activations"].items()}
    with atomic_file(out) as tmp:
        save_file(tensors, str(tmp), metadata={"layer_type": fields["layer_type"], **_metadata(export)})


def write_neuronpedia(export: SteeringExport, out: Path, fmt: str = "neuronpedia") -> None:
    with atomic_file(out) as tmp:
        tmp.write_text(json_text(neuronpedia_vector(export)), encoding="utf-8")


def _metadata(export: SteeringExport) -> dict[str, str]:
    """String metadata every binary format carries: where, how much, and from what."""
    fields = {**export.provenance, "scale": export.scale, "scale_unit": export.scale_unit,
              "target": export.target.name, "block": export.block}
    return {key: json.dumps(value) if not isinstance(value, str) else value for key, value in fields.items()}


# ---------------------------------------------------------------- reading back


def read_control_vector(path: str | Path) -> dict[int, np.ndarray]:
    """The `direction.{N}` tensors of a control-vector GGUF, by N (llama.cpp's block, 0-based output index)."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as error:
        raise fail(path, f"not a GGUF file ({error})") from None
    if _gguf_string(reader, "general.architecture") != CONTROL_VECTOR_ARCH:
        raise fail(path, "not a control vector (general.architecture is not 'controlvector')")
    return {int(t.name.split(".", 1)[1]): np.array(t.data, dtype=np.float32)
            for t in reader.tensors if t.name.startswith("direction.")}


def read_steering_vector(path: str | Path) -> dict:
    """The keyword arguments of steering-vectors' `SteeringVector` from a file `export_direction` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        layers = {int(key.rsplit(".", 1)[1]): handle.get_tensor(key) for key in handle.keys()}
    return {"layer_activations": layers, "layer_type": metadata.get("layer_type", DECODER_BLOCK)}


def _gguf_string(reader, key: str) -> str | None:
    field = reader.get_field(key)
    return None if field is None else bytes(field.parts[-1]).decode("utf-8", errors="replace")


def _gguf_int(reader, key: str) -> int | None:
    field = reader.get_field(key)
    return None if field is None else int(field.parts[-1][0])
