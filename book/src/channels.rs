//! The payment channel records kept beside the ledger (payments/src/channels/redis.rs owns
//! them): each channel's record (its accepted cumulative, the signed vouchers a settlement on
//! chain needs, its close history), the credits decided with a channel update and not yet
//! applied to the ledger (`pending`, `poisoned`), the channels with a forced close to watch,
//! and the close watcher's cursor. The ledger holds the credits these produced, not the records
//! themselves; without them a Redis data loss would forget how much of a channel was already
//! credited, and the payer's next voucher would be credited from zero again.
//!
//! **The cut.** Each round reads, in one Lua call, the channels changed since the book last
//! stored them (`mpp:dirty`, id → version), the pending and poisoned credits, the forced set,
//! the watcher's cursor, the Redis clock and the ledger's last entry id; then the changed
//! records (each with its version, atomically); and copies ledger lines up to that last id
//! only, all in one PostgreSQL transaction. A voucher's credit line is written after its
//! record, so every credit line the book holds has its voucher in a record the book holds: a
//! rebuild never forgets what a channel has credited (the payer's next voucher is credited
//! from there, not from zero). The other way, a voucher in a stored record whose credit is
//! neither in the book's lines nor in its pending credits (accepted after the snapshot, or
//! while the book lagged) is found by the rebuild, which puts the missing amount back as a
//! pending credit: a channel's voucher credits add up to its accepted cumulative.
//!
//! Keys under `<prefix>:mpp:`: `ch:<id>` (record JSON), `channels` (set of ids), `ver` (hash id →
//! version, raised by every commit), `dirty` (hash id → version, cleared once stored),
//! `credits:pending` / `credits:poisoned` (hash key → JSON), `forced` (set), `meta` (hash).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tollgate_kv::Conn;
use tollgate_metering::MAX_OP_AMOUNT;
use tollgate_metering::units::PICOS_PER_BASE_UNIT;

/// Channels recorded before versions existed get version 1 and are marked changed, once.
const ADOPT: &str = r#"
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('HSETNX', KEYS[2], id, 1) == 1 then
    redis.call('HSET', KEYS[3], id, 1)
    n = n + 1
  end
end
return n
"#;

/// Gives every channel without a version one, marked changed, so the book copies it (records
/// written before the book copied channels). Returns how many.
pub(crate) async fn adopt(conn: &mut Conn, prefix: &str) -> Result<i64, redis::RedisError> {
    redis::Script::new(ADOPT)
        .key(key(prefix, "channels"))
        .key(key(prefix, "ver"))
        .key(key(prefix, "dirty"))
        .invoke_async(conn)
        .await
}

/// One read of everything but the records: clock, ledger end, changed ids, side state.
const SNAPSHOT: &str = r#"
local t = redis.call('TIME')
local last = redis.call('XREVRANGE', KEYS[6], '+', '-', 'COUNT', 1)
local id = ''
if last[1] then id = last[1][1] end
return {t[1], t[2], id, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]),
        redis.call('HGETALL', KEYS[3]), redis.call('SMEMBERS', KEYS[4]), redis.call('HGETALL', KEYS[5]),
        redis.call('HGETALL', KEYS[7]), redis.call('HGETALL', KEYS[8])}
"#;

/// The ledger's last entry id and, for each account key in KEYS[2..], its lifetime credited
/// and debited, at one instant (for `reconcile`).
const END_AND_TOTALS: &str = r#"
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local out = {''}
if last[1] then out[1] = last[1][1] end
for i = 2, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'credited', 'debited')
  out[#out + 1] = v[1] or '0'
  out[#out + 1] = v[2] or '0'
end
return out
"#;

/// Clears a channel's dirty mark only when the version stored covers it (a commit after the
/// read marked it again).
const CLEAN: &str = r#"
for i = 1, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur and tonumber(cur) <= tonumber(ARGV[i + 1]) then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
return 1
"#;

/// What is small enough to store whole each round: pending and poisoned credits (key →
/// JSON), channels with a forced close to watch, the watcher's named values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideState {
    pub pending: BTreeMap<String, String>,
    pub poisoned: BTreeMap<String, String>,
    /// Set-aside credits an operator dropped (settled by other means): counted as credited.
    #[serde(default)]
    pub dropped: BTreeMap<String, String>,
    /// Held reversals of starts' charges (due at their deadline unless the start went live).
    #[serde(default)]
    pub held: BTreeMap<String, String>,
    pub forced: BTreeSet<String>,
    pub meta: BTreeMap<String, String>,
}

/// A channel record as stored: its version (raised by every commit) and JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRow {
    pub id: String,
    pub version: i64,
    pub record: String,
}

