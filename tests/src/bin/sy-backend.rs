//! A backend for end-to-end tests: answers HTTP on TCP and datagrams on UDP with its name and
//! the client address it saw (`NAME CLIENT_IP`), so tests can tell which backend answered and
//! whether the client address was kept. `--bind [::]` serves both families (IPv4 clients are
//! reported by their IPv4 address). Where the kernel has SCTP, the same HTTP is also served
//! over SCTP associations on the TCP port.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let name = get("--name").unwrap_or_else(|| "backend".into());
    let bind = get("--bind").unwrap_or_else(|| "0.0.0.0".into());
    if let Some(port) = get("--udp") {
        let sock = UdpSocket::bind(format!("{bind}:{port}"))?;
        let name = name.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, peer)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(
                    format!("{name} {}\n", peer.ip().to_canonical()).as_bytes(),
                    peer,
                );
            }
        });
    }
    let port = get("--tcp").unwrap_or_else(|| "8080".into());
    // A deep accept queue: load tests open thousands of connections a second, and a busy
    // machine must not turn a slow accept loop into dropped SYNs.
    let addr: SocketAddr = format!("{bind}:{port}")
        .parse()
        .map_err(|e| std::io::Error::other(format!("{bind}:{port}: {e}")))?;
    let listener = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    if addr.is_ipv6() {
        listener.set_only_v6(false)?;
    }
    listener.set_reuse_address(true)?;
    listener.bind(&addr.into())?;
    listener.listen(4096)?;
    let listener: TcpListener = listener.into();
    // SCTP (one-to-one style, which reads and writes like TCP) where the kernel has it.
    if let Some(sctp) = sctp_listener(&format!("{bind}:{port}")) {
        let name = name.clone();
        std::thread::spawn(move || {
            for conn in sctp.incoming() {
                let Ok(s) = conn else { continue };
                let name = name.clone();
                std::thread::spawn(move || serve(s, &name));
            }
        });
    }
    // Signal readiness to whoever started us.
    println!("ready");
    for conn in listener.incoming() {
        let Ok(s) = conn else { continue };
        let name = name.clone();
        std::thread::spawn(move || serve(s, &name));
    }
    Ok(())
}

/// An SCTP listener on `addr`, or `None` where the kernel has no SCTP.
fn sctp_listener(addr: &str) -> Option<TcpListener> {
    let addr: SocketAddr = addr.parse().ok()?;
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::from(132)),
    )
    .ok()?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(false);
    }
    s.set_reuse_address(true).ok()?;
    s.bind(&addr.into()).ok()?;
    s.listen(128).ok()?;
    Some(s.into())
}

/// Serve HTTP requests on one connection until the client closes it.
fn serve(mut s: std::net::TcpStream, name: &str) {
    let peer: Option<SocketAddr> = s.peer_addr().ok();
    // Serve requests on this connection until the client closes it, so a test can
    // hold a connection open across a daemon restart.
    let mut buf = [0u8; 4096];
    let mut pending = Vec::new();
    loop {
        let Ok(n) = s.read(&mut buf) else { return };
        if n == 0 {
            return;
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let req = String::from_utf8_lossy(&pending[..end]).to_string();
            pending.drain(..end + 4);
            let body = format!(
                "{name} {}\n",
                peer.map(|p| p.ip().to_canonical().to_string())
                    .unwrap_or_default()
            );
            let close = req.to_ascii_lowercase().contains("connection: close");
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
                body.len(),
                if close { "close" } else { "keep-alive" }
            );
            if s.write_all(resp.as_bytes()).is_err() || close {
                return;
            }
        }
    }
}
