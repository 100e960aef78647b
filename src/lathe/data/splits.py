"""Which rows train, validate and test: one seeded plan for val_size / test_size splits and
k-fold cross-validation, stratified by label when asked.

The plan works on units: a row, or every row of one source row where a processor made
several (a QA context cut into windows shares its `origin`), so no example is split across
train and test. Sizes are fractions of all units or counts of units. The test units are taken
first and never change with the fold or val_size, so a cross-validation and the final run hold
out the same test set. Stratified: each class gives its share to every split (largest
remainders), and the folds are dealt class by class, so each fold holds the class mix of the
whole. Pure (numpy only) and unit-tested; the loader applies it with `Dataset.select`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lathe.errors import DataError


@dataclass(frozen=True)
class Plan:
    train: list[int]  # row indices, ascending
    val: list[int]
    test: list[int]
    stratified: bool


def size_of(size: float, n: int) -> int:
    """A fraction of n (at least one row when the fraction is above 0) or a count."""
    if size <= 0:
        return 0
    if size >= 1:
        return int(size)
    return max(1, round(size * n))


def plan(n_rows: int, *, seed: int, val_size: float = 0.0, test_size: float = 0.0, folds: int = 0,
         fold: int | None = None, labels: Sequence[Any] | None = None, groups: Sequence[Any] | None = None,
         where: str = "dataset") -> Plan:
    """Indices of the train, validation and test rows. `labels`: one class per row (stratifies
    when given); `groups`: rows with the same value stay together; `fold`: 1..folds, the fold
    held out as validation (val_size is not used then)."""
    import numpy as np

    units, unit_rows = _units(n_rows, groups)
    n = len(units)
    unit_labels = [labels[rows[0]] for rows in unit_rows] if labels is not None else None
    rng = np.random.default_rng(seed)
    order = [int(i) for i in rng.permutation(n)]
    n_test, n_val = size_of(test_size, n), size_of(val_size, n) if not folds else 0
    what = "rows" if groups is None else "examples"
    if n_test + n_val >= n:
        asked = ", ".join(f"{k}={v:g}" for k, v in (("val_size", val_size), ("test_size", test_size)) if v)
        raise DataError(f"{asked} leave no training {what} out of the {n} {what} of {where}; make them smaller")
    test, rest = _take(order, n_test, unit_labels)
    if folds:
        if folds > len(rest):
            raise DataError(f"folds={folds} is more than the {len(rest)} {what} of {where} left for "
                            f"cross-validation{' after the test split' if n_test else ''}; use fewer folds")
        dealt = _deal(rest, folds, unit_labels)
        val = dealt[(fold or 1) - 1]
        held = set(val)
        train = [u for u in rest if u not in held]
    else:
        val, train = _take(rest, n_val, unit_labels)

    def rows_of(chosen: list[int]) -> list[int]:
        return sorted(r for u in chosen for r in unit_rows[u])

    return Plan(rows_of(train), rows_of(val), rows_of(test), unit_labels is not None)


def _units(n_rows: int, groups: Sequence[Any] | None) -> tuple[list[Any], list[list[int]]]:
    if groups is None:
        return list(range(n_rows)), [[i] for i in range(n_rows)]
    index: dict[Any, int] = {}
    rows: list[list[int]] = []
    for i, g in enumerate(groups):
        if g not in index:
            index[g] = len(rows)
            rows.append([])
        rows[index[g]].append(i)
    return list(index), rows


def _by_class(order: list[int], labels: Sequence[Any]) -> dict[Any, list[int]]:
    classes: dict[Any, list[int]] = {}
    for u in order:
        classes.setdefault(labels[u], []).append(u)
    return classes


def _take(order: list[int], k: int, labels: Sequence[Any] | None) -> tuple[list[int], list[int]]:
    """(k units, the rest), both in `order`; stratified: each class gives its share of k."""
    if k == 0:
        return [], list(order)
    if labels is None:
        return order[:k], order[k:]
    classes = _by_class(order, labels)
    n = len(order)
    exact = {c: k * len(members) / n for c, members in classes.items()}
    quota = {c: int(q) for c, q in exact.items()}
    # largest remainders first (ties: the larger class, then the class first met) get one more
    by_remainder = sorted(classes, key=lambda c: (-(exact[c] - quota[c]), -len(classes[c])))
    for c in by_remainder[:k - sum(quota.values())]:
        quota[c] += 1
    chosen = {u for c, members in classes.items() for u in members[:quota[c]]}
    return [u for u in order if u in chosen], [u for u in order if u not in chosen]


def _deal(order: list[int], folds: int, labels: Sequence[Any] | None) -> list[list[int]]:
    """The units dealt into `folds` folds of equal size (within one); stratified: class by class,
    the dealing carried on from class to class, so each fold holds every class's share."""
    out: list[list[int]] = [[] for _ in range(folds)]
    if labels is None:
        for i, u in enumerate(order):
            out[i % folds].append(u)
        return out
    i = 0
    for members in _by_class(order, labels).values():
        for u in members:
            out[i % folds].append(u)
            i += 1
    return out