pub(crate) struct Snapshot {
    /// The Redis clock when read (µs), for the record.
    pub taken_us: i64,
    /// The ledger's last entry id then (`None`: empty).
    pub last: Option<String>,
    /// The channels changed since the book stored them (read in chunks by `records`).
    pub changed: Vec<String>,
    pub side: SideState,
}

pub(crate) fn key(prefix: &str, what: &str) -> String {
    format!("{prefix}:mpp:{what}")
}

fn pairs(flat: Vec<String>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.insert(k, v);
    }
    out
}

type Raw = (
    String,
    String,
    String,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
);

/// Reads the cut (see the module's doc): everything but the records themselves.
pub(crate) async fn snapshot(conn: &mut Conn, prefix: &str) -> Result<Snapshot, redis::RedisError> {
    let (sec, usec, last, dirty, pending, poisoned, forced, meta, dropped, held): Raw =
        redis::Script::new(SNAPSHOT)
            .key(key(prefix, "dirty"))
            .key(key(prefix, "credits:pending"))
            .key(key(prefix, "credits:poisoned"))
            .key(key(prefix, "forced"))
            .key(key(prefix, "meta"))
            .key(format!("{prefix}:ledger"))
            .key(key(prefix, "credits:dropped"))
            .key(key(prefix, "credits:held"))
            .invoke_async(conn)
            .await?;
    let taken_us = sec.parse::<i64>().unwrap_or(0) * 1_000_000 + usec.parse::<i64>().unwrap_or(0);
    Ok(Snapshot {
        taken_us,
        last: (!last.is_empty()).then_some(last),
        changed: pairs(dirty).into_keys().collect(),
        side: SideState {
            pending: pairs(pending),
            poisoned: pairs(poisoned),
            dropped: pairs(dropped),
            held: pairs(held),
            forced: forced.into_iter().collect(),
            meta: pairs(meta),
        },
    })
}

/// The records of `ids` as they are now, each with its version (read together: a commit
/// between the two would pair them wrongly). A record without a version is left out.
pub(crate) async fn records(
    conn: &mut Conn,
    prefix: &str,
    ids: &[String],
) -> Result<Vec<ChannelRow>, redis::RedisError> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for id in ids {
        pipe.cmd("GET").arg(key(prefix, &format!("ch:{id}")));
        pipe.cmd("HGET").arg(key(prefix, "ver")).arg(id);
    }
    let got: Vec<Option<String>> = pipe.query_async(conn).await?;
    let mut out = Vec::with_capacity(ids.len());
    for (id, pair) in ids.iter().zip(got.chunks(2)) {
        if let [Some(record), Some(version)] = pair
            && let Ok(version) = version.parse::<i64>()
        {
            out.push(ChannelRow {
                id: id.clone(),
                version,
                record: record.clone(),
            });
        }
    }
    Ok(out)
}

/// Channels recorded without a version (by nodes older than the book's copy of channels, or
/// before it) get one, marked changed, so the book copies them. Cheap when there are none:
/// only when the set of channels and the versions differ in size.
pub(crate) async fn adopt_if_needed(
    conn: &mut Conn,
    prefix: &str,
) -> Result<i64, redis::RedisError> {
    let (channels, versions): (i64, i64) = redis::pipe()
        .cmd("SCARD")
        .arg(key(prefix, "channels"))
        .cmd("HLEN")
        .arg(key(prefix, "ver"))
        .query_async(conn)
        .await?;
    if channels == versions {
        return Ok(0);
    }
    adopt(conn, prefix).await
}

