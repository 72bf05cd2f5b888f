"""Featurize: hashed n-gram counts, LSA vectors, the task's tables and the loaders."""

from __future__ import annotations

import subprocess
import sys

import duckdb
import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from hypothesis import given, settings as hsettings, strategies as st
from sklearn.feature_extraction.text import HashingVectorizer

from quadflow.settings import FeaturizeSettings
from quadflow.store import StageRef, connect, open_store
from quadflow.tasks.featurize import (
    LSA,
    batch_bounds,
    featurize,
    hashed_ngram_spaces,
    hashed_ngrams,
    load_ngrams,
    load_vectors,
    ngrams_batch,
    _sample_texts,
    sample_rows,
    token_weighted_sample,
)

BIG = 2**22  # big enough that a handful of n-grams never collide


def dense_counts(texts, n_buckets=BIG, max_chars=10_000):
    return hashed_ngrams(texts, n_buckets, max_chars)


# --- hashed_ngrams ------------------------------------------------------------------------


def test_unigram_and_bigram_counts():
    x = dense_counts(["a b a", "b"])
    assert x.shape == (2, BIG) and x.dtype == np.float32
    # doc 0: unigrams a:2, b:1; bigrams (a b):1, (b a):1
    assert sorted(x[0].data.tolist()) == [1.0, 1.0, 1.0, 2.0]
    # the shared unigram "b" lands in the same bucket in both documents
    assert set(x[1].indices) <= set(x[0].indices) and x[1].sum() == 1


def test_lowercase_punctuation_and_unicode_words():
    same = dense_counts(["The cat, THE CAT!", "the cat the cat", "Éclair ÉCLAIR", "éclair éclair"])
    assert (same[0] != same[1]).nnz == 0
    assert (same[2] != same[3]).nnz == 0
    assert same[2].sum() == 3  # two unigrams + one bigram


def test_bigrams_do_not_cross_documents():
    split = dense_counts(["alpha", "beta"])
    joined = dense_counts(["alpha beta"])
    assert split.sum() == 2 and joined.sum() == 3


def test_empty_and_wordless_documents_give_zero_rows():
    x = dense_counts(["", "!!! ...", "word"])
    assert x.shape[0] == 3
    assert x[0].nnz == 0 and x[1].nnz == 0 and x[2].sum() == 1


def test_max_chars_is_honored():
    clipped = hashed_ngrams(["aaa bbb ccc"], BIG, max_chars=3)
    assert (clipped != dense_counts(["aaa"])).nnz == 0
    # the cut falls inside a word: only the kept prefix counts
    assert (hashed_ngrams(["aaa bbb"], BIG, max_chars=5) != dense_counts(["aaa b"])).nnz == 0


words = st.lists(st.sampled_from(["x", "yy", "zzz", "Word", "ünï", "42"]), max_size=30)


@hsettings(max_examples=40, deadline=None)
@given(st.lists(words, min_size=1, max_size=8))
def test_count_total_is_tokens_plus_bigrams(docs):
    texts = [" ".join(ws) for ws in docs]
    x = hashed_ngrams(texts, 64, 10_000)  # small space: collisions must not lose counts
    expected = [2 * len(ws) - 1 if ws else 0 for ws in docs]
    assert np.asarray(x.sum(axis=1)).ravel().tolist() == expected
    assert x.has_canonical_format  # sorted buckets, no duplicates


def test_matches_sklearn_hashing_vectorizer_totals():
    texts = ["The quick brown fox", "jumps over the lazy dog dog", "", "a-b c_d 3.14"]
    hv = HashingVectorizer(
        ngram_range=(1, 2), token_pattern=r"(?u)\w+", alternate_sign=False, norm=None, n_features=BIG
    )
    ours = dense_counts(texts)
    theirs = hv.transform(texts)
    assert np.array_equal(np.asarray(ours.sum(axis=1)).ravel(), np.asarray(theirs.sum(axis=1)).ravel())
    assert np.array_equal(np.diff(ours.indptr), np.diff(theirs.indptr))  # same distinct n-grams per doc


def test_batches_and_spaces_agree_with_one_pass():
    texts = [f"doc {i} " + "lorem ipsum " * (i % 7) for i in range(50)]
    big, small = hashed_ngram_spaces(texts, (4096, 100), 10_000, batch_docs=7, batch_chars=60)
    assert (big != hashed_ngrams(texts, 4096, 10_000)).nnz == 0
    assert (small != hashed_ngrams(texts, 100, 10_000)).nnz == 0
    assert small.sum() == big.sum()  # same n-grams, reduced into a smaller space


