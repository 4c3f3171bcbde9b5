"""`-verify_commits ALLOWED_SIGNERS`: the commit a pass applies must carry a good SSH
signature by an allowed signer, checked by git itself (`git verify-commit` with
`gpg.format=ssh` and `gpg.ssh.allowedSignersFile`), so that whoever can push to the ops
repository without a signing key cannot reach the fleet through the reconciler.

The one place the reconciler runs `git verify-commit`; `reason` (pure) turns git's
answer into the text of the refusal.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

GIT_TIMEOUT_SECONDS = 60.0


class CommitRefused(ValueError):
    """The commit is not signed by an allowed signer; the text names it and says why."""


def reason(stderr: str) -> str:
    """The line of git's (and ssh-keygen's) output that says why a signature was refused."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        lowered = line.lower()
        if "no signature" in lowered:
            return "it is not signed"
        if "no principal matched" in lowered or "not allowed" in lowered:
            return f"its signer is not in the allowed signers file ({line})"
    # git verify-commit says nothing at all about a commit without a signature.
    return lines[-1] if lines else "it is not signed"


def verify(repo: Path, commit: str, *, allowed_signers: Path) -> str:
    """Check `commit`; returns git's description of the good signature, or raises
    CommitRefused."""
    if not allowed_signers.is_file():
        raise CommitRefused(f"-verify_commits: {str(allowed_signers)!r} is not a readable file")
    command = [
        "git",
        "-c", "gpg.format=ssh",
        "-c", f"gpg.ssh.allowedSignersFile={allowed_signers.absolute()}",
        "verify-commit", "--raw", commit,
    ]  # fmt: skip
    try:
        done = subprocess.run(
            command,
            cwd=repo,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=GIT_TIMEOUT_SECONDS,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CommitRefused(f"commit {commit[:12]}: cannot run git verify-commit: {exc}") from None
    if done.returncode != 0:
        raise CommitRefused(
            f"commit {commit[:12]} refused by -verify_commits: {reason(done.stderr)}; "
            "nothing was written"
        )
    return done.stderr.strip().splitlines()[0] if done.stderr.strip() else "good signature"
