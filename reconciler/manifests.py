"""Manifests: YAML bytes in, typed desired entries (or every error, with file and line) out.

A manifest is `tasks/nodes/<id>.yaml` or `tasks/regions/<region>.yaml` (`.yml` too)
holding `name:` (the Lua function) and optional `data:`; it becomes the etcd value
`{"Name": name, "Data": data}` as canonical JSON, so an unchanged manifest always gives
the same bytes. Pure: no git, no etcd, no clock; the caller supplies (path, bytes) pairs.

Speed matters (10,000 manifests in well under a second): files are parsed with the C
YAML loader and checked against the schema's shape by a few lines of Python that accept
exactly what `schemas/manifest.schema.json` accepts (a property test holds them equal).
The jsonschema validator, slow to import and to run, is used only to explain a manifest
that failed the quick check.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import posixpath
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gleam import keys, messages

TASKS_DIR = "tasks"
KIND_DIRS: Mapping[str, keys.Kind] = {"nodes": keys.Kind.NODE, "regions": keys.Kind.REGION}
EXTENSIONS = (".yaml", ".yml")


def _schema_path() -> Path:
    """schemas/ beside the packages (a checkout or an editable install), else the copy a
    wheel installs under <prefix>/share/gleam/schemas."""
    beside = Path(__file__).resolve().parent.parent / "schemas" / "manifest.schema.json"
    installed = Path(sys.prefix) / "share" / "gleam" / "schemas" / "manifest.schema.json"
    return beside if beside.is_file() or not installed.is_file() else installed


SCHEMA_PATH = _schema_path()
ALLOWED_KEYS = frozenset({"name", "data"})


class _Loader(yaml.CSafeLoader):
    """The C safe loader without the timestamp rule: `2024-05-01` stays a string, since
    a date object cannot go into a JSON message and a date-looking string should not
    turn into an error. A key given twice in one mapping is an error: YAML loaders
    silently keep the last one, which hides a bad merge."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if len(node.value) > 1:
            seen: set[str] = set()
            for key_node, _value in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if key_node.value in seen and key_node.value != "<<":
                        raise yaml.constructor.ConstructorError(
                            None,
                            None,
                            f"key {key_node.value!r} is given twice",
                            key_node.start_mark,
                        )
                    seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.CSafeLoader.yaml_implicit_resolvers.items()
}


@dataclass(frozen=True)
class ManifestError:
    """One problem in one file; `line` is 1-based, None where YAML cannot say."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.message}"


class InvalidManifests(Exception):
    """Some manifests are invalid; `errors` holds every problem found, in path order."""

    def __init__(self, errors: Iterable[ManifestError]) -> None:
        self.errors = tuple(sorted(errors, key=lambda e: (e.path, e.line or 0)))
        super().__init__(f"{len(self.errors)} invalid manifest(s)")


@dataclass(frozen=True)
class Manifest:
    """A valid manifest: where it came from, the key it targets and the bytes to write."""

    path: str
    target: keys.Target
    value: bytes

    @functools.cached_property
    def task(self) -> messages.Task:
        return messages.decode_task(self.value)


def classify(path: str) -> keys.Target | ManifestError | None:
    """The target a repository path stands for, a ManifestError for a YAML file in the
    wrong place or with an invalid name, or None for a file that is no manifest (a README
    in tasks/, say)."""
    if not path.endswith(EXTENSIONS):
        return None
    parts = path.split("/")
    if len(parts) != 3 or parts[0] != TASKS_DIR or parts[1] not in KIND_DIRS:
        if parts[0] != TASKS_DIR:
            return None
        return ManifestError(
            path, None, "manifests go directly in tasks/nodes/ or tasks/regions/; not read"
        )
    stem = posixpath.splitext(parts[2])[0]
    kind = KIND_DIRS[parts[1]]
    try:
        return keys.Target(kind, stem)
    except keys.InvalidName as exc:
        return ManifestError(path, None, f"file name: {exc}")


def paths_for(target: keys.Target) -> list[str]:
    """The repository paths that can hold `target`'s manifest (the reverse of classify):
    one per spelling of the extension, so a rename between them, or a duplicate, is
    seen whole."""
    return [
        f"{TASKS_DIR}/{dirname}/{target.name}{ext}"
        for dirname, kind in KIND_DIRS.items()
        if kind is target.kind
        for ext in EXTENSIONS
    ]


@functools.cache
def rules_fingerprint() -> str:
    """Changes whenever the rules that turn a file into bytes (this module and the
    schema) change. Recorded with each apply, so that an upgrade that changes them gets
    one full pass, and kept in the parse cache, so that such an upgrade empties it."""
    h = hashlib.sha256(b"parsecache-1\0")
    for path in (Path(__file__), SCHEMA_PATH):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def parse(path: str, raw: bytes, target: keys.Target) -> Manifest | list[ManifestError]:
    """Parse and validate one manifest's bytes."""
    try:
        doc = yaml.load(raw, Loader=_Loader)  # noqa: S506 - a CSafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        return [ManifestError(path, line, f"not valid YAML: {problem or exc}")]
    except yaml.YAMLError as exc:
        return [ManifestError(path, None, f"not valid YAML: {exc}")]
    except (UnicodeDecodeError, ValueError) as exc:
        return [ManifestError(path, None, f"cannot be read as text: {exc}")]
    if not _quick_valid(doc):
        return _explain(path, raw, doc)
    task = messages.Task(doc["name"], doc.get("data"))
    try:
        value = task.encode()
        if b"NaN" in value or b"Infinity" in value:
            # json.dumps writes these bare words, which JSON (and the agent) refuse.
            json.dumps(task.data, allow_nan=False)
    except (messages.MessageError, keys.InvalidName) as exc:
        return [ManifestError(path, _line_of(raw, ("data",)), str(exc))]
    except ValueError:
        return [ManifestError(path, _line_of(raw, ("data",)), "data holds .nan or .inf: not JSON")]
    return Manifest(path=path, target=target, value=value)


