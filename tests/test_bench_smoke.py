"""The benchmark's code path on a tiny mailbox: every contender runs, the report is complete and
the last line is machine-readable. No timing is asserted (that is what ``make bench`` is for)."""

from __future__ import annotations

import re

from bench import drain_bench

LAST_LINE = re.compile(
    r"drain/ceiling=(\d+\.\d\d) drain/mbsync=(\d+\.\d\d) peak_rss_mb=(\d+) "
    r"writes_per_msg=(\d+\.\d\d) import_s=(\d+\.\d\d)"
)
MESSAGES = 40


def test_benchmark_runs_every_contender_and_ends_with_the_summary_line(stack, fresh, capsys):
    # One message over the drain's 8 MiB threshold: fetched in pieces, stored as staged blocks.
    code = drain_bench.main(
        [
            f"--messages={MESSAGES}",
            "--repeats=1",
            "--large-mb=9",
            "--ceiling=aio:32" if drain_bench.aio_available() else "--ceiling=threads:8",
            "--import-repeats=1",
        ],
        stack=stack,
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()

    match = LAST_LINE.fullmatch(lines[-1])
    assert match, lines[-1]
    to_ceiling, to_mbsync, rss, writes, import_s = map(float, match.groups())
    assert to_ceiling > 0 and to_mbsync > 0
    # The 9 MB message is never held whole: the drain stays far below corpus-in-memory sizes.
    assert 20 <= rss < 400
    # One PUT per message, 3 staged blocks + commit for the large one, plus the run's own state
    # (container, lease, checkpoints, run record): more than one write per message, not two.
    assert 1.0 < writes < 1.5
    assert 0 < import_s < 10

    table = "\n".join(lines)
    for name in ("mail2blob drain", "storage ceiling", "mbsync", "FSync no"):
        assert name in table
    assert f"mailbox: {MESSAGES} messages" in table
    assert "IMAP connection busy" in table


def test_large_messages_are_spread_through_the_corpus():
    corpus = drain_bench.build_corpus(12, [9, 11], seed=3)
    sizes = [len(body) for body in corpus]
    assert len(corpus) == 12
    large = [n for n, size in enumerate(sizes) if size > 8 * 1024 * 1024]
    assert len(large) == 2 and 0 < large[0] < large[1] < 11


def test_writes_are_every_request_but_reads():
    from collections import Counter

    operations = Counter(
        {
            "BlockBlob_Upload": 10,
            "BlockBlob_StageBlock": 3,
            "BlockBlob_CommitBlockList": 1,
            "Blob_AcquireLease": 1,
            "Container_Create": 1,
            "Blob_Download": 4,
            "Blob_GetProperties": 2,
            "Container_ListBlobFlatSegment": 1,
        }
    )
    assert drain_bench.count_writes(operations) == 16
