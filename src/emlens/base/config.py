"""The one config base: strict fields, YAML with flags laid over it, paths read beside their file, an identity.

Every config class of emlens (eval, honesty, capability, training, loop, steering, extraction, ...) derives from
`Config`, so each is read, overridden and compared the same way:

- `Config.from_yaml(path, **flags)`: the YAML's fields (every problem one line naming the file and field), with
  command-line flags laid over them. A flag that is None was not given; precedence is flag, YAML, class default.
- Path fields are marked `Annotated[str, PATH]` (or a list of them): a relative value that names a file (or folder) beside
  the YAML file is read as that file, so a config means the same files from whatever folder it is run. A value
  that names no such file is left as written (a bundled set's name, or a path from the working folder).
- Fields that change no result (how many requests are in flight, timeouts) are marked `Annotated[T, NOT_IDENTITY]`;
  `identity()` is everything else: what a finished run is compared with before it is reused or resumed.
- `FLAG_FIELDS` maps one flag onto several fields (`--limit` limits every setting); a dotted flag
  (`free_form.samples`) sets one nested field.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path, PurePath
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict

from emlens.base.io import PathLike, fail, read_yaml_mapping, validate


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


PATH = _Marker("PATH")  # a file (relative to the config file that names it) or a bundled set's name
NOT_IDENTITY = _Marker("NOT_IDENTITY")  # changes no result: a re-run may change it and still resume


class Config(BaseModel):
    """A strict config (an unknown field is an error) that reads YAML, takes flags and says its identity."""

    model_config = ConfigDict(extra="forbid")
    FLAG_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {}  # flag -> the dotted fields it sets

    @classmethod
    def from_yaml(cls, path: PathLike | None = None, *, where: str | None = None, **flags: Any) -> Self:
        """The config of a YAML file (None: the class defaults) with `flags` laid over it."""
        if path is None:
            config = cls()
        else:
            folder = Path(path).resolve().parent
            data = read_paths_beside(cls, read_yaml_mapping(path, cls.__name__), folder)
            config = validate(cls, data, path, context={"base_dir": str(folder)})
        if not any(_given(value) for value in flags.values()):
            return config
        return config.with_flags(where=where or ("command line" if path is None else f"{path} (command line)"),
                                 **flags)

    def with_flags(self, where: str = "command line", **flags: Any) -> Self:
        """This config with flags laid over it: a flag names a field, a dotted nested field, or one of
        `FLAG_FIELDS`; a flag that is None (or an empty list) was not given."""
        data = self.model_dump()
        for name, value in flags.items():
            if _given(value):
                value = str(value) if isinstance(value, PurePath) else value  # path fields are strings
                for target in self.FLAG_FIELDS.get(name, (name,)):
                    _set_dotted(data, target, value, where)
        return validate(type(self), data, where, context={"base_dir": None})

    def identity(self, mode: str = "python") -> dict:
        """Every field that can change a result (all but the NOT_IDENTITY ones), as a plain mapping."""
        return self.model_dump(mode=mode, exclude=_non_identity(type(self)) or None)

    @classmethod
    def field_default(cls, dotted: str) -> Any:
        """The class default of a field, nested fields dotted (a flag of FLAG_FIELDS: its first field)."""
        first, *rest = cls.FLAG_FIELDS.get(dotted, (dotted,))[0].split(".")
        value = cls.model_fields[first].get_default(call_default_factory=True)  # a class that needs fields has none
        for part in rest:
            value = getattr(value, part)
        return value

    @classmethod
    def field_description(cls, dotted: str) -> str | None:
        model: type[BaseModel] = cls
        parts = cls.FLAG_FIELDS.get(dotted, (dotted,))[0].split(".")
        for part in parts[:-1]:
            model = _model_class(model.model_fields[part].annotation) or model
        return model.model_fields[parts[-1]].description


def _given(value: Any) -> bool:
    return value is not None and value != []


def _set_dotted(data: dict, dotted: str, value: Any, where: str) -> None:
    *parents, last = dotted.split(".")
    holder = data
    for part in parents:
        if not isinstance(holder.get(part), dict):
            raise fail(where, f"field '{dotted}': '{part}' is not a section")
        holder = holder[part]
    holder[last] = value


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The config class a field holds (through Optional, list and dict), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_class(arg)
        if found is not None:
            return found
    return None


def _marked(field, marker: _Marker) -> bool:
    return any(m is marker for m in field.metadata) or _marked_inside(field.annotation, marker)


def _marked_inside(annotation: Any, marker: _Marker) -> bool:
    """A marker on the element type: `list[Annotated[str, PATH]]`, `dict[str, Annotated[str, PATH]]`."""
    if typing.get_origin(annotation) is typing.Annotated:
        return any(m is marker for m in annotation.__metadata__) or _marked_inside(typing.get_args(annotation)[0],
                                                                                 marker)
    origin = typing.get_origin(annotation)
    if origin in (list, dict, tuple, typing.Union, types.UnionType):
        return any(_marked_inside(arg, marker) for arg in typing.get_args(annotation))
    return False


def _non_identity(model: type[BaseModel]) -> dict:
    """The pydantic `exclude` mapping of a class's NOT_IDENTITY fields, nested sections included."""
    exclude: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if _marked(field, NOT_IDENTITY):
            exclude[name] = True
        elif (inner := _model_class(field.annotation)) is not None and typing.get_origin(field.annotation) not in (
                list, dict) and (nested := _non_identity(inner)):
            exclude[name] = nested
    return exclude


def read_paths_beside(model: type[BaseModel], data: Any, folder: Path) -> Any:
    """`data` (a config mapping) with every PATH field's relative value that names a file in `folder` replaced
    by that file's path: what `from_yaml` does, and what an experiment does for the sections it embeds."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for name, field in model.model_fields.items():
        if name not in out:
            continue
        if _marked(field, PATH):
            out[name] = _beside(out[name], folder)
        elif (inner := _model_class(field.annotation)) is not None:
            value = out[name]
            if isinstance(value, list):
                out[name] = [read_paths_beside(inner, item, folder) for item in value]
            elif isinstance(value, dict) and typing.get_origin(field.annotation) is dict:
                out[name] = {key: read_paths_beside(inner, item, folder) for key, item in value.items()}
            else:
                out[name] = read_paths_beside(inner, value, folder)
    return out


def _beside(value: Any, folder: Path) -> Any:
    if isinstance(value, list):
        return [_beside(v, folder) for v in value]
    if isinstance(value, dict):
        return {k: _beside(v, folder) for k, v in value.items()}
    if isinstance(value, str) and value and not Path(value).expanduser().is_absolute() and (folder / value).exists():
        return str(folder / value)
    return value
