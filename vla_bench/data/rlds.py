"""The released RLDS/TFDS on-disk layout, read and written without TensorFlow.

A TFDS dataset directory (e.g. `bridge_dataset/1.0.0/`) holds `dataset_info.json` (splits, shard counts, episodes
per shard), `features.json` (the feature tree: which keys are per-step, their dtypes, shapes and image encodings)
and TFRecord shards named by the split's `filepathTemplate`. Each record is one `tf.train.Example` per episode with
the nested dict flattened into `/`-joined keys and the `steps` sequence stacked along time and stored flat.

`RLDSDataset(root).episodes(split)` streams episodes one record at a time (constant memory, whatever the dataset
size) as nested dicts of numpy arrays: `steps/...` tensors reshaped to (T, *shape), images decoded with PIL to
(T, H, W, C) uint8, text decoded to str (per-step text as an object array of str), bools as bool.
`write_rlds(...)` writes the same layout, for test fixtures.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Mapping

import numpy as np
from PIL import Image

from ..errors import VlaBenchError, choices
from . import jpeg
from .example_proto import ExampleParseError, parse_example, serialize_example
from .tfrecord import iter_records_with_offsets, write_records

#: the TFDS key under which the per-step sequence lives (RLDS: one `steps` Dataset per episode)
STEPS = "steps"
_DEFAULT_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
_TFDS = "tensorflow_datasets.core.features."
_PIL_FORMATS = {"jpeg": ["JPEG"], "png": ["PNG"]}
_JPEG_MAGIC = b"\xff\xd8"  # start-of-image marker


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One leaf of features.json: `key` is the flat `/`-joined Example key."""

    key: str
    kind: str  # "tensor" | "image" | "text"
    dtype: str  # numpy dtype name; "str" for text
    shape: tuple[int, ...]  # per step for sequence features; -1 = unknown
    per_step: bool
    encoding: str | None = None  # image encoding ("jpeg" / "png")


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    name: str
    shard_lengths: tuple[int, ...]
    shard_paths: tuple[Path, ...]

    @property
    def num_episodes(self) -> int:
        return sum(self.shard_lengths)

    @property
    def present(self) -> tuple[Path, ...]:
        return tuple(p for p in self.shard_paths if p.is_file())

    @property
    def missing(self) -> tuple[Path, ...]:
        return tuple(p for p in self.shard_paths if not p.is_file())

    def shards_summary(self) -> str:
        return f"{len(self.present)} of {len(self.shard_paths)} shards present"


# ------------------------------------------------------------------------------------------------ features.json


def parse_features_json(tree: Mapping) -> dict[str, FeatureSpec]:
    """The leaves of a TFDS features.json tree, by flat key."""
    specs: dict[str, FeatureSpec] = {}
    _walk_features(tree, "", False, specs)
    return specs


def _walk_features(node: Mapping, prefix: str, per_step: bool, out: dict) -> None:
    cls = str(node.get("pythonClassName", "?")).rsplit(".", 1)[-1]
    where = prefix or "<root>"
    if "featuresDict" in node:
        for name, child in node["featuresDict"]["features"].items():
            _walk_features(child, f"{prefix}/{name}" if prefix else name, per_step, out)
    elif "sequence" in node:
        if per_step:
            raise VlaBenchError(f"features.json: nested sequence at {where!r} is not supported (RLDS has one level)")
        _walk_features(node["sequence"]["feature"], prefix, True, out)
    elif "tensor" in node:
        t = node["tensor"]
        shape = tuple(int(d) for d in t.get("shape", {}).get("dimensions", []))
        out[prefix] = FeatureSpec(prefix, "tensor", t["dtype"], shape, per_step)
    elif "image" in node:
        im = node["image"]
        shape = tuple(int(d) for d in im.get("shape", {}).get("dimensions", []))
        out[prefix] = FeatureSpec(prefix, "image", im.get("dtype", "uint8"), shape, per_step,
                                  im.get("encodingFormat", "png"))
    elif "text" in node:
        out[prefix] = FeatureSpec(prefix, "text", "str", (), per_step)
    else:
        raise VlaBenchError(
            f"features.json: feature {where!r} has type {cls}, which vla-bench cannot decode; "
            "supported: FeaturesDict, Dataset, Tensor, Scalar, Image, Text"
        )


