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

Manifests come from whoever can open a pull request, so every input is bounded before
it can cost much: a file over MAX_FILE_BYTES is refused unparsed; YAML aliases are
counted and their expansion measured on the composed node graph (cheap: aliases are
shared nodes there) before anything is built, so a "billion laughs" file is refused in
microseconds; nesting deeper than messages.MAX_DEPTH is refused before the constructor,
the JSON encoder or jsonschema could recurse that far; and a path that is not valid
UTF-8 or holds a control character is an error naming it, escaped for display.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gleam import keys, messages, rollout

TASKS_DIR = "tasks"
KIND_DIRS: Mapping[str, keys.Kind] = {"nodes": keys.Kind.NODE, "regions": keys.Kind.REGION}
EXTENSIONS = (".yaml", ".yml")

# Limits (the README's manifest section lists them with the error each gives). A file
# may be larger than its message (comments, indentation), so twice the message limit.
MAX_FILE_BYTES = 2 * messages.MAX_MESSAGE_BYTES
# Alias uses (`*name`, `<<: *name`) in one file: sharing a few blocks of defaults is what
# aliases are for.
MAX_ALIASES = 100
# Nodes in the document once every alias is replaced by what it names. A valid message
# spends at least two bytes per node, so a document past this could not fit in the
# 1 MiB message limit anyway; the check runs before anything is expanded.
MAX_EXPANDED_NODES = messages.MAX_MESSAGE_BYTES // 2
# The manifest mapping itself is one level; `data` may nest messages.MAX_DEPTH more.
MAX_DOCUMENT_DEPTH = messages.MAX_DEPTH + 1


def _schema_path() -> Path:
    """schemas/ beside the packages (a checkout or an editable install), else the copy a
    wheel installs under <prefix>/share/gleam/schemas."""
    beside = Path(__file__).resolve().parent.parent / "schemas" / "manifest.schema.json"
    installed = Path(sys.prefix) / "share" / "gleam" / "schemas" / "manifest.schema.json"
    return beside if beside.is_file() or not installed.is_file() else installed


SCHEMA_PATH = _schema_path()
ALLOWED_KEYS = frozenset({"name", "data", "rollout"})


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

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        # Python refuses to read a decimal integer past its digit limit (a ValueError);
        # hexadecimal, octal and binary ones are read, but printing one fails wherever
        # that happens (an error message that quotes it, say). Both are refused here.
        too_long = _TooLong(
            None,
            None,
            f"holds an integer of more than {messages.MAX_INT_DIGITS} digits",
            node.start_mark,
        )
        try:
            value: int = super().construct_yaml_int(node)
        except ValueError as exc:
            if "integer string conversion" in str(exc):
                raise too_long from None
            raise
        if abs(value) >= _INT_LIMIT:
            raise too_long
        return value


class _TooLong(yaml.constructor.ConstructorError):
    """A value past a limit: reported as it is, not as invalid YAML."""


# The smallest integer with more than messages.MAX_INT_DIGITS decimal digits.
_INT_LIMIT = 10**messages.MAX_INT_DIGITS
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.CSafeLoader.yaml_implicit_resolvers.items()
}


class _FastLoader(_Loader):
    """_Loader with a memo of the implicit tags of plain scalars: the C parser asks the
    (Python) resolver for every node, and a fleet's manifests repeat the same keys and
    values. The tag depends on the text only (no path resolvers), so the memo changes
    nothing but the time."""

    def resolve(self, kind: type[yaml.Node], value: str, implicit: tuple[bool, bool]) -> str:
        if kind is yaml.ScalarNode and implicit[0]:
            tag = _PLAIN_TAGS.get(value)
            if tag is None:
                tag = super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call]
                if len(value) <= 64 and len(_PLAIN_TAGS) < 1 << 16:
                    _PLAIN_TAGS[value] = tag
            return tag
        other: str = super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call]
        return other

    # Without path resolvers (asserted below) the resolver's descend/ascend hooks, which
    # the C composer calls around every node, do nothing: C builtins that take the same
    # arguments and ignore them cost a fifth of a Python method call.
    descend_resolver = staticmethod(slice)  # type: ignore[assignment]
    ascend_resolver = staticmethod(tuple)  # type: ignore[assignment]


