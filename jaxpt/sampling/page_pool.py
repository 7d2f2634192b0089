"""The host side of a paged KV cache: which pages are free, who holds each page, and which
full pages hold a known prompt prefix (so a later request with that prefix shares them).

Plain data and integers, as in vLLM's block manager: the engine's scheduler asks, the
model step only reads the page tables it is given. Page 0 is never handed out (scratch).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence


def prefix_hashes(tokens: Sequence[int], page_size: int) -> list[int]:
    """One hash per full page of ``tokens``, each covering the whole prefix up to its end
    (a page's keys depend on every token before it)."""
    hashes, previous = [], 0
    for end in range(page_size, len(tokens) + 1, page_size):
        previous = hash((previous, tuple(tokens[end - page_size : end])))
        hashes.append(previous)
    return hashes


class PagePool:
    """``num_pages`` pages of ``page_size`` tokens; page 0 is scratch.

    A page is free, held (reference count > 0), or cached: no longer held but still holding
    a registered prefix, reused by ``match_prefix`` until ``allocate`` needs it back
    (least recently released first).
    """

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is scratch), got {num_pages}")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = deque(range(1, num_pages))
        self._refs = [0] * num_pages
        self._cached: OrderedDict[int, int] = OrderedDict()  # page -> hash, LRU first
        self._page_of: dict[int, int] = {}  # prefix hash -> page
        self._hash_of: dict[int, int] = {}  # page -> prefix hash
        self.peak_used = 0

    @property
    def used(self) -> int:
        """Pages held by some sequence."""
        return self.num_pages - 1 - len(self._free) - len(self._cached)

    def available(self) -> int:
        return len(self._free) + len(self._cached)

    def allocate(self, count: int) -> list[int] | None:
        """``count`` pages held once each, or None (nothing taken) when too few are left."""
        if count > self.available():
            return None
        pages = []
        for _ in range(count):
            if self._free:
                page = self._free.popleft()
            else:  # reuse the least recently released cached prefix
                page, digest = self._cached.popitem(last=False)
                del self._page_of[digest], self._hash_of[page]
            self._refs[page] = 1
            pages.append(page)
        self.peak_used = max(self.peak_used, self.used)
        return pages

    def share(self, pages: Sequence[int]) -> None:
        """Hold ``pages`` once more each (another sequence reads them)."""
        for page in pages:
            if self._refs[page] == 0:
                self._cached.pop(page, None)
            self._refs[page] += 1
        self.peak_used = max(self.peak_used, self.used)

    def release(self, pages: Sequence[int]) -> None:
        for page in pages:
            self._refs[page] -= 1
            if self._refs[page] > 0:
                continue
            if page in self._hash_of:
                self._cached[page] = self._hash_of[page]
            else:
                self._free.append(page)

    def match_prefix(self, tokens: Sequence[int]) -> list[int]:
        """The held-once-more pages of the longest registered prefix of ``tokens``, in
        whole pages, always leaving at least one token of ``tokens`` uncovered (its
        logits must be computed)."""
        pages = []
        for digest in prefix_hashes(tokens[:-1], self.page_size):
            page = self._page_of.get(digest)
            if page is None:
                break
            pages.append(page)
        self.share(pages)
        return pages

    def register(self, tokens: Sequence[int], pages: Sequence[int]) -> None:
        """Record that ``pages`` hold the keys and values of ``tokens`` (full pages only)."""
        for digest, page in zip(prefix_hashes(tokens, self.page_size), pages):
            if digest in self._page_of or page in self._hash_of:
                continue
            self._page_of[digest] = page
            self._hash_of[page] = digest

    def forget_prefixes(self) -> None:
        """Drop every registered prefix (the weights changed, so the cached keys are
        stale); cached pages become free."""
        self._free.extend(self._cached)
        self._cached.clear()
        self._page_of.clear()
        self._hash_of.clear()
