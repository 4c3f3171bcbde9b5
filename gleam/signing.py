"""Signed task messages: Ed25519 keys in OpenSSH format, the signed bytes, sign and check.

A writer (gleam-reconcile or gleam-client with -sign_key) adds to the task message

    "Sig": {"alg": "ed25519", "key": "SHA256:<fingerprint>", "prev": P, "sig": "<base64>",
            "for": "<full task key>"}

where the signature covers the canonical JSON (sorted keys, no spaces, UTF-8) of

    {"Data": ..., "Name": ..., "Rollout": ... (only if the message has one),
     "key": "<full task key>", "prev": P}

and P is the task key's mod_revision the writer saw (etcd's revision if the key did not
exist); the write compares the key against P, so P is true when it lands. Binding the
key stops a message being copied to another host's key; P lets the agent refuse a
replayed older message. "for" is not trusted on its own: it only lets an agent say
which key a copied message was made for, after checking the signature against it.
Pure apart from `load_private_key`/`load_public_keys`, which read one file each.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gleam import flags, messages, protected_files

# cryptography itself is imported where a key is loaded or a signature checked: a
# reconciler without -sign_key or -verify_commits does not pay for loading OpenSSL's
# bindings at every start (a few per cent of a 10,000-manifest apply).
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

ALG = "ed25519"
SIG_FIELD = "Sig"
# The message fields the signature covers (besides the key and P); "Rollout" only when
# the message has one (rollouts carry it), so that older messages sign the same bytes.
SIGNED_FIELDS = ("Data", "Name")
OPTIONAL_SIGNED_FIELDS = ("Rollout",)
_ED25519_PREFIX = "ssh-ed25519"
# An OpenSSH Ed25519 private key file is about 400 bytes, a public key line about 100:
# the limits leave room for comments and thousands of keys, and keep a -trust pointing
# at a huge file (or one that grows) from filling the agent's memory.
MAX_KEY_FILE_BYTES = 64 * 1024
MAX_TRUST_FILE_BYTES = 1024 * 1024


# -sign_key (env GLEAM_SIGN_KEY) of gleam-reconcile and gleam-client.
FLAG = flags.Flag(
    "sign_key",
    "sign every task message written with this Ed25519 private key (OpenSSH format, "
    "unencrypted: ssh-keygen -t ed25519 -N '')",
    metavar="FILE",
)


class KeyError_(ValueError):  # noqa: N801 - KeyError is taken by the builtin
    """A key file that cannot be used; the text names the file (and line)."""


class SignatureError(ValueError):
    """A message whose signature does not hold; the text says why (after `signature: `)."""


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """`SHA256:<base64 of the SHA-256 of the key blob, unpadded>`, as `ssh-keygen -l`
    prints it."""
    from cryptography.hazmat.primitives import serialization

    line = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    blob = base64.b64decode(line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    return f"SHA256:{digest}"


@dataclass(frozen=True)
class Signer:
    """A private key and its fingerprint."""

    key: Ed25519PrivateKey
    fingerprint: str

    @classmethod
    def from_key(cls, key: Ed25519PrivateKey) -> Signer:
        return cls(key, fingerprint(key.public_key()))


def load_private_key(path: str | Path) -> Signer:
    """An unencrypted Ed25519 private key in OpenSSH format (`ssh-keygen -t ed25519 -N ''`)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        data = protected_files.read(
            path, rule=protected_files.Rule.PRIVATE, limit=MAX_KEY_FILE_BYTES, what="private key"
        )
    except protected_files.Refused as exc:
        raise KeyError_(str(exc)) from None
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        raise KeyError_(f"{path}: the key is encrypted; Gleam needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyError_(f"{path}: not an OpenSSH private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyError_(f"{path}: the key is not Ed25519 (make one with ssh-keygen -t ed25519)")
    return Signer.from_key(key)


def signer_from(values: Mapping[str, str | None]) -> Signer | None:
    """The -sign_key of resolved flag values (None without it); FlagError for a key file
    that cannot be used."""
    path = values.get(FLAG.name)
    if not path:
        return None
    try:
        return load_private_key(path)
    except KeyError_ as exc:
        raise flags.FlagError(f"-sign_key: {exc}") from None


def parse_public_keys(text: str, *, source: str) -> dict[str, Ed25519PublicKey]:
    """Ed25519 keys from `authorized_keys`-style lines (options before the key type and a
    comment after it are allowed; blank lines and # comments are skipped), by
    fingerprint. Any other line is an error naming `source` and the line number."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    found: dict[str, Ed25519PublicKey] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if _ED25519_PREFIX not in fields[:-1]:
            raise KeyError_(f"{source} line {number}: not an ssh-ed25519 public key")
        blob = fields[fields.index(_ED25519_PREFIX) + 1]
        try:
            key = serialization.load_ssh_public_key(f"{_ED25519_PREFIX} {blob}".encode("ascii"))
        except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
            raise KeyError_(f"{source} line {number}: bad ssh-ed25519 key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):  # pragma: no cover - the prefix says so
            raise KeyError_(f"{source} line {number}: not an ssh-ed25519 public key")
        found[fingerprint(key)] = key
    return found


def load_public_keys(path: str | Path) -> dict[str, Ed25519PublicKey]:
    """The trusted keys of a `-trust` file (at least one); the file must be writable by
    its reader (or root) alone (gleam/protected_files.py)."""
    try:
        data = protected_files.read(
            path, rule=protected_files.Rule.TRUSTED, limit=MAX_TRUST_FILE_BYTES, what="-trust file"
        )
        text = data.decode("utf-8")
    except protected_files.Refused as exc:
        raise KeyError_(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise KeyError_(f"{path}: the trusted keys are not UTF-8 text: {exc}") from None
    found = parse_public_keys(text, source=str(path))
    if not found:
        raise KeyError_(f"{path}: no ssh-ed25519 public key in the file")
    return found


def signed_bytes(message: Mapping[str, Any], *, key: str, prev: int) -> bytes:
    """The exact bytes the signature covers (see the module docstring)."""
    covered: dict[str, Any] = {name: message.get(name) for name in SIGNED_FIELDS}
    for name in OPTIONAL_SIGNED_FIELDS:
        if name in message:
            covered[name] = message[name]
    covered["key"] = key
    covered["prev"] = prev
    return messages.canonical_json(covered).encode("utf-8")


def sign(message: Mapping[str, Any], *, key: str, prev: int, signer: Signer) -> dict[str, Any]:
    """`message` with its "Sig" (any old one replaced) for the task key `key` at `prev`."""
    unsigned = {name: value for name, value in message.items() if name != SIG_FIELD}
    signature = signer.key.sign(signed_bytes(unsigned, key=key, prev=prev))
    unsigned[SIG_FIELD] = {
        "alg": ALG,
        "key": signer.fingerprint,
        "prev": prev,
        "sig": base64.b64encode(signature).decode("ascii"),
        "for": key,
    }
    return unsigned


def sign_task(task: messages.Task, *, key: str, prev: int, signer: Signer) -> bytes:
    """The task's message bytes, signed: what a writer puts at `key`."""
    # The unsigned message (its name, size and serialisability checked), "Rollout"
    # included when the task has one.
    return sign_encoded(task.encode(), key=key, prev=prev, signer=signer)


# An object key that json.dumps wrote from a number, a boolean or null: sort_keys sorted
# such keys as what they were (10 after 9), not as the strings they became, and a dict
# can hold both 1 and "1". Every object key in canonical bytes follows a "{" or a ","
# directly, so no match means every key was a string.
_NON_STRING_KEY = re.compile(rb'[{,]"(?:-?[0-9][0-9.eE+-]*|true|false|null)":')


def sign_encoded(unsigned: bytes, *, key: str, prev: int, signer: Signer) -> bytes:
    """The message bytes `unsigned`, as `messages.Task.encode` made them, signed for the
    task key `key` at `prev`: the same bytes as `canonical_json(sign(json.loads(unsigned)))`
    (tests/test_signing.py holds them to it), spliced instead of decoded and encoded again.

    The writer's shortcut only: these bytes are canonical JSON whose top-level keys are
    "Data", "Name" and maybe "Rollout", all of which sort before "key", "prev" and "Sig",
    so the signed bytes are the message with `,"key":...,"prev":P` before its closing
    brace, and the signed message is the message with `,"Sig":{...}` there. A verifier
    must never splice: it rebuilds the signed bytes from the message it decoded."""
    if (
        not unsigned.startswith(b'{"Data":')
        or not unsigned.endswith(b"}")
        or b'"Sig":' in unsigned  # an old Sig to drop (or the word in the data)
        or _NON_STRING_KEY.search(unsigned) is not None
    ):
        # Not the canonical form this shortcut needs (or an object key whose canonical
        # order changes once decoded): decode and encode, as a verifier will.
        signed = sign(json.loads(unsigned), key=key, prev=prev, signer=signer)
        return _within_limit(messages.canonical_json(signed).encode("utf-8"), key)
    body = unsigned[:-1]
    key_json = messages.canonical_json(key).encode("utf-8")
    at = str(prev).encode("ascii")
    signature = signer.key.sign(b"".join((body, b',"key":', key_json, b',"prev":', at, b"}")))
    out = b"".join(
        (
            body,
            b',"Sig":{"alg":"' + ALG.encode("ascii") + b'","for":',
            key_json,
            b',"key":"' + signer.fingerprint.encode("ascii") + b'","prev":',
            at,
            b',"sig":"',
            base64.b64encode(signature),
            b'"}}',
        )
    )
    return _within_limit(out, key)


def _within_limit(signed: bytes, key: str) -> bytes:
    """`signed`, or MessageError when the signature took it over the size agents accept
    (a message just under the limit unsigned would be written and then refused by every
    agent as too large)."""
    if len(signed) > messages.MAX_MESSAGE_BYTES:
        raise messages.MessageError(
            f"task message for {key} is {len(signed)} bytes once signed, over the "
            f"{messages.MAX_MESSAGE_BYTES}-byte limit agents accept"
        )
    return signed


@dataclass(frozen=True)
class Verified:
    """A signature that holds: by which key, and the P it was made at."""

    fingerprint: str
    prev: int


def verify(raw: bytes, *, key: str, trusted: Mapping[str, Ed25519PublicKey]) -> Verified:
    """Check the "Sig" of the message bytes `raw` found at the task key `key`; raises
    SignatureError whose text is the reason (`missing`, `unknown key SHA256:...`,
    `invalid`, `made for /gleam/node/web-1`). Whether P is recent enough is the caller's
    (it knows what it last ran)."""
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):
        raise SignatureError("missing") from None
    return verify_message(message, key=key, trusted=trusted)