def features_json(specs: Iterable[FeatureSpec]) -> dict:
    """The TFDS features.json tree for `specs` (per-step features go under one `steps` Dataset)."""
    root: dict = _dict_node()
    for spec in specs:
        parts = spec.key.split("/")
        node = root
        for i, part in enumerate(parts[:-1]):
            features = node["featuresDict"]["features"]
            if part not in features:
                if i == 0 and spec.per_step:
                    features[part] = {"pythonClassName": _TFDS + "dataset_feature.Dataset",
                                      "sequence": {"feature": _dict_node(), "length": "-1"}}
                else:
                    features[part] = _dict_node()
            node = features[part]
            if "sequence" in node:
                node = node["sequence"]["feature"]
        node["featuresDict"]["features"][parts[-1]] = _leaf_node(spec)
    return root


def _dict_node() -> dict:
    return {"pythonClassName": _TFDS + "features_dict.FeaturesDict", "featuresDict": {"features": {}}}


def _leaf_node(spec: FeatureSpec) -> dict:
    dims = {"dimensions": [str(d) for d in spec.shape]} if spec.shape else {}
    if spec.kind == "image":
        return {"pythonClassName": _TFDS + "image_feature.Image",
                "image": {"shape": dims, "dtype": spec.dtype, "encodingFormat": spec.encoding}}
    if spec.kind == "text":
        return {"pythonClassName": _TFDS + "text_feature.Text", "text": {}}
    cls = "scalar.Scalar" if not spec.shape else "tensor_feature.Tensor"
    return {"pythonClassName": _TFDS + cls, "tensor": {"shape": dims, "dtype": spec.dtype, "encoding": "none"}}


# ---------------------------------------------------------------------------------------------------- reading


def resolve_dataset_dir(root: str | os.PathLike) -> Path:
    """The directory holding dataset_info.json: `root` itself, or its one version subdirectory (`.../1.0.0`)."""
    root = Path(root)
    if (root / "dataset_info.json").is_file():
        return root
    if not root.is_dir():
        raise VlaBenchError(f"RLDS dataset directory {root} does not exist")
    versions = sorted(p for p in root.iterdir() if (p / "dataset_info.json").is_file())
    if len(versions) == 1:
        return versions[0]
    if versions:
        raise VlaBenchError(f"{root} holds several dataset versions; pass one of: {choices(versions)}")
    raise VlaBenchError(
        f"no dataset_info.json in {root} or its subdirectories: give the TFDS version directory "
        "(e.g. .../bridge_orig/1.0.0) holding dataset_info.json, features.json and the *.tfrecord-* shards"
    )


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise VlaBenchError(f"missing {path.name} in {path.parent}: it comes with the dataset download") from e
    except json.JSONDecodeError as e:
        raise VlaBenchError(f"{path} is not valid JSON ({e})") from e


