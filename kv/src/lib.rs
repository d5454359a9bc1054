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
//!   one pipeline with `WAIT` (see [`Conn`]). Asynchronous replication otherwise loses the last
//!   writes of a master that dies, and a payment channel's accepted amount going back would let
//!   a voucher be credited twice.
//! - **Pub/sub.** On a cluster, sharded: scripts and [`publish`] use `SPUBLISH`, and a
//!   [`Subscription`] subscribes on the channel's master (`SSUBSCRIBE`), so a message does not
//!   cross the whole cluster's bus. A failover ends the subscription: the subscriber reloads.

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
            Target::Cluster { .. } => {
                self.connect_with(Timeouts {
                    connect: Some(Duration::from_secs(1)),
                    response: Some(Duration::from_secs(5)),
                })
                .await
            }
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
    let mut b = redis::cluster::ClusterClientBuilder::new(seeds.to_vec())
        .retries(3)
        .min_retry_wait(50)
        .max_retry_wait(1000);
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
/// and keyless commands listed in [`is_read`]) goes in one pipeline with `WAIT replica_acks`:
/// the pipeline reaches the slot's master on one connection (and is resent whole if the client
/// retries), so the wait covers this very write. Fewer replicas than asked within
/// [`REPLICA_WAIT`] is an error (`Io`, retryable): the write may or may not stay, so callers
/// retry what they would retry after a lost connection. A transaction becomes `MULTI … EXEC`
/// then `WAIT` (`WAIT` inside a transaction does not block).
#[derive(Clone)]
pub struct Conn(Inner);

#[derive(Clone)]
enum Inner {
    One(ConnectionManager),
    Cluster { conn: ClusterConnection, acks: u32 },
}

impl Conn {
    pub fn is_cluster(&self) -> bool {
        matches!(self.0, Inner::Cluster { .. })
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
/// master or to any node, where a `WAIT` would not follow them): no `WAIT` after them.
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
    ];
    READS.iter().any(|r| r.eq_ignore_ascii_case(name))
}

fn not_acknowledged(got: &Value, acks: u32) -> RedisError {
    RedisError::from((
        ErrorKind::Io,
        "write not acknowledged by a replica",
        format!("{got:?} replicas within {REPLICA_WAIT:?}, {acks} needed"),
    ))
}

/// Checks the trailing `WAIT` reply and drops it.
fn take_wait(mut replies: Vec<Value>, acks: u32) -> RedisResult<Vec<Value>> {
    match replies.pop() {
        Some(Value::Int(n)) if n >= i64::from(acks) => Ok(replies),
        Some(other) => Err(not_acknowledged(&other, acks)),
        None => Err(not_acknowledged(&Value::Nil, acks)),
    }
}

fn wait_cmd(acks: u32) -> Cmd {
    let mut c = redis::cmd("WAIT");
    c.arg(acks).arg(REPLICA_WAIT.as_millis() as u64);
    c
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Inner::One(c) => c.req_packed_command(cmd),
            Inner::Cluster { conn, acks } => {
                let acks = *acks;
                if acks == 0 || is_read(cmd) {
                    return conn.req_packed_command(cmd);
                }
                Box::pin(async move {
                    let mut pipe = redis::pipe();
                    pipe.add_command(cmd.clone()).add_command(wait_cmd(acks));
                    let mut replies = conn.req_packed_commands(&pipe, 0, 2).await?;
                    // A failed command is the answer (its error is what the caller sees).
                    if matches!(replies.first(), Some(Value::ServerError(_))) {
                        return Ok(replies.swap_remove(0));
                    }
                    let mut replies = take_wait(replies, acks)?;
                    replies
                        .pop()
                        .ok_or_else(|| not_acknowledged(&Value::Nil, acks))
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
            Inner::Cluster { conn, acks } => {
                let acks = *acks;
                if acks == 0 || pipeline.cmd_iter().all(is_read) {
                    return conn.req_packed_commands(pipeline, offset, count);
                }
                Box::pin(async move {
                    // The same commands as sent (a transaction spelled out), then the WAIT.
                    let mut pipe = redis::pipe();
                    if pipeline.is_transaction() {
                        pipe.cmd("MULTI");
                    }
                    for c in pipeline.cmd_iter() {
                        pipe.add_command(c.clone());
                    }
                    if pipeline.is_transaction() {
                        pipe.cmd("EXEC");
                    }
                    pipe.add_command(wait_cmd(acks));
                    let replies = conn.req_packed_commands(&pipe, offset, count + 1).await?;
                    if replies.iter().any(|v| matches!(v, Value::ServerError(_))) {
                        let mut replies = replies;
                        replies.truncate(count);
                        return Ok(replies);
                    }
                    take_wait(replies, acks)
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
