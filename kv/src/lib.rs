//! Where tollgate's shared state lives: one Redis, or a Redis Cluster.
//!
//! Every key family except money (routes, usage counts, control's projects and locks, payment
//! channels, the runtime hosts) reaches Redis through a [`Conn`] opened from a [`Target`], so the
//! same code runs on both:
//!
//! - **Keys.** On a cluster, a family's prefix is one hash tag (`{tollgate}`,
//!   [`Target::family_prefix`]): all of these keys share a slot, so a script that touches
//!   several (a route write fenced by its project's lock, a project and its owner's index) runs
//!   unchanged. One master serves them; they are control-plane writes, a few per deploy. Money,
//!   the volume that scales, is sharded over many slots by the metering crate's `ClusterStore`.
//! - **Writes.** On a cluster, a write is acknowledged only once a replica holds it: it goes in
//!   one transaction with a marker and then `WAIT` (see [`Conn`]). Asynchronous replication
//!   otherwise loses the last writes of a master that dies, and a payment channel's accepted
//!   amount going back would let a voucher be credited twice. Liveness leases and counts take
//!   the master's word ([`Conn::without_acks`]).
//! - **Pub/sub.** On a cluster, sharded: scripts and [`publish`] use `SPUBLISH`, and a
//!   [`Subscription`] subscribes on the channel's master (`SSUBSCRIBE`), so a message does not
//!   cross the whole cluster's bus. A failover ends the subscription: the subscriber reloads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// How long a write waits for a replica before it is refused as unacknowledged.
pub const REPLICA_WAIT: Duration = Duration::from_millis(1000);

/// One Redis (a URL) or a Redis Cluster (any of its members).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    One(String),
    Cluster {
        seeds: Vec<String>,
        /// Replicas a write must reach before it is acknowledged (0: the master's answer).
        replica_acks: u32,
    },
}

impl From<&str> for Target {
    fn from(url: &str) -> Self {
        Target::One(url.to_owned())
    }
}
impl From<&String> for Target {
    fn from(url: &String) -> Self {
        Target::One(url.clone())
    }
}
impl From<String> for Target {
    fn from(url: String) -> Self {
        Target::One(url)
    }
}
impl From<&Target> for Target {
    fn from(t: &Target) -> Self {
        t.clone()
    }
}

/// Connection timeouts (`None`: the client's defaults).
#[derive(Debug, Clone, Copy, Default)]
pub struct Timeouts {
    pub connect: Option<Duration>,
    pub response: Option<Duration>,
}

impl Timeouts {
    /// Request-serving callers: 1 s to connect, 5 s to answer.
    pub const REQUESTS: Timeouts = Timeouts {
        connect: Some(Duration::from_secs(1)),
        response: Some(Duration::from_secs(5)),
    };

    /// Both bounded by `t`.
    pub fn both(t: Duration) -> Self {
        Timeouts {
            connect: Some(t),
            response: Some(t),
        }
    }
}