class RLDSDataset:
    """A TFDS/RLDS dataset directory, read lazily: nothing but the two JSON files is read until you iterate."""

    def __init__(self, root: str | os.PathLike):
        self.dir = resolve_dataset_dir(root)
        info = _load_json(self.dir / "dataset_info.json")
        self.name: str = info.get("name", self.dir.parent.name)
        self.version: str = info.get("version", self.dir.name)
        file_format = info.get("fileFormat", "tfrecord")
        if file_format != "tfrecord":
            raise VlaBenchError(f"{self.dir / 'dataset_info.json'}: fileFormat {file_format!r}; only tfrecord is read")
        self.splits: dict[str, SplitInfo] = {}
        for split in info.get("splits", []):
            lengths = tuple(int(n) for n in split.get("shardLengths", []))
            template = split.get("filepathTemplate", _DEFAULT_TEMPLATE)
            paths = tuple(
                self.dir / template.format(DATASET=self.name, SPLIT=split["name"], FILEFORMAT=file_format,
                                           SHARD_X_OF_Y=f"{i:05d}-of-{len(lengths):05d}")
                for i in range(len(lengths))
            )
            self.splits[split["name"]] = SplitInfo(split["name"], lengths, paths)
        self.features: dict[str, FeatureSpec] = parse_features_json(_load_json(self.dir / "features.json"))

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise VlaBenchError(f"split {name!r} is not in {self.dir / 'dataset_info.json'}; "
                                f"splits: {choices(self.splits)}")
        return self.splits[name]

    def shards(self, split: str, *, allow_missing_shards: bool = False) -> list[tuple[Path, int]]:
        """(path, episode count) of the split's shards that are on disk.

        Missing shards raise VlaBenchError ("k of n shards present") unless `allow_missing_shards` (a partial
        download then streams what is there)."""
        info = self.split(split)
        missing = info.missing
        if missing and (not allow_missing_shards or len(missing) == len(info.shard_paths)):
            shown = ", ".join(p.name for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
            complete = [s for s, i in self.splits.items() if not i.missing]
            raise VlaBenchError(
                f"split {split!r} of {self.dir}: {info.shards_summary()} (missing: {shown}). "
                f"Download the missing shards{'' if allow_missing_shards else ', or allow a partial split'}; "
                f"complete splits here: {choices(complete) or 'none'}"
            )
        return [(p, n) for p, n in zip(info.shard_paths, info.shard_lengths) if p.is_file()]

    def _check_keys(self, features: Collection[str] | None) -> dict[str, FeatureSpec]:
        if features is None:
            return self.features
        unknown = [k for k in features if k not in self.features]
        if unknown:
            raise VlaBenchError(f"unknown feature(s) {choices(unknown)} for {self.dir}; features: "
                                f"{choices(self.features)}")
        return {k: self.features[k] for k in features}

    def serialized(self, split: str, *, allow_missing_shards: bool = False) -> Iterator[tuple[Path, int, bytes]]:
        """(shard path, byte offset, serialized Example) of every record, CRC-checked; no decoding."""
        for path, expected in self.shards(split, allow_missing_shards=allow_missing_shards):
            count = 0
            for offset, data in iter_records_with_offsets(path):
                count += 1
                yield path, offset, data
            if count != expected:
                raise VlaBenchError(
                    f"TFRecord shard {path} holds {count} episodes, dataset_info.json says {expected}: "
                    "the file is truncated or from another download; re-download it"
                )

    def episodes(self, split: str, *, features: Collection[str] | None = None, max_episodes: int | None = None,
                 allow_missing_shards: bool = False) -> Iterator[dict]:
        """Stream the split's episodes as nested dicts of numpy arrays, one record in memory at a time.

        `features` (flat keys, e.g. "steps/observation/image_0") limits what is decoded; the default is all."""
        specs = self._check_keys(features)
        if max_episodes is not None and max_episodes <= 0:
            return
        n = 0
        for path, offset, data in self.serialized(split, allow_missing_shards=allow_missing_shards):
            yield decode_episode(data, specs, where=f"{path} at byte offset {offset}")
            n += 1
            if max_episodes is not None and n >= max_episodes:
                return


def decode_episode(data: bytes, specs: Mapping[str, FeatureSpec], where: str = "record") -> dict:
    """One serialized RLDS episode -> nested dict of arrays, per `specs` (see the module docstring)."""
    try:
        flat = parse_example(data, keys=specs.keys())
    except ExampleParseError as e:
        raise VlaBenchError(f"malformed tf.train.Example in {where}: {e}") from e
    missing = [k for k in specs if k not in flat]
    if missing:
        raise VlaBenchError(f"episode in {where} lacks feature(s) {choices(missing)} that features.json declares")
    steps = _num_steps(flat, specs, where)
    try:
        decoded = {key: _decode_feature(flat[key], spec, steps, where) for key, spec in specs.items()}
    except (ValueError, TypeError, OSError, IndexError, OverflowError, KeyError) as e:
        # damaged values in a well-framed record: an image that is not one, a shape its data do not fill
        raise VlaBenchError(f"malformed episode in {where}: {type(e).__name__}: {e}") from e
    return unflatten(decoded)


def _num_steps(flat: Mapping, specs: Mapping[str, FeatureSpec], where: str) -> int | None:
    """T, inferred from the per-step features (TFDS stores it nowhere); they must agree."""
    counts = {}
    for key, spec in specs.items():
        if not spec.per_step:
            continue
        size = len(flat[key])
        if spec.kind == "tensor":
            per = math.prod(spec.shape) if all(d >= 0 for d in spec.shape) else None
            if per is None:
                continue  # unknown shape: cannot tell T from it
            size = size // per if per else 0
        counts[key] = size
    if len(set(counts.values())) > 1:
        raise VlaBenchError(f"episode in {where}: per-step features disagree on the step count: {counts}")
    return next(iter(counts.values()), None)


def _decode_feature(value, spec: FeatureSpec, steps: int | None, where: str):
    if spec.kind == "text":
        texts = [v.decode("utf-8") for v in value]
        return np.array(texts, dtype=object) if spec.per_step else (texts[0] if texts else "")
    if spec.kind == "image":
        frames = [_decode_image(v, spec, where) for v in value]
        if not spec.per_step:
            return frames[0]
        if frames:
            return np.stack(frames)
        return np.zeros((0, *[max(d, 0) for d in spec.shape]), np.uint8)
    arr = np.asarray(value).astype(np.dtype(spec.dtype), copy=False)
    shape = (steps, *spec.shape) if spec.per_step else spec.shape
    try:
        return arr.reshape(shape)
    except ValueError as e:
        raise VlaBenchError(f"feature {spec.key!r} in {where}: {arr.size} values do not fit shape {shape}") from e


def _decode_image(blob: bytes, spec: FeatureSpec, where: str) -> np.ndarray:
    channels = spec.shape[-1] if spec.shape else 3
    try:
        if blob[:2] == _JPEG_MAGIC and channels in (1, 3):  # decoded as TensorFlow decodes it (data/jpeg.py)
            array = jpeg.decode(blob, channels)
            return array[..., None] if array.ndim == 2 else array
        # naming the format skips PIL's probing of every plugin; converting only when needed skips a copy
        formats = _PIL_FORMATS.get(spec.encoding or "")
        image = Image.open(io.BytesIO(blob), formats=formats)
        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels, "RGB")
        array = np.asarray(image if image.mode == mode else image.convert(mode))
    except Exception as e:  # PIL and simplejpeg raise several types for damaged images
        raise VlaBenchError(f"image {spec.key!r} in {where} cannot be decoded: {e}") from e
    return array[..., None] if array.ndim == 2 else array