/// The ledger's last entry id (`None`: empty) and each account's (credited, debited), read at
/// one instant.
pub(crate) async fn ledger_end_and_totals(
    conn: &mut Conn,
    prefix: &str,
    accounts: &[String],
) -> Result<(Option<String>, Vec<(i64, i64)>), redis::RedisError> {
    let script = redis::Script::new(END_AND_TOTALS);
    let mut inv = script.prepare_invoke();
    inv.key(format!("{prefix}:ledger"));
    for a in accounts {
        inv.key(format!("{prefix}:acct:{a}"));
    }
    let reply: Vec<String> = inv.invoke_async(conn).await?;
    let mut it = reply.into_iter();
    let last = it.next().filter(|l| !l.is_empty());
    let rest: Vec<String> = it.collect();
    let totals = rest
        .chunks(2)
        .map(|p| {
            let n = |i: usize| p.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
            (n(0), n(1))
        })
        .collect();
    Ok((last, totals))
}

/// After the book's commit: the stored channels are clean unless changed again since.
pub(crate) async fn clean(
    conn: &mut Conn,
    prefix: &str,
    stored: &[ChannelRow],
) -> Result<(), redis::RedisError> {
    for chunk in stored.chunks(500) {
        let script = redis::Script::new(CLEAN);
        let mut inv = script.prepare_invoke();
        inv.key(key(prefix, "dirty"));
        for r in chunk {
            inv.arg(&r.id).arg(r.version);
        }
        let _: i64 = inv.invoke_async(conn).await?;
    }
    Ok(())
}

/// The accepted cumulative of a record (base units), for the rebuild's check against the
/// book's credit lines.
pub(crate) fn highest(record: &str) -> Option<u128> {
    #[derive(Deserialize)]
    struct State {
        highest_voucher_amount: u128,
    }
    #[derive(Deserialize)]
    struct Record {
        state: State,
    }
    serde_json::from_str::<Record>(record)
        .ok()
        .map(|r| r.state.highest_voucher_amount)
}

/// The money-core account a record's vouchers credit.
pub(crate) fn account(record: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Record {
        account: String,
    }
    serde_json::from_str::<Record>(record)
        .ok()
        .map(|r| r.account)
}

/// A voucher credit's key `mpp:<channel>:<cumulative>` (or a rebuild's gap credit
/// `rebuild:mpp:<channel>:<cumulative>`) → (channel, cumulative).
pub(crate) fn voucher_credit(key: &str) -> Option<(&str, u128)> {
    let rest = key
        .strip_prefix("rebuild:")
        .unwrap_or(key)
        .strip_prefix("mpp:")?;
    let (id, cum) = rest.rsplit_once(':')?;
    (!id.is_empty() && !id.contains(':')).then_some(())?;
    Some((id, cum.parse().ok()?))
}

/// What a rebuild restored of the channels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChannelsRestored {
    pub channels: usize,
    /// Pending credits put back (their lines were not in the book: the drain applies them).
    pub pending_credits: usize,
    /// Channels whose accepted vouchers were credited in neither the book's lines nor its
    /// pending credits: the missing amount put back as a pending credit
    /// (`rebuild:mpp:<channel>:<cumulative>`).
    pub gap_credits: usize,
    pub poisoned_credits: usize,
    pub warnings: Vec<String>,
}

/// Refuses a Redis that holds payment channel records already (a rebuild fills an empty store:
/// checked before anything is written).
pub(crate) async fn check_empty(conn: &mut Conn, prefix: &str) -> Result<(), String> {
    let held: i64 = redis::cmd("EXISTS")
        .arg(key(prefix, "channels"))
        .arg(key(prefix, "ver"))
        .arg(key(prefix, "credits:pending"))
        .arg(key(prefix, "credits:poisoned"))
        .arg(key(prefix, "credits:dropped"))
        .arg(key(prefix, "credits:held"))
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    if held > 0 {
        return Err(format!(
            "Redis already holds payment channel state ({}:*): a rebuild only fills an empty store",
            key(prefix, "")
        ));
    }
    Ok(())
}

