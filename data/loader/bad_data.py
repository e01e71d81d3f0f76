"""Bad data: the kinds of defect, the exception that names one, and the counts that travel to the trainer.

A broken sample never crashes a run and is never trained on silently. The task encoder turns each
defect into a :class:`SkippedSample` that rides in the pack it would have joined, so every skip is
counted exactly once, in the batch that reaches the trainer, even across loader worker processes
and checkpoint restores. :class:`DataStats` sums those per-pack counts on the trainer side and
stops the run when more than ``--max-bad-sample-fraction`` of the samples read were broken.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from data.loader.peer_formats import NORMALISATIONS, WARNINGS
from dit.errors import TrainingStopped

MAX_EXAMPLES = 8  # skipped samples remembered by key and shard, for the log


class SkipKind(str, enum.Enum):  # noqa: UP042 -- StrEnum would change str()/format() of members (f"{e.kind}")
    """Why a sample was left out of training."""

    CORRUPT_MEMBER = "corrupt_member"  # a .pth / .pickle payload that does not decode (truncated, garbage)
    CORRUPT_SHARD = (
        "corrupt_shard"  # the tar does not read where its index points (deleted, emptied, cut short after prepare)
    )
    UNSAFE_PICKLE = "unsafe_pickle"  # .pickle names code (a global no array needs); refused unrun (dit.safe_pickle)
    SAMPLE_ERROR = "sample_error"  # reading, cooking or decoding raised an exception no check foresaw
    NOT_A_LATENT = (
        "not_a_latent"  # .pth is not a dense float tensor [C, T, H, W] / [C, H, W] with --latent-channels, no side 0
    )
    OVERSIZED_STORAGE = "oversized_storage"  # a tensor stored with far more data than it shows (a view of a larger
    # one), or whose torch.save bytes declare more than they hold (compressed: a deflate bomb)
    NON_FINITE = "non_finite"  # NaN or Inf in the latent or the text embedding
    MEMBER_TOO_LARGE = (
        "member_too_large"  # a tar member declares more bytes than its shard holds for it (sparse, forged)
    )
    MISSING_MEMBER = "missing_member"  # no .pth, .pickle or .json in the sample
    INVALID_JSON = "invalid_json"  # .json is not a JSON object (too deeply nested included)
    BAD_METADATA = "bad_metadata"  # fps in the .json that is not a finite positive number under --fps-conditioning
    MISSING_FPS = "missing_fps"  # a video without fps in its .json under --fps-conditioning
    BAD_LABEL = "bad_label"  # class-conditioned run: no label in the .json, or one outside [0, --num-classes)
    BAD_TEXT_EMBEDDING = "bad_text_embedding"  # .pickle is not a dense float [L, --text-embed-dim], L >= 1
    GRID_NOT_DIVISIBLE = "grid_not_divisible"  # latent frames/height/width not divisible by the patch
    OVERSIZE = "oversize"  # longer than --max-seq-length: a sizing problem, not broken data
    TEXT_OVERSIZE = "text_oversize"  # text embedding longer than --max-text-length: a sizing problem too


SIZING = frozenset({SkipKind.OVERSIZE, SkipKind.TEXT_OVERSIZE})
BAD_DATA = frozenset(SkipKind) - SIZING


class BadSample(Exception):
    """Raised by the format checks; the task encoder turns it into a :class:`SkippedSample` marker.

    ``flag`` names the flag the sample contradicts where there is one (``--latent-channels``), and
    ``value`` what the sample has instead (its channel count): when no sample of a dataset fits,
    :mod:`data.loader.launch_check` tells the user which flag to set, and to what. ``also``: the sample's other
    defects, found by the checks that ran after this one's.
    """

    def __init__(self, kind: SkipKind, detail: str, flag: str | None = None, value: int | None = None):
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail
        self.flag = flag
        self.value = value
        self.also: list[BadSample] = []


class BadDataError(TrainingStopped):
    """The run stops: too much of the dataset is broken, or a sample broke a rejecting policy."""


@dataclass
class SkipRecord:
    kind: str
    key: str
    shard: str
    detail: str


@dataclass
class DataStats:
    """Counts over the samples of some packs: one pack's in a batch, the run's on the trainer."""

    read: int = 0  # samples drawn from the dataset, good or not
    trained: int = 0  # samples placed in a pack
    skipped: dict[str, int] = field(default_factory=dict)  # by SkipKind value
    examples: list[SkipRecord] = field(default_factory=list)  # the first MAX_EXAMPLES skips
    longest: int = 0  # tokens (padded) of the longest sample read, oversize ones included: what --max-seq-length needs
    formats: dict[str, int] = field(default_factory=dict)  # samples trained by writer recognised (peer_formats)
    normalised: dict[str, int] = field(default_factory=dict)  # samples trained by normalisation applied
    notes: dict[str, str] = field(default_factory=dict)  # the first sample's detail of each normalisation

    @property
    def bad(self) -> int:
        return sum(n for kind, n in self.skipped.items() if SkipKind(kind) in BAD_DATA)

    def add(self, other: DataStats) -> None:
        self.read += other.read
        self.trained += other.trained
        self.skipped = dict(Counter(self.skipped) + Counter(other.skipped))
        self.examples.extend(other.examples[: MAX_EXAMPLES - len(self.examples)])
        self.longest = max(self.longest, other.longest)
        self.formats = dict(Counter(self.formats) + Counter(other.formats))
        self.normalised = dict(Counter(self.normalised) + Counter(other.normalised))
        self.notes = {**other.notes, **self.notes}

    def check(self, max_bad_fraction: float, read: int | None = None) -> None:
        """Raise :class:`BadDataError` when the broken fraction of the samples read exceeds the limit.

        ``read``: the samples read so far where more were read than have reached the trainer (the rest of a
        packing buffer whose skips came first); by default :attr:`read`. It is checked once at least
        ``1 / max_bad_fraction`` samples were read: before that, a single broken sample would already
        exceed the fraction.
        """
        read = max(self.read, read or 0)
        if max_bad_fraction > 0 and read < math.ceil(1 / max_bad_fraction):
            return
        if self.bad > max_bad_fraction * read:
            raise BadDataError(
                f"{self.bad} of {read} samples read ({self.bad / read:.1%}) were broken, more than "
                f"--max-bad-sample-fraction {max_bad_fraction}: {self.describe()}. Fix or drop those shards "
                "(python -m data.report DATASET lists them), or raise the limit if this is expected."
            )

    def warnings(self) -> dict[str, str]:
        """The normalisations applied so far that deserve a warning, each with what it did (for the trainer's log)."""
        return {name: NORMALISATIONS[name] for name in self.normalised if name in WARNINGS}

    def describe(self) -> str:
        """One line for the log: counts by kind and the first few skipped samples."""
        kinds = ", ".join(f"{k}={n}" for k, n in sorted(self.skipped.items())) or "none"
        first = "; ".join(f"{e.kind} {e.key} ({e.detail})" for e in self.examples)
        return f"skipped {sum(self.skipped.values())} of {self.read} read [{kinds}]" + (
            f"; first: {first}" if first else ""
        )

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DataStats:
        return cls(
            **{**state, "skipped": dict(state["skipped"]), "examples": [SkipRecord(**e) for e in state["examples"]]}
        )
