"""Selection-quality metrics and the protocol checks that keep comparisons between selectors fair.

A selection is scored by the held-out perplexity of a Kneser-Ney trigram model trained on the
selected texts alone (lower is better), with one `Vocab` shared by every method. Two rules make
the numbers comparable: no selected document may be in the held-out set, and every method must
spend the same token budget (within `BUDGET_TOLERANCE`), since more tokens alone lower perplexity.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from benchmarks.eval.ngram_lm import KneserNeyTrigramLM, Vocab

# Methods must land within 2% of the budget: the benchmark brief's tolerance; the pipeline's
# selectors fill to within 0.1% (tasks/select.py FULL_FRACTION) on pools of many small documents.
BUDGET_TOLERANCE = 0.02


class ProtocolError(ValueError):
    """A comparison broke the evaluation protocol (held-out leakage or an unequal budget)."""


def evaluate_selection(selected_texts: Iterable[str], heldout_texts: Iterable[str], vocab: Vocab) -> dict:
    """Held-out perplexity of a trigram model trained only on the selection, plus what it was trained on."""
    start = time.perf_counter()
    model = KneserNeyTrigramLM(vocab).fit(selected_texts)
    train_s = time.perf_counter() - start
    held = model.score(heldout_texts)
    return {
        "perplexity": held["perplexity"],
        "cross_entropy": held["cross_entropy"],  # nats per held-out token (and </s>)
        "heldout_events": held["events"],
        "heldout_unk_rate": held["unk_rate"],
        "train_events": model.n_events_,
        "train_seconds": round(train_s, 3),
        "vocab_size": len(vocab),
        "vocab_fingerprint": vocab.fingerprint,
    }


def check_protocol(
    selected_ids: Mapping[str, Iterable[str]] | Iterable[str],
    heldout_ids: Iterable[str],
    tokens_by_method: Mapping[str, int],
    budget: int,
    tolerance: float = BUDGET_TOLERANCE,
) -> dict[str, float]:
    """Raise ProtocolError on held-out leakage or a method off budget; else each method's relative deviation.

    `selected_ids` is either one selection's ids or a mapping method -> ids; ids are the source
    documents' own ids (the `id` field of the task files).
    """
    if budget <= 0:
        raise ProtocolError(f"budget = {budget!r}; it must be > 0")
    if tolerance < 0:
        raise ProtocolError(f"tolerance = {tolerance!r}; it must be >= 0")
    if isinstance(selected_ids, Mapping):
        selections = {str(m): list(ids) for m, ids in selected_ids.items()}
    else:
        selections = {"selection": list(selected_ids)}
    held = set(heldout_ids)
    problems = []
    for method, ids in selections.items():
        leaked = sorted(held.intersection(ids))
        if leaked:
            problems.append(
                f"{method}: {len(leaked)} selected ids are in the held-out set, e.g. {leaked[:5]!r}"
            )
    unmeasured = sorted(set(selections) - set(tokens_by_method)) if isinstance(selected_ids, Mapping) else []
    if unmeasured:
        problems.append(f"{unmeasured!r}: no token count given, so the budget cannot be checked")
    deviation = {}
    for method, tokens in tokens_by_method.items():
        deviation[method] = (tokens - budget) / budget
        if abs(tokens - budget) > tolerance * budget:
            problems.append(
                f"{method}: {tokens:,} tokens is {deviation[method]:+.2%} off the budget of {budget:,} "
                f"(allowed: +-{tolerance:.0%})"
            )
    if problems:
        raise ProtocolError("evaluation protocol violated:\n  " + "\n  ".join(problems))
    return deviation
