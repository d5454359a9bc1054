//! Any bytes as a settle journal on disk (a torn, truncated or corrupted file after a crash):
//! opening it never panics, cuts at most a torn last line, and yields exactly the batches the
//! parser finds unacknowledged (and kept) in the whole lines; a second open agrees with the first (the
//! journal a restarted node replays is stable).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_metering::{Journal, parse_journal};

fuzz_target!(|bytes: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.journal");
    std::fs::write(&path, bytes).unwrap();
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let expected = parse_journal(&bytes[..whole]);
    // What `book rebuild` reads from a stopped node's journal is what the node replays.
    assert_eq!(Journal::read_stopped(&path).unwrap(), expected);
    let first = {
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.pending(), expected.pending.as_slice());
        assert_eq!(j.incarnation(), expected.incarnation.as_ref());
        // Acknowledged batches kept for the book of record are never replayed, and survive
        // the compaction an open may do.
        assert!(j.kept().eq(expected.kept.iter().map(|k| &k.batch)));
        j.pending().to_vec()
    };
    let j = Journal::open(&path).unwrap();
    assert_eq!(j.pending(), first.as_slice());
    assert!(j.kept().eq(expected.kept.iter().map(|k| &k.batch)));
});