def load(
    files: Iterable[tuple[str, bytes]], *, known: Iterable[tuple[str, bytes]] = ()
) -> dict[keys.Target, Manifest]:
    """Every manifest among (path, file bytes) pairs by target; non-manifest files are
    skipped. `known` holds (path, message bytes) of files already parsed and valid (the
    parse cache). Raises InvalidManifests with every error of every file if any is
    invalid."""
    errors: list[ManifestError] = []
    out: dict[keys.Target, Manifest] = {}
    parsed = ((path, raw, False) for path, raw in files)
    cached = ((path, value, True) for path, value in known)
    for path, raw, is_value in itertools.chain(cached, parsed):
        target = classify(path)
        if target is None:
            continue
        if isinstance(target, ManifestError):
            errors.append(target)
            continue
        result = Manifest(path, target, raw) if is_value else parse(path, raw, target)
        if isinstance(result, list):
            errors.extend(result)
            continue
        other = out.get(target)
        if other is not None:
            errors.append(ManifestError(path, None, f"{other.path} already defines {target.path}"))
            continue
        out[target] = result
    if errors:
        raise InvalidManifests(errors)
    return out


# Validation -------------------------------------------------------------------------


def _quick_valid(doc: Any) -> bool:
    """True exactly when the schema accepts `doc` (see tests/test_reconcile_manifests.py)."""
    if type(doc) is not dict or "name" not in doc:
        return False
    if not ALLOWED_KEYS.issuperset(doc):
        return False
    name = doc["name"]
    if type(name) is not str:
        return False
    try:
        keys.validate_function(name)
    except keys.InvalidName:
        return False
    return True


@functools.cache
def validator() -> Any:
    """The compiled jsonschema validator for schemas/manifest.schema.json."""
    import jsonschema  # slow to import; needed only to explain an invalid manifest

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _explain(path: str, raw: bytes, doc: Any) -> list[ManifestError]:
    """Errors for a manifest that failed the quick check, with lines where YAML knows."""
    if doc is None:
        return [ManifestError(path, None, "manifest is empty; it needs at least `name:`")]
    errors: list[ManifestError] = []
    for error in sorted(validator().iter_errors(doc), key=lambda e: list(e.absolute_path)):
        where = tuple(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            for extra in sorted(set(error.instance) - ALLOWED_KEYS, key=str):
                errors.append(
                    ManifestError(
                        path,
                        _line_of(raw, (*where, extra), key=True),
                        f"unknown key {extra!r} (a manifest has `name` and `data` only)",
                    )
                )
            continue
        label = ".".join(str(p) for p in where) or "manifest"
        message = error.message
        if error.validator == "required":
            message = "`name:` is missing (the Lua function to run, e.g. `name: print`)"
        elif error.validator == "pattern" and where == ("name",):
            message = (
                f"function name {error.instance!r} is invalid: segments separated by '::' "
                "may hold letters, digits, '_' and '-' only"
            )
        elif error.validator == "type" and not where:
            message = f"a manifest is a mapping with `name` and `data`, not {_yaml_type(doc)}"
        else:
            message = f"{label}: {message}"
        errors.append(ManifestError(path, _line_of(raw, where), message))
    if not errors:
        # The schema accepted what the quick check refused: a name that the shared
        # key rules refuse but the schema's pattern lets through (a trailing newline).
        try:
            keys.validate_function(str(doc.get("name")) if isinstance(doc, dict) else str(doc))
            message = "manifest refused"
        except keys.InvalidName as exc:
            message = str(exc)
        errors.append(ManifestError(path, _line_of(raw, ("name",)), message))
    return errors


def _yaml_type(doc: Any) -> str:
    if isinstance(doc, list):
        return "a list"
    if isinstance(doc, str):
        return "a string"
    return f"a {type(doc).__name__}"


def _line_of(raw: bytes, where: tuple[Any, ...], *, key: bool = False) -> int | None:
    """1-based line of the node at `where` (mapping keys and list indexes), found by
    composing the YAML again (error path only); the nearest known ancestor's line if the
    path does not reach that far."""
    try:
        node = yaml.compose(raw, Loader=yaml.CSafeLoader)
    except yaml.YAMLError:
        return None
    if node is None:
        return None
    line = node.start_mark.line + 1
    for step in where:
        found: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if str(key_node.value) == str(step):
                    found = key_node if key and step == where[-1] else value_node
                    break
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(step, int)
            and 0 <= step < len(node.value)
        ):
            found = node.value[step]
        if found is None:
            break
        node = found
        line = node.start_mark.line + 1
    return line