def verify_message(message: Any, *, key: str, trusted: Mapping[str, Ed25519PublicKey]) -> Verified:
    """`verify` of a message already decoded (the agent's worker decodes it once): the
    signed bytes are rebuilt from the decoded values, never taken from the raw bytes,
    so what is checked is exactly what runs (a "Data" given twice is decoded as its
    last one, and that is the one checked)."""
    sig = message.get(SIG_FIELD) if isinstance(message, dict) else None
    if sig is None:
        raise SignatureError("missing")
    if not isinstance(sig, dict):
        raise SignatureError("invalid (Sig is not an object)")
    alg, fp, prev, value = sig.get("alg"), sig.get("key"), sig.get("prev"), sig.get("sig")
    if alg != ALG:
        raise SignatureError(f"invalid (alg {str(alg)[:40]!r}, not {ALG!r})")
    if not isinstance(fp, str) or not isinstance(value, str):
        raise SignatureError("invalid (Sig needs string key and sig)")
    if not isinstance(prev, int) or isinstance(prev, bool) or prev < 0:
        raise SignatureError("invalid (Sig prev is not a revision)")
    public = trusted.get(fp)
    if public is None:
        raise SignatureError(f"unknown key {fp[:80]}")
    try:
        signature = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("invalid (sig is not base64)") from None
    try:
        covered = signed_bytes(message, key=key, prev=prev)
    except (ValueError, RecursionError):  # a value json cannot write back (nested too deeply)
        raise SignatureError("invalid (the message cannot be encoded)") from None
    try:
        public.verify(signature, covered)
    except _invalid_signature():
        claimed = _claimed_key(message, sig.get("for"), public, signature, prev=prev, key=key)
        if claimed is not None:
            raise SignatureError(f"made for {claimed}") from None
        raise SignatureError("invalid") from None
    return Verified(fp, prev)