impl Target {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Target::Cluster { .. })
    }

    /// The prefix a key family puts before its keys: `prefix` on one Redis (the keys are the
    /// ones they always were), one hash tag `{prefix}` on a cluster.
    pub fn family_prefix(&self, prefix: &str) -> String {
        match self {
            Target::One(_) => prefix.to_owned(),
            Target::Cluster { .. } => format!("{{{prefix}}}"),
        }
    }

    /// For messages: the URL, or the cluster's members.
    pub fn describe(&self) -> String {
        match self {
            Target::One(url) => url.clone(),
            Target::Cluster { seeds, .. } => format!("the Redis Cluster of {}", seeds.join(", ")),
        }
    }

    /// A connection with the client's defaults (one Redis: a connection manager's retries;
    /// a cluster: 1 s to connect, 5 s to answer).
    pub async fn connect(&self) -> RedisResult<Conn> {
        match self {
            Target::One(url) => Ok(Conn(Inner::One(
                ConnectionManager::new(redis::Client::open(url.as_str())?).await?,
            ))),
            Target::Cluster { .. } => self.connect_with(Timeouts::REQUESTS).await,
        }
    }

    /// A connection that reconnects by itself (one Redis: a connection manager; a cluster: the
    /// cluster client, which follows failovers and slot moves).
    pub async fn connect_with(&self, t: Timeouts) -> RedisResult<Conn> {
        match self {
            Target::One(url) => {
                let client = redis::Client::open(url.as_str())?;
                let mut cfg = ConnectionManagerConfig::new().set_number_of_retries(1);
                if let Some(c) = t.connect {
                    cfg = cfg.set_connection_timeout(Some(c)).set_max_delay(c);
                }
                if let Some(r) = t.response {
                    cfg = cfg.set_response_timeout(Some(r));
                }
                Ok(Conn(Inner::One(
                    ConnectionManager::new_with_config(client, cfg).await?,
                )))
            }
            Target::Cluster {
                seeds,
                replica_acks,
            } => {
                let client = cluster_client(seeds, t, None)?;
                Ok(Conn(Inner::Cluster {
                    conn: client.get_async_connection().await?,
                    acks: *replica_acks,
                    scripts: Arc::default(),
                }))
            }
        }
    }

    /// Subscribes to `channels` (all in one slot on a cluster: one family's). Subscribe first,
    /// then read what the channels announce changes of: nothing is missed in between.
    pub async fn subscribe(&self, channels: &[String], t: Timeouts) -> RedisResult<Subscription> {
        match self {
            Target::One(url) => {
                let client = redis::Client::open(url.as_str())?;
                let (mut sink, stream) = client.get_async_pubsub().await?.split();
                for ch in channels {
                    sink.subscribe(ch).await?;
                }
                Ok(Subscription(Sub::One { sink, stream }))
            }
            Target::Cluster { seeds, .. } => {
                let (tx, push) = tokio::sync::mpsc::unbounded_channel();
                let client = cluster_client(seeds, t, Some(tx))?;
                let mut conn = client.get_async_connection().await?;
                for ch in channels {
                    conn.ssubscribe(ch).await?;
                }
                let mut routes: Vec<Route> = channels
                    .iter()
                    .map(|c| Route::with_key(c, SlotAddr::Master))
                    .collect();
                routes.dedup();
                Ok(Subscription(Sub::Cluster { conn, push, routes }))
            }
        }
    }
}

fn cluster_client(
    seeds: &[String],
    t: Timeouts,
    push: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
) -> RedisResult<redis::cluster::ClusterClient> {
    // No retries inside the client: it resends a whole request after a connection drops, when
    // the server may already have run it (a counter added twice, a lock found held by its own
    // token). `Conn` resends only what was refused unrun (a redirect after a failover: the
    // client rebuilds its slot map meanwhile); a lost connection reaches the caller, who
    // retries as with one Redis.
    let mut b = redis::cluster::ClusterClientBuilder::new(seeds.to_vec()).retries(0);
    if let Some(c) = t.connect {
        b = b.connection_timeout(c);
    }
    if let Some(r) = t.response {
        b = b.response_timeout(r);
    }
    if let Some(tx) = push {
        b = b
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(tx);
    }
    b.build()
}

/// A connection to a [`Target`]; clones share it.
///
/// On a cluster with `replica_acks > 0`, every command that may write (anything but the reads
/// and keyless commands listed in [`is_read`]) goes in one transaction with a marker write in
/// its slot (`INCR {tag}:kv:acked`), then `WAIT replica_acks`, in one pipeline to the slot's
/// master (see `acknowledged`). The wait covers this command and, through the marker, every
/// write the master had applied when the command ran: a command that changed nothing (a
/// `SET NX` that found the key, an `HSETNX` that found the field) answers from state a replica
/// holds too. Fewer replicas than asked within [`REPLICA_WAIT`] is an error (`Io`): the write
/// may or may not stay, and callers retry what they would retry after a lost connection. A
/// caller's pipeline goes in the same transaction (a non-atomic one becomes atomic).
/// [`Conn::query_confirmed`] does the same for a read whose answer is acted on elsewhere (money
/// credited from what it lists).
#[derive(Clone)]
pub struct Conn(Inner);