_PLAIN_TAGS: dict[str, str] = {}
assert not _Loader.yaml_path_resolvers, "the tag memo assumes no path resolvers"


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
    # The function name, when the parse that made `value` knows it (not from the parse
    # cache): spares the output a decode of every message just to print names.
    name: str | None = field(default=None, compare=False, repr=False)

    @functools.cached_property
    def task(self) -> messages.Task:
        return messages.decode_task(self.value)

    @property
    def function(self) -> str:
        """The function name the message carries."""
        return self.name if self.name is not None else self.task.name


def decode_path(raw: bytes) -> str | ManifestError:
    """A path as git or the file system gives it (bytes) as text; a ManifestError naming
    it, escaped for display, when it is not valid UTF-8 or holds a control or other
    invisible character. Every path under tasks/ must pass, whatever its extension: a
    newline in a file name once made one file's contents be read as another's."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ManifestError(display_path(raw), None, "file name is not valid UTF-8; not read")
    if not text.isprintable():
        return ManifestError(
            display_path(raw),
            None,
            "file name holds a control or invisible character (shown escaped); not read",
        )
    return text


def display_path(raw: bytes) -> str:
    """`raw` as one printable line: bytes that are not UTF-8 as \\xNN, control and
    invisible characters escaped (\\n, \\x1b, \\u202e), backslashes doubled so that
    an escape cannot be mistaken for a name's own characters."""
    # Imported here: client_render brings the etcd client (gRPC) with it, which the
    # parse worker (parseworker.py) must not pay for; paths to escape are rare.
    from gleam import client_render

    text = raw.decode("utf-8", "surrogateescape").replace("\\", "\\\\")
    return client_render.printable(text)


# The tree listing classifies every path and load() again: cached, the second is free.
@functools.lru_cache(maxsize=1 << 17)
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
    stem = _stem(parts[2])
    kind = KIND_DIRS[parts[1]]
    try:
        return keys.Target(kind, stem)
    except keys.InvalidName as exc:
        return ManifestError(path, None, f"file name: {exc}")


def _stem(name: str) -> str:
    """posixpath.splitext(name)[0] for a name with a dot (what classify has), at a
    fraction of its cost: leading dots do not start an extension."""
    stem = name[: name.rindex(".")]
    return stem if stem.strip(".") else name


def cache_key(path: str, blob: str) -> str:
    """What the parse cache keeps a blob's message under: its id and the directory it is
    in. The bytes alone do not decide the message: a file with a `rollout` is a staged
    region task in tasks/regions/ and an error in tasks/nodes/, so a blob parsed in one
    directory says nothing of the same blob in another."""
    return f"{path.rpartition('/')[0]}\0{blob}"


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
    h = hashlib.sha256(b"parsecache-2\0")  # 2: keyed by cache_key, not the blob id alone
    for path in (Path(__file__), SCHEMA_PATH):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def parse(path: str, raw: bytes, target: keys.Target) -> Manifest | list[ManifestError]:
    """Parse and validate one manifest's bytes."""
    if len(raw) > MAX_FILE_BYTES:
        return [
            ManifestError(
                path,
                None,
                f"file is over the {_mib(MAX_FILE_BYTES)} limit for a manifest; not parsed",
            )
        ]
    loaded = _load_yaml(path, raw)
    if isinstance(loaded, ManifestError):
        return [loaded]
    doc = loaded
    if not _quick_valid(doc):
        return _explain(path, raw, doc)
    plan = _rollout(path, raw, target, doc)
    if isinstance(plan, ManifestError):
        return [plan]
    task = messages.Task(doc["name"], doc.get("data"), rollout=plan)
    try:
        value = task.encode()
    except (messages.MessageError, keys.InvalidName) as exc:
        return [ManifestError(path, _line_of(raw, ("data",)), _clip(str(exc)))]
    return Manifest(path=path, target=target, value=value, name=task.name)


def _rollout(
    path: str, raw: bytes, target: keys.Target, doc: dict[str, Any]
) -> dict[str, Any] | ManifestError | None:
    """The normalised `rollout` section (region manifests only), None without one."""
    if "rollout" not in doc:
        return None
    if target.kind is not keys.Kind.REGION:
        return ManifestError(
            path,
            _line_of(raw, ("rollout",), key=True),
            "a node manifest cannot have `rollout` (waves are for region tasks)",
        )
    try:
        return rollout.parse_plan(doc["rollout"]).to_json()
    except rollout.RolloutError as exc:
        return ManifestError(path, _line_of(raw, ("rollout", *exc.where)), str(exc))


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):g} MiB"


