//! The request path: `Host` → route → upstream, with the proxy's own answers for everything that
//! cannot reach an upstream. No network I/O here except to the upstream.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use tollgate_balance_cache::Spend;
use tollgate_routes::{MAX_HOST_LEN, ResolvedRoute, RouteTable, normalize_host};

use crate::access_log::{AccessLog, Decision, Record, loggable_path, now_unix_ms};
use crate::config::ProxyConfig;
use crate::gate::{Gate, Redeemed};
use crate::headers::{
    REQUEST_ID, carries_payment, content_length, header_bytes, request_id, strip_internal_headers,
    strip_platform_credentials,
};
use crate::metrics::ProxyMetrics;
use crate::pages::{Problem, wants_html};
use crate::tls::TlsConfig;

pub use crate::headers::INTERNAL_HEADER_PREFIX;

/// Shared between the proxy and the admin server: ready = routes loaded and not draining.
#[derive(Default)]
pub struct Health {
    draining: AtomicBool,
}

impl Health {
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

pub struct Dispatch {
    pub(crate) gate: Option<Gate>,
    pub(crate) table: Arc<RouteTable>,
    pub(crate) health: Arc<Health>,
    pub(crate) metrics: Arc<ProxyMetrics>,
    pub(crate) max_header_bytes: usize,
    pub(crate) max_body_bytes: u64,
    pub(crate) trust_forwarded: bool,
    /// Credentials for these realms never reach an upstream.
    pub(crate) payment_realms: Arc<[String]>,
    pub(crate) connect_timeout: Duration,
    pub(crate) read_timeout: Duration,
    pub(crate) write_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    /// Plain-HTTP requests get a 308 to HTTPS on this port (`tls.redirect_http`).
    pub(crate) redirect_port: Option<u16>,
    /// `Strict-Transport-Security` for HTTPS answers.
    pub(crate) hsts: Option<http::HeaderValue>,
    pub(crate) access_log: Option<Arc<AccessLog>>,
}

impl Dispatch {
    pub(crate) fn new(
        cfg: &ProxyConfig,
        tls: &TlsConfig,
        table: Arc<RouteTable>,
        health: Arc<Health>,
        metrics: Arc<ProxyMetrics>,
        gate: Option<Gate>,
    ) -> Self {
        Dispatch {
            gate,
            table,
            health,
            metrics,
            max_header_bytes: cfg.max_request_header_bytes,
            max_body_bytes: cfg.max_body_bytes,
            trust_forwarded: cfg.trust_forwarded_headers,
            payment_realms: cfg.payment_realms.iter().cloned().collect(),
            connect_timeout: Duration::from_secs_f64(cfg.upstream_connect_timeout_seconds),
            read_timeout: Duration::from_secs_f64(cfg.upstream_read_timeout_seconds),
            write_timeout: Duration::from_secs_f64(cfg.upstream_write_timeout_seconds),
            idle_timeout: Duration::from_secs_f64(cfg.upstream_idle_timeout_seconds),
            redirect_port: if tls.redirect_http {
                tls.public_port()
            } else {
                None
            },
            hsts: tls
                .hsts_value()
                .and_then(|v| http::HeaderValue::from_str(&v).ok()),
            access_log: None,
        }
    }
}

/// Decrements the in-flight gauge however the request ends.
pub struct InFlight(prometheus::IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub struct Ctx {
    start: Instant,
    route: Option<Arc<ResolvedRoute>>,
    first_pick: usize,
    attempts: usize,
    body_bytes: u64,
    request_id: String,
    html: bool,
    /// An upstream took the request and dropped the connection without answering.
    interrupted: bool,
    /// The money gate refused it (402/503): not the service's usage.
    refused: bool,
    /// The `Payment-Receipt` of a top-up paid with this request (a suspended service's owner
    /// answered its 402 challenge).
    receipt: Option<String>,
    /// Came over TLS.
    tls: bool,
    /// The `Strict-Transport-Security` value every answer on this request carries.
    hsts: Option<http::HeaderValue>,
    /// What the money gate did (the access log's `decision`).
    decision: Decision,
    /// The current upstream attempt began / its response headers took this long.
    upstream_start: Option<Instant>,
    upstream_time: Option<Duration>,
    /// Held for the request's lifetime (the runtime's in-flight count).
    _request_guard: Option<Box<dyn Send + Sync>>,
    _in_flight: InFlight,
}

impl Ctx {
    fn host(&self) -> &str {
        self.route.as_ref().map_or("", |r| &r.hostname)
    }
}

#[async_trait]
impl ProxyHttp for Dispatch {
    type CTX = Ctx;

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {
        // Pingora adds a (disabled) compression module by default, which still builds a
        // per-request context. We do not compress: hosted services choose their own encoding.
    }

    fn new_ctx(&self) -> Ctx {
        self.metrics.in_flight.inc();
        Ctx {
            start: Instant::now(),
            route: None,
            first_pick: 0,
            attempts: 0,
            body_bytes: 0,
            request_id: String::new(),
            html: false,
            interrupted: false,
            refused: false,
            receipt: None,
            tls: false,
            hsts: None,
            decision: Decision::Refused,
            upstream_start: None,
            upstream_time: None,
            _request_guard: None,
            _in_flight: InFlight(self.metrics.in_flight.clone()),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        if ctx.tls {
            ctx.hsts = self.hsts.clone();
        }
        let req = session.req_header();
        ctx.html = wants_html(req.headers.get(http::header::ACCEPT).map(|v| v.as_bytes()));
        ctx.request_id = request_id(req);

        if !self.table.is_synced() {
            self.metrics.rejected_not_ready.inc();
            return respond(session, ctx, &Problem::not_ready()).await;
        }
        if header_bytes(req) > self.max_header_bytes {
            self.metrics.rejected_header_too_large.inc();
            return respond(
                session,
                ctx,
                &Problem::header_too_large(self.max_header_bytes),
            )
            .await;
        }
        if let Some(len) = content_length(req)
            && len > self.max_body_bytes
        {
            self.metrics.rejected_body_too_large.inc();
            return respond(session, ctx, &Problem::body_too_large(self.max_body_bytes)).await;
        }
        let raw_host = match req.headers.get(http::header::HOST) {
            Some(h) => h.as_bytes(),
            // HTTP/1.0 without Host, or absolute-form without a Host header.
            None => req.uri.host().map(str::as_bytes).unwrap_or_default(),
        };
        let mut buf = [0u8; MAX_HOST_LEN];
        let host = match normalize_host(raw_host, &mut buf) {
            Ok(h) => h,
            Err(e) => {
                self.metrics.rejected_bad_host.inc();
                return respond(session, ctx, &Problem::bad_host(e.to_string())).await;
            }
        };
        if !ctx.tls
            && let Some(port) = self.redirect_port
        {
            // Before the route and the money gate: a redirect is never charged.
            let location = https_location(host, port, &session.req_header().uri);
            ctx.decision = Decision::Redirected;
            return redirect(session, ctx, &location).await;
        }
        match self.table.lookup(host) {
            Some(route) => {
                ctx.decision = Decision::Free;
                if let Some(gate) = &self.gate
                    && let Some(account) = route.account_id.as_deref()
                {
                    let mut spend = gate.pay(account).await;
                    let mut refused_detail = None;
                    if matches!(spend, Spend::Suspended)
                        && let Some(desk) = &gate.payments
                        && carries_payment(&session.req_header().headers)
                    {
                        // The owner answers the 402 challenge: a top-up, then this request.
                        match desk.redeem(account, &session.req_header().headers).await {
                            Ok(Redeemed::Management(receipt)) => {
                                ctx.refused = true;
                                ctx.decision = Decision::Paid;
                                ctx.route = Some(route);
                                return respond_management(session, ctx, receipt).await;
                            }
                            Ok(Redeemed::Paid(receipt)) => {
                                spend =
                                    gate.pay_after_credit(account, Duration::from_secs(2)).await;
                                if matches!(spend, Spend::Ok) {
                                    ctx.receipt = Some(receipt);
                                }
                            }
                            Err(r) if r.retryable => spend = Spend::Unavailable,
                            Err(r) => refused_detail = Some(r.detail),
                        }
                    }
                    match spend {
                        Spend::Ok => {
                            ctx.decision = Decision::Paid;
                            gate.metered.inc();
                            if let (Some(hooks), Some(dep)) =
                                (&gate.hooks, route.deployment_id.as_deref())
                            {
                                ctx._request_guard = hooks.begin(dep);
                            }
                        }
                        Spend::Suspended => {
                            ctx.decision = Decision::Suspended;
                            gate.rejected_suspended.inc();
                            ctx.refused = true;
                            let mut p = Problem::suspended(&route.hostname, &gate.top_up);
                            if let Some(d) = refused_detail {
                                p.detail = format!("{} The payment was refused: {d}", p.detail);
                            }
                            let challenge = gate
                                .payments
                                .as_ref()
                                .and_then(|d| d.challenge(account, &route.hostname));
                            ctx.route = Some(route);
                            return respond_with(session, ctx, &p, challenge).await;
                        }
                        Spend::Pending | Spend::Unavailable => {
                            ctx.decision = Decision::Unavailable;
                            gate.rejected_unavailable.inc();
                            ctx.refused = true;
                            ctx.route = Some(route);
                            return respond(session, ctx, &Problem::metering_unavailable()).await;
                        }
                    }
                }
                ctx.first_pick = route.first_pick();
                ctx.route = Some(route);
                Ok(false)
            }
            None => {
                self.metrics.rejected_unknown_host.inc();
                let p = Problem::unknown_host(host);
                respond(session, ctx, &p).await
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let route = ctx
            .route
            .as_ref()
            .ok_or_else(|| Error::explain(InternalError, "upstream_peer without a route"))?;
        let addr = route
            .upstream(ctx.first_pick, ctx.attempts)
            .ok_or_else(|| Error::explain(InternalError, "route without upstreams"))?;
        ctx.attempts += 1;
        ctx.upstream_start = Some(Instant::now());
        let mut peer = HttpPeer::new(addr, false, String::new());
        let o = &mut peer.options;
        o.connection_timeout = Some(self.connect_timeout);
        o.read_timeout = Some(self.read_timeout);
        o.write_timeout = Some(self.write_timeout);
        o.idle_timeout = Some(self.idle_timeout);
        Ok(Box::new(peer))
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        if matches!(e.etype(), ConnectionClosed | ReadError) {
            ctx.interrupted = true;
        }
        // Pingora's own rule: retry idempotent requests that failed on a reused connection
        // (the upstream may have closed it while idle).
        let mut e = e.more_context(format!("Peer: {peer}"));
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.metrics.upstream_connect_errors.inc();
        // Nothing was sent yet, so any request may go to the next upstream of the route.
        let more = ctx
            .route
            .as_ref()
            .is_some_and(|r| ctx.attempts < r.upstreams.len());
        if more {
            e.set_retry(true);
        }
        e
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(b) = body {
            ctx.body_bytes += b.len() as u64;
            if ctx.body_bytes > self.max_body_bytes {
                self.metrics.rejected_body_too_large.inc();
                return Error::e_explain(HTTPStatus(413), "request body over max_body_bytes");
            }
        }
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        strip_internal_headers(upstream);
        if !self.payment_realms.is_empty() {
            strip_platform_credentials(upstream, &self.payment_realms);
        }
        let client_ip = match session.client_addr() {
            Some(PingoraAddr::Inet(a)) => a.ip().to_string(),
            _ => String::new(),
        };
        let xff = match (
            self.trust_forwarded,
            upstream.headers.get("x-forwarded-for"),
        ) {
            (true, Some(prev)) if !client_ip.is_empty() => {
                let mut v = prev.as_bytes().to_vec();
                v.extend_from_slice(b", ");
                v.extend_from_slice(client_ip.as_bytes());
                Some(v)
            }
            (true, Some(_)) => None,
            _ => Some(client_ip.into_bytes()),
        };
        if let Some(v) = xff {
            upstream.insert_header("x-forwarded-for", v)?;
        }
        if !self.trust_forwarded || upstream.headers.get("x-forwarded-proto").is_none() {
            upstream.insert_header("x-forwarded-proto", if ctx.tls { "https" } else { "http" })?;
        }
        if !self.trust_forwarded || upstream.headers.get("x-forwarded-host").is_none() {
            let req = session.req_header();
            // HTTP/2 carries the host in :authority, not in a Host field.
            match (req.headers.get(http::header::HOST), req.uri.authority()) {
                (Some(h), _) => {
                    let h = h.clone();
                    upstream.insert_header("x-forwarded-host", h)?
                }
                (None, Some(a)) => {
                    let a = a.as_str().to_owned();
                    upstream.insert_header("x-forwarded-host", a)?
                }
                (None, None) => {
                    upstream.insert_header("x-forwarded-host", ctx.host().to_owned())?
                }
            }
        }
        upstream.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.upstream_time = ctx.upstream_start.map(|t| t.elapsed());
        if self.health.is_draining() {
            // Close each client connection after its current response, so that clients open
            // their next one to a node (or upgraded process) that is not going away, instead
            // of racing a request into a socket we are about to close.
            session.set_keepalive(None);
        }
        if resp.status.as_u16() != 101 {
            // Hop-by-hop fields of the upstream's connection, not of ours (RFC 9110 §7.6.1).
            resp.remove_header("keep-alive");
            resp.remove_header("proxy-connection");
        }
        resp.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        if let Some(v) = &ctx.hsts
            && !resp
                .headers
                .contains_key(http::header::STRICT_TRANSPORT_SECURITY)
        {
            resp.insert_header(http::header::STRICT_TRANSPORT_SECURITY, v.clone())?;
        }
        if let Some(receipt) = ctx.receipt.take() {
            resp.insert_header("payment-receipt", receipt)?;
            resp.insert_header("cache-control", "private")?;
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let problem = match e.etype() {
            HTTPStatus(413) => Some(Problem::body_too_large(self.max_body_bytes)),
            HTTPStatus(code) if *code >= 500 => Some(Problem::internal()),
            HTTPStatus(_) => Some(Problem::bad_request(e.to_string())),
            ConnectTimedout | ReadTimedout | WriteTimedout => {
                self.metrics.upstream_timeouts.inc();
                Some(Problem::gateway_timeout(ctx.host()))
            }
            _ => match e.esource() {
                // Connected and sent, then the connection died with no answer.
                // (A retry of it then finds the port closed: the process is gone.)
                ErrorSource::Upstream
                    if (ctx.interrupted || matches!(e.etype(), ConnectionClosed | ReadError))
                        && session.response_written().is_none() =>
                {
                    self.metrics.upstream_other_errors.inc();
                    Some(Problem::service_interrupted(ctx.host()))
                }
                ErrorSource::Upstream => {
                    if !matches!(
                        e.etype(),
                        ConnectRefused | ConnectError | ConnectNoRoute | ConnectProxyFailure
                    ) {
                        self.metrics.upstream_other_errors.inc();
                    }
                    Some(Problem::bad_gateway(ctx.host()))
                }
                ErrorSource::Downstream => match e.etype() {
                    WriteError | ReadError | ConnectionClosed => None,
                    _ => Some(Problem::bad_request(
                        "The request could not be read.".into(),
                    )),
                },
                ErrorSource::Internal | ErrorSource::Unset => Some(Problem::internal()),
            },
        };
        let code = match problem {
            Some(p) => {
                // A response may already be under way (upstream died mid-body): then the
                // connection is just closed.
                if session.response_written().is_none()
                    && let Ok((mut h, body)) = p.render(&ctx.request_id, ctx.html)
                {
                    if let Some(v) = &ctx.hsts {
                        let _ = h.insert_header(http::header::STRICT_TRANSPORT_SECURITY, v.clone());
                    }
                    // The connection is not reused after an error: say so, or a client may
                    // send its next request into a closing socket.
                    session.set_keepalive(None);
                    let _ = session.write_response_header(Box::new(h), false).await;
                    let _ = session.write_response_body(Some(body), true).await;
                }
                p.status
            }
            None => 0,
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        // The request is over: the connection's next byte starts a header (under its deadline).
        crate::header_guard::request_done(session.stream());
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        self.metrics.count_status(status);
        if let Some(route) = &ctx.route
            && route.project_id.is_some()
            && !ctx.refused
        {
            route.requests.fetch_add(1, Ordering::Relaxed);
            route
                .bytes_out
                .fetch_add(session.body_bytes_sent() as u64, Ordering::Relaxed);
        }
        self.metrics
            .duration_seconds
            .observe(ctx.start.elapsed().as_secs_f64());
        if let Some(e) = e
            && status >= 500
        {
            tracing::warn!(
                request_id = %ctx.request_id,
                host = ctx.host(),
                status,
                error = %e,
                "request failed"
            );
        }
        if let Some(log) = &self.access_log
            && log.wants(status)
        {
            log.log(&access_record(session, ctx, status));
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, _error: &Error) -> bool {
        // `logging` reports failures through tracing with the request id.
        true
    }
}

/// The access log's line for this request, borrowed from it: nothing from a header value
/// (but a plain host name) or the query.
fn access_record<'a>(session: &'a Session, ctx: &'a Ctx, status: u16) -> Record<'a> {
    let req = session.req_header();
    let host: &str = match &ctx.route {
        Some(r) => &r.hostname,
        // Not a route: the client's Host, only if it is plainly a host name (a log line is
        // no place for whatever a client sends).
        None => req
            .headers
            .get(http::header::HOST)
            .map(|h| h.as_bytes())
            .or(req.uri.host().map(str::as_bytes))
            .filter(|h| {
                h.len() <= MAX_HOST_LEN
                    && h.iter()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(b))
            })
            .and_then(|h| std::str::from_utf8(h).ok())
            .unwrap_or("-"),
    };
    let metered = matches!(
        ctx.decision,
        Decision::Paid | Decision::Suspended | Decision::Unavailable
    );
    Record {
        unix_ms: now_unix_ms(),
        request_id: &ctx.request_id,
        host,
        method: req.method.as_str(),
        path: loggable_path(&req.uri),
        protocol: match req.version {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        },
        tls: ctx.tls,
        status,
        bytes_sent: session.body_bytes_sent() as u64,
        duration: ctx.start.elapsed(),
        upstream: ctx.upstream_time,
        account: if metered {
            ctx.route.as_ref().and_then(|r| r.account_id.as_deref())
        } else {
            None
        },
        decision: ctx.decision,
    }
}

/// Writes a proxy-made answer and ends the request (`Ok(true)` for `request_filter`).
async fn respond(session: &mut Session, ctx: &Ctx, p: &Problem) -> Result<bool> {
    respond_with(session, ctx, p, None).await
}

/// A problem answer, with a `WWW-Authenticate: Payment` challenge when there is one (a 402
/// must carry at least one).
async fn respond_with(
    session: &mut Session,
    ctx: &Ctx,
    p: &Problem,
    challenge: Option<String>,
) -> Result<bool> {
    let (mut h, body) = p.render(&ctx.request_id, ctx.html)?;
    if let Some(c) = challenge {
        h.insert_header("www-authenticate", c)?;
    }
    if let Some(v) = &ctx.hsts {
        h.insert_header(http::header::STRICT_TRANSPORT_SECURITY, v.clone())?;
    }
    session.set_keepalive(None);
    session.write_response_header(Box::new(h), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(true)
}

/// 204 with the receipt: a payment-channel change that pays for nothing by itself.
async fn respond_management(session: &mut Session, ctx: &Ctx, receipt: String) -> Result<bool> {
    let mut h = ResponseHeader::build(204, Some(4))?;
    h.insert_header("payment-receipt", receipt)?;
    h.insert_header("cache-control", "private")?;
    if !ctx.request_id.is_empty() {
        h.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
    }
    if let Some(v) = &ctx.hsts {
        h.insert_header(http::header::STRICT_TRANSPORT_SECURITY, v.clone())?;
    }
    session.write_response_header(Box::new(h), true).await?;
    Ok(true)
}

/// The same URL over HTTPS (`host` is already normalised: lower case, no port).
fn https_location(host: &str, port: u16, uri: &http::Uri) -> String {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    // An absolute-form request line carries its own path; an empty one is "/".
    let path = if path.starts_with('/') { path } else { "/" };
    if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    }
}

/// 308 Permanent Redirect: keeps the method and body, unlike 301.
async fn redirect(session: &mut Session, ctx: &Ctx, location: &str) -> Result<bool> {
    let body = Bytes::from(format!("Moved to {location}\n"));
    let mut h = ResponseHeader::build(308, Some(5))?;
    h.insert_header(http::header::LOCATION, location)?;
    h.insert_header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    h.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    if !ctx.request_id.is_empty() {
        h.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
    }
    session.write_response_header(Box::new(h), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(true)
}