#[derive(Clone)]
enum Inner {
    One(ConnectionManager),
    Cluster {
        conn: ClusterConnection,
        acks: u32,
        /// Script sources by SHA1, from the `SCRIPT LOAD`s this connection answered itself.
        scripts: Scripts,
    },
}

/// One Redis's connection manager as a [`Conn`] (for code that holds one already).
impl From<ConnectionManager> for Conn {
    fn from(c: ConnectionManager) -> Self {
        Conn(Inner::One(c))
    }
}

impl Conn {
    pub fn is_cluster(&self) -> bool {
        matches!(self.0, Inner::Cluster { .. })
    }

    /// The same connection, its writes acknowledged by the master alone: for liveness leases
    /// and heartbeats, whose loss in a failover costs a lease's lifetime, while waiting for a
    /// replica would stop them whenever a master has none (after its replica was promoted).
    pub fn without_acks(&self) -> Conn {
        match &self.0 {
            Inner::One(c) => Conn(Inner::One(c.clone())),
            Inner::Cluster { conn, scripts, .. } => Conn(Inner::Cluster {
                conn: conn.clone(),
                acks: 0,
                scripts: scripts.clone(),
            }),
        }
    }

    /// `code` for this connection: on a cluster its `PUBLISH`es become `SPUBLISH` (the channel
    /// must then be in the slot of the script's keys).
    pub fn script(&self, code: &str) -> redis::Script {
        redis::Script::new(&self.lua(code))
    }

    /// [`Conn::script`]'s source text.
    pub fn lua(&self, code: &str) -> String {
        if self.is_cluster() {
            code.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")
        } else {
            code.to_owned()
        }
    }

    /// Runs a read whose answer is acted on elsewhere, and (on a cluster) answers only once a
    /// replica holds everything the read saw: what a failover could take back is not acted on.
    pub async fn query_confirmed<T: redis::FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        match &mut self.0 {
            Inner::Cluster { conn, acks, .. } if *acks > 0 => {
                let acks = *acks;
                let mut tries = 0;
                let v = loop {
                    match acknowledged(conn, acks, &[cmd]).await.and_then(first) {
                        Err(e) if ran_nothing(&e) && tries < UNRUN_RETRIES => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(100) * tries).await;
                        }
                        other => break other?,
                    }
                };
                Ok(redis::from_redis_value(v.extract_error()?)?)
            }
            _ => cmd.query_async(self).await,
        }
    }
}

/// Publishes `payload` on `channel` (`SPUBLISH` on a cluster).
pub async fn publish(conn: &mut Conn, channel: &str, payload: &str) -> RedisResult<()> {
    let verb = if conn.is_cluster() {
        "SPUBLISH"
    } else {
        "PUBLISH"
    };
    redis::cmd(verb)
        .arg(channel)
        .arg(payload)
        .query_async::<i64>(conn)
        .await
        .map(|_| ())
}