def _load_yaml(path: str, raw: bytes, *, fast: bool = True) -> Any:
    """The YAML document, or a ManifestError. The node graph is checked before it is
    constructed (see the module docstring). `fast=False` is PyYAML's constructor alone,
    the reference the fast path is tested against."""
    loader = _FastLoader(raw) if fast else _Loader(raw)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if b"*" in raw or _indicators(raw) > MAX_DOCUMENT_DEPTH:
            refused = graph_problem(node)
            if refused is not None:
                message, where = refused
                return ManifestError(path, where.start_mark.line + 1, message)
        if not fast:
            return loader.construct_document(node)
        try:
            return _convert(loader, node)
        except _CONVERT_FALLBACK:
            # Something _convert does not handle (an explicit tag, a nested merge) or an
            # error: PyYAML's own constructor gives the value, or the error, exactly.
            return loader.construct_document(node)
    except _TooLong as exc:
        mark = exc.problem_mark
        return ManifestError(path, mark.line + 1 if mark else None, str(exc.problem))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        return ManifestError(path, line, _clip(f"not valid YAML: {problem or exc}"))
    except yaml.YAMLError as exc:
        return ManifestError(path, None, _clip(f"not valid YAML: {exc}"))
    except UnicodeDecodeError as exc:
        return ManifestError(path, None, _clip(f"cannot be read as text: {exc}"))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        # PyYAML's constructors fail this way on explicit tags with values they do not
        # expect (`!!timestamp x`, `!!bool maybe`): a per-file error like any other.
        return ManifestError(
            path,
            None,
            _clip(f"not valid YAML: a value cannot be built ({type(exc).__name__}: {exc})"),
        )
    finally:
        loader.dispose()


# The fast converter ----------------------------------------------------------------
#
# PyYAML's constructor is generic Python (a lookup per node, generators, state kept for
# recursive objects) and was most of a manifest's parse. _convert builds the same values
# from the composed nodes for the tags manifests use: the YAML 1.1 scalars as the
# resolver tagged them (null, bool, int, float, str), sequences, and mappings with
# `<<` merges whose sources hold no merge of their own. It raises _Unusual for anything
# else (an explicit `!!binary`, `!!set`, a non-scalar key, a nested merge, `=`), and
# then the caller runs PyYAML's constructor on the same untouched graph; its errors are
# raised the same way. tests/test_manifests_convert.py holds the two equal on random
# documents.

_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_STR = "tag:yaml.org,2002:str"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"
_MERGE = "tag:yaml.org,2002:merge"


class _Unusual(Exception):
    """A node _convert leaves to PyYAML's constructor."""


# What makes _load_yaml fall back to PyYAML's constructor: _Unusual, and every error a
# conversion can raise, so that the error the user sees is the constructor's own.
_CONVERT_FALLBACK = (_Unusual, yaml.YAMLError, ValueError, KeyError, TypeError, IndexError)


def _convert(loader: _Loader, root: yaml.Node) -> Any:
    """The value PyYAML's constructor would build from `root` (see above). Recursive:
    the caller has bounded the depth (graph_problem, or too few indicators to nest
    deep) and refused recursive aliases. Does not modify the nodes."""
    bools = loader.bool_values
    shared: dict[int, Any] = {}  # aliased collections are built once, as PyYAML does

    def convert(node: yaml.Node) -> Any:
        tag = node.tag
        if type(node) is yaml.ScalarNode:
            text: str = node.value
            if tag == _STR:
                return text
            if tag == _INT:
                # A plain decimal (not octal); anything else the constructor reads.
                simple = text.isascii() and text.isdigit() and (text[0] != "0" or text == "0")
                if simple and len(text) <= messages.MAX_INT_DIGITS:
                    return int(text)
                return loader.construct_yaml_int(node)
            if tag == _NULL:
                return None
            if tag == _BOOL:
                return bools[text.lower()]
            if tag == _FLOAT:
                return loader.construct_yaml_float(node)
            raise _Unusual(tag)
        key = id(node)
        if key in shared:
            return shared[key]
        if type(node) is yaml.SequenceNode and tag == _SEQ:
            items: list[Any] = []
            shared[key] = items
            items.extend(convert(child) for child in node.value)
            return items
        if type(node) is yaml.MappingNode and tag == _MAP:
            mapping: dict[Any, Any] = {}
            shared[key] = mapping
            for key_node, value_node in _pairs(node):
                if type(key_node) is not yaml.ScalarNode:
                    raise _Unusual("a key that is not a scalar")
                mapping[convert(key_node)] = convert(value_node)
            return mapping
        raise _Unusual(tag)

    try:
        return convert(root)
    finally:
        # convert and its closure cell refer to each other: a cycle that would hold
        # `shared`, and so the whole document, until the cycle collector ran (which a
        # pass pauses: reconcile.collector_paused). Rebinding the name breaks it.
        convert = _converted