@functools.cache
def _invalid_signature() -> type[Exception]:
    """cryptography's InvalidSignature. An `except` clause's class is looked up only
    when something was raised, so a check that holds (an agent's every task) does not
    pay for the import statement (about 0.7 µs), and a process without keys never
    imports cryptography."""
    from cryptography.exceptions import InvalidSignature

    return InvalidSignature


def _claimed_key(
    message: Mapping[str, Any],
    claimed: object,
    public: Ed25519PublicKey,
    signature: bytes,
    *,
    prev: int,
    key: str,
) -> str | None:
    """The task key a signature that fails for `key` was made for: the Sig's "for",
    believed only if the signature holds for it."""
    if not isinstance(claimed, str) or claimed == key:
        return None
    try:
        public.verify(signature, signed_bytes(message, key=claimed, prev=prev))
    except _invalid_signature():
        return None
    return claimed[:300]


def unsigned_if_ours(raw: bytes, fingerprint: str) -> bytes | None:
    """The canonical message without its "Sig" when `raw` carries a Sig by the key
    `fingerprint`, else None: what a signing writer compares with the unsigned message
    it wants, so that a value it signed earlier is not seen as different. The signature
    is not checked here: a writer only skips a key whose value it wrote itself (the caller
    checks that the key was not written since)."""
    if b'"Sig"' not in raw:
        return None
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(message, dict):
        return None
    sig = message.pop(SIG_FIELD, None)
    if not isinstance(sig, dict) or sig.get("key") != fingerprint:
        return None
    return messages.canonical_json(message).encode("utf-8")