/// Commands that never write (or carry no key: the cluster client sends those to every
/// master or to any node, where a `WAIT` would not follow them; or whose effect is not data a
/// replica keeps, such as a message): no `WAIT` after them.
pub fn is_read(cmd: &Cmd) -> bool {
    let Some(redis::Arg::Simple(name)) = cmd.args_iter().next() else {
        return true;
    };
    const READS: &[&[u8]] = &[
        b"GET",
        b"MGET",
        b"EXISTS",
        b"TTL",
        b"PTTL",
        b"TYPE",
        b"STRLEN",
        b"HGET",
        b"HMGET",
        b"HGETALL",
        b"HLEN",
        b"HEXISTS",
        b"HKEYS",
        b"HVALS",
        b"SMEMBERS",
        b"SISMEMBER",
        b"SCARD",
        b"ZRANGE",
        b"ZRANGEBYSCORE",
        b"ZREVRANGE",
        b"ZSCORE",
        b"ZCARD",
        b"LRANGE",
        b"LLEN",
        b"XRANGE",
        b"XREVRANGE",
        b"XLEN",
        b"EVALSHA_RO",
        b"EVAL_RO",
        b"PING",
        b"SCRIPT",
        b"INFO",
        b"TIME",
        b"CLUSTER",
        b"WAIT",
        b"MULTI",
        b"EXEC",
        b"DBSIZE",
        b"PUBLISH",
        b"SPUBLISH",
    ];
    READS.iter().any(|r| r.eq_ignore_ascii_case(name))
}

/// The hash tag of the command's (first) key: `{tollgate}` of `{tollgate}:ctl:…`. The marker
/// goes there, so it shares the command's slot. A script's first key follows its key count;
/// other commands name their key first.
fn tag_of(cmd: &Cmd) -> Option<String> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            redis::Arg::Simple(b) => Some(b),
            _ => None,
        })
        .collect();
    let name = args.first()?;
    let scripted = [
        &b"EVAL"[..],
        b"EVALSHA",
        b"EVAL_RO",
        b"EVALSHA_RO",
        b"FCALL",
        b"FCALL_RO",
    ]
    .iter()
    .any(|n| n.eq_ignore_ascii_case(name));
    let key = if scripted {
        let keys: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
        if keys == 0 {
            return None;
        }
        args.get(3)?
    } else {
        args.get(1)?
    };
    // Redis's rule: the first `{`, the first `}` after it, something in between.
    let open = key.iter().position(|&c| c == b'{')?;
    let close = open + 1 + key[open + 1..].iter().position(|&c| c == b'}')?;
    (close > open + 1).then(|| String::from_utf8_lossy(&key[open..=close]).into_owned())
}

fn not_acknowledged(got: &Value, acks: u32) -> RedisError {
    RedisError::from((
        ErrorKind::Io,
        "write not acknowledged by a replica",
        format!("{got:?} replicas within {REPLICA_WAIT:?}, {acks} needed"),
    ))
}

/// The one reply of a one-command request.
fn first(replies: Vec<Value>) -> RedisResult<Value> {
    replies
        .into_iter()
        .next()
        .ok_or_else(|| RedisError::from((ErrorKind::Client, "no reply")))
}

/// Checks a `WAIT` reply.
fn check_wait(reply: Option<&Value>, acks: u32) -> RedisResult<()> {
    match reply {
        Some(Value::Int(n)) if *n >= i64::from(acks) => Ok(()),
        Some(other) => Err(not_acknowledged(other, acks)),
        None => Err(not_acknowledged(&Value::Nil, acks)),
    }
}

