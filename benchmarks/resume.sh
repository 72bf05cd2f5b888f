#!/bin/bash
# Kill a run with SIGKILL once 10 of its score shards are done, rerun it, and time both.
# Usage (after `benchmarks/scale.py --workers-at 1000000`): benchmarks/resume.sh [WORKDIR] [BASE_RUN] [REFERENCE_RUN]
# BASE_RUN supplies the config (its paths are rewritten to WORKDIR); REFERENCE_RUN is an uninterrupted run to compare with.
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false
W=${1:-runs/resume-1m}; BASE=${2:-runs/scale/workers-1000000-1}; REF=${3:-runs/scale/workers-1000000-2}
rm -rf $W; mkdir -p $W
sed "s#$BASE#$W#g" $BASE/config.yaml > $W/config.yaml
start=$(date +%s.%N)
setsid .venv/bin/quadflow run --config $W/config.yaml --workers 2 > $W/run1.log 2>&1 &
pid=$!
while [ $(ls $W/quadflow.duckdb.parts/score-*/out-*.parquet 2>/dev/null | wc -l) -lt 10 ]; do sleep 0.2; done
kill -9 -- -$pid; wait $pid 2>/dev/null
t1=$(echo "$(date +%s.%N) - $start" | bc)
start=$(date +%s.%N)
.venv/bin/quadflow run --config $W/config.yaml --workers 2 > $W/run2.log 2>&1
rc=$?
t2=$(echo "$(date +%s.%N) - $start" | bc)
echo "killed after $t1 s; rerun rc=$rc in $t2 s"
grep -E "resuming|shards:|Cached|selected " $W/run2.log | sed 's/^.*| //' | head -20
.venv/bin/python -c "
import duckdb, polars as pl
con = duckdb.connect('$W/quadflow.duckdb', read_only=True)
print(con.execute(\"select stage, source, count(*), sum(hi-lo) from shard_done group by all order by all\").fetchall())
a = pl.read_parquet('$W/out/selection.parquet')['id'].sort().to_list()
b = pl.read_parquet('$REF/out/selection.parquet')['id'].sort().to_list()
print('same selection as the uninterrupted 2-worker run:', a == b, len(a))
"
