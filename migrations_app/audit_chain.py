"""The audit log's hash chain: canonical serialization, hashing, verification, signed checkpoints.

Pure functions over plain dicts, so the verifier is the same for the database and for a copy of
it, and can be tested against any mutation without a database.

entry_hash = SHA-256( canonical JSON of the entry's content fields + prev_hash )
A checkpoint is (entry id, entry_hash, time) signed with HMAC-SHA256 under a key kept apart from
SECRET_KEY; it is written outside the database, so a log truncated after it is detected.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

GENESIS = "0" * 64

# The fields that are hashed, in this order: everything an auditor relies on.
CONTENT_FIELDS = (
    "created_at", "actor_id", "actor_name", "action", "outcome", "object_type", "object_id", "request_id",
    "vm_name", "reason", "before", "after", "task_id", "ip", "data",
)


def canonical(entry: dict) -> bytes:
    """One byte string per entry content: sorted keys, no whitespace, times as ISO 8601 text."""
    body = {}
    for name in CONTENT_FIELDS:
        value = entry.get(name)
        if hasattr(value, "isoformat"):
            value = value.isoformat()
        body[name] = value
    body["prev_hash"] = entry["prev_hash"]
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def entry_hash(entry: dict) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    entry_id: int
    entry_hash: str
    at: str
    signature: str

    def line(self) -> str:
        return json.dumps({"entry_id": self.entry_id, "entry_hash": self.entry_hash, "at": self.at,
                           "signature": self.signature}, sort_keys=True)


def sign(key: bytes, entry_id: int, hash_: str, at: str) -> Checkpoint:
    mac = hmac.new(key, f"{entry_id}|{hash_}|{at}".encode(), hashlib.sha256).hexdigest()
    return Checkpoint(entry_id, hash_, at, mac)


def parse_checkpoints(lines: Iterable[str]) -> Iterator[Checkpoint | str]:
    """Checkpoints from a file's lines; an unreadable line comes back as an error string."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            yield Checkpoint(int(raw["entry_id"]), str(raw["entry_hash"]), str(raw["at"]), str(raw["signature"]))
        except (ValueError, KeyError, TypeError):
            yield f"checkpoint line {number} is not readable"


@dataclass(frozen=True)
class Verdict:
    ok: bool
    checked: int
    problem: str = ""
    first_bad_id: int | None = None


def verify(entries: Iterable[dict], checkpoints: Iterable[Checkpoint | str] = (), key: bytes = b"") -> Verdict:
    """Walk the entries in id order; name the first one that breaks the chain or a checkpoint."""
    expected: dict[int, str] = {}
    last_checkpoint: Checkpoint | None = None
    for cp in checkpoints:
        if isinstance(cp, str):
            return Verdict(False, 0, cp)
        if not hmac.compare_digest(sign(key, cp.entry_id, cp.entry_hash, cp.at).signature, cp.signature):
            return Verdict(False, 0, f"the checkpoint at entry {cp.entry_id} has a bad signature")
        expected[cp.entry_id] = cp.entry_hash
        if last_checkpoint is None or cp.entry_id > last_checkpoint.entry_id:
            last_checkpoint = cp
    prev, prev_id, checked = GENESIS, 0, 0
    for entry in entries:
        checked += 1
        if entry["id"] <= prev_id:
            return Verdict(False, checked, f"entry {entry['id']} is out of order", entry["id"])
        if entry["prev_hash"] != prev:
            return Verdict(False, checked, f"entry {entry['id']} does not follow entry {prev_id} "
                                           "(an entry was removed, inserted or reordered)", entry["id"])
        actual = entry_hash(entry)
        if actual != entry["entry_hash"]:
            return Verdict(False, checked, f"entry {entry['id']} was altered after it was written", entry["id"])
        want = expected.pop(entry["id"], None)
        if want is not None and want != actual:
            return Verdict(False, checked, f"entry {entry['id']} differs from its signed checkpoint", entry["id"])
        prev, prev_id = actual, entry["id"]
    if expected:
        missing = min(expected)
        return Verdict(False, checked, f"signed checkpoint names entry {missing}, which is missing: "
                                       "the log was truncated or entries were removed", missing)
    return Verdict(True, checked)
