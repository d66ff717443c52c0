"""Command-line text to checked inputs: sizes, device specs, dtypes, counts and the model argument.

Every function raises a devicemap error naming the flag, the value and the fix, so the command prints
one line and exits 2. Nothing is changed behind the user's back: a device given twice, a size without a
unit or a zero batch is refused rather than reinterpreted.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import catalog
from ..catalog import trees
from ..catalog.trees import CatalogShape
from ..cost.engine import Engine
from ..cost.hardware import Hardware
from ..errors import InvalidOptionError, InvalidSizeError, PlacementError, UnknownDeviceError
from ..inputs.files import read_json_object, regular_file_status
from ..inputs.memory import DeviceKey, device_key, parse_size
from ..sizing.gguf import FILE_TYPES as GGUF_FILE_TYPES
from ..sizing.gguf import GGUF
from ..sizing.quantization import torchao_quantization

MIB = 2**20
MAX_GPUS = 1024
"""More GPUs than one plan ever spans; a larger count is a typo (and would build a huge device list)."""

DTYPES = ("bfloat16", "float16", "float32", "float64", "float8_e4m3fn", "float8_e5m2", "int8", "uint8")
DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
}
DEFAULT_KV_DTYPE = "bfloat16"


# ----- sizes and devices -----------------------------------------------------------------------------


def size(flag: str, text: str, entry: str | None = None) -> int:
    """A size on the command line: ``"24GiB"``, or a plain byte count of at least 1 MiB.

    A bare number below 1 MiB is refused: ``--gpus 24`` almost certainly means 24 GiB, not 24 bytes.
    ``entry`` is the part of the flag's value to quote in errors (default: ``text``).
    """
    where = f"{flag} {(entry or text)!r}"
    if text.isascii() and text.isdigit():
        count = int(text)
        if count < MIB:
            raise InvalidSizeError(
                f"{where}: a number without a unit is a byte count, and {count} bytes is surely a mistake; "
                f"did you mean {text}GiB? write {text}B for bytes"
            )
        return _library_size(where, count)
    return _library_size(where, text)


def _library_size(where: str, value: object) -> int:
    try:
        return parse_size(value)  # type: ignore[arg-type]
    except InvalidSizeError as err:
        raise InvalidSizeError(f"{where}: {err}") from None


def gpu_sizes(text: str) -> dict[DeviceKey, int]:
    """``--gpus``: ``"4x24GiB"`` (or ``4X24GiB``) -> four GPUs of 24 GiB; ``"80GiB,40GiB"`` -> GPU 0 and 1.

    >>> gpu_sizes("2x1MiB")
    {0: 1048576, 1: 1048576}
    """
    sizes: list[int] = []
    for part in _entries("--gpus", text, "4x24GiB or 80GiB,40GiB"):
        repeated = re.fullmatch(r"(\d+)[xX](.*)", part)
        count = int(repeated[1]) if repeated else 1
        if not 1 <= count <= MAX_GPUS - len(sizes):
            raise InvalidOptionError(
                f"--gpus {text!r}: {count} GPUs in {part!r}; give between 1 and {MAX_GPUS} GPUs in all"
            )
        sizes.extend([size("--gpus", repeated[2] if repeated else part, entry=part)] * count)
    return dict(enumerate(sizes))


def max_memory(text: str) -> dict[DeviceKey, int]:
    """``--max-memory``: ``"0=20GiB,1=20GiB,cpu=64GiB,disk"`` -> a max_memory dict.

    Each device once; every device but disk needs a size (disk takes none: it is never limited).
    """
    memory: dict[DeviceKey, int] = {}
    for part in _entries("--max-memory", text, "0=20GiB,cpu=64GiB,disk"):
        name, has_size, amount = part.partition("=")
        try:
            key = device_key(name)
        except UnknownDeviceError as err:
            raise UnknownDeviceError(f"--max-memory {text!r}: {err}") from None
        if key in memory:
            raise UnknownDeviceError(
                f"--max-memory {text!r}: device {name!r} is given twice; give each device once"
            )
        if isinstance(key, int) and key >= MAX_GPUS:
            raise UnknownDeviceError(
                f"--max-memory {text!r}: GPU index {key} is too large (at most {MAX_GPUS - 1})"
            )
        if key == "disk":
            if has_size:
                raise InvalidSizeError(
                    f"--max-memory {text!r}: disk takes no size (offloading to disk is never limited); "
                    "write just 'disk'"
                )
            memory[key] = 0
        elif not has_size:
            raise InvalidSizeError(
                f"--max-memory {text!r}: {name!r} needs a size, e.g. {name}=64GiB (only disk may stand alone)"
            )
        else:
            memory[key] = size("--max-memory", amount, entry=part)
    return memory


def _entries(flag: str, text: str, example: str) -> list[str]:
    if not text:
        raise InvalidOptionError(f"{flag} is empty: give e.g. {example}")
    parts = text.split(",")
    if not all(parts):
        raise InvalidOptionError(
            f"{flag} {text!r}: an empty entry; separate entries with one comma, e.g. {example}"
        )
    return parts


def pins(texts: list[str] | None, memory: dict[DeviceKey, int]) -> dict[str, DeviceKey]:
    """``--pin NAME=DEVICE`` (repeatable) -> ``{name: device}``; the device must be in the device spec.

    Module names are checked by the library, which suggests close names for a typo.

    >>> pins(["lm_head=0", "model.embed_tokens=cpu"], {0: 1, "cpu": 1})
    {'lm_head': 0, 'model.embed_tokens': 'cpu'}
    """
    placed: dict[str, DeviceKey] = {}
    for text in texts or []:
        name, has_device, device = text.partition("=")
        name = name.strip()
        if not has_device or not name or not device.strip():
            raise InvalidOptionError(
                f"--pin {text!r}: write MODULE=DEVICE, e.g. --pin lm_head=0 or --pin model.embed_tokens=cpu"
            )
        try:
            key = device_key(device)
        except UnknownDeviceError as err:
            raise UnknownDeviceError(f"--pin {text!r}: {err}") from None
        if key not in memory:
            devices = ", ".join(str(d) for d in memory)
            raise UnknownDeviceError(
                f"--pin {text!r}: device {device.strip()!r} is not in the device spec ({devices}); "
                "pin to one of those or add it with --gpus/--cpu/--disk/--max-memory"
            )
        if name in placed and placed[name] != key:
            raise InvalidOptionError(
                f"--pin {text!r}: {name!r} is already pinned to {placed[name]!r}; pin each module once"
            )
        placed[name] = key
    return placed


def no_split_classes(texts: list[str] | None, model: Any) -> list[str] | None:
    """``--no-split CLASS`` (repeatable): class names that exist in the model, or None when absent
    (the model's own ``_no_split_modules`` then apply). A name no module has is a typo, not a no-op."""
    if not texts:
        return None
    if isinstance(model, CatalogShape):  # a bundled model as data: its module classes are listed
        present = list(model.module_class_names)
    else:
        present = sorted({type(module).__name__ for module in model.modules()})
    for name in texts:
        if name not in present:
            close = difflib.get_close_matches(name, present, n=3)
            hint = (
                f"did you mean {', '.join(close)}?"
                if close
                else f"the model's classes are {', '.join(present)}"
            )
            raise InvalidOptionError(f"--no-split {name!r}: no module of the model has this class; {hint}")
    return list(dict.fromkeys(texts))


def output_file(flag: str, text: str, example: str) -> Path:
    """A file to write in an existing folder, checked before planning (not after the work is done)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise InvalidOptionError(
            f"{flag} {text!r} is a folder: give a file name inside it, e.g. {path / example}"
        )
    if not path.parent.is_dir():
        raise InvalidOptionError(
            f"{flag} {text!r}: the folder {str(path.parent)!r} does not exist; create it first"
        )
    return path


# ----- quantization ----------------------------------------------------------------------------------

# --quant presets: the quantization_config each stands for, in the dict form transformers' configs take
# (torchao's need torchao's config objects, built only when asked for).
QUANT_PRESETS: dict[str, dict[str, Any]] = {
    "bnb-4bit": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "bnb-4bit-dq": {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
    },
    "bnb-fp4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "bnb-8bit": {"quant_method": "bitsandbytes", "load_in_8bit": True},
    "bnb-8bit-cpu-offload": {
        "quant_method": "bitsandbytes",
        "load_in_8bit": True,
        "llm_int8_enable_fp32_cpu_offload": True,
    },
    "torchao-int8": {"quant_method": "torchao", "torchao": "Int8WeightOnlyConfig"},
    "torchao-fp8": {"quant_method": "torchao", "torchao": "Float8WeightOnlyConfig"},
    # the weights llama.cpp loads from a GGUF file of this type (devicemap.GGUF), for --to llama.cpp
    **{f"gguf-{t.lower()}": {"quant_method": "gguf", "file_type": t} for t in GGUF_FILE_TYPES},
}


def quantization(text: str | None) -> Any:
    """``--quant``: a preset name -> the quantization_config :func:`devicemap.plan` takes (None if absent)."""
    if text is None:
        return None
    preset = QUANT_PRESETS.get(text.strip().lower())
    if preset is None:
        raise InvalidOptionError(f"--quant {text!r}: use one of {', '.join(QUANT_PRESETS)}")
    if preset["quant_method"] == "gguf":
        return GGUF(preset["file_type"])
    if preset["quant_method"] != "torchao":
        return dict(preset)
    ao = torchao_quantization(f"--quant {text}")
    try:
        from transformers import TorchAoConfig
    except ImportError:
        raise InvalidOptionError(f"--quant {text}: needs transformers (pip install transformers)") from None
    return TorchAoConfig(getattr(ao, preset["torchao"])())


# ----- hardware --------------------------------------------------------------------------------------


def hardware(text: str, gpus: int, engine: str = "accelerate") -> Any:
    """``--hardware GPU[,HOST]``: a GPU preset for each of the spec's ``gpus`` GPUs and a host preset, or
    ``measure`` for this machine's host (default: desktop-ddr5), run by ``engine`` (``--engine``: the
    software whose fitted efficiencies the speed model uses) -> a :class:`devicemap.Hardware`."""
    gpu, _, host = (part.strip() for part in text.partition(","))
    if host == "measure":
        measured = Hardware.measure_host(gpu or None, gpus=gpus, quick=True)
        return dataclasses.replace(measured, engine=Engine.preset(engine))
    return Hardware.preset(gpu or None, gpus=gpus, host=host or "desktop-ddr5", engine=engine)


# ----- dtypes and counts -----------------------------------------------------------------------------


def weights_dtype(text: str | None, source: ModelSource) -> str | None:
    """``--dtype``: a dtype name or alias, ``auto`` = the config's own dtype, or ``None`` when absent or
    when the config names none (the weights keep their own dtypes)."""
    if text is None:
        return None
    if text.strip().lower() == "auto":
        return source.config_dtype()
    return dtype("--dtype", text)


def dtype(flag: str, text: str) -> str:
    """A dtype name devicemap sizes: a torch name or an alias (bf16, fp16, half, fp32, float)."""
    name = known_dtype(text)
    if name is None:
        raise InvalidOptionError(
            f"{flag} {text!r} is not a dtype devicemap sizes; use one of {accepted_dtypes()}"
        )
    return name


def known_dtype(text: str) -> str | None:
    """The torch name of a dtype name or alias devicemap accepts, else None."""
    name = text.strip().lower().removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    return name if name in DTYPES else None


def accepted_dtypes() -> str:
    aliases: dict[str, list[str]] = {}
    for alias, name in DTYPE_ALIASES.items():
        aliases.setdefault(name, []).append(alias)
    named = [f"{n} ({', '.join(aliases[n])})" if n in aliases else n for n in DTYPES]
    return ", ".join(named) + ", auto (the config's dtype)"


def is_floating(name: str | None) -> bool:
    return name is not None and name.startswith(("float", "bfloat"))


def kv_dtype(text: str | None, compute_dtype: str | None, source: ModelSource) -> str:
    """``--kv-dtype``, else the compute dtype: ``--dtype`` when floating, else the config's, else bfloat16
    (an int8 weight dtype says nothing about the cache, which holds activations)."""
    if text is not None and text.strip().lower() != "auto":
        return dtype("--kv-dtype", text)
    if is_floating(compute_dtype):
        return compute_dtype  # type: ignore[return-value]
    config_dtype = source.config_dtype()
    return config_dtype if is_floating(config_dtype) else DEFAULT_KV_DTYPE  # type: ignore[return-value]


def at_least_one(flag: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise InvalidOptionError(f"{flag} {value}: use a whole number of at least 1")
    return value


def picture_path(text: str) -> Path:
    """``--out``: a .svg or .html file in an existing folder (checked before planning, not after)."""
    path = Path(text).expanduser()
    if path.suffix.lower() not in (".svg", ".html"):
        raise InvalidOptionError(f"--out {text!r}: use a .svg or .html file name")
    return output_file("--out", text, "plan.svg")


# ----- the model argument ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """What the model argument names: a bundled model, a config.json, or a safetensors checkpoint."""

    text: str
    kind: str  # "catalog", "config" or "checkpoint"
    path: Path | None
    config: dict[str, Any] | None  # None: a checkpoint without config.json

    def config_dtype(self) -> str | None:
        """The dtype the config declares (``dtype`` / ``torch_dtype``, or its text config's), if any."""
        for config in (self.config or {}, (self.config or {}).get("text_config")):
            if not isinstance(config, dict):
                continue
            for key in ("dtype", "torch_dtype"):
                value = config.get(key)
                if value is None:
                    continue
                name = known_dtype(value) if isinstance(value, str) else None
                if name is None:
                    raise InvalidOptionError(
                        f"{self.text}: the config's {key} {value!r} is not a dtype devicemap sizes; give "
                        f"--dtype explicitly, one of {accepted_dtypes()}"
                    )
                return name
        return None

    def shape(self) -> CatalogShape | None:
        """A bundled model as data (:class:`devicemap.catalog.trees.CatalogShape`: planned without torch), or
        None: not a catalog name, or its data does not match its config (then build it: :meth:`meta_model`)."""
        if self.kind != "catalog":
            return None
        return trees.shape(self.text)

    def meta_model(self, command: str):
        """The model on the meta device (for commands that need its modules, not only its headers)."""
        if self.kind == "catalog":
            return catalog.build_meta_model(self.text)
        if self.config is None:
            raise InvalidOptionError(
                f"`devicemap {command}` needs the model's modules, built from its config.json, and "
                f"{self.text!r} has none beside it: add the model's config.json to the checkpoint folder"
            )
        try:
            return catalog.build_meta_model(self.config)
        except PlacementError as err:
            raise type(err)(f"{self.path}: {err}") from None


def model_source(text: str) -> ModelSource:
    """Resolve the model argument: an existing path first, then a bundled name."""
    if not text.strip():
        raise InvalidOptionError(
            "the model argument is empty: give a catalog name (see `devicemap models`), a config.json, a model "
            "folder or a safetensors checkpoint (. for the current folder)"
        )
    path = Path(text).expanduser()
    bundled = text in catalog.names()
    if path.is_dir():
        if is_checkpoint(path):
            return ModelSource(text, "checkpoint", path, read_config(path / "config.json", required=False))
        if (path / "config.json").is_file():
            return ModelSource(text, "config", path / "config.json", read_config(path / "config.json"))
        if not bundled:
            raise InvalidOptionError(
                f"model folder {text!r} holds neither a config.json nor *.safetensors files; give a model folder, "
                "a config.json or a catalog name"
            )
    elif path.is_file():
        if is_checkpoint(path):
            return ModelSource(
                text, "checkpoint", path, read_config(path.parent / "config.json", required=False)
            )
        if path.suffix.lower() == ".json":
            return ModelSource(text, "config", path, read_config(path))
        if not bundled:
            raise InvalidOptionError(
                f"model {text!r}: devicemap reads a config.json, a model folder or a .safetensors checkpoint "
                "(file or index), not this file"
            )
    elif os.path.lexists(path) and not bundled:
        regular_file_status(path, InvalidOptionError)  # a FIFO, a device...: says which, never reads it
    if bundled:
        return ModelSource(text, "catalog", None, catalog.load_config(text))
    if _looks_like_a_path(text):
        raise InvalidOptionError(f"model {text!r}: no such file or folder; check the path")
    catalog.load_config(text)  # raises UnknownModuleError with close names
    raise AssertionError("unreachable: load_config accepted a name missing from names()")


def is_checkpoint(path: Path) -> bool:
    """A safetensors file, an index, or a folder of safetensors files (planned from headers alone)."""
    if path.is_dir():
        # Any entry by that name (a FIFO too): the checkpoint reader then says what is wrong with it.
        return os.path.lexists(path / "model.safetensors.index.json") or any(path.glob("*.safetensors"))
    return path.name.endswith((".safetensors", ".safetensors.index.json")) and path.is_file()


def read_config(path: Path, required: bool = True) -> dict[str, Any] | None:
    """A config.json as a dict; its faults (not a regular file, too big, unreadable, not JSON, not an
    object) name the file."""
    if not required and regular_file_status(path, InvalidOptionError) is None:
        return None
    return read_json_object(path, InvalidOptionError)


def _looks_like_a_path(text: str) -> bool:
    separators = [s for s in (os.sep, os.altsep, "/") if s]
    return (
        any(s in text for s in separators)
        or text.startswith((".", "~"))
        or text.lower().endswith((".json", ".safetensors"))
    )