def _converted(node: yaml.Node) -> Any:
    raise AssertionError("_convert is done")


def _pairs(node: yaml.MappingNode) -> list[tuple[yaml.Node, yaml.Node]]:
    """A mapping's (key, value) nodes as PyYAML's constructor takes them: a key given
    twice (by its text, `<<` aside) is _Unusual (the constructor reports it); the pairs
    of a merged mapping come first, so that the mapping's own keys win. One merge source
    only, with distinct keys: how several sources, or a source's repeated keys, combine
    changed between PyYAML 6.0 releases, so those are left to the installed PyYAML."""
    pairs: list[tuple[yaml.Node, yaml.Node]] = node.value
    if len(pairs) > 1:
        seen: set[str] = set()
        for key_node, _value in pairs:
            if type(key_node) is yaml.ScalarNode:
                text = key_node.value
                if text in seen and text != "<<":
                    raise _Unusual("a key given twice")
                seen.add(text)
    merges = [value_node for key_node, value_node in pairs if key_node.tag == _MERGE]
    if not merges:
        return pairs
    source = merges[0]
    if type(source) is yaml.SequenceNode and len(source.value) == 1:
        source = source.value[0]
    if len(merges) > 1 or type(source) is not yaml.MappingNode or source.tag != _MAP:
        raise _Unusual("a merge of several mappings or of something else")
    merged: list[tuple[yaml.Node, yaml.Node]] = source.value
    texts = {key_node.value for key_node, _value in merged}
    if len(texts) != len(merged) or any(
        key_node.tag in (_MERGE, "tag:yaml.org,2002:value") for key_node, _value in merged
    ):
        raise _Unusual("a merged mapping with a repeated key, or that merges itself")
    own = [(key_node, value_node) for key_node, value_node in pairs if key_node.tag != _MERGE]
    return merged + own


# Each YAML collection needs at least one indicator of its own: a bracket, or the `-`,
# `:` or `?` of its entries. Without aliases, a document with no more of them than the
# depth limit cannot be nested past it, which spares most files the graph walk.
_NOT_INDICATORS = bytes(c for c in range(256) if c not in b"[{-:?")


def _indicators(raw: bytes) -> int:
    return len(raw.translate(None, _NOT_INDICATORS))  # one pass in C


def graph_problem(root: yaml.Node) -> tuple[str, yaml.Node] | None:
    """Why a composed YAML document must not be constructed, and the node where that
    was found, or None: more than MAX_ALIASES alias uses, more than MAX_EXPANDED_NODES
    nodes once aliases are expanded, nesting past MAX_DOCUMENT_DEPTH (counted through
    aliases), or an alias inside the node it names. Iterative, and linear in the
    distinct nodes: an alias is a shared node here, whose expanded size and depth are
    computed once."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()
    aliases = 0
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children = _children(node)
        if finished:
            open_nodes.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = (
                (1 + max((depth[id(c)] for c in children), default=0))
                if isinstance(node, yaml.CollectionNode)
                else 0
            )
            if size[key] > MAX_EXPANDED_NODES:
                return (
                    f'aliases expand it past {MAX_EXPANDED_NODES:,} nodes (a "billion laughs"?);'
                    " not read",
                    node,
                )
            if depth[key] > MAX_DOCUMENT_DEPTH:
                return f"data is nested deeper than {messages.MAX_DEPTH} levels; not read", node
            continue
        if key in size:
            aliases += 1
            if aliases > MAX_ALIASES:
                return f"more than {MAX_ALIASES} aliases; not read", node
            continue
        if key in open_nodes:
            return "an alias refers to a node that contains it (a recursive alias); not read", node
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in reversed(children))
    return None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _clip(text: str, width: int = 300) -> str:
    """One line of at most `width` characters: an error is a line (YAML's own texts may
    span two), and a huge value quoted in one (jsonschema's do) must not make a huge one."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def load(
    files: Iterable[tuple[str, bytes]], *, problems: Iterable[ManifestError] = ()
) -> dict[keys.Target, Manifest]:
    """Every manifest among (path, file bytes) pairs by target; non-manifest files are
    skipped. `problems` are errors found while listing the files (refused names, links).
    Raises InvalidManifests with every error of every file if any is invalid."""
    return gather((parse_file(path, raw) for path, raw in files), problems=problems)


