"""A two-tier, byte-bounded store of chunk KV with Cache-Craft-style eviction.

Entries are addressed by `chunk_key` digests (tokens + model + cache salt + layout; see
`hashing.py`), so tenant isolation is a property of the key: a chunk stored under one
`cache_salt` can only be found again under the same salt.

Tiers: ``device`` (accelerator memory, small) and ``host`` (CPU memory, larger), each with
its own byte budget that the store never exceeds. A new entry goes to the device tier;
making room there *demotes* the least useful device entries to the host tier, and making
room in the host tier *evicts* (drops) its least useful entries. A hit on a host entry
*promotes* it back to the device tier (which may demote others). An entry larger than the
device budget lives on the host only; one larger than both budgets is refused.

Usefulness (after Cache-Craft): ``utility = (hits + 1) * recompute_cost / nbytes``, the
prefill work a kept entry is expected to save per byte it occupies; ``recompute_cost``
defaults to ``tokens * layers``. The lowest utility goes first; ties go to the least
recently used. All sizes are in bytes of the stored tensors (any dtype, packed formats
included).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Literal

import torch

Tier = Literal["device", "host"]
TIERS: tuple[Tier, Tier] = ("device", "host")


class ChunkStoreError(ValueError):
    """A chunk the store cannot hold (too large for every tier) or malformed chunk KV."""


@dataclass(frozen=True)
class ChunkKV:
    """The KV of one chunk: one K and one V tensor per layer, token-major (``[T, ...]``).

    `start_position` is the position of the chunk's first token when its post-RoPE keys
    were computed (needed to re-rotate them for a new position, see `rope.py`).
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    start_position: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        object.__setattr__(self, "values", tuple(self.values))
        if not self.keys or len(self.keys) != len(self.values):
            raise ChunkStoreError(f"chunk KV needs one K and one V tensor per layer, got "
                                  f"{len(self.keys)} K and {len(self.values)} V")
        n = self.keys[0].shape[0] if self.keys[0].dim() else 0
        if n < 1:
            raise ChunkStoreError("chunk KV tensors must be token-major with at least one token")
        for i, t in enumerate(self.keys + self.values):
            if t.dim() == 0 or t.shape[0] != n:
                raise ChunkStoreError(f"tensor {i} has {t.shape[0] if t.dim() else 0} tokens "
                                      f"on dim 0, expected {n}")
        if self.start_position < 0:
            raise ChunkStoreError(f"start_position must be >= 0, got {self.start_position}")

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def to(self, device: torch.device | str, pin_memory: bool = False) -> ChunkKV:
        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device)
            return t.pin_memory() if pin_memory and not t.is_pinned() else t
        return ChunkKV(tuple(move(t) for t in self.keys), tuple(move(t) for t in self.values),
                       self.start_position)


@dataclass
class _Entry:
    key: str
    kv: ChunkKV
    nbytes: int
    recompute_cost: float
    last_use: int
    hits: int = 0
    tier: Tier | None = None  # None while moving between tiers

    @property
    def utility(self) -> float:
        return (self.hits + 1) * self.recompute_cost / self.nbytes


@dataclass(frozen=True)
class ChunkStoreStats:
    """Counters and gauges of a `ChunkStore` (for metrics)."""

    hits: int
    misses: int
    puts: int
    refused: int
    promotions: int
    demotions: int
    evictions: int
    entries: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    budget_bytes: dict[str, int] = field(default_factory=dict)