def unflatten(flat: Mapping[str, Any]) -> dict:
    """{"a/b": x, "a/c": y} -> {"a": {"b": x, "c": y}}."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of `unflatten`."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        full = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            out.update(flatten(value, full))
        else:
            out[full] = value
    return out


# ---------------------------------------------------------------------------------------------------- writing


def infer_feature_specs(episode: Mapping, image_format: str = "jpeg") -> dict[str, FeatureSpec]:
    """Feature specs guessed from one episode dict: under `steps`, uint8 (T,H,W,C) arrays are images, object or
    str arrays text, other arrays tensors of their per-step shape; outside it, str is text, the rest tensors."""
    specs = {}
    for key, value in flatten(episode).items():
        per_step = key.split("/", 1)[0] == STEPS
        if isinstance(value, str):
            specs[key] = FeatureSpec(key, "text", "str", (), per_step)
            continue
        arr = np.asarray(value)
        if arr.dtype.kind in "OUS":
            specs[key] = FeatureSpec(key, "text", "str", (), per_step)
        elif per_step and arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[-1] in (1, 3, 4):
            specs[key] = FeatureSpec(key, "image", "uint8", tuple(arr.shape[1:]), True, image_format)
        else:
            shape = tuple(arr.shape[1:]) if per_step else tuple(arr.shape)
            specs[key] = FeatureSpec(key, "tensor", arr.dtype.name, shape, per_step)
    return specs


def encode_episode(episode: Mapping, specs: Mapping[str, FeatureSpec]) -> bytes:
    """One episode dict -> serialized tf.train.Example, as TFDS writes it."""
    flat = flatten(episode)
    missing = [k for k in specs if k not in flat]
    if missing:
        raise VlaBenchError(f"episode lacks feature(s) {choices(missing)} of the dataset's features")
    features = {}
    for key, spec in specs.items():
        value = flat[key]
        if spec.kind == "text":
            features[key] = [value] if isinstance(value, str) else [str(v) for v in np.asarray(value).reshape(-1)]
        elif spec.kind == "image":
            frames = np.asarray(value, dtype=np.uint8)
            features[key] = [_encode_image(f, spec.encoding or "png") for f in (frames if spec.per_step else [frames])]
        else:
            features[key] = np.asarray(value)
    return serialize_example(features)


def _encode_image(frame: np.ndarray, encoding: str) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)
    if encoding == "jpeg":
        image.save(buffer, format="JPEG", quality=95)
    elif encoding == "png":
        image.save(buffer, format="PNG")
    else:
        raise VlaBenchError(f"image encoding {encoding!r} is not supported; choices: jpeg, png")
    return buffer.getvalue()


def write_rlds(root: str | os.PathLike, episodes_by_split: Mapping[str, Iterable[Mapping]], *,
               name: str = "dataset", version: str = "1.0.0", features: Mapping | None = None,
               episodes_per_shard: int = 1000, image_format: str = "jpeg") -> Path:
    """Write episodes in the released TFDS layout under `root/name/version`; return that directory.

    `features` is a features.json tree to write against (e.g. a real dataset's, to mimic it exactly); without
    it the specs are inferred from the first episode (see `infer_feature_specs`)."""
    out = Path(root) / name / version
    out.mkdir(parents=True, exist_ok=True)
    splits_json, specs = [], None
    if features is not None:
        specs = parse_features_json(features)
    for split, episodes in episodes_by_split.items():
        episodes = list(episodes)
        if specs is None and episodes:
            specs = infer_feature_specs(episodes[0], image_format)
        n_shards = max(1, math.ceil(len(episodes) / episodes_per_shard))
        lengths, num_bytes = [], 0
        for i in range(n_shards):
            chunk = episodes[i * episodes_per_shard:(i + 1) * episodes_per_shard]
            records = [encode_episode(ep, specs) for ep in chunk]
            path = out / f"{name}-{split}.tfrecord-{i:05d}-of-{n_shards:05d}"
            write_records(path, records)
            lengths.append(str(len(chunk)))
            num_bytes += sum(len(r) for r in records)
        splits_json.append({"filepathTemplate": _DEFAULT_TEMPLATE, "name": split,
                            "numBytes": str(num_bytes), "shardLengths": lengths})
    info = {"fileFormat": "tfrecord", "moduleName": "vla_bench.data.rlds", "name": name,
            "splits": splits_json, "version": version}
    (out / "dataset_info.json").write_text(json.dumps(info, indent=2))
    tree = features if features is not None else features_json((specs or {}).values())
    (out / "features.json").write_text(json.dumps(tree, indent=2))
    return out