def cached(known: Iterable[tuple[str, bytes]]) -> Iterator[Manifest | list[ManifestError] | None]:
    """(path, message bytes) from the parse cache as parse_file would give them."""
    for path, value in known:
        target = classify(path)
        if target is None or isinstance(target, ManifestError):
            yield None if target is None else [target]
        else:
            yield Manifest(path, target, value)


def parse_paths(paths: Sequence[str], raw: bytes) -> list[Manifest | list[ManifestError] | None]:
    """parse_file's result for each of `paths`, which all hold the bytes `raw` (one git
    blob). The bytes and the directory decide what a file parses to (see cache_key), so
    they are parsed once a directory and the other paths get that result under their own
    name: one blob committed at a thousand paths costs one parse, not a thousand (and
    its message is held once)."""
    if len(paths) == 1:  # nearly every blob: no bookkeeping
        return [parse_file(paths[0], raw)]
    out: list[Manifest | list[ManifestError] | None] = []
    first: dict[str, Manifest | list[ManifestError]] = {}
    for path in paths:
        target = classify(path)
        if target is None or isinstance(target, ManifestError):
            out.append(None if target is None else [target])
            continue
        directory = path.rpartition("/")[0]
        done = first.get(directory)
        if done is None:
            done = first[directory] = parse(path, raw, target)
            out.append(done)
        elif isinstance(done, Manifest):
            out.append(Manifest(path, target, done.value, done.name))
        else:
            out.append([ManifestError(path, error.line, error.message) for error in done])
    return out


def parse_file(path: str, raw: bytes) -> Manifest | list[ManifestError] | None:
    """One file of the tree: its Manifest, its errors (a misplaced file, an invalid
    name, a manifest that does not parse), or None for a file that is no manifest."""
    target = classify(path)
    if target is None:
        return None
    if isinstance(target, ManifestError):
        return [target]
    return parse(path, raw, target)


def gather(
    results: Iterable[Manifest | list[ManifestError] | None],
    *,
    problems: Iterable[ManifestError] = (),
) -> dict[keys.Target, Manifest]:
    """The manifests by target from parse_file's results, in the order given: a second
    file for a target already defined is an error naming the first. Raises
    InvalidManifests with `problems` and every file's errors if there is any."""
    errors: list[ManifestError] = list(problems)
    out: dict[keys.Target, Manifest] = {}
    for result in results:
        if result is None:
            continue
        if isinstance(result, list):
            errors.extend(result)
            continue
        target = result.target
        other = out.get(target)
        if other is not None:
            errors.append(
                ManifestError(result.path, None, f"{other.path} already defines {target.path}")
            )
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
                        f"unknown key {_clip(repr(extra), 80)} (a manifest has `name`, "
                        "`data` and `rollout` only)",
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
        errors.append(ManifestError(path, _line_of(raw, where), _clip(message)))
    if not errors:
        # The schema accepted what the quick check refused: a name that the shared
        # key rules refuse but the schema's pattern lets through (a trailing newline).
        try:
            keys.validate_function(str(doc.get("name")) if isinstance(doc, dict) else str(doc))
            message = "manifest refused"
        except keys.InvalidName as exc:
            message = str(exc)
        errors.append(ManifestError(path, _line_of(raw, ("name",)), _clip(message)))
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