/// `cmds` in one transaction with the marker (`INCR {tag}:kv:acked`, in their slot), then
/// `WAIT acks`, in one pipeline; the commands' replies once a replica holds them.
///
/// The transaction makes the request all or nothing: a refusal the cluster client reports
/// (a redirect, `TRYAGAIN`, `READONLY`…) can only come while queuing or at `EXEC`, when nothing
/// ran, so sending the request again ([`ran_nothing`]) cannot apply it twice; and the marker
/// runs right after the commands, so the `WAIT` covers everything they saw. Every reply is read,
/// so an error while queuing is the answer. A command that fails inside the transaction (a
/// wrong type, `NOSCRIPT`) answers its error as its reply, as outside one.
async fn acknowledged(
    conn: &mut ClusterConnection,
    acks: u32,
    cmds: &[&Cmd],
) -> RedisResult<Vec<Value>> {
    let tag = cmds.iter().find_map(|c| tag_of(c)).ok_or_else(|| {
        RedisError::from((
            ErrorKind::InvalidClientConfig,
            "a write on a cluster names no hash-tagged key",
            "every key of a Redis Cluster deployment carries its family's tag ({prefix})"
                .to_owned(),
        ))
    })?;
    let n = cmds.len();
    let mut pipe = redis::pipe();
    pipe.cmd("MULTI");
    for c in cmds {
        pipe.add_command((*c).clone());
    }
    pipe.cmd("INCR").arg(format!("{tag}:kv:acked"));
    pipe.cmd("EXEC");
    pipe.cmd("WAIT")
        .arg(acks)
        .arg(REPLICA_WAIT.as_millis() as u64);
    // MULTI, n + 1 queued, EXEC, WAIT.
    let replies = conn.req_packed_commands(&pipe, 0, n + 4).await?;
    if let Some(e) = replies
        .iter()
        .take(n + 3)
        .find(|v| matches!(v, Value::ServerError(_)))
    {
        return Err(e
            .clone()
            .extract_error()
            .err()
            .unwrap_or_else(|| not_acknowledged(&Value::Nil, acks)));
    }
    let mut results = match replies.get(n + 2) {
        Some(Value::Array(items)) if items.len() == n + 1 => items.clone(),
        other => {
            return Err(RedisError::from((
                ErrorKind::Client,
                "unexpected reply to EXEC",
                format!("{other:?}"),
            )));
        }
    };
    check_wait(replies.get(n + 3), acks)?;
    results.truncate(n);
    Ok(results)
}

type Scripts = Arc<Mutex<HashMap<String, String>>>;

/// One command: acknowledged by `acks` replicas when it may write; sent again after a refusal
/// that ran nothing (see [`ran_nothing`]).
async fn send(conn: &mut ClusterConnection, acks: u32, cmd: &Cmd) -> RedisResult<Value> {
    let mut tries = 0;
    loop {
        let reply = if acks == 0 || is_read(cmd) {
            conn.req_packed_command(cmd).await
        } else {
            acknowledged(conn, acks, &[cmd]).await.and_then(first)
        };
        match reply {
            Err(e) if ran_nothing(&e) && tries < UNRUN_RETRIES => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100) * tries).await;
            }
            other => return other,
        }
    }
}

/// How often a request refused without being run is sent again (over about 1.5 s).
const UNRUN_RETRIES: u32 = 5;

/// Refusals that ran nothing, so sending the request again cannot apply it twice: the slot
/// moved (`MOVED`: the client has rebuilt its slot map meanwhile), `TRYAGAIN`, the cluster is
/// down for the moment, or the node was demoted to replica (`READONLY`). Only errors a keyless
/// `WAIT` can never answer: `LOADING` and `MASTERDOWN` could come from the `WAIT` after `EXEC`
/// ran, so they reach the caller. The cluster client itself does not resend (see
/// `cluster_client`): it would resend after a lost connection too, when the server may
/// already have run the request.
fn ran_nothing(e: &RedisError) -> bool {
    use redis::ServerErrorKind as K;
    matches!(
        e.kind(),
        ErrorKind::Server(K::Moved | K::TryAgain | K::ClusterDown | K::ReadOnly)
    )
}

/// `SCRIPT LOAD <source>` is answered here, not sent: the cluster client sends it to every
/// node, replicas included, so one member down or frozen would stop every script's first
/// run. The source is kept, and an `EVALSHA` a master does not know is sent again as `EVAL`
/// (which loads it there) by [`as_eval`].
fn remember_script(scripts: &Scripts, cmd: &Cmd) -> Option<String> {
    let mut args = cmd.args_iter();
    let (
        Some(redis::Arg::Simple(name)),
        Some(redis::Arg::Simple(sub)),
        Some(redis::Arg::Simple(src)),
    ) = (args.next(), args.next(), args.next())
    else {
        return None;
    };
    if !name.eq_ignore_ascii_case(b"SCRIPT") || !sub.eq_ignore_ascii_case(b"LOAD") {
        return None;
    }
    let src = String::from_utf8_lossy(src).into_owned();
    let sha = redis::Script::new(&src).get_hash().to_owned();
    scripts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(sha.clone(), src);
    Some(sha)
}

