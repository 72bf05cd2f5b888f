"""The score task on a small DuckDB store: rows per scorer with versions, errors, idempotency."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from scipy import sparse
from sklearn.feature_extraction.text import HashingVectorizer

from quadflow.settings import ConfigError, ScoreSettings
from quadflow.store import StageRef, connect, open_store
from quadflow.tasks.featurize import hashed_ngrams, load_ngrams
from quadflow.tasks.score import load_scores, score

N_BUCKETS = 256
MAX_CHARS = 20_000

PROSE = [
    "The committee met on Tuesday to discuss the budget for the new library. Members agreed that the "
    "reading room needs more light, and that the children's section should move to the ground floor. "
    "A final decision will be taken next month, after the architects have presented their plans.",
    "Rain fell over the hills for most of the week, and the river rose to its highest level in years. "
    "Farmers moved their sheep to higher ground. The council opened the school hall for families "
    "whose houses were flooded, and volunteers brought food, blankets and dry clothes.",
]
JUNK = [
    "\n".join(f"item{i}" for i in range(40)),
    "#### #### #### ####\n" * 10,
    "{ \"key\": 1, \"value\": [1, 2, 3] }",
    "buy now buy now buy now buy now buy now buy now",
]


def _pool(n: int) -> list[str]:
    return [PROSE[i % 2] + f" Note {i}." if i % 3 else JUNK[i % 4] + f" {i}" for i in range(n)]


def _ngrams_table(texts: list[str], start: int = 0, foreign: bool = False) -> pa.Table:
    """The n-gram rows featurize writes for `texts` (quadflow's hashing); foreign: another hashing's counts."""
    if foreign:
        x = HashingVectorizer(n_features=N_BUCKETS, alternate_sign=False, ngram_range=(1, 2), norm=None)
        m = x.transform(texts).tocsr()
    else:
        m = hashed_ngrams(texts, N_BUCKETS, MAX_CHARS)
    m.sort_indices()
    offsets = pa.array(m.indptr.astype(np.int32))
    return pa.table({
        "doc_idx": np.arange(start, start + len(texts), dtype=np.int64),
        "buckets": pa.ListArray.from_arrays(offsets, pa.array(m.indices.astype(np.uint16))),
        "counts": pa.ListArray.from_arrays(offsets, pa.array(m.data.astype(np.uint16))),
    })


# featurize_totals as the featurize stage writes it (its shard tasks sum what they store), for stores made by hand
TOTALS_FROM_NGRAMS = """
create table featurize_totals as
select key, role, bucket::integer as bucket, sum(n)::bigint as total
from (select key, role, unnest(buckets) as bucket, unnest(counts) as n from featurize_ngrams)
group by all
"""


def make_store(tmp_path, n_pool: int = 36, n_target: int = 8, foreign_ngrams: bool = False):
    """A store holding the ingest and featurize tables the score stage reads, as the contract has them.

    foreign_ngrams: the stored n-grams are another hashing's (sklearn's HashingVectorizer), not the
    hashing of the texts featurize does, as a partition written by another version would be."""
    store = open_store(tmp_path / "store.duckdb")
    pool, target = _pool(n_pool), [PROSE[i % 2] + f" Extra {i}." for i in range(n_target)]
    with duckdb.connect(store.path) as con:
        con.execute("create table ingest_docs (key varchar, role varchar, doc_idx bigint, text varchar, "
                    "n_tokens bigint)")
        con.execute("create table featurize_ngrams (key varchar, role varchar, doc_idx bigint, "
                    "buckets usmallint[], counts usmallint[])")
        for role, texts in (("pool", pool), ("target", target)):
            if not texts:
                continue
            docs = pa.table({"doc_idx": np.arange(len(texts), dtype=np.int64), "text": texts})
            con.register("docs", docs)
            con.execute("insert into ingest_docs select 'ing', ?, doc_idx, text, 10 from docs", [role])
            con.unregister("docs")
            con.register("grams", _ngrams_table(texts, foreign=foreign_ngrams))
            con.execute("insert into featurize_ngrams select 'feat', ?, doc_idx, buckets, counts from grams", [role])
            con.unregister("grams")
        con.execute(TOTALS_FROM_NGRAMS)
        con.execute("create table featurize_info (key varchar, dsir_buckets integer, dim integer, max_chars integer)")
        con.execute("insert into featurize_info values ('feat', ?, 8, ?)", [N_BUCKETS, MAX_CHARS])
    docs_ref = StageRef("ingest", "ing", store, n_pool + n_target, "ing-fp")
    feats_ref = StageRef("featurize", "feat", store, n_pool + n_target, "feat-fp")
    return store, docs_ref, feats_ref


def rows(store, sql: str, params=None):
    with connect(store, read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def test_writes_every_scorer_and_combined_with_versions(tmp_path):
    store, docs, feats = make_store(tmp_path)
    settings = ScoreSettings(scorers=["heuristic", "dsir", "classifier"], weights={"heuristic": 2.0})
    ref = score.fn(settings, docs, feats, 0)

    assert ref.stage == "score" and ref.rows == 36 * 4
    got = dict((s, (n, v)) for s, n, v in rows(
        store, "select scorer, count(*), any_value(version) from score_docs where key = ? group by scorer", [ref.key]))
    assert got == {
        "heuristic": (36, "heuristic-1"), "dsir": (36, "dsir-2"), "classifier": (36, "classifier-2"),
        "combined": (36, "combined-1+heuristic-1+dsir-2+classifier-2"),
    }
    lo, hi = rows(store, "select min(score), max(score) from score_docs where key = ? and scorer = 'combined'",
                  [ref.key])[0]
    assert 0.0 <= lo < hi <= 1.0

    # heuristic detail names the failed rules, other scorers have none
    details = dict(rows(store, "select doc_idx, detail from score_docs where key = ? and scorer = 'heuristic'",
                        [ref.key]))
    assert "c4_curly_bracket" in details[6]  # JUNK[2]: a JSON snippet
    assert rows(store, "select count(*) from score_docs where key = ? and scorer <> 'heuristic' "
                       "and detail is not null", [ref.key])[0][0] == 0

    info = {s: (v, json.loads(p)) for s, v, p in rows(store, "select scorer, version, params from score_info "
                                                              "where key = ?", [ref.key])}
    assert set(info) == {"heuristic", "dsir", "classifier", "combined"}
    clf = info["classifier"][1]
    # 8 targets and every one of the 36 pool documents as a negative (capped by the pool), 5 folds
    assert (clf["positives"], clf["negatives"], clf["folds"]) == (8, 36, 5) and clf["held_out_accuracy"] is not None
    assert len(clf["target_quantiles"]) == 101
    assert info["dsir"][1]["n_buckets"] == N_BUCKETS
    assert info["combined"][1]["weights"] == {"heuristic": 2.0, "dsir": 1.0, "classifier": 1.0}

    # prose is target-like: it outranks the junk on the combined score
    combined = load_scores_from(store, ref.key)
    prose = np.array([i % 3 != 0 for i in range(36)])
    assert combined[prose].mean() > combined[~prose].mean() + 0.3


def load_scores_from(store, key, scorer="combined"):
    with connect(store, read_only=True) as con:
        return load_scores(con, key, scorer)


def test_auto_scorers_follow_the_target_set(tmp_path):
    store, docs, feats = make_store(tmp_path)
    ref = score.fn(ScoreSettings(), docs, feats, 0)
    assert {s for (s,) in rows(store, "select distinct scorer from score_docs where key = ?", [ref.key])} == {
        "dsir", "classifier", "combined"}

    store2, docs2, feats2 = make_store(tmp_path / "no-target", n_target=0)
    ref2 = score.fn(ScoreSettings(), docs2, feats2, 0)
    assert {s for (s,) in rows(store2, "select distinct scorer from score_docs where key = ?", [ref2.key])} == {
        "heuristic", "combined"}
    # with one scorer the combined score is its percentile rank
    h, c = load_scores_from(store2, ref2.key, "heuristic"), load_scores_from(store2, ref2.key)
    assert np.array_equal(np.argsort(h, kind="stable"), np.argsort(c, kind="stable"))


def test_target_scorers_without_target_set_raise_config_error(tmp_path):
    store, docs, feats = make_store(tmp_path, n_target=0)
    with pytest.raises(ConfigError, match="'dsir', 'classifier' need a target set"):
        score.fn(ScoreSettings(scorers=["heuristic", "dsir", "classifier"]), docs, feats, 0)
    assert rows(store, "select count(*) from duckdb_tables() where table_name = 'score_docs'")[0][0] == 0


def test_rerun_is_idempotent_and_other_partitions_survive(tmp_path):
    store, docs, feats = make_store(tmp_path)
    settings = ScoreSettings(scorers=["heuristic", "classifier"])
    first = score.fn(settings, docs, feats, 0)
    again = score.fn(settings, docs, feats, 0)
    assert again == first
    other = score.fn(settings, docs, feats, 1)
    assert other.key != first.key
    counts = dict(rows(store, "select key, count(*) from score_docs group by key"))
    assert counts == {first.key: 36 * 3, other.key: 36 * 3}
    assert dict(rows(store, "select key, count(*) from score_info group by key")) == {first.key: 3, other.key: 3}


def test_load_scores_orders_by_doc_idx_and_names_missing_scorers(tmp_path):
    store, docs, feats = make_store(tmp_path)
    ref = score.fn(ScoreSettings(scorers=["heuristic"]), docs, feats, 0)
    expected = [s for _, s in rows(store, "select doc_idx, score from score_docs where key = ? and "
                                          "scorer = 'heuristic' order by doc_idx", [ref.key])]
    np.testing.assert_array_equal(load_scores_from(store, ref.key, "heuristic"), expected)
    with pytest.raises(ValueError, match="has no 'dsir' scores"):
        load_scores_from(store, ref.key, "dsir")


def test_reads_the_ngram_counts_featurize_wrote(tmp_path):
    store, docs, feats = make_store(tmp_path)
    expected = hashed_ngrams(_pool(36), N_BUCKETS, MAX_CHARS)
    with connect(store, read_only=True) as con:
        got = load_ngrams(con, "feat", "pool")
        assert got.shape == (36, N_BUCKETS)
        assert abs(got - expected).max() == 0


def test_refuses_stored_ngrams_that_are_not_the_texts_hashing(tmp_path):
    """Score shards hash their texts' n-grams themselves; the scorers are fitted on what featurize stored.
    A partition whose stored counts come from another hashing is refused before any shard runs."""
    store, docs, feats = make_store(tmp_path, foreign_ngrams=True)
    with pytest.raises(ValueError, match=r"featurize partition 'feat': the stored n-gram counts of pool document 0 "
                                         r"are not its text's hashed n-grams .*featurize again"):
        score.fn(ScoreSettings(scorers=["dsir"]), docs, feats, 0)
    assert rows(store, "select count(*) from information_schema.tables where table_name = 'shard_done'") == [(0,)] \
        or rows(store, "select count(*) from shard_done where stage = 'score'") == [(0,)]
    # the web-text rules read no n-grams: nothing to check, the stage runs
    ref = score.fn(ScoreSettings(scorers=["heuristic"]), docs, feats, 0)
    assert ref.rows == 36 * 2
