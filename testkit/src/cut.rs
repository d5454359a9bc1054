//! A loopback TCP relay the test controls, to cut one client off from a server the way a
//! partition does: `freeze` stops every byte both ways while each connection stays open (no
//! FIN, no RST: the client's reads and writes just hang, as when packets are dropped), and
//! `thaw` lets the bytes flow again. `freeze_matching` freezes only the open connections whose
//! client sent a given byte string (e.g. `SUBSCRIBE`: a change feed silently dropped while the
//! same client's other connections work). Plain threads and blocking sockets.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One relayed connection's controls.
struct Conn {
    frozen: Arc<AtomicBool>,
    /// Until the client's side ends.
    open: Arc<AtomicBool>,
    /// Everything the client sent so far, up to 4 KiB (what `freeze_matching` looks at).
    seen: Arc<Mutex<Vec<u8>>>,
    streams: [TcpStream; 2],
}

pub struct TcpCut {
    addr: SocketAddr,
    all_frozen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<Conn>>>,
    accepted: Arc<AtomicU64>,
}

impl TcpCut {
    /// Relays a fresh loopback port to `target`.
    pub fn start(target: SocketAddr) -> TcpCut {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let cut = TcpCut {
            addr,
            all_frozen: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(Vec::new())),
            accepted: Arc::new(AtomicU64::new(0)),
        };
        let (all, stop, conns, accepted) = (
            cut.all_frozen.clone(),
            cut.stop.clone(),
            cut.conns.clone(),
            cut.accepted.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => continue,
                };
                let _ = client.set_nonblocking(false);
                // While everything is frozen a new connection gets no answer either.
                while all.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::Relaxed);
                let frozen = Arc::new(AtomicBool::new(false));
                let open = Arc::new(AtomicBool::new(true));
                let seen = Arc::new(Mutex::new(Vec::new()));
                let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                ) else {
                    continue;
                };
                conns.lock().unwrap().push(Conn {
                    frozen: frozen.clone(),
                    open: open.clone(),
                    seen: seen.clone(),
                    streams: [c3, s3],
                });
                let pump = |mut from: TcpStream,
                            mut to: TcpStream,
                            record: Option<Arc<Mutex<Vec<u8>>>>,
                            open: Option<Arc<AtomicBool>>| {
                    let (frozen, all, stop) = (frozen.clone(), all.clone(), stop.clone());
                    std::thread::spawn(move || {
                        let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            if frozen.load(Ordering::Relaxed) || all.load(Ordering::Relaxed) {
                                // Read nothing: the bytes wait in the kernel, as on a dead path.
                                std::thread::sleep(Duration::from_millis(10));
                                continue;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if let Some(r) = &record {
                                        let mut r = r.lock().unwrap();
                                        let room = 4096usize.saturating_sub(r.len());
                                        r.extend_from_slice(&buf[..n.min(room)]);
                                    }
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        ErrorKind::WouldBlock | ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => break,
                            }
                        }
                        let _ = to.shutdown(Shutdown::Write);
                        if let Some(open) = open {
                            open.store(false, Ordering::Relaxed);
                        }
                    });
                };
                pump(client, s2, Some(seen), Some(open));
                pump(server, c2, None, None);
            }
        });
        cut
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every connection, open and new, stops passing bytes (no FIN).
    pub fn freeze(&self) {
        self.all_frozen.store(true, Ordering::Relaxed);
    }

    /// Bytes flow again (connections frozen by `freeze_matching` stay frozen).
    pub fn thaw(&self) {
        self.all_frozen.store(false, Ordering::Relaxed);
    }

    /// Freezes for good the open connections whose client sent `needle`; returns how many.
    pub fn freeze_matching(&self, needle: &[u8]) -> usize {
        let conns = self.conns.lock().unwrap();
        let mut n = 0;
        for c in conns.iter() {
            let seen = c.seen.lock().unwrap();
            if seen.windows(needle.len()).any(|w| w == needle) {
                c.frozen.store(true, Ordering::Relaxed);
                n += 1;
            }
        }
        n
    }

    /// Open, flowing connections whose client sent `needle` (e.g. subscribers that came back).
    pub fn live_matching(&self, needle: &[u8]) -> usize {
        let conns = self.conns.lock().unwrap();
        conns
            .iter()
            .filter(|c| c.open.load(Ordering::Relaxed) && !c.frozen.load(Ordering::Relaxed))
            .filter(|c| {
                let seen = c.seen.lock().unwrap();
                seen.windows(needle.len()).any(|w| w == needle)
            })
            .count()
    }

    /// Connections relayed so far (a client that reconnects shows here).
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpCut {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.conns.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            for s in &c.streams {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}
