"""Saved results: one ``.safetensors`` file, the tensors as tensors and everything else as JSON in its header.

Every result is a dataclass, so one mechanism saves them all (`Saveable`): its fields are written
recursively, a tensor under its dotted path (``maps.blocks.0.hook_resid_post.operators``), a nested
dataclass, list, tuple or dict as JSON naming what it was. Nothing is pickled, so a file from anywhere
is safe to open: loading builds only tl_linmap's own dataclasses, from their fields (`tl_linmap.load`).

A result that holds its model (a map's token reader, a feature split) keeps a `SavedModel` instead:
the model's name, its config and the text of the prompt's tokens, and on request its whole
vocabulary, unembedding and embedding, so the loaded result still prints, plots and decodes.
The header also records the format, the versions that wrote the file, the prompt's tokens and the dtype.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import uuid
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import torch
from safetensors import safe_open
from torch import Tensor

from tl_linmap.base.errors import InputError
from tl_linmap.base.spill import FILE_ID, SpilledTensor, write_file

#: The newest format written; a file of a newer one is refused (`read`). Format 1 held a `Graph`'s
#: fields flat and nothing else; 2 holds any result, fields nested; 3 (written only where needed) also
#: holds tensors read on access, a `LinearMaps`' spilled maps. Older files still load.
FORMAT = 3
_KEY = "tl_linmap"
#: The model config entries recorded (what circuit-tracer's ``UnifiedConfig`` needs, and the sizes a reader checks).
CONFIG_KEYS = ("n_layers", "d_model", "d_head", "n_heads", "d_mlp", "d_vocab", "n_key_value_heads", "tokenizer_name", "model_name",
               "original_architecture")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """The versions a file records.

    Returns:
        tl_linmap's, TransformerLens's and torch's.
    """
    return {"tl_linmap": _version("tl_linmap"), "transformer_lens": _version("transformer-lens"), "torch": torch.__version__}


def config_hash(config: dict) -> str:
    """A short hash of a model's config, to tell later whether a result belongs to a model.

    Args:
        config: JSON-able sizes and names.

    Returns:
        16 hex digits.
    """
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_config(model) -> dict:
    """A model's sizes and names, JSON-able (`CONFIG_KEYS`; a value of another type as its text).

    Args:
        model: A TransformerBridge, a HookedTransformer or a `SavedModel`.

    Returns:
        The config (None for an entry the model's config lacks).
    """
    cfg = model.cfg
    out = {key: getattr(cfg, key, None) for key in CONFIG_KEYS}
    return {key: value if value is None or isinstance(value, (int, str)) else str(value) for key, value in out.items()}


class SavedModel:
    """What a loaded result keeps of its model: enough to print, plot and (where saved) decode without it.

    It stands where the result held the model (``lm.reader.model``, ``features.model``): ``cfg`` holds the
    sizes, ``tokenizer.decode`` the text of the tokens saved (the prompt's, or the whole vocabulary),
    ``W_U``, ``b_U`` and ``W_E`` the unembedding and embedding where the result was saved with
    ``vocabulary=True``. What it lacks is refused with an error saying what to pass.

    Attributes:
        name: The model's name.
        config: Its config (`model_config`).
        strings: Token id -> its text, for the ids saved.
        full: Whether ``strings`` is the whole vocabulary and ``W_U``, ``b_U``, ``W_E`` were saved.
    """

    def __init__(self, config: dict, strings: dict[int, str], full: bool = False, unembedding: dict[str, Tensor | None] | None = None):
        self.config = dict(config)
        self.name = str(self.config.get("model_name") or "")
        self.cfg = SimpleNamespace(**self.config)
        self.strings = dict(strings)
        self.full = full
        self._unembedding = unembedding or {}
        self.tokenizer = self  # what decode_tokens and a TokenReader read the tokens' text through

    def _missing(self, what: str) -> InputError:
        return InputError(
            f"This result was loaded without its model and saved without {what}: load it with tl_linmap.load(path, model=model) "
            f"({self.name or 'the model it was computed with'}), or save it with .save(path, vocabulary=True)."
        )

    def _tensor(self, name: str) -> Tensor | None:
        if not self.full:
            raise self._missing(f"the model's unembedding ({name})")
        return self._unembedding.get(name)

    @property
    def W_U(self) -> Tensor:
        """The unembedding, ``(d_model, d_vocab)``."""
        return self._tensor("W_U")

    @property
    def W_E(self) -> Tensor:
        """The embedding, ``(d_vocab, d_model)``."""
        return self._tensor("W_E")

    @property
    def b_U(self) -> Tensor | None:
        """The unembedding bias (None where the model has none)."""
        return self._tensor("b_U")

    def decode(self, ids) -> str:
        """The text of token ids, as the model's tokenizer decoded each.

        Args:
            ids: Token ids saved with the result.

        Returns:
            Their texts joined.

        Raises:
            InputError: for an id whose text was not saved.
        """
        ids = [int(i) for i in ids]
        lost = [i for i in ids if i not in self.strings]
        if lost:
            raise self._missing(f"the text of token {lost[0]} (it holds the prompt's tokens only)")
        return "".join(self.strings[i] for i in ids)

    def to_tokens(self, text: str, prepend_bos: bool = False, move_to_device: bool = True) -> Tensor:
        """The one saved token whose text is ``text`` (how `tl_linmap.reading.tokens.token_id` reads a string).

        Args:
            text: A single token's text, e.g. ``" Paris"``.
            prepend_bos: Must be False: a saved vocabulary cannot tokenize.
            move_to_device: Ignored (a saved vocabulary's ids are on the CPU), as a model's ``to_tokens`` takes it.

        Returns:
            ``(1, 1)`` ids.

        Raises:
            InputError: where no saved token, or more than one, has that text.
        """
        found = [i for i, s in self.strings.items() if s == text]
        if prepend_bos or len(found) != 1:
            how = f"{len(found)} tokens saved with this result read" if found else "No token saved with this result reads"
            raise InputError(
                f"{how} {text!r}: pass the token's id, or load the result with "
                "tl_linmap.load(path, model=model), whose tokenizer reads any text."
            )
        return torch.tensor([found])

    def __repr__(self) -> str:
        held = f"the whole vocabulary ({len(self.strings)} tokens) and its unembedding" if self.full else f"the text of {len(self.strings)} tokens"
        return f"SavedModel({self.name!r}, d_model {self.config.get('d_model')}, {held})"


def _is_model(value) -> bool:
    return isinstance(value, SavedModel) or (isinstance(value, torch.nn.Module) and hasattr(value, "cfg"))


class Saveable:
    """What makes a result dataclass saveable: `save`, and how its header names its prompt.

    Class attributes a result may set:

    - ``_TOKEN_IDS``: the field that holds the prompt's token ids (their text is saved with the
      result, so its tokens still print without the model);
    - ``_STR_TOKENS``: the attribute that gives the prompt's tokens as text (None: none);
    - ``_VOCABULARY``: whether `save` keeps the model's vocabulary unless told (a result that cannot
      print without reading vectors as tokens).
    """

    _TOKEN_IDS: ClassVar[str | None] = None
    _STR_TOKENS: ClassVar[str | None] = "str_tokens"
    _VOCABULARY: ClassVar[bool] = False

    def _prompt(self) -> dict | None:
        # What the header records of the prompt: its token ids and their text, where this result has them.
        ids = getattr(self, self._TOKEN_IDS) if self._TOKEN_IDS else None
        strings = getattr(self, self._STR_TOKENS, None) if self._STR_TOKENS else None
        if ids is None and strings is None:
            return None
        return {"tokens": None if ids is None else [int(i) for i in ids.flatten()], "str_tokens": None if strings is None else list(strings)}

    def _model(self) -> dict | None:
        # What the header records of the model where the result holds no model, only its config (a Graph).
        return None

    def save(self, path: str | Path, *, vocabulary: bool | None = None, model=None) -> Path:
        """Save this result to one ``.safetensors`` file; `tl_linmap.load` gives it back, bit for bit, without the model.

        Tensors are saved as they are (dtype, layout; moved to the CPU), everything else as JSON in the
        header, with the model's name and config hash, the prompt's tokens, the dtype and the versions
        of tl_linmap, TransformerLens and torch. Nothing is pickled. Maps kept on disk (a
        `tl_linmap.results.maps.LinearMaps` under a memory budget) are copied in one at a time and
        load still on disk, read from this file on access.

        Loaded without the model, the result prints, makes its tables and plots; where it held its model
        (a map's token reader) it keeps the text of the prompt's tokens. Reading vectors as tokens
        (``decode``, ``logit_contributions``, ``plot("decoded")``) needs the unembedding:
        ``vocabulary=True`` saves it, with the embedding and every token's text: ``d_model x d_vocab``
        numbers in the model's dtype, twice where the embedding is not tied (SmolLM2-135M, tied: 113 MB
        in float32, about four of its maps of a nine-token prompt); or load with ``model=``.

        Args:
            path: The file (``.safetensors`` is added where the name has no suffix).
            vocabulary: Also save the model's vocabulary, ``W_U``, ``b_U`` and ``W_E``, where this result holds
                its model (None: only for a result that reads tokens to print itself, a `Pushed`).
            model: The model the result came from, to record its name and config hash where the result
                does not hold it (an `Attribution`, a `PatchingAttribution`, ...).

        Returns:
            The path written.

        Raises:
            InputError: for a ``model`` other than the one this result holds.
        """
        return write(path, self, vocabulary=self._VOCABULARY if vocabulary is None else vocabulary, model=model)

    def to(self, device: str | torch.device):
        """This result with every tensor it holds on ``device`` (results come back on the model's input device).

        The model it refers to stays where it is, and so do the maps of a `tl_linmap.results.maps.LinearMaps`
        that wrote some to disk (read back on the CPU, as they are indexed).

        Args:
            device: A torch device, e.g. ``"cpu"`` or ``"cuda:1"``.

        Returns:
            A new result of the same class (this one if nothing had to move).
        """
        return _moved(self, torch.device(device))


def _moved(value, device: torch.device):
    # A result's tensors moved, its structure (dataclasses, containers) copied around them; a model,
    # a handle to a file (a NamedTuple) or anything else is kept as it is.
    if isinstance(value, Tensor):
        return value.to(device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        moved = copy.copy(value)
        for f in dataclasses.fields(value):
            object.__setattr__(moved, f.name, _moved(getattr(value, f.name), device))
        return moved
    if isinstance(value, list):
        return [_moved(v, device) for v in value]
    if type(value) is tuple:
        return tuple(_moved(v, device) for v in value)
    if type(value) is dict:
        return {k: _moved(v, device) for k, v in value.items()}
    return value


class _Encoder:
    """A result's fields as JSON, its tensors collected under their dotted paths."""

    def __init__(self, vocabulary: bool):
        self.vocabulary = vocabulary
        self.tensors: dict[str, Tensor | SpilledTensor] = {}
        self.spilled: list[str] = []
        self._views: dict[tuple, str] = {}
        self._storages: set[int] = set()
        self.models: list = []
        self.token_ids: set[int] = set()

    def value(self, value, path: str):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, Tensor):
            return self.tensor(value, path)
        if isinstance(value, SpilledTensor):
            return self.spilled_tensor(value, path)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return self.dataclass(value, path)
        if _is_model(value):
            if not any(value is m for m in self.models):
                self.models.append(value)
            return {"$model": [m is value for m in self.models].index(True)}
        if isinstance(value, tuple):
            return {"$tuple": [self.value(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.value(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            value = value._saved_form() if hasattr(value, "_saved_form") else value  # maps on disk (results.maps.MapStore), not read
            if all(isinstance(k, str) and not k.startswith("$") for k in value):
                return {k: self.value(v, f"{path}.{k}") for k, v in value.items()}
            return {"$dict": [[self.value(k, path), self.value(v, f"{path}.{_key(k)}")] for k, v in value.items()]}
        if isinstance(value, (slice, range)):
            return {f"${type(value).__name__}": [value.start, value.stop, value.step]}
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a numpy scalar
            return value.item()
        raise TypeError(f"{path}: a {type(value).__name__} cannot be saved (tl_linmap saves tensors, dataclasses and JSON values).")

    def tensor(self, tensor: Tensor, path: str) -> dict:
        # Saved in its memory order, so it loads with its own strides (a transposed W_U stays transposed:
        # the same products, bit for bit); a tensor with gaps (a slice) is saved compact.
        tensor = tensor.detach()
        order = sorted(range(tensor.ndim), key=lambda d: -tensor.stride(d))
        dense = tensor.permute(order)
        if not dense.is_contiguous():
            order, dense = list(range(tensor.ndim)), tensor.contiguous()
        # A view saved already (the prompt's ids in every map; a tied W_U, the transposed W_E) is referred to again.
        view = (dense.untyped_storage().data_ptr(), dense.storage_offset(), tuple(dense.shape), dense.stride(), dense.dtype, dense.device)
        key = self._views.get(view) if dense.numel() else None
        if key is None:
            if dense.numel() and view[0] in self._storages:  # safetensors saves one tensor per storage
                dense = dense.clone()
            elif dense.numel():
                self._storages.add(view[0])
            key = path if path not in self.tensors else f"{path}#{len(self.tensors)}"
            self.tensors[key] = dense.cpu()
            self._views[view] = key
        return {"$tensor": key} if order == sorted(order) else {"$tensor": key, "order": order}

    def spilled_tensor(self, spilled: SpilledTensor, path: str) -> dict:
        # A tensor on disk is copied into the file as its own file stores it, when the file is written,
        # and loads as it was: on disk, in the saved file (read skips it).
        key = path if path not in self.tensors else f"{path}#{len(self.tensors)}"
        self.tensors[key] = spilled
        self.spilled.append(key)
        return {"$spilled": key, "shape": list(spilled.shape), "dtype": str(spilled.dtype).removeprefix("torch."),
                "order": list(spilled.order), "contiguous": spilled.contiguous}

    def dataclass(self, value, path: str) -> dict:
        cls = type(value)
        ids = getattr(cls, "_TOKEN_IDS", None) and getattr(value, cls._TOKEN_IDS)
        if isinstance(ids, Tensor):
            self.token_ids.update(int(i) for i in ids.flatten())
        fields = {f.name: self.value(getattr(value, f.name), f"{path}.{f.name}".lstrip(".")) for f in dataclasses.fields(value) if f.init}
        return {"$class": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}

    def model(self, model, index: int) -> dict:
        record = _summary(model)
        if isinstance(model, SavedModel):
            if self.vocabulary and not model.full:
                raise InputError(f"This result was loaded without its model's vocabulary: load it with tl_linmap.load(path, model=model) "
                                 f"({model.name or 'the model it was computed with'}) to save it with vocabulary=True.")
            strings, full = model.strings, model.full
            tensors = model._unembedding
        else:
            full = self.vocabulary
            ids = range(model.cfg.d_vocab) if full else sorted(self.token_ids)
            tokenizer = getattr(model, "tokenizer", None)
            strings = {i: tokenizer.decode([i]) if tokenizer else str(i) for i in ids}
            tensors = {"W_U": model.W_U, "W_E": model.W_E, "b_U": getattr(model, "b_U", None)} if full else {}
        record["vocabulary"] = {"ids": None if full else list(strings), "strings": list(strings.values()), "full": full}  # full: ids in order
        record["unembedding"] = {name: self.value(t, f"$models.{index}.{name}") for name, t in tensors.items()} if full else None
        return record


def _key(key) -> str:
    return ".".join(map(str, key)) if isinstance(key, tuple) else str(key)


def _summary(model) -> dict:
    config = model_config(model)
    return {"name": str(config.get("model_name") or ""), "config_hash": config_hash(config), "config": config}


def write(path: str | Path, result: Saveable, *, vocabulary: bool = False, model=None) -> Path:
    """Save a result (what `Saveable.save` does).

    Args:
        path: The file (``.safetensors`` is added where the name has no suffix).
        result: A result dataclass.
        vocabulary: Also save its model's vocabulary, ``W_U``, ``b_U`` and ``W_E``.
        model: The model it came from (recorded where the result does not hold it).

    Returns:
        The path written.

    Raises:
        InputError: for a ``model`` other than the one the result holds.
    """
    path = Path(path)
    path = path if path.suffix else path.with_suffix(".safetensors")
    encoder = _Encoder(vocabulary)
    root = encoder.value(result, "")
    floats = [t.dtype for t in encoder.tensors.values() if t.dtype.is_floating_point]
    held = [_summary(m) for m in encoder.models]
    given = None if model is None else _summary(model)
    if given and held and given["config_hash"] not in {m["config_hash"] for m in held}:
        raise InputError(f"This result holds the model {held[0]['name']!r}, not the {given['name']!r} given: leave model= out.")
    header = {
        "format": FORMAT if encoder.spilled else 2, "kind": type(result).__name__, "versions": versions(),
        "model": given or (held[0] if held else result._model()), "prompt": result._prompt(),
        "dtype": str(floats[0]).removeprefix("torch.") if floats else None,
        "models": [encoder.model(m, i) for i, m in enumerate(encoder.models)],
        "root": root,
        "spilled": encoder.spilled,
        "file_id": _file_id(path, {key: encoder.tensors[key] for key in encoder.spilled}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, encoder.tensors, {_KEY: json.dumps(header), FILE_ID: header["file_id"]})
    return path


def _file_id(path: Path, spilled: dict[str, SpilledTensor]) -> str:
    # A new name for the file's contents, unless this is a result loaded from `path` saved back over it
    # (each tensor it reads from there goes back under its own key): then its maps still read the file.
    target = path.resolve()
    ours = [(key, t) for key, t in spilled.items() if t.file_id is not None and t.path.resolve() == target]
    ids = {t.file_id for _, t in ours}
    if ours and len(ids) == 1 and all(t.key == key for key, t in ours):
        return ids.pop()
    return uuid.uuid4().hex


def _aligned(tensor: Tensor) -> Tensor:
    # A tensor read from the file may start off the 64-byte boundary torch allocates on, and a matrix product
    # then takes another vectorised path, rounding differently: a copy computes as the saved one did.
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


def read(path: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """Open a saved result.

    Args:
        path: A file `write` wrote.

    Returns:
        ``(header, tensors)``: the header's JSON (``format``, ``kind``, ``versions``, ``model``, ``prompt``,
        ``dtype``, ...) and the tensors by name.

    Raises:
        InputError: for a missing file, a file tl_linmap did not write, or one of a newer format.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"No saved result at {str(path)!r}: give the path a result's .save() wrote.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            header = json.loads(meta[_KEY]) if _KEY in meta else {}
            on_disk = set(header.get("spilled", ()))  # read on access (rebuild)
            missing = sorted(on_disk - set(f.keys()))  # noqa: SIM118 - a safe_open handle is no dict
            tensors = {k: _aligned(f.get_tensor(k)) for k in f.keys() if k not in on_disk}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own types for a file that is not one
        raise InputError(f"{str(path)!r} is not a safetensors file ({err}): give the path a result's .save() wrote.") from err
    if _KEY not in meta:
        raise InputError(f"{str(path)!r} is a safetensors file tl_linmap did not write (no {_KEY!r} header): load it with safetensors.")
    if missing:
        raise InputError(f"{str(path)!r} lacks the tensors its header lists ({', '.join(missing[:3])}): the file is damaged; save the result again.")
    if header.get("format", 0) > FORMAT:
        raise InputError(
            f"{str(path)!r} was saved in format {header['format']} by tl_linmap {header['versions'].get('tl_linmap')}; this tl_linmap "
            f"reads format {FORMAT} and older: upgrade tl_linmap to load it."
        )
    return header, tensors


def rebuild(header: dict, tensors: dict[str, Tensor], find_class: Callable[[str], type], model=None, path: str | Path | None = None):
    """The result a format-2 or format-3 header and its tensors describe.

    Args:
        header: As `read` gives it.
        tensors: As `read` gives them.
        find_class: ``"module:qualname"`` -> the dataclass (`tl_linmap.load.saved` finds tl_linmap's own, and only those).
        model: The model to put where the result held one (None: a `SavedModel`).
        path: The file read, where tensors saved from disk stay (a `SpilledTensor` of it each).

    Returns:
        The result.
    """
    decoder = _Decoder(tensors, find_class, path, header.get("file_id"))
    def stand_in(record: dict) -> SavedModel:
        vocabulary = record["vocabulary"]
        ids = vocabulary["ids"] if vocabulary["ids"] is not None else range(len(vocabulary["strings"]))
        unembedding = record["unembedding"] and {name: decoder.value(t) for name, t in record["unembedding"].items()}
        return SavedModel(record["config"], dict(zip(ids, vocabulary["strings"])), vocabulary["full"], unembedding)

    decoder.models = [model or stand_in(record) for record in header["models"]]
    return decoder.value(header["root"])


class _Decoder:
    """The inverse of `_Encoder`."""

    def __init__(self, tensors: dict[str, Tensor], find_class: Callable[[str], type], path: str | Path | None = None,
                 file_id: str | None = None):
        self.tensors = tensors
        self.find_class = find_class
        self.path = path
        self.file_id = file_id
        self.models: list = []

    def value(self, value):
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if not isinstance(value, dict):
            return value
        if "$tensor" in value:
            tensor = self.tensors[value["$tensor"]]
            order = value.get("order")
            return tensor if order is None else tensor.permute(sorted(range(len(order)), key=order.__getitem__))
        if "$spilled" in value:
            if self.path is None:
                raise InputError("This result holds tensors read from its file on access: give rebuild the file's path.")
            return SpilledTensor(Path(self.path).resolve(), tuple(value["shape"]), getattr(torch, value["dtype"]), tuple(value["order"]),
                                 value["contiguous"], value["$spilled"], self.file_id)
        if "$class" in value:
            cls = self.find_class(value["$class"])
            fields = {name: self.value(v) for name, v in value["fields"].items()}
            try:
                return cls(**fields)
            except TypeError as err:
                raise InputError(f"A saved {cls.__name__} does not fit this tl_linmap's {cls.__name__} ({err}): load it with the version that saved it.") from err
        if "$model" in value:
            return self.models[value["$model"]]
        if "$tuple" in value:
            return tuple(self.value(v) for v in value["$tuple"])
        if "$dict" in value:
            return {self.value(k): self.value(v) for k, v in value["$dict"]}
        if "$slice" in value:
            return slice(*value["$slice"])
        if "$range" in value:
            return range(*value["$range"])
        if "$dtype" in value:
            return getattr(torch, value["$dtype"])
        return {k: self.value(v) for k, v in value.items()}
