"""Training configs: LoRA, data sources, mixtures, sweeps; validated YAML with ${ENV} expansion."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    PrivateAttr,
    ValidationInfo,
    model_validator,
)

from emlens.base.config import Config
from emlens.base.errors import EmlensInputError
from emlens.base.io import fail, validate
from emlens.model import DEFAULT_MODEL

DEFAULT_RATIOS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # Hu et al. 2025 mixture sweep


# ---------------------------------------------------------------- config

_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """`${VAR}` and `${VAR:-default}` as in a shell; an unset VAR without a default is an error."""

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name) or default
        if value is None:
            raise ValueError(f"environment variable {name} is not set (write ${{{name}:-default}} for a fallback)")
        return value

    return _ENV_VAR.sub(substitute, text)


def _resolve_path(value: str, info: ValidationInfo) -> str:
    """Expand env vars and `~`; a relative path is relative to the config file (or the cwd without one)."""
    path = Path(expand_env(value)).expanduser()
    if not path.is_absolute():
        path = Path((info.context or {}).get("base_dir") or os.getcwd()) / path
    path = path.resolve()
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    return str(path)


DataPath = Annotated[str, AfterValidator(_resolve_path)]
Ratio = Annotated[float, Field(ge=0.0, le=1.0, description="fraction of misaligned examples: 0.05 = 5 %")]
RunName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]


_Strict = Config


class DataSource(_Strict):
    """A training set: chat JSONL ({"messages": [...]}) or alpaca records (instruction, input, output)."""

    path: DataPath
    limit: int | None = Field(None, ge=1, description="train on a seeded random subset of this many examples")
    format: Literal["auto", "chat", "alpaca"] = "auto"


class Mixture(_Strict):
    """`size` examples of which round(ratio * size) come from `misaligned`, the rest from `benign`."""

    misaligned: DataSource
    benign: DataSource
    ratio: Ratio
    size: int = Field(ge=1)

    @model_validator(mode="after")
    def _no_limits(self):
        if self.misaligned.limit is not None or self.benign.limit is not None:
            raise ValueError("mixture sources take no 'limit': 'ratio' and 'size' decide how many are drawn")
        return self


class LoraSettings(_Strict):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    layers_to_transform: list[Annotated[int, Field(ge=0)]] | None = None
    use_rslora: bool = False


class TrainingSettings(_Strict):
    learning_rate: float = Field(1e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(4, ge=1, description="per device")
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(512, ge=8, description="tokens; longer chats are truncated on the right")
    assistant_only: bool = Field(True, description="loss on assistant tokens only")
    save_steps: int = Field(25, ge=1, description="a checkpoint every N optimizer steps (and at the end)")
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool | None = Field(None, description="default: on with CUDA, off on CPU")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")


class SweepSettings(_Strict):
    ratios: list[Ratio] | None = Field(None, min_length=1, description="default: 0, 1, 2, 5, 10, 20, 30, 50 %")
    datasets: dict[RunName, DataPath] | None = Field(None, min_length=1,
                                                     description="name -> path; replaces the (misaligned) dataset")


class TrainConfig(_Strict):
    model: str = DEFAULT_MODEL
    dataset: DataSource | None = None
    mixture: Mixture | None = None
    seed: int = Field(0, description="data sampling, LoRA init and data order")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    sweep: SweepSettings | None = None
    _source: str = PrivateAttr("config")  # the YAML it came from, named by errors found after validation

    @model_validator(mode="after")
    def _one_data_source(self):
        if (self.dataset is None) == (self.mixture is None):
            raise ValueError("give exactly one of 'dataset' or 'mixture'")
        return self

    def run_config(self) -> dict:
        """The config as recorded in manifests (paths resolved, no sweep section)."""
        return self.model_dump(mode="json", exclude={"sweep"})


def parse_config(data: Any, where: str | Path = "config", base_dir: str | Path | None = None) -> TrainConfig:
    """Validate a config mapping; relative data paths are taken relative to `base_dir`."""
    if not isinstance(data, dict):
        raise fail(where, f"expected a mapping of TrainConfig fields, got {type(data).__name__}")
    return validate(TrainConfig, data, where, context={"base_dir": str(base_dir) if base_dir else None})


def load_config(path: str | Path) -> TrainConfig:
    """Read a training config YAML: data paths relative to the YAML's folder, `${VAR:-default}` expanded."""
    config = TrainConfig.from_yaml(path)
    config._source = str(path)
    return config


def with_sweep(config: TrainConfig, ratios: list[float] | None = None,
               datasets: dict[str, str] | None = None) -> TrainConfig:
    """The config with its sweep's ratios and/or datasets replaced (None: keep), validated like config fields."""
    if ratios is None and datasets is None:
        return config
    sweep = config.sweep.model_dump(exclude_none=True) if config.sweep else {}
    sweep.update({**({"ratios": ratios} if ratios is not None else {}),
                  **({"datasets": datasets} if datasets is not None else {})})
    updated = parse_config({**config.model_dump(mode="json"), "sweep": sweep}, where="command line")
    updated._source = config._source
    return updated


@contextmanager
def naming_the_config(config: TrainConfig):
    """Errors about a config field found after validation (data sizes, LoRA targets) also name the YAML."""
    try:
        yield
    except EmlensInputError as error:
        if str(error).startswith("field '"):
            raise EmlensInputError(f"{config._source}: {error}") from None
        raise