def test_batch_bounds_cover_every_row_once():
    texts = pl.Series(["x" * n for n in [5, 500, 0, 50, 5000, 1, 1, 1]])
    bounds = list(batch_bounds(texts, max_chars=1000, max_docs=3, max_batch_chars=600))
    assert bounds[0][0] == 0 and bounds[-1][1] == len(texts)
    assert all(a < b and b == c for (a, b), (c, _) in zip(bounds, bounds[1:]))
    assert all(b - a <= 3 for a, b in bounds)


def test_hashing_is_deterministic_across_processes():
    texts = ["Determinism matters: the same text, the same buckets.", "zweite Zeile"]
    here = hashed_ngrams(texts, 2**18, 1000)
    code = (
        "from quadflow.tasks.featurize import hashed_ngrams;"
        f"x = hashed_ngrams({texts!r}, 2**18, 1000);"
        "print(x.indices.tolist(), x.data.tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{here.indices.tolist()} {here.data.tolist()}"


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="0"):
        hashed_ngrams(["x"], 0, 100)
    with pytest.raises(ValueError, match="-1"):
        hashed_ngrams(["x"], 16, -1)


# --- LSA ---------------------------------------------------------------------------------


def topic_texts(n_per_topic=40, seed=0):
    rng = np.random.default_rng(seed)
    topics = [
        ["kernel", "module", "driver", "device", "interrupt", "memory"],
        ["sql", "table", "index", "query", "join", "select"],
        ["cheese", "bread", "wine", "olive", "tomato", "basil"],
    ]
    texts, labels = [], []
    for t, vocab in enumerate(topics):
        for _ in range(n_per_topic):
            texts.append(" ".join(rng.choice(vocab, size=12)))
            labels.append(t)
    return texts, np.array(labels)


def test_lsa_vectors_are_normalized_float32_and_deterministic():
    texts, _ = topic_texts()
    counts = hashed_ngrams(texts + [""], 4096, 1000)
    a = LSA(dim=8, sample=60, random_state=3).fit(counts)
    b = LSA(dim=8, sample=60, random_state=3).fit(counts)
    va, vb = a.transform(counts), b.transform(counts)
    assert va.dtype == np.float32 and va.shape == (len(texts) + 1, 8)
    assert np.array_equal(va, vb)
    assert np.allclose(np.linalg.norm(va[:-1], axis=1), 1.0, atol=1e-5)
    assert not va[-1].any()  # the empty document stays a zero vector
    assert a.idf_.shape == (4096,) and a.components_.shape == (8, 4096)
    assert a.n_fit_docs_ == 60


def test_lsa_separates_topics():
    texts, labels = topic_texts()
    v = LSA(dim=4, sample=1000, random_state=0).fit_transform(hashed_ngrams(texts, 4096, 1000))
    sim = v @ v.T
    same = labels[:, None] == labels[None, :]
    assert sim[same].mean() > 0.9 and sim[~same].mean() < 0.3


def test_lsa_fit_on_presampled_rows_equals_fit_on_all():
    # the task fits on hashed_ngrams(pool[sample_rows(...)]); that must be the same model
    texts, _ = topic_texts()
    counts = hashed_ngrams(texts, 4096, 1000)
    rows = sample_rows(counts.shape[0], 50, 7)
    full = LSA(dim=6, sample=50, random_state=7).fit(counts)
    pre = LSA(dim=6, sample=50, random_state=7).fit(counts[rows])
    assert np.array_equal(full.components_, pre.components_)
    assert np.array_equal(full.idf_, pre.idf_)


