"""Signed task messages (gleam/signing.py) and the agent's check (agent/trust.py): pure."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import assume, example, given
from hypothesis import strategies as st

from agent import trust
from gleam import keys, messages, signing

KEY = "/gleam/node/web-1"


def new_signer() -> signing.Signer:
    return signing.Signer.from_key(Ed25519PrivateKey.generate())


def public_line(signer: signing.Signer, comment: str = "ops@example") -> str:
    raw = signer.key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return f"{raw.decode()} {comment}"


def trusted(*signers: signing.Signer) -> dict[str, Any]:
    return {s.fingerprint: s.key.public_key() for s in signers}


SIGNER = new_signer()
TASK = messages.Task("config::sync", {"path": "/etc/app.conf", "mode": "0644"})


def signed(prev: int = 7, key: str = KEY, signer: signing.Signer = SIGNER) -> bytes:
    return signing.sign_task(TASK, key=key, prev=prev, signer=signer)


def test_signed_bytes_are_the_documented_canonical_json() -> None:
    message = {"Name": "print", "Data": {"b": 1, "a": "é"}}
    assert (
        signing.signed_bytes(message, key=KEY, prev=12)
        == ('{"Data":{"a":"é","b":1},"Name":"print","key":"/gleam/node/web-1","prev":12}').encode()
    )
    with_rollout = {**message, "Rollout": {"id": "r1"}}
    assert b'"Rollout":{"id":"r1"}' in signing.signed_bytes(with_rollout, key=KEY, prev=12)


def test_a_signed_message_verifies_with_any_ed25519_tool() -> None:
    raw = signed(prev=41)
    message = json.loads(raw)
    sig = message["Sig"]
    assert (sig["alg"], sig["key"], sig["prev"], sig["for"]) == (
        "ed25519",
        SIGNER.fingerprint,
        41,
        KEY,
    )
    covered = json.dumps(
        {"Data": message["Data"], "Name": message["Name"], "key": KEY, "prev": 41},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    SIGNER.key.public_key().verify(base64.b64decode(sig["sig"]), covered)
    assert messages.decode_task(raw) == TASK  # agents without -trust read it as before


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="no ssh-keygen on this machine")
def test_keys_made_by_ssh_keygen_load_and_fingerprints_match_its_own(tmp_path: Path) -> None:
    key_file = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ops", "-f", str(key_file)],
        check=True,
        timeout=30,
    )
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(key_file)], check=True, capture_output=True, text=True
    ).stdout.split()[1]
    signer = signing.load_private_key(key_file)
    assert signer.fingerprint == listed
    assert list(signing.load_public_keys(f"{key_file}.pub")) == [listed]


def test_trust_file_takes_authorized_keys_lines_and_names_a_bad_line(tmp_path: Path) -> None:
    other = new_signer()
    text = (
        f"# fleet signers\n\n{public_line(SIGNER)}\n"
        f'from="10.0.0.0/8",no-pty {public_line(other, "rotated in")}\n'
    )
    assert set(signing.parse_public_keys(text, source="t")) == {
        SIGNER.fingerprint,
        other.fingerprint,
    }
    with pytest.raises(signing.KeyError_, match="t line 2: not an ssh-ed25519"):
        signing.parse_public_keys("\nssh-rsa AAAAB3NzaC1yc2E= x\n", source="t")
    with pytest.raises(signing.KeyError_, match="t line 1: bad ssh-ed25519 key"):
        signing.parse_public_keys("ssh-ed25519 notbase64!! x\n", source="t")
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(signing.KeyError_, match="no ssh-ed25519 public key"):
        signing.load_public_keys(empty)
    with pytest.raises(signing.KeyError_, match="cannot open .*missing"):
        signing.load_public_keys(tmp_path / "missing")


def test_private_key_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("not a key")
    bad.chmod(0o600)
    with pytest.raises(signing.KeyError_, match=f"{bad}: not an OpenSSH private key"):
        signing.load_private_key(bad)
    if shutil.which("ssh-keygen") is not None:
        locked = tmp_path / "locked"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(locked)],
                       check=True, timeout=30)  # fmt: skip
        with pytest.raises(signing.KeyError_, match="encrypted"):
            signing.load_private_key(locked)
    with pytest.raises(signing.KeyError_, match="cannot open .*missing"):
        signing.load_private_key(tmp_path / "missing")


def private_key_file(path: Path, *, mode: int = 0o600) -> Path:
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_a_private_key_others_may_read_or_change_is_refused_as_ssh_does(
    tmp_path: Path, mode: int
) -> None:
    key = private_key_file(tmp_path / "key", mode=mode)
    with pytest.raises(signing.KeyError_, match=f"has mode {mode:04o}.*chmod 600"):
        signing.load_private_key(key)
    key.chmod(0o600)
    assert signing.load_private_key(key).fingerprint.startswith("SHA256:")
    key.chmod(0o400)
    assert signing.load_private_key(key).fingerprint.startswith("SHA256:")


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666, 0o620])
def test_a_trust_file_others_may_change_is_refused_as_sshd_does(tmp_path: Path, mode: int) -> None:
    trusted = tmp_path / "trusted"
    trusted.write_text(public_line(SIGNER) + "\n")
    trusted.chmod(mode)
    with pytest.raises(signing.KeyError_, match=f"has mode {mode:04o}, so other users may change"):
        signing.load_public_keys(trusted)
    trusted.chmod(0o644)  # readable by all is fine: public keys
    assert list(signing.load_public_keys(trusted)) == [SIGNER.fingerprint]


def test_key_files_that_are_not_regular_files_or_too_large_are_refused(tmp_path: Path) -> None:
    import os

    # /dev/zero would fill the memory; a FIFO would wait for a writer for ever.
    for load in (signing.load_private_key, signing.load_public_keys):
        with pytest.raises(signing.KeyError_, match="'/dev/zero' is not a regular file"):
            load("/dev/zero")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    for load in (signing.load_private_key, signing.load_public_keys):
        with pytest.raises(signing.KeyError_, match="is not a regular file"):
            load(fifo)
    huge = tmp_path / "huge"
    huge.write_text((public_line(SIGNER) + "\n") * (signing.MAX_TRUST_FILE_BYTES // 80))
    with pytest.raises(signing.KeyError_, match=f"is over {signing.MAX_TRUST_FILE_BYTES} bytes"):
        signing.load_public_keys(huge)
    big_key = private_key_file(tmp_path / "big")
    with big_key.open("ab") as handle:
        handle.write(b"#" * signing.MAX_KEY_FILE_BYTES)
    with pytest.raises(signing.KeyError_, match=f"is over {signing.MAX_KEY_FILE_BYTES} bytes"):
        signing.load_private_key(big_key)
    latin = tmp_path / "latin"
    latin.write_bytes(b"ssh-ed25519 \xff\n")
    with pytest.raises(signing.KeyError_, match="not UTF-8"):
        signing.load_public_keys(latin)


def test_files_owned_by_another_user_are_refused() -> None:
    import os
    import stat

    from gleam import protected_files

    def status(mode: int, uid: int) -> os.stat_result:
        return os.stat_result((stat.S_IFREG | mode, 0, 0, 1, uid, 0, 10, 0, 0, 0))

    private, trusted = protected_files.Rule.PRIVATE, protected_files.Rule.TRUSTED
    with pytest.raises(protected_files.Refused, match="a private key must belong to the user"):
        protected_files.check("k", status(0o600, 4242), rule=private, what="private key", uid=1000)
    with pytest.raises(protected_files.Refused, match=r"not by this user \(uid 1000\) or root"):
        protected_files.check("t", status(0o644, 4242), rule=trusted, what="-trust file", uid=1000)
    # sshd's rule: trusted keys may belong to root (or the reader); a private key to the
    # reader alone.
    protected_files.check("t", status(0o644, 0), rule=trusted, what="-trust file", uid=1000)
    protected_files.check("t", status(0o644, 1000), rule=trusted, what="-trust file", uid=1000)
    with pytest.raises(protected_files.Refused, match="owned by uid 0"):
        protected_files.check("k", status(0o600, 0), rule=private, what="private key", uid=1000)


def tampered(raw: bytes, **changes: Any) -> bytes:
    message = json.loads(raw)
    message.update(changes)
    return json.dumps(message).encode()


CASES = [
    ("unsigned", TASK.encode(), None, "signature: missing"),
    ("not JSON", b"{", None, "signature: missing"),
    ("unknown key", signed(signer=new_signer()), None, "signature: unknown key SHA256:"),
    ("tampered data", tampered(signed(), Data={"path": "/etc/shadow"}), None, "signature: invalid"),
    ("tampered name", tampered(signed(), Name="print"), None, "signature: invalid"),
    ("copied", signed(key="/gleam/node/web-2"), None, "signature: made for /gleam/node/web-2"),
    ("replay", signed(prev=12), 40, "signature: replay of an older task (prev 12 < last run 40)"),
    ("Sig a string", tampered(signed(), Sig="x"), None, "signature: invalid"),
    (
        "prev a bool",
        tampered(signed(), Sig={**json.loads(signed())["Sig"], "prev": True}),
        None,
        "signature: invalid",
    ),  # fmt: skip
    (
        "sig not base64",
        tampered(signed(), Sig={**json.loads(signed())["Sig"], "sig": "%%"}),
        None,
        "signature: invalid",
    ),  # fmt: skip
    (
        "other alg",
        tampered(signed(), Sig={**json.loads(signed())["Sig"], "alg": "rsa"}),
        None,
        "signature: invalid",
    ),  # fmt: skip
    (
        "lying for",
        tampered(signed(), Sig={**json.loads(signed())["Sig"], "for": "/gleam/x"}),
        None,
        None,
    ),  # fmt: skip
    ("good", signed(prev=40), 40, None),
    ("first run", signed(prev=3), None, None),
]


@pytest.mark.parametrize(("raw", "last_run", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_agent_check(raw: bytes, last_run: int | None, expected: str | None) -> None:
    refusal = trust.check(raw, key=KEY, last_run=last_run, trusted=trusted(SIGNER))
    if expected is None:
        assert refusal is None
    else:
        assert refusal is not None and refusal.startswith(expected), refusal


def worker_refusal(raw: bytes) -> str | None:
    """What the agent's worker does: decode the message with its limits (a message that
    fails is a "bad task message", not a signature matter), then check what it decoded."""
    try:
        _task, message = messages.decode_task_message(raw)
    except messages.MessageError:
        return "bad task message"
    return trust.check_message(message, key=KEY, last_run=None, trusted=trusted(SIGNER))


@given(st.binary(max_size=300))
def test_any_bytes_give_a_refusal_never_a_crash(raw: bytes) -> None:
    refusal = trust.check(raw, key=KEY, last_run=None, trusted=trusted(SIGNER))
    assert refusal is not None and refusal.startswith("signature: ")
    through_worker = worker_refusal(raw)
    assert through_worker is not None
    assert through_worker.startswith(("signature: ", "bad task message"))


def test_gate_remembers_the_last_revision_and_reloads(tmp_path: Path) -> None:
    from agent import pending

    trust_file = tmp_path / "trusted"
    trust_file.write_text(public_line(SIGNER) + "\n")
    gate = trust.Gate(trust_file)
    gate.seed({KEY: pending.Completed(40)})
    old, new = signed(prev=12), signed(prev=50)
    assert gate.refusal(pending.Job(KEY, 50, old), json.loads(old)) == (
        "signature: replay of an older task (prev 12 < last run 40)"
    )
    assert gate.refusal(pending.Job(KEY, 51, new), json.loads(new)) is None
    rotated = new_signer()
    trust_file.write_text(public_line(rotated) + "\n")
    gate.reload()
    assert gate.fingerprints == [rotated.fingerprint]
    trust_file.write_text("garbage\n")
    gate.reload()  # keeps the keys in use
    assert gate.fingerprints == [rotated.fingerprint]
    trust_file.write_text(public_line(new_signer()) + "\n")
    trust_file.chmod(0o666)  # anyone may now add a key: refused, the keys in use kept
    gate.reload()
    assert gate.fingerprints == [rotated.fingerprint]


def test_worst_values_in_a_signed_message_are_refused_cleanly() -> None:
    deep = (
        b'{"Name":"print","Data":'
        + b"[" * 5000
        + b"]" * 5000
        + b',"Sig":'
        + json.dumps(json.loads(signed())["Sig"]).encode()
        + b"}"
    )
    refusal = trust.check(deep, key=KEY, last_run=None, trusted=trusted(SIGNER))
    assert refusal is not None and refusal.startswith("signature: ")
    assert worker_refusal(deep) is not None
    huge_prev = tampered(signed(), Sig={**json.loads(signed())["Sig"], "prev": 10**100})
    assert trust.check(huge_prev, key=KEY, last_run=None, trusted=trusted(SIGNER)) == (
        "signature: invalid"
    )
    assert worker_refusal(huge_prev) is not None
    unicode = signing.sign_task(messages.Task("print", {"ü": "✓\u2028"}), key=KEY, prev=1,
                                signer=SIGNER)  # fmt: skip
    assert trust.check(unicode, key=KEY, last_run=1, trusted=trusted(SIGNER)) is None


# The writer's shortcut (signing.sign_encoded splices the signature into the canonical
# bytes) against the reference: decode the message, sign it, encode it canonically.


def reference_signed(task: messages.Task, *, key: str, prev: int) -> bytes:
    message = json.loads(task.encode())
    return messages.canonical_json(
        signing.sign(message, key=key, prev=prev, signer=SIGNER)
    ).encode()


_FLOATS = st.floats(allow_nan=False, allow_infinity=False)
_SCALARS = st.none() | st.booleans() | st.integers() | _FLOATS | st.text()


def _containers(children: Any) -> Any:
    # Object keys as YAML gives them: strings, but also numbers and booleans, which
    # json.dumps sorts as what they were (10 after 9) before writing them as strings.
    return (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(), children, max_size=4)
        | st.dictionaries(st.integers() | _FLOATS, children, max_size=4)
        | st.dictionaries(st.booleans(), children, max_size=2)
    )


_DATA = st.recursive(_SCALARS, _containers, max_leaves=24)
_NAMES = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,12}(::[A-Za-z0-9_][A-Za-z0-9_-]{0,12}){0,2}",
                       fullmatch=True)  # fmt: skip
_KEYS = st.sampled_from([KEY, "/gleam/region/eu-west", "/a/b/node/x.y_z-1", "/g/node/" + "n" * 128])


@given(
    name=_NAMES,
    data=_DATA,
    rollout=st.none() | st.dictionaries(st.text(max_size=8), _DATA, max_size=3),
    key=_KEYS,
    prev=st.integers(min_value=0, max_value=2**63 - 1),
)
@example(name="print", data=None, rollout=None, key=KEY, prev=0)
@example(name="print", data={}, rollout={}, key=KEY, prev=1)
@example(name="print", data={10: "a", 9: "b"}, rollout=None, key=KEY, prev=5)
@example(name="print", data={"Sig": {"key": 1}, "x": '"Sig":'}, rollout=None, key=KEY, prev=5)
@example(name="print", data={"ü": "✓\u2028\u0000\"\\", "a": [1.5, -0.0, 1e300, 10**40]},
         rollout={"id": "r1", "waves": [1, 2]}, key=KEY, prev=7)  # fmt: skip
@example(name="print", data={"big": "x" * 200_000, "n": list(range(2000))}, rollout=None,
         key=KEY, prev=99)  # fmt: skip
def test_the_writers_spliced_signature_is_byte_identical_to_the_reference(
    name: str, data: Any, rollout: dict[str, Any] | None, key: str, prev: int
) -> None:
    task = messages.Task(name, data, rollout=rollout)
    try:
        task.encode()
    except (messages.MessageError, ValueError):
        assume(False)  # data no writer may send (mixed key types, too large, ...)
    fast = signing.sign_task(task, key=key, prev=prev, signer=SIGNER)
    assert fast == reference_signed(task, key=key, prev=prev)
    assert trust.check(fast, key=key, last_run=prev, trusted=trusted(SIGNER)) is None


CRAFTED_TAILS = [
    b',"Data":{"path":"/etc/shadow"}',
    b',"Name":"evil::payload"',
    b',"Rollout":{"id":"r9"}',
    b',"Data":null',
]


@pytest.mark.parametrize("tail", CRAFTED_TAILS)
def test_a_field_given_again_after_the_sig_is_refused(tail: bytes) -> None:
    # JSON decoders keep the last of a key given twice: the agent would run the field
    # appended after the Sig, so the check must cover what was decoded, not the bytes
    # that came first.
    crafted = signed(prev=40)[:-1] + tail + b"}"
    task, message = messages.decode_task_message(crafted)
    assert (task.name, task.data, task.rollout) != (TASK.name, TASK.data, TASK.rollout)
    assert trust.check(crafted, key=KEY, last_run=None, trusted=trusted(SIGNER)) == (
        "signature: invalid"
    )
    assert trust.check_message(message, key=KEY, last_run=None, trusted=trusted(SIGNER)) == (
        "signature: invalid"
    )


def test_a_field_given_twice_before_the_signed_one_runs_the_signed_one() -> None:
    # The first of two "Data" is dropped by the decoder: what runs is what was signed.
    crafted = b'{"Data":{"path":"/etc/shadow"},' + signed(prev=40)[1:]
    task, message = messages.decode_task_message(crafted)
    assert task == TASK
    assert trust.check_message(message, key=KEY, last_run=None, trusted=trusted(SIGNER)) is None


def test_the_worker_refuses_a_crafted_message_without_running_it(tmp_path: Path) -> None:
    from agent import pending
    from agent.task_queue import TaskQueue
    from agent.worker import Worker
    from tests.test_agent_results import FakeOutcome, FakeRunner, Sink

    trust_file = tmp_path / "trusted"
    trust_file.write_text(public_line(SIGNER) + "\n")
    runner = FakeRunner(FakeOutcome(True, "ran", None, 1.0))
    layout = keys.Layout("/gleam")
    worker = Worker(TaskQueue(), runner, Sink(), agent_id="web-1", layout=layout,
                    gate=trust.Gate(trust_file))  # fmt: skip
    crafted = signed(prev=40)[:-1] + CRAFTED_TAILS[0] + b"}"
    record = worker.execute(pending.Job(KEY, 41, crafted))
    assert (record.ok, record.error, runner.calls) == (False, "signature: invalid", [])
    record = worker.execute(pending.Job(KEY, 42, signed(prev=41)))
    assert record.ok and runner.calls == [(TASK.name, TASK.data)]


def test_a_message_the_signature_takes_over_the_size_limit_is_refused_by_the_signer() -> None:
    """Signing adds about 250 bytes: a message just under the agents' limit would be
    written and then refused by every agent, so the writer refuses it, naming the key
    (on the spliced path and on the decode-and-encode one)."""
    key = "/gleam/node/web-1"
    for data in ("x", {"1": "x"}):  # a number-like key takes the decode-and-encode path
        overhead = len(messages.Task("print", data).encode()) - 1
        filler = "x" * (messages.MAX_MESSAGE_BYTES - overhead - 10)
        big = messages.Task("print", filler if data == "x" else {"1": filler})
        assert len(big.encode()) <= messages.MAX_MESSAGE_BYTES
        with pytest.raises(
            messages.MessageError, match=f"task message for {key} is .* once signed"
        ):
            signing.sign_task(big, key=key, prev=7, signer=SIGNER)
    small = messages.Task("print", "x" * 1000)
    assert len(signing.sign_task(small, key=key, prev=7, signer=SIGNER)) < 2000