/// `EVAL <source> …` for an `EVALSHA <sha> …` answered `NOSCRIPT` whose source is known (a
/// refused `EVALSHA` ran nothing, so sending it again as `EVAL` runs it once).
fn as_eval(scripts: &Scripts, cmd: &Cmd, reply: &RedisResult<Value>) -> Option<Cmd> {
    let noscript = match reply {
        Ok(Value::ServerError(e)) => e.kind() == Some(redis::ServerErrorKind::NoScript),
        Err(e) => e.kind() == ErrorKind::Server(redis::ServerErrorKind::NoScript),
        Ok(_) => false,
    };
    if !noscript {
        return None;
    }
    let mut args = cmd.args_iter();
    let (Some(redis::Arg::Simple(name)), Some(redis::Arg::Simple(sha))) =
        (args.next(), args.next())
    else {
        return None;
    };
    if !name.eq_ignore_ascii_case(b"EVALSHA") {
        return None;
    }
    let src = scripts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(std::str::from_utf8(sha).ok()?)?
        .clone();
    let mut eval = redis::cmd("EVAL");
    eval.arg(src);
    for a in args {
        if let redis::Arg::Simple(b) = a {
            eval.arg(b);
        }
    }
    Some(eval)
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Inner::One(c) => c.req_packed_command(cmd),
            Inner::Cluster {
                conn,
                acks,
                scripts,
            } => {
                let acks = *acks;
                if let Some(sha) = remember_script(scripts, cmd) {
                    return Box::pin(async move { Ok(Value::BulkString(sha.into_bytes())) });
                }
                let scripts = scripts.clone();
                Box::pin(async move {
                    let reply = send(conn, acks, cmd).await;
                    match as_eval(&scripts, cmd, &reply) {
                        Some(eval) => send(conn, acks, &eval).await,
                        None => reply,
                    }
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Inner::One(c) => c.req_packed_commands(pipeline, offset, count),
            Inner::Cluster { conn, acks, .. } => {
                let acks = *acks;
                if acks == 0 || pipeline.cmd_iter().all(is_read) {
                    return conn.req_packed_commands(pipeline, offset, count);
                }
                Box::pin(async move {
                    let cmds: Vec<&Cmd> = pipeline.cmd_iter().collect();
                    let mut tries = 0;
                    loop {
                        let replies = acknowledged(conn, acks, &cmds).await.map(|r| {
                            if pipeline.is_transaction() {
                                // What EXEC answers: one array.
                                vec![Value::Array(r)]
                            } else {
                                r.into_iter().skip(offset).take(count).collect()
                            }
                        });
                        match replies {
                            Err(e) if ran_nothing(&e) && tries < UNRUN_RETRIES => {
                                tries += 1;
                                tokio::time::sleep(Duration::from_millis(100) * tries).await;
                            }
                            other => return other,
                        }
                    }
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Inner::One(c) => c.get_db(),
            Inner::Cluster { conn, .. } => conn.get_db(),
        }
    }
}

/// A subscription from [`Target::subscribe`].
pub struct Subscription(Sub);

enum Sub {
    One {
        sink: redis::aio::PubSubSink,
        stream: redis::aio::PubSubStream,
    },
    Cluster {
        conn: ClusterConnection,
        push: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
        routes: Vec<Route>,
    },
}

/// What [`Subscription::next`] gives.
pub type Delivery = Result<Vec<u8>, Lost>;

/// The subscription is gone (a connection closed, or on a cluster the channel's slot moved: a
/// failover). Messages may have been missed: subscribe again, then reread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost(pub String);

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "subscription lost: {}", self.0)
    }
}
impl std::error::Error for Lost {}

impl Subscription {
    /// The next message's payload.
    pub async fn next(&mut self) -> Delivery {
        match &mut self.0 {
            Sub::One { stream, .. } => match stream.next().await {
                Some(m) => Ok(m.get_payload_bytes().to_vec()),
                None => Err(Lost("the subscription stream ended".into())),
            },
            Sub::Cluster { push, .. } => loop {
                let Some(m) = push.recv().await else {
                    return Err(Lost("the push channel ended".into()));
                };
                if let Some(d) = cluster_delivery(m) {
                    return d;
                }
            },
        }
    }

    /// A message already received, without waiting (`None`: nothing buffered).
    pub fn try_next(&mut self) -> Option<Delivery> {
        match &mut self.0 {
            Sub::One { stream, .. } => match futures_util::FutureExt::now_or_never(stream.next()) {
                Some(Some(m)) => Some(Ok(m.get_payload_bytes().to_vec())),
                Some(None) => Some(Err(Lost("the subscription stream ended".into()))),
                None => None,
            },
            Sub::Cluster { push, .. } => loop {
                match push.try_recv() {
                    Ok(m) => {
                        if let Some(d) = cluster_delivery(m) {
                            return Some(d);
                        }
                    }
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => return None,
                    Err(_) => return Some(Err(Lost("the push channel ended".into()))),
                }
            },
        }
    }

    /// Checks the subscription's connection (on a cluster: the channels' masters).
    pub async fn ping(&mut self) -> RedisResult<()> {
        match &mut self.0 {
            // In subscribed mode PING answers ["pong", ""], not +PONG: any reply will do.
            Sub::One { sink, .. } => sink.ping::<Value>().await.map(|_| ()),
            Sub::Cluster { conn, routes, .. } => {
                for r in routes.iter() {
                    let to = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(*r));
                    conn.route_command(redis::cmd("PING"), to).await?;
                }
                Ok(())
            }
        }
    }
}