/// Writes the book's channel records and side state into an empty Redis (the rebuild). A
/// pending credit whose line the book holds is not put back (it was applied). `credits`: the
/// book's credit keys (without `credit:`). Refused when Redis holds any channel record.
pub(crate) async fn restore(
    conn: &mut Conn,
    prefix: &str,
    rows: &[ChannelRow],
    side: &SideState,
    credits: &BTreeMap<String, (String, i64)>,
) -> Result<ChannelsRestored, String> {
    check_empty(conn, prefix).await?;
    let mut out = ChannelsRestored {
        channels: rows.len(),
        poisoned_credits: side.poisoned.len(),
        ..ChannelsRestored::default()
    };
    // Per channel: the book's voucher credits (highest cumulative, p$ total) and the pending
    // ones being put back.
    let mut credited: BTreeMap<String, (u128, i128)> = BTreeMap::new();
    for (k, (_, amount)) in credits {
        if let Some((id, cum)) = voucher_credit(k) {
            let c = credited.entry(id.to_owned()).or_default();
            c.0 = c.0.max(cum);
            c.1 += i128::from(*amount);
        }
    }
    // Channels whose side credits do not read: no gap is computed for them (named instead).
    let mut unsure: BTreeSet<String> = BTreeSet::new();
    for (k, v) in &side.pending {
        if credits.contains_key(k) {
            continue;
        }
        if let Some((id, _)) = voucher_credit(k) {
            match serde_json::from_str::<serde_json::Value>(v)
                .ok()
                .and_then(|v| v.get("picos").and_then(serde_json::Value::as_i64))
            {
                Some(picos) => credited.entry(id.to_owned()).or_default().1 += i128::from(picos),
                None => {
                    unsure.insert(id.to_owned());
                }
            }
        }
    }
    // Set aside (put back as such: an operator decides) or dropped by an operator (settled by
    // other means): counted as credited, never as a gap.
    for v in side.poisoned.values().chain(side.dropped.values()) {
        let credit = serde_json::from_str::<serde_json::Value>(v).ok();
        let credit = credit.as_ref().and_then(|v| v.get("credit"));
        let Some(key) = credit.and_then(|c| c.get("key")?.as_str()) else {
            continue;
        };
        if credits.contains_key(key) {
            continue;
        }
        if let Some((id, _)) = voucher_credit(key) {
            match credit.and_then(|c| c.get("picos")?.as_i64()) {
                Some(picos) => credited.entry(id.to_owned()).or_default().1 += i128::from(picos),
                None => {
                    unsure.insert(id.to_owned());
                }
            }
        }
    }
    let mut gaps: Vec<(String, String)> = Vec::new();
    let highs: BTreeSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    for r in rows {
        let (cum, total) = credited.get(r.id.as_str()).copied().unwrap_or_default();
        let Some((high, account)) = highest(&r.record).zip(account(&r.record)) else {
            if cum > 0 {
                out.warnings.push(format!(
                    "channel {}: the book holds its credits (up to cumulative {cum}) but its record does not read: close it before another voucher is credited",
                    r.id
                ));
            }
            continue;
        };
        let owed = i128::try_from(high)
            .ok()
            .and_then(|h| h.checked_mul(i128::from(PICOS_PER_BASE_UNIT)));
        let Some(owed) = owed else {
            out.warnings.push(format!(
                "channel {}: its accepted cumulative {high} is out of range: check its credits by hand",
                r.id
            ));
            continue;
        };
        if unsure.contains(&r.id) {
            out.warnings.push(format!(
                "channel {}: a pending or set-aside credit of it does not read: its credits are not checked against its vouchers; check them by hand",
                r.id
            ));
            continue;
        }
        if cum > high || total > owed {
            // The cut makes this impossible; said loudly if it ever is not.
            out.warnings.push(format!(
                "channel {}: the book holds credit up to cumulative {cum} ({total} p$) but its record only up to {high}: close it before the payer's next voucher is credited from {high}",
                r.id
            ));
        } else if total < owed {
            let gap = owed - total;
            let key = format!("rebuild:mpp:{}:{high}", r.id);
            match i64::try_from(gap).ok().filter(|g| *g <= MAX_OP_AMOUNT) {
                Some(gap) => {
                    let credit = serde_json::json!({"key": key, "account": account, "picos": gap});
                    gaps.push((key.clone(), credit.to_string()));
                    out.warnings.push(format!(
                        "channel {}: vouchers up to cumulative {high} were accepted but {gap} p$ of them were credited in neither the book nor its pending credits: put back as pending credit {key}",
                        r.id
                    ));
                }
                None => out.warnings.push(format!(
                    "channel {}: {gap} p$ of accepted vouchers are not credited, more than one credit may carry: credit account {account} by hand",
                    r.id
                )),
            }
        }
    }
    for id in credited.keys() {
        if !highs.contains(id.as_str()) {
            out.warnings.push(format!(
                "channel {id}: the book holds its credits but no record: close it before another voucher is credited from zero"
            ));
        }
    }
    out.gap_credits = gaps.len();
    let mut cmds: Vec<redis::Cmd> = Vec::new();
    for r in rows {
        let mut set = redis::cmd("SET");
        set.arg(key(prefix, &format!("ch:{}", r.id))).arg(&r.record);
        cmds.push(set);
        let mut add = redis::cmd("SADD");
        add.arg(key(prefix, "channels")).arg(&r.id);
        cmds.push(add);
        let mut ver = redis::cmd("HSET");
        ver.arg(key(prefix, "ver")).arg(&r.id).arg(r.version);
        cmds.push(ver);
    }
    for (k, v) in &side.pending {
        if credits.contains_key(k) {
            continue;
        }
        out.pending_credits += 1;
        let mut c = redis::cmd("HSET");
        c.arg(key(prefix, "credits:pending")).arg(k).arg(v);
        cmds.push(c);
    }
    for (k, v) in &gaps {
        let mut c = redis::cmd("HSET");
        c.arg(key(prefix, "credits:pending")).arg(k).arg(v);
        cmds.push(c);
    }
    for (k, v) in &side.dropped {
        let mut c = redis::cmd("HSET");
        c.arg(key(prefix, "credits:dropped")).arg(k).arg(v);
        cmds.push(c);
    }
    // Held reversals come back held: a start that went live is still told by nobody after a
    // loss, so each falls due at its deadline (the customer never pays for nothing).
    for (k, v) in &side.held {
        if credits.contains_key(k) {
            continue;
        }
        let mut c = redis::cmd("HSET");
        c.arg(key(prefix, "credits:held")).arg(k).arg(v);
        cmds.push(c);
    }
    for (k, v) in &side.poisoned {
        let mut c = redis::cmd("HSET");
        c.arg(key(prefix, "credits:poisoned")).arg(k).arg(v);
        cmds.push(c);
    }
    for id in &side.forced {
        let mut c = redis::cmd("SADD");
        c.arg(key(prefix, "forced")).arg(id);
        cmds.push(c);
    }
    for (k, v) in &side.meta {
        let mut c = redis::cmd("HSET");
        c.arg(key(prefix, "meta")).arg(k).arg(v);
        cmds.push(c);
    }
    for chunk in cmds.chunks(1000) {
        let mut pipe = redis::pipe();
        for c in chunk {
            pipe.add_command(c.clone()).ignore();
        }
        pipe.query_async::<()>(conn)
            .await
            .map_err(|e| e.to_string())?;
    }
    for w in &out.warnings {
        tracing::warn!("{w}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn voucher_credit_keys_and_record_cumulatives_are_read() {
        assert_eq!(voucher_credit("mpp:0xab:1500"), Some(("0xab", 1500)));
        assert_eq!(voucher_credit("mpp:0xab:x"), None);
        assert_eq!(voucher_credit("mpp-close:0xab"), None);
        assert_eq!(voucher_credit("mpp::5"), None);
        assert_eq!(voucher_credit("topup:1"), None);
        assert_eq!(
            highest(
                r#"{"state":{"highest_voucher_amount":340282366920938463463374607431768211455},"account":"a"}"#
            ),
            Some(u128::MAX)
        );
        assert_eq!(highest("{}"), None);
    }
}