def test_lsa_pads_dims_beyond_the_rank_with_zeros():
    counts = hashed_ngrams(["one two", "three four", "five"], 1024, 100)
    lsa = LSA(dim=16, sample=100, random_state=0).fit(counts)
    v = lsa.transform(counts)
    assert v.shape == (3, 16)
    assert not lsa.components_[3:].any()
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("texts", [["one lonely document"], ["the same words"] * 5])
def test_lsa_on_a_sample_without_variance_records_no_explained_share_and_no_nan(texts):
    """One document, or copies of one: nothing varies, so the explained share is 0 (sklearn would say NaN)."""
    import warnings

    counts = hashed_ngrams(texts, 1024, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from the 0 / 0 either
        lsa = LSA(dim=4, sample=100, random_state=0).fit(counts)
    assert np.array_equal(lsa.explained_variance_ratio_, np.zeros(4))
    v = lsa.transform(counts)
    assert np.isfinite(v).all() and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_lsa_rejects_a_different_feature_space():
    lsa = LSA(dim=2, sample=10, random_state=0).fit(hashed_ngrams(["a b", "c d", "e"], 1024, 100))
    with pytest.raises(ValueError, match="2048"):
        lsa.transform(sp.csr_matrix((1, 2048), dtype=np.float32))


# --- arrow and store round trips -----------------------------------------------------------


def test_ngrams_batch_clips_counts_and_sorts_buckets():
    m = sp.csr_matrix(
        (np.array([3, 70_000, 1], np.float32), np.array([9, 2, 5]), np.array([0, 2, 2, 3])), shape=(3, 10)
    )
    t = ngrams_batch(np.arange(3), m)
    assert t.column("buckets").to_pylist() == [[2, 9], [], [5]]
    assert t.column("counts").to_pylist() == [[65_535, 3], [], [1]]


DOCS_DDL = """
create table if not exists ingest_docs (
    key varchar, role varchar, doc_idx bigint, doc_id varchar, source_id varchar, text varchar,
    n_tokens bigint, n_chars bigint, source varchar, file varchar, line bigint, fields varchar
)
"""


def make_docs(tmp_path, pool, target=(), key="ingest-key", pool_tokens=None):
    """An ingest partition of `pool` and `target`; pool documents have `pool_tokens` tokens (default 0)."""
    store = open_store(tmp_path / "store.duckdb")
    tokens = {"pool": list(pool_tokens) if pool_tokens is not None else [0] * len(pool), "target": [0] * len(target)}
    with connect(store) as con:
        con.execute(DOCS_DDL)
        for role, texts in (("pool", pool), ("target", target)):
            rows = [[key, role, i, f"id{role}{i}", text, tokens[role][i], len(text), i + 1]
                    for i, text in enumerate(texts)]
            if rows:
                con.executemany("insert into ingest_docs values (?, ?, ?, ?, null, ?, ?, ?, 's', 'f', ?, null)", rows)
    return StageRef("ingest", key, store, len(pool) + len(target), "fp")


SMALL = FeaturizeSettings(n_features=2048, dsir_buckets=64, dim=8, svd_sample=100, max_chars=200)


def test_task_writes_tables_that_round_trip(tmp_path):
    pool, _ = topic_texts(n_per_topic=20)
    pool = pool + ["", "word " * 200]  # an empty doc and one past max_chars
    target = ["kernel driver memory", "sql join query"]
    docs = make_docs(tmp_path, pool, target)
    ref = featurize.fn(SMALL, docs, 0)
    assert ref.stage == "featurize" and ref.rows == len(pool) + len(target)

    with connect(docs.store, read_only=True) as con:
        vecs = load_vectors(con, ref.key, "pool")
        assert vecs.shape == (len(pool), 8) and vecs.dtype == np.float32
        lsa = LSA(8, 100, 0).fit(hashed_ngrams(pool, 2048, 200))
        assert np.allclose(vecs, lsa.transform(hashed_ngrams(pool, 2048, 200)), atol=1e-6)
        assert np.allclose(load_vectors(con, ref.key, "target"), lsa.transform(hashed_ngrams(target, 2048, 200)),
                           atol=1e-6)

        grams = load_ngrams(con, ref.key, "pool")  # n_buckets from featurize_info
        expected = hashed_ngrams(pool, 64, 200)
        assert grams.shape == (len(pool), 64) and (grams != expected).nnz == 0
        assert load_ngrams(con, ref.key, "target", n_buckets=64).shape == (2, 64)
        buckets = con.execute(
            "select buckets from featurize_ngrams where key = ? and role = 'pool' and doc_idx = 0", [ref.key]
        ).fetchone()[0]
        assert buckets == sorted(buckets)


def test_task_rerun_is_idempotent_and_settings_get_their_own_partition(tmp_path):
    pool, _ = topic_texts(n_per_topic=10)
    docs = make_docs(tmp_path, pool)
    first = featurize.fn(SMALL, docs, 0)
    again = featurize.fn(SMALL, docs, 0)
    assert again == first
    other = featurize.fn(SMALL.model_copy(update={"dim": 4}), docs, 0)
    assert other.key != first.key
    with connect(docs.store, read_only=True) as con:
        counts = dict(con.execute("select key, count(*) from featurize_vectors group by key").fetchall())
        assert counts == {first.key: len(pool), other.key: len(pool)}
        assert con.execute("select count(*) from featurize_info").fetchone()[0] == 2
        assert load_vectors(con, other.key, "pool").shape == (len(pool), 4)
        assert load_vectors(con, first.key, "target").shape == (0, 8)


def test_task_rejects_an_empty_pool_and_gappy_doc_idx(tmp_path):
    docs = make_docs(tmp_path, [], ["only a target"])
    with pytest.raises(ValueError, match="no pool documents"):
        featurize.fn(SMALL, docs, 0)
    with duckdb.connect(docs.store.path) as con:
        con.execute(
            "insert into ingest_docs values ('ingest-key', 'pool', 5, 'x', null, 'gap', 0, 3, 's', 'f', 1, null)"
        )
    with pytest.raises(ValueError, match="not dense"):
        featurize.fn(SMALL, docs, 0)


# ---------------------------------------------------------------- the LSA's sample drawn by tokens


def test_token_weighted_sample_draws_long_documents_in_proportion_and_never_empty_ones(tmp_path):
    tokens = np.ones(2000, dtype=np.int64)
    tokens[::100] = 100  # 20 long documents: half of the pool's tokens, 1% of its documents
    tokens[7::200] = 0  # 10 documents without tokens
    docs = make_docs(tmp_path, ["w"] * tokens.size, pool_tokens=tokens.tolist())
    long_ = np.flatnonzero(tokens == 100)
    with connect(docs.store, read_only=True) as con:
        a, b, c = (token_weighted_sample(con, docs.key, 50, seed) for seed in (3, 3, 4))
        everything = token_weighted_sample(con, docs.key, 5000, 3)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert a.size == 50 and (np.diff(a) > 0).all() and (tokens[a] > 0).all()
    # A uniform sample of 50 holds 0.5 long documents on average; by tokens, most of them.
    assert np.isin(long_, a).sum() >= 15 and np.isin(long_, c).sum() >= 15
    # A pool smaller than the sample: every document with tokens, none without.
    assert everything.tolist() == np.flatnonzero(tokens > 0).tolist()
    with pytest.raises(ValueError, match="n must be >= 1"):
        with connect(docs.store, read_only=True) as con:
            token_weighted_sample(con, docs.key, 0, 3)


def test_task_fits_the_lsa_on_a_sample_drawn_by_tokens_when_asked(tmp_path):
    pool, _ = topic_texts(n_per_topic=40)
    tokens = [len(t.split()) for t in pool]
    docs = make_docs(tmp_path, pool, pool_tokens=tokens)
    settings = SMALL.model_copy(update={"svd_sample": 30, "svd_sample_by": "tokens"})
    ref = featurize.fn(settings, docs, 5)
    plain = featurize.fn(SMALL.model_copy(update={"svd_sample": 30}), docs, 5)
    assert ref.key != plain.key
    with connect(docs.store, read_only=True) as con:
        rows = token_weighted_sample(con, docs.key, 30, 5)
        got = load_vectors(con, ref.key, "pool")
        assert not np.allclose(got, load_vectors(con, plain.key, "pool"))
    texts = [pool[i] for i in rows]
    lsa = LSA(8, 30, 5).fit(hashed_ngrams(texts, 2048, 200))
    assert np.allclose(got, lsa.transform(hashed_ngrams(pool, 2048, 200)), atol=1e-6)


def test_task_says_why_a_pool_without_tokens_cannot_be_sampled_by_tokens(tmp_path):
    pool, _ = topic_texts(n_per_topic=5)
    docs = make_docs(tmp_path, pool)  # every n_tokens is 0
    with pytest.raises(ValueError, match="no document has tokens.*svd_sample_by"):
        featurize.fn(SMALL.model_copy(update={"svd_sample_by": "tokens"}), docs, 0)


def test_the_lsa_sample_is_read_only_as_far_as_featurizing_looks(tmp_path):
    pool = ["é" * 50_000, "short text", "word " * 30]
    docs = make_docs(tmp_path, pool, pool_tokens=[50_000, 2, 30])
    with connect(docs.store, read_only=True) as con:
        texts = _sample_texts(con, docs.key, np.array([0, 1, 2]), 200)
    assert texts.to_list() == ["é" * 200, "short text", ("word " * 30)[:200]]