fn cluster_delivery(m: redis::PushInfo) -> Option<Delivery> {
    match m.kind {
        redis::PushKind::SMessage | redis::PushKind::Message => match m.data.get(1) {
            Some(Value::BulkString(b)) => Some(Ok(b.clone())),
            _ => Some(Ok(Vec::new())),
        },
        redis::PushKind::Disconnection => Some(Err(Lost("a member's connection closed".into()))),
        // The client subscribes again where the slot went, but messages may have been missed.
        redis::PushKind::SUnsubscribe => Some(Err(Lost("a channel's slot moved".into()))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_follows_the_commands_key_not_a_brace_elsewhere() {
        let mut eval = redis::cmd("EVAL");
        eval.arg("return '{' .. ARGV[1] .. '}'")
            .arg(2)
            .arg("{tollgate}:routes")
            .arg("x");
        assert_eq!(tag_of(&eval).as_deref(), Some("{tollgate}"));
        let mut sha = redis::cmd("EVALSHA");
        sha.arg("abc")
            .arg(1)
            .arg("{tollgate:m3}:acct:a")
            .arg("{other}");
        assert_eq!(tag_of(&sha).as_deref(), Some("{tollgate:m3}"));
        let mut none = redis::cmd("EVALSHA");
        none.arg("abc").arg(0).arg("{x}");
        assert_eq!(tag_of(&none), None);
        let mut hset = redis::cmd("HSET");
        hset.arg("{tollgate}:ctl:project:p").arg("f").arg("{v}");
        assert_eq!(tag_of(&hset).as_deref(), Some("{tollgate}"));
        let mut plain = redis::cmd("SET");
        plain.arg("untagged").arg("{v}");
        assert_eq!(tag_of(&plain), None);
        let mut empty = redis::cmd("SET");
        empty.arg("{}x").arg(1);
        assert_eq!(tag_of(&empty), None, "an empty tag hashes the whole key");
    }
}
