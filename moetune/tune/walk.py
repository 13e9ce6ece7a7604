"""The order in which each process of a shared run visits the batch sizes.

Every process joins any study that still has trials to give out, so any order finishes the
run; the order decides how often processes meet in one study. Processes that walk the same
list in step share nearly every study, and each pays the start of every study (asking,
then waiting for its first compile) with only part of the study's trials to show for it.

So processes go in pairs, each pair over its own stretch of the sorted batch sizes: the
first from the top down, the second from the bottom up. They work on different batch sizes
until they meet, wherever the trials' cost puts the meeting point; each study's warm start
still comes from the neighbouring batch size that process tuned just before. A process
then goes on with the rest, nearest first, joining what others left unfinished.

The first process of a run (the one that writes the tables under `--devices`) walks down
from the largest batch size: the batch sizes that settle last are then in the middle of the
list, whose layer choice is quicker to time than the largest one's.
"""

from __future__ import annotations


def walk_order(batch_sizes: list[int], slot: int = 0, count: int = 1) -> list[int]:
    """Batch sizes in the order process `slot` of `count` visits them; alone, ascending."""
    if not 0 <= slot < count:
        raise ValueError(f"walk slot {slot} is not among {count} processes")
    sizes = sorted(batch_sizes)
    if count == 1:
        return sizes
    stretches = (count + 1) // 2
    stretch, second = divmod(slot, 2)
    low, high = len(sizes) * stretch // stretches, len(sizes) * (stretch + 1) // stretches
    own = sizes[low:high]
    if not second and slot + 1 < count:  # the first of a pair walks down; one alone, up
        own.reverse()
    if not own:  # more processes than batch sizes
        return sizes
    end = sizes.index(own[-1])
    rest = sorted((index for index in range(len(sizes)) if not low <= index < high),
                  key=lambda index: (abs(index - end), index))
    return own + [sizes[index] for index in rest]
