//! A deadline for the whole request header (slowloris). Pingora times out each *read* of a
//! header (60 s), so a client that sends a byte every few seconds holds a connection open for
//! as long as it likes. This wraps each HTTP/1 connection's stream: from the moment a request
//! begins (the connection opens, or the first byte after a response) its header must be
//! complete within `header_timeout`, or the read fails and Pingora closes the connection.
//! HTTP/2 connections (ALPN `h2`) pass through: their framing is not a text header.
//!
//! A request ends when the proxy says so ([`request_done`], from its `logging` phase), never
//! on the first response byte: an upstream may answer while the client is still uploading, and
//! that upload is body, not the next header.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora::protocols::{Stream, raw_connect::ProxyDigest, tls::TlsRef};
use pingora::server::ShutdownWatch;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The proxy application with every HTTP/1 connection's header reads under a deadline.
pub struct HeaderGuard<A> {
    inner: Arc<A>,
    timeout: Duration,
    cut: IntCounter,
}

impl<A> HeaderGuard<A> {
    pub fn new(inner: A, timeout: Duration, cut: IntCounter) -> Self {
        HeaderGuard {
            inner: Arc::new(inner),
            timeout,
            cut,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for HeaderGuard<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let stream: Stream = if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            stream
        } else {
            Box::new(Guarded::new(stream, self.timeout, self.cut.clone()))
        };
        self.inner.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request header, under the deadline.
    Header,
    /// The header is complete: the body and the response are not limited here.
    Body,
    /// The request is over; the next byte read starts the next request's header.
    Between,
    /// `101 Switching Protocols` was sent: the connection is a tunnel (WebSocket) from now on.
    Tunnel,
}

/// The phase after the proxy writes `bytes` (the start of a write) in phase `p`: a
/// `101 Switching Protocols` makes a tunnel; anything else changes nothing.
fn after_write(p: Phase, bytes: &[u8]) -> Phase {
    match (p, bytes.get(..12)) {
        (Phase::Header | Phase::Body, Some(b"HTTP/1.1 101" | b"HTTP/1.0 101")) => Phase::Tunnel,
        _ => p,
    }
}

/// Tells the connection's guard that its request is over (the proxy's `logging` phase): the
/// next byte starts a new header. No-op on a stream without a guard (HTTP/2).
pub fn request_done(stream: Option<&Stream>) {
    if let Some(g) = stream.and_then(|s| s.as_any().downcast_ref::<Guarded>()) {
        g.done.store(true, Ordering::Release);
    }
}

#[derive(Debug)]
struct Guarded {
    io: Stream,
    phase: Phase,
    timeout: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// Line feeds in a row so far (a `\r` between them does not count): two end a header;
    /// [`NO_TEXT`] before its first other byte.
    feeds: u8,
    cut: IntCounter,
    /// Set by [`request_done`]; taken by the next read.
    done: AtomicBool,
    /// Some byte of the current header has arrived.
    started: bool,
}

impl Guarded {
    fn new(io: Stream, timeout: Duration, cut: IntCounter) -> Self {
        Guarded {
            io,
            // A connection that opens and says nothing is held to the same deadline.
            phase: Phase::Header,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            feeds: NO_TEXT,
            cut,
            done: AtomicBool::new(false),
            started: false,
        }
    }
}

/// `feeds` before a header's first byte that is not a line break.
const NO_TEXT: u8 = u8::MAX;

/// Follows a header's bytes to its blank line; true once it is reached. `feeds`: line feeds in
/// a row so far (a `\r` between them does not count).
fn header_end(feeds: &mut u8, bytes: &[u8]) -> bool {
    for &b in bytes {
        match b {
            // Blank lines before the request line end nothing (else they would lift the deadline).
            b'\n' | b'\r' if *feeds == NO_TEXT => {}
            b'\n' => {
                *feeds += 1;
                if *feeds == 2 {
                    *feeds = NO_TEXT;
                    return true;
                }
            }
            b'\r' => {}
            _ => *feeds = 0,
        }
    }
    false
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.done.swap(false, Ordering::AcqRel) && this.phase != Phase::Tunnel {
            this.phase = Phase::Between;
        }
        if this.phase == Phase::Header && this.deadline.as_mut().poll(cx).is_ready() {
            this.cut.inc();
            if this.feeds == NO_TEXT && !this.started {
                // Nothing sent at all: a plain close (end of stream), which Pingora does not log.
                return Poll::Ready(Ok(()));
            }
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request header not complete within proxy.header_timeout_seconds",
            )));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let filled = buf.filled();
            let new = filled.get(before..).unwrap_or_default();
            if !new.is_empty() {
                if this.phase == Phase::Between {
                    this.phase = Phase::Header;
                    this.started = false;
                    this.feeds = NO_TEXT;
                    let at = tokio::time::Instant::now() + this.timeout;
                    this.deadline.as_mut().reset(at);
                }
                this.started = true;
                if this.phase == Phase::Header && header_end(&mut this.feeds, new) {
                    this.phase = Phase::Body;
                }
            }
        }
        r
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        this.phase = after_write(this.phase, buf);
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            this.phase = after_write(this.phase, first);
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        self.io.shutdown().await;
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.io.id()
    }
}

impl Ssl for Guarded {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.io.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.io.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.io.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.io.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.io.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.io.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.io.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.io.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.io.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.io.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.io.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_header_ends_at_its_blank_line_split_anyhow() {
        for parts in [
            vec!["GET / HTTP/1.1\r\nHost: a\r\n\r\n"],
            vec!["GET / HTTP/1.1\r\nHost: a\r", "\n", "\r", "\nbody"],
            vec!["GET / HTTP/1.1\nHost: a\n\n"],
        ] {
            let mut feeds = NO_TEXT;
            let ends: Vec<bool> = parts
                .iter()
                .map(|p| header_end(&mut feeds, p.as_bytes()))
                .collect();
            assert_eq!(ends.last(), Some(&true), "{parts:?}");
            assert!(!ends[..ends.len() - 1].contains(&true), "{parts:?}");
        }
        let mut feeds = NO_TEXT;
        assert!(!header_end(
            &mut feeds,
            b"GET / HTTP/1.1\r\nHost: a\r\nX: \r\r\n"
        ));
        // Blank lines first do not end (or begin) a header.
        let mut feeds = NO_TEXT;
        assert!(!header_end(&mut feeds, b"\r\n\r\n\n\nGET / HTTP/1.1\r\n"));
        assert!(header_end(&mut feeds, b"\r\n"));
    }

    #[test]
    fn only_an_upgrade_changes_the_phase_on_a_write() {
        assert_eq!(
            after_write(Phase::Body, b"HTTP/1.1 200 OK\r\n"),
            Phase::Body
        );
        assert_eq!(
            after_write(Phase::Body, b"HTTP/1.1 101 Switching Protocols\r\n"),
            Phase::Tunnel
        );
        assert_eq!(
            after_write(Phase::Body, b"HTTP/1.1 100 Continue\r\n"),
            Phase::Body
        );
        assert_eq!(
            after_write(Phase::Between, b"HTTP/1.1 101 x"),
            Phase::Between
        );
        assert_eq!(after_write(Phase::Tunnel, b"anything"), Phase::Tunnel);
    }
}
