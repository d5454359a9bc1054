//! Any message on the route change channel: decoding never panics, and applying whatever
//! decodes to a route table keeps every lookup answering with a valid route (or none): a bad
//! writer cannot corrupt the table every proxy serves from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_routes::{Change, RouteEvent, RouteKey, RouteTable, normalize_host_owned};

fuzz_target!(|payload: &[u8]| {
    let Ok(ev) = serde_json::from_slice::<RouteEvent>(payload) else {
        return;
    };
    let Some(key) = RouteKey::from_field(&ev.key) else {
        return;
    };
    let table = RouteTable::new("localhost", Vec::new());
    table.apply([Change {
        key: key.clone(),
        version: ev.v,
        route: ev.route.clone(),
    }]);
    let host = match &key {
        RouteKey::Slug(s) => format!("{s}.localhost"),
        RouteKey::Host(h) => h.clone(),
    };
    if let Some(r) = table.lookup(&host) {
        // Only a route that validates is served, under its canonical name.
        assert!(ev.route.as_ref().is_some_and(|r| r.validate().is_ok()));
        assert_eq!(normalize_host_owned(&r.hostname).ok().as_deref(), Some(r.hostname.as_ref()));
    }
});