class ChunkStore:
    """Chunk KV keyed by `chunk_key`, in a device tier and a host tier, each byte-bounded."""

    def __init__(self, device_budget_bytes: int, host_budget_bytes: int, *,
                 device: torch.device | str = "cpu", host_device: torch.device | str = "cpu",
                 pin_host_memory: bool = False) -> None:
        for name, value in (("device_budget_bytes", device_budget_bytes),
                            ("host_budget_bytes", host_budget_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        self._budget: dict[Tier, int] = {"device": device_budget_bytes,
                                         "host": host_budget_bytes}
        self._where: dict[Tier, torch.device] = {"device": torch.device(device),
                                                 "host": torch.device(host_device)}
        self._pin = pin_host_memory and torch.cuda.is_available()
        self._entries: dict[str, _Entry] = {}
        self._bytes: dict[Tier, int] = {"device": 0, "host": 0}
        self._clock = 0
        self._lock = threading.RLock()
        self._hits = self._misses = self._puts = self._refused = 0
        self._promotions = self._demotions = self._evictions = 0

    # ---------------------------------------------------------------- public API

    def put(self, key: str, kv: ChunkKV, recompute_cost: float | None = None) -> Tier:
        """Store `kv` under `key` and return the tier it landed in.

        A key already present is only marked as used (same key means same content).
        Raises `ChunkStoreError` when the chunk is larger than both budgets.
        """
        if not isinstance(key, str) or not key:
            raise ValueError("key must be a non-empty string (see chunk_key)")
        if not isinstance(kv, ChunkKV):
            raise TypeError(f"kv must be a ChunkKV, got {type(kv).__name__}")
        cost = float(kv.num_tokens * kv.num_layers if recompute_cost is None else recompute_cost)
        if not cost > 0:
            raise ValueError(f"recompute_cost must be > 0, got {recompute_cost!r}")
        with self._lock:
            existing = self._entries.get(key)
            if existing is not None:
                existing.last_use = self._tick()
                assert existing.tier is not None
                return existing.tier
            nbytes = kv.nbytes
            if nbytes > max(self._budget.values()):
                self._refused += 1
                raise ChunkStoreError(
                    f"chunk of {nbytes} bytes ({kv.num_tokens} tokens x {kv.num_layers} layers) "
                    f"exceeds both tier budgets (device {self._budget['device']} B, host "
                    f"{self._budget['host']} B); raise the budgets or mark smaller chunks")
            entry = _Entry(key, kv, nbytes, cost, last_use=self._tick())
            self._entries[key] = entry
            self._puts += 1
            self._admit(entry, "device")
            assert entry.tier is not None
            return entry.tier

    def get(self, key: str, promote: bool = True) -> ChunkKV | None:
        """The chunk KV stored under `key` (counted as a hit), or None (a miss).

        A hit on a host entry moves it to the device tier when `promote` and it fits the
        device budget. The returned tensors stay valid if the entry later moves.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._hits += 1
            entry.hits += 1
            entry.last_use = self._tick()
            if (promote and entry.tier == "host"
                    and entry.nbytes <= self._budget["device"]):
                self._detach(entry)
                self._promotions += 1
                self._admit(entry, "device")
            return entry.kv

    def tier_of(self, key: str) -> Tier | None:
        """Where `key` is stored, without counting a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.tier

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def remove(self, key: str) -> bool:
        """Drop `key`; True if it was stored (not counted as an eviction)."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self._detach(entry)
            return True

    def utility(self, key: str) -> float | None:
        """The eviction utility of `key` (higher stays longer), or None if absent."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.utility

    def stats(self) -> ChunkStoreStats:
        with self._lock:
            entries = {t: sum(1 for e in self._entries.values() if e.tier == t) for t in TIERS}
            return ChunkStoreStats(
                hits=self._hits, misses=self._misses, puts=self._puts, refused=self._refused,
                promotions=self._promotions, demotions=self._demotions,
                evictions=self._evictions, entries=entries, bytes=dict(self._bytes),
                budget_bytes=dict(self._budget))

    # ---------------------------------------------------------------- internals

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _detach(self, entry: _Entry) -> None:
        """Take `entry` out of its tier's byte count (it stays in `_entries`)."""
        if entry.tier is not None:
            self._bytes[entry.tier] -= entry.nbytes
            entry.tier = None

    def _admit(self, entry: _Entry, tier: Tier) -> None:
        """Place a detached entry in `tier`, making room; device falls back to host."""
        if entry.nbytes > self._budget[tier]:
            if tier == "device":
                self._admit(entry, "host")
            else:  # cannot be held anywhere any more
                del self._entries[entry.key]
                self._evictions += 1
            return
        self._make_room(tier, entry.nbytes)
        if entry.kv.keys[0].device != self._where[tier] or (tier == "host" and self._pin):
            entry.kv = entry.kv.to(self._where[tier], pin_memory=tier == "host" and self._pin)
        entry.tier = tier
        self._bytes[tier] += entry.nbytes

    def _make_room(self, tier: Tier, nbytes: int) -> None:
        while self._bytes[tier] + nbytes > self._budget[tier]:
            victim = min((e for e in self._entries.values() if e.tier == tier),
                         key=lambda e: (e.utility, e.last_use))
            self._detach(victim)
            if tier == "device":
                self._demotions += 1
                self._admit(victim, "host")
            else:
                del self._entries[victim.key]
                self._evictions += 1
