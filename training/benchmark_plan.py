"""Which composites a VGG-MonoAudio-style benchmark holds: partner choice and item names.

A benchmark item is a *target* clip and a *partner* clip shown side by side; the model is asked
for the target's label and must produce the target's sound only. Two subsets (the released
set's folders):

* ``inter_class``: the partner's sound belongs to another kind of source. Its label differs from
  the target's, and where both clips have a ``category`` the categories differ too
  (``dog barking`` next to ``playing cello``): the easy case.
* ``intra_class``: the partner is of the same category but has another label (``playing cello``
  next to ``playing violin``): the hard case, two similar sources the prompt must tell apart.
  "Same class" cannot mean "same label": with two ``dog barking`` halves no prompt can say which
  half is meant, and the negative prompt (the partner's label) would be the prompt itself. So
  intra-class pairs need a coarser grouping than labels: the table's optional ``category`` column
  (the release records a ``target_category`` such as ``music`` or ``human``). Clips without one
  take part in ``inter_class`` only.

Labels are compared after case folding and joining runs of white space, so ``Dog  barking`` and
``dog barking`` count as one prompt. Per target and subset, ``partners`` distinct partners are drawn
uniformly without replacement from the eligible clips (all of them where fewer are eligible), by a
generator seeded from (seed, subset, target id): a target's partners do not depend on the order of
the table's rows or on which subset is planned first. Every pair appears twice, with the target on
the left and on the right, so a model that always answers with one side scores at chance.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SUBSETS = ("intra_class", "inter_class")
PLACEMENTS = ("left", "right")
DEFAULT_PARTNERS = 4  # per target and subset: the release has ~4 (67 clips, 560 + 511 composites)
SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]*$")  # ids become file names: no separators, no dot first


@dataclass(frozen=True)
class BenchClip:
    """A usable single-source clip: one input row that decoded well."""

    id: str  # the table's id; part of every file name the clip appears in
    path: str  # the media file as opened (resolved against the table's folder)
    start: float  # seconds into the file where the clip starts
    label: str  # the prompt asking for this clip's sound
    category: str | None  # coarse group for intra-class pairs; None where the table has none
    row: int  # the table's data row (for messages)

    @property
    def prompt_key(self) -> str:
        return normalise_label(self.label)

    @property
    def category_key(self) -> str | None:
        return normalise_label(self.category) if self.category else None


@dataclass(frozen=True)
class PlannedItem:
    """One composite: ``target`` on the ``placement`` side, ``partner`` on the other."""

    subset: str
    target: BenchClip
    partner: BenchClip
    placement: str  # "left" | "right": where the target is

    @property
    def name(self) -> str:
        """``<target>_<partner>_<placement>``: the official repository's naming (its example composite
        ``3qesirWAGt4_000020_AHom7lBbtoY_000030_left`` asks for the first clip's "dog barking")."""
        return f"{self.target.id}_{self.partner.id}_{self.placement}"


def normalise_label(text: str) -> str:
    return " ".join(text.split()).casefold()


def eligible(subset: str, target: BenchClip, partner: BenchClip) -> bool:
    """Whether ``partner`` may stand next to ``target`` in ``subset`` (rules in the module doc)."""
    if partner.id == target.id or partner.prompt_key == target.prompt_key:
        return False
    if subset == "intra_class":
        return target.category_key is not None and target.category_key == partner.category_key
    if subset == "inter_class":
        both = target.category_key is not None and partner.category_key is not None
        return not (both and target.category_key == partner.category_key)
    raise ValueError(f"unknown subset {subset!r}; expected one of {', '.join(SUBSETS)}")


def _generator(seed: int, subset: str, target_id: str) -> np.random.Generator:
    # blake2b, not hash(): Python salts string hashes per process, and the plan must be the same anywhere
    digest = hashlib.blake2b(f"selva.benchmark:{int(seed)}:{subset}:{target_id}".encode(), digest_size=8).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))


def choose_partners(
    clips: Sequence[BenchClip], subset: str, *, seed: int, partners: int = DEFAULT_PARTNERS
) -> list[tuple[BenchClip, BenchClip]]:
    """(target, partner) pairs of ``subset``: targets in ``clips`` order, each target's partners in
    ``clips`` order. Candidates are taken in id order before drawing, so the draw does not depend
    on the table's row order either."""
    if partners < 1:
        raise ValueError(f"partners must be >= 1, got {partners}")
    by_id = sorted(clips, key=lambda c: c.id)
    order = {c.id: i for i, c in enumerate(clips)}
    pairs: list[tuple[BenchClip, BenchClip]] = []
    for target in clips:
        pool = [c for c in by_id if eligible(subset, target, c)]
        if not pool:
            continue
        count = min(partners, len(pool))
        picked = _generator(seed, subset, target.id).choice(len(pool), size=count, replace=False)
        chosen = sorted((pool[int(i)] for i in picked), key=lambda c: order[c.id])
        pairs.extend((target, partner) for partner in chosen)
    return pairs


def plan_items(clips: Sequence[BenchClip], *, seed: int, partners: int = DEFAULT_PARTNERS,
               reciprocal: bool = False) -> list[PlannedItem]:
    """Every composite of both subsets: per pair, the target left, then the target right.

    ``reciprocal``: each drawn pair (A, B) also brings (B, A) when it was not drawn, so every composite
    picture is asked for each of its two objects (A left of B is item A-B-left and item B-A-right);
    the synthetic proof scores a composite against both objects' events this way."""
    items: list[PlannedItem] = []
    for subset in SUBSETS:
        pairs = choose_partners(clips, subset, seed=seed, partners=partners)
        if reciprocal:
            drawn = {(t.id, p.id) for t, p in pairs}
            for target, partner in list(pairs):
                if (partner.id, target.id) not in drawn:
                    drawn.add((partner.id, target.id))
                    pairs.append((partner, target))
        items += [PlannedItem(subset, t, p, placement) for t, p in pairs for placement in PLACEMENTS]
    return items
