//! The activator of an idle deployment: a loopback socket the route points at while its process
//! is stopped; the first connection starts it, and is relayed to it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Relays the connection that woke an idle deployment, and any that arrive at the activator
/// until the route has moved on (`linger`), to the freshly started process.
pub(crate) async fn relay_from_activator(
    listener: TcpListener,
    first: TcpStream,
    to: SocketAddr,
    linger: Duration,
) {
    async fn relay(mut inbound: TcpStream, to: SocketAddr) {
        if let Ok(mut outbound) = TcpStream::connect(to).await {
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        }
    }
    tokio::spawn(relay(first, to));
    let deadline = tokio::time::sleep(linger);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((s, _)) => { tokio::spawn(relay(s, to)); }
                Err(_) => break,
            },
            _ = &mut deadline => break,
        }
    }
}
