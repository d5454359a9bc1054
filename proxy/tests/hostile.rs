//! Hostile HTTP input (issue 17, "hostile input"): request smuggling, malformed and oversized
//! headers, bad Host values, slow and idle clients. Each is answered cleanly (a 4xx, or the
//! connection closed), never reaches the hosted service as something other than what the proxy
//! itself understood, and leaves the proxy serving everyone else.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Node, options, raw};
use tollgate_testkit::Upstream;

/// Upstream requests seen so far.
fn seen(up: &Upstream) -> u64 {
    *up.seen.requests.lock().unwrap()
}

/// Upstream requests seen once the count has stopped moving (an exchange the proxy cut off may
/// reach the service a little after the client's answer).
async fn settled(up: &Upstream) -> u64 {
    let mut last = seen(up);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let now = seen(up);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// The status line's code of each response in `r` (pipelined answers on one connection).
fn statuses(r: &str) -> Vec<u16> {
    r.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| r.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_are_refused_before_the_service() {
    let up = Upstream::start("s");
    let node = Node::start(options(None, &[("s.localhost", up.addr)]));
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: s.localhost\r\n\r\n";
    // (what, request, whether the framing is wrong in the header: then a refusal reaches no
    // service; a broken chunked body is found while it streams, after the header went on, and
    // the upstream exchange is cut off).
    let cases: Vec<(&str, String)> = vec![
        (
            "Content-Length and Transfer-Encoding",
            format!(
                "POST / HTTP/1.1\r\nHost: s.localhost\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
                5 + smuggled.len()
            ),
        ),
        (
            "two different Content-Length values",
            format!(
                "POST / HTTP/1.1\r\nHost: s.localhost\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
        ),
        (
            "a Content-Length list",
            format!(
                "POST / HTTP/1.1\r\nHost: s.localhost\r\nContent-Length: 0, {}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
        ),
        (
            "Transfer-Encoding other than chunked last",
            format!(
                "POST / HTTP/1.1\r\nHost: s.localhost\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "obs-fold (a header continued on the next line)",
            format!(
                "POST / HTTP/1.1\r\nHost: s.localhost\r\nX-A: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "a chunk size that is not hex",
            format!(
                "POST / HTTP/1.1\r\nHost: s.localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "a chunk size past 64 bits",
            format!(
                "POST / HTTP/1.1\r\nHost: s.localhost\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000000001\r\nabc\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "a negative Content-Length",
            format!("POST / HTTP/1.1\r\nHost: s.localhost\r\nContent-Length: -1\r\n\r\n{smuggled}"),
        ),
        (
            "a space before the colon",
            format!(
                "POST / HTTP/1.1\r\nHost: s.localhost\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
    ];
    for (what, req) in cases {
        let before = settled(&up).await;
        let r = raw(node.addr, req.as_bytes());
        let after = settled(&up).await;
        let codes = statuses(&r);
        eprintln!("{what}: {codes:?}, the service saw {}", after - before);
        // The proxy either refuses (4xx, then closes) or answers exactly one request it parsed
        // as the service will; the smuggled request never becomes a request of its own.
        assert!(
            !r.contains("smuggled") && codes.len() <= 1,
            "{what}: answered {codes:?}: {r}"
        );
        if let Some(&c) = codes.first() {
            assert!(
                (400..500).contains(&c) || c == 200,
                "{what}: status {c}: {r}"
            );
            let in_body = what.starts_with("a chunk size");
            if c != 200 && !in_body {
                assert_eq!(after, before, "{what}: refused, but the service saw it");
            }
        }
        assert!(
            after <= before + 1,
            "{what}: the service saw {} requests",
            after - before
        );
    }
    // Where both framings come and the request is taken, the service gets one: chunked
    // (which the proxy read), never a Content-Length it could read differently.
    let r = raw(
        node.addr,
        b"POST /headers HTTP/1.1\r\nHost: s.localhost\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    );
    if r.starts_with("HTTP/1.1 200") {
        assert!(!r.contains("\"content-length\""), "{r}");
    } else {
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    }
    // And the proxy serves on.
    let ok = raw(
        node.addr,
        b"GET / HTTP/1.1\r\nHost: s.localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_headers_and_hosts_get_a_clean_4xx() {
    let up = Upstream::start("m");
    let node = Node::start(options(None, &[("m.localhost", up.addr)]));
    let many: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(&str, String)> = vec![
        (
            "a header line without a colon",
            "GET / HTTP/1.1\r\nHost: m.localhost\r\nNoColonHere\r\n\r\n".into(),
        ),
        (
            "a NUL in a header value",
            "GET / HTTP/1.1\r\nHost: m.localhost\r\nX-A: a\0b\r\n\r\n".into(),
        ),
        (
            "a control character in a header name",
            "GET / HTTP/1.1\r\nHost: m.localhost\r\nX\x01A: b\r\n\r\n".into(),
        ),
        (
            "a request line of 100 KiB",
            format!(
                "GET /{} HTTP/1.1\r\nHost: m.localhost\r\n\r\n",
                "a".repeat(100 * 1024)
            ),
        ),
        (
            "one header of 100 KiB",
            format!(
                "GET / HTTP/1.1\r\nHost: m.localhost\r\nX-A: {}\r\n\r\n",
                "a".repeat(100 * 1024)
            ),
        ),
        (
            "300 headers",
            format!("GET / HTTP/1.1\r\nHost: m.localhost\r\n{many}\r\n"),
        ),
        (
            "not HTTP at all",
            "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03garbage\r\n\r\n".into(),
        ),
        (
            "an unknown version",
            "GET / HTTP/7.0\r\nHost: m.localhost\r\n\r\n".into(),
        ),
        (
            "two Host headers",
            "GET / HTTP/1.1\r\nHost: m.localhost\r\nHost: other.localhost\r\n\r\n".into(),
        ),
        (
            "a Host with user info",
            "GET / HTTP/1.1\r\nHost: user@m.localhost\r\n\r\n".into(),
        ),
        (
            "a Host with a space",
            "GET / HTTP/1.1\r\nHost: m.local host\r\n\r\n".into(),
        ),
        (
            "a Host with a path",
            "GET / HTTP/1.1\r\nHost: m.localhost/x\r\n\r\n".into(),
        ),
        ("no Host at all (HTTP/1.1)", "GET / HTTP/1.1\r\n\r\n".into()),
        (
            "a non-ASCII Host",
            "GET / HTTP/1.1\r\nHost: m\u{e9}.localhost\r\n\r\n".into(),
        ),
    ];
    for (what, req) in cases {
        let before = settled(&up).await;
        let r = raw(node.addr, req.as_bytes());
        let codes = statuses(&r);
        // A clean answer: one 4xx; bytes that are not HTTP may get the connection closed.
        let ok = match codes.as_slice() {
            [c] => (400..500).contains(c),
            [] => what == "not HTTP at all",
            _ => false,
        };
        assert!(ok, "{what}: {codes:?}: {}", &r[..r.len().min(300)]);
        assert_eq!(settled(&up).await, before, "{what}: reached the service");
    }
    let ok = raw(
        node.addr,
        b"GET / HTTP/1.1\r\nHost: m.localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_header_client_is_cut_off_and_idle_connections_do_not_starve_others() {
    let up = Upstream::start("slow");
    let mut o = options(None, &[("slow.localhost", up.addr)]);
    o.proxy.header_timeout_seconds = 2.0;
    let node = Node::start(o);

    // Slowloris: a header byte every 500 ms never completes a request.
    let addr = node.addr;
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
        let start = Instant::now();
        let head =
            b"GET / HTTP/1.1\r\nHost: slow.localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for b in head.iter().cycle() {
            if s.write_all(&[*b]).is_err() || start.elapsed() > Duration::from_secs(20) {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        start.elapsed()
    });

    // A thousand connections that never send a byte (fewer where the process may not hold
    // two thousand descriptors: each costs one here and one in the in-process proxy).
    let limit: usize = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(1024);
    let n_idle = 1000.min(limit.saturating_sub(300) / 2);
    let idle: Vec<TcpStream> = (0..n_idle)
        .map(|_| TcpStream::connect(node.addr).unwrap())
        .collect();
    // Everyone else is served meanwhile, promptly.
    let t = Instant::now();
    let ok = raw(
        node.addr,
        b"GET / HTTP/1.1\r\nHost: slow.localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    let cut = slow.join().unwrap();
    assert!(
        cut < Duration::from_secs(10),
        "a slow header was held open for {cut:?}"
    );
    // The idle ones are closed after the header timeout too (a read sees EOF or a reset).
    std::thread::sleep(Duration::from_secs(3));
    let mut closed = 0;
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            // Still open: the read timed out.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            // EOF, a reset, or a 408 written before closing.
            _ => closed += 1,
        }
    }
    assert!(
        closed * 100 >= n_idle * 99,
        "{closed} of {n_idle} idle connections closed"
    );

    // The deadline is for headers only: a WebSocket (after its 101), a keep-alive connection
    // between requests and an upload that continues after `100 Continue` outlive it.
    // A WebSocket frame that arrives in two parts, 2.5 s apart (by hand: a client library
    // sends whole frames).
    let mut s = TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: slow.localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | 5];
    frame.extend_from_slice(&mask);
    frame.extend(b"hello".iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    for _ in 0..2 {
        s.write_all(&frame[..4]).unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        s.write_all(&frame[4..]).unwrap();
        let mut echo = [0u8; 12];
        s.read_exact(&mut echo).unwrap();
        assert_eq!(&echo[2..], b"echo:hello");
    }
    // A slow header on a kept-alive connection's second request is cut off too.
    let mut s = TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: slow.localhost\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"slow") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let start = Instant::now();
    for b in b"GET / HTTP/1.1\r\nHost: slow.localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        // Closed by the proxy: a read sees the end (or a reset) at once.
        s.set_nonblocking(true).unwrap();
        let mut probe = [0u8; 1];
        let closed = matches!(s.read(&mut probe), Ok(0))
            || matches!(s.read(&mut probe), Err(ref e) if e.kind() != std::io::ErrorKind::WouldBlock);
        s.set_nonblocking(false).unwrap();
        if closed {
            break;
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "a slow second header was held open for {:?}",
        start.elapsed()
    );
    // Keep-alive: the second request on one connection, 2.5 s after the first.
    let mut s = TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for last in [false, true] {
        let close = if last { "Connection: close\r\n" } else { "" };
        s.write_all(format!("GET / HTTP/1.1\r\nHost: slow.localhost\r\n{close}\r\n").as_bytes())
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"slow") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        if !last {
            std::thread::sleep(Duration::from_millis(2500));
        }
    }
    let mut s = TcpStream::connect(node.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /body HTTP/1.1\r\nHost: slow.localhost\r\nContent-Length: 6\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut b = [0u8; 25];
    s.read_exact(&mut b).unwrap();
    assert!(
        b.starts_with(b"HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&b)
    );
    s.write_all(b"abc").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    s.write_all(b"def").unwrap();
    let mut rest = String::new();
    let _ = s.read_to_string(&mut rest);
    assert!(rest.contains("200 OK") && rest.ends_with('6'), "{rest}");
}
