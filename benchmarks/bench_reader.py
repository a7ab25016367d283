"""Reader throughput on the real Bridge debug shard (25 episodes, 3.5 MB), with baselines from the same run.

    pytest benchmarks/bench_reader.py --benchmark-only

Each benchmark reads the whole train split once per round; `extra_info` carries episodes/s and MB/s (shard bytes
per second of the mean round time), so the figures come out of `--benchmark-json` as well as the table.
The levels, cheapest first: framing only (no CRC), framing + CRC32C, + Example parsing, + full decode of every
feature (4 JPEG cameras, language embeddings), and the proxy engine's view (image_0 + state + action + language).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from vla_bench.data.bridge import bridge_episodes
from vla_bench.data.example_proto import parse_example
from vla_bench.data.rlds import RLDSDataset
from vla_bench.data.tfrecord import iter_records

BRIDGE_DEBUG = Path(__file__).resolve().parents[1] / "tests" / "data" / "bridge_debug"
SHARDS = sorted((BRIDGE_DEBUG / "1.0.0").glob("bridge_dataset-train.tfrecord-*"))
pytestmark = pytest.mark.skipif(not SHARDS, reason=f"real Bridge debug shard not found under {BRIDGE_DEBUG}")


def _count(iterable) -> int:
    return sum(1 for _ in iterable)


def _frames(check_crc: bool):
    return lambda: _count(r for shard in SHARDS for r in iter_records(shard, check_crc=check_crc))


def _parse():
    return _count(parse_example(r) for shard in SHARDS for r in iter_records(shard))


def _decode_all():
    return _count(RLDSDataset(BRIDGE_DEBUG).episodes("train"))


def _ground_truth():
    return _count(bridge_episodes(BRIDGE_DEBUG, "train"))


@pytest.mark.parametrize("level, read", [
    ("framing", _frames(False)),
    ("framing+crc", _frames(True)),
    ("parse", _parse),
    ("decode_all", _decode_all),
    ("openvla_ground_truth", _ground_truth),
])
def test_reader_throughput(benchmark, level, read):
    episodes = benchmark(read)
    assert episodes == 25
    seconds = benchmark.stats.stats.mean
    megabytes = sum(s.stat().st_size for s in SHARDS) / 1e6
    benchmark.extra_info.update({"level": level, "episodes": episodes, "episodes_per_s": round(episodes / seconds, 1),
                                 "MB_per_s": round(megabytes / seconds, 1)})
