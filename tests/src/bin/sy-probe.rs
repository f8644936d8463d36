//! A client for end-to-end tests. Optionally joins a cgroup (so the socket load balancer sees
//! it) and a network namespace, then makes requests and prints one line per request:
//! `ok NAME CLIENT_IP` as the backend answered, or `err KIND` (refused, timeout, ...).
//!
//! sy-probe [--cgroup DIR] [--netns NAME] (--tcp|--udp|--sctp ADDR:PORT) [--count N]
//!          [--timeout-ms MS] [--interval-ms MS] [--hold] [--sport PORT]
//! With --udp --hold it keeps one connected UDP socket, one request per stdin line, and
//! opens a new one for the request after an error (a client that reconnects).
//! With --bind ADDR:PORT every TCP connection is made from that local address and port.
//! With --sport every UDP request comes from that source port (a DNS-style client whose
//! flow the kernel's conntrack keeps), otherwise each request uses a fresh port.
//! With --hold it keeps one TCP connection open, reading a request line from stdin for each
//! request, so a test can make requests on one connection across events.

use std::io::{BufRead, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use switchyard_tests::client::{error_kind, http};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(cg) = get("--cgroup") {
        std::fs::write(format!("{cg}/cgroup.procs"), std::process::id().to_string())?;
    }
    if let Some(ns) = get("--netns") {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
    }
    let count: usize = get("--count").and_then(|c| c.parse().ok()).unwrap_or(1);
    let timeout = Duration::from_millis(
        get("--timeout-ms")
            .and_then(|c| c.parse().ok())
            .unwrap_or(2000),
    );
    let interval = Duration::from_millis(
        get("--interval-ms")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
    );
    let out = std::io::stdout();
    if let Some(target) = get("--tcp") {
        let addr: SocketAddr = target
            .parse()
            .map_err(|e| std::io::Error::other(format!("{target}: {e}")))?;
        if args.iter().any(|a| a == "--hold") {
            let mut s = TcpStream::connect_timeout(&addr, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            println!("connected {peer}");
            out.lock().flush()?;
            for _ in std::io::stdin().lock().lines() {
                match http(&mut s, true) {
                    Ok(body) => println!("ok {body}"),
                    Err(e) => println!("err {}", error_kind(&e)),
                }
                out.lock().flush()?;
            }
            return Ok(());
        }
        let bind: Option<SocketAddr> = get("--bind").and_then(|b| b.parse().ok());
        let connect = |addr: &SocketAddr| -> std::io::Result<TcpStream> {
            let Some(local) = bind else {
                return TcpStream::connect_timeout(addr, timeout);
            };
            let s = socket2::Socket::new(
                socket2::Domain::for_address(*addr),
                socket2::Type::STREAM,
                None,
            )?;
            s.set_reuse_address(true)?;
            s.bind(&local.into())?;
            s.connect_timeout(&(*addr).into(), timeout)?;
            Ok(s.into())
        };
        for _ in 0..count {
            let r = connect(&addr).and_then(|mut s| {
                s.set_read_timeout(Some(timeout))?;
                let peer = s.peer_addr()?;
                if peer != addr {
                    // getpeername must show the service address, not the backend's.
                    return Ok(format!("peer-mismatch {peer}"));
                }
                http(&mut s, false)
            });
            match r {
                Ok(body) => println!("ok {body}"),
                Err(e) => println!("err {}", error_kind(&e)),
            }
            out.lock().flush()?;
            std::thread::sleep(interval);
        }
    }
    if let Some(target) = get("--sctp") {
        // An SCTP association (one-to-one style), then the same HTTP exchange as --tcp.
        let addr: SocketAddr = target
            .parse()
            .map_err(|e| std::io::Error::other(format!("{target}: {e}")))?;
        for _ in 0..count {
            let r = (|| {
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::from(132)),
                )?;
                s.connect_timeout(&addr.into(), timeout)?;
                let mut s: TcpStream = s.into();
                s.set_read_timeout(Some(timeout))?;
                let peer = s.peer_addr()?;
                if peer != addr {
                    return Ok(format!("peer-mismatch {peer}"));
                }
                http(&mut s, false)
            })();
            match r {
                Ok(body) => println!("ok {body}"),
                Err(e) => println!("err {}", error_kind(&e)),
            }
            out.lock().flush()?;
            std::thread::sleep(interval);
        }
    }
    if let Some(target) = get("--udp") {
        let addr: SocketAddr = target
            .parse()
            .map_err(|e| std::io::Error::other(format!("{target}: {e}")))?;
        let sport: u16 = get("--sport").and_then(|p| p.parse().ok()).unwrap_or(0);
        if args.iter().any(|a| a == "--hold") {
            // One connected socket for every request line on stdin, as a long-lived
            // client keeps one; after an error the next request uses a new socket (the
            // client reconnects).
            let any = if addr.is_ipv6() { "::" } else { "0.0.0.0" };
            let open = || -> std::io::Result<UdpSocket> {
                let s = UdpSocket::bind((any, sport))?;
                s.set_read_timeout(Some(timeout))?;
                s.connect(addr)?;
                Ok(s)
            };
            let first = open()?;
            println!("connected {}", first.local_addr()?);
            let mut sock = Some(first);
            out.lock().flush()?;
            for _ in std::io::stdin().lock().lines() {
                let r = match sock.take() {
                    Some(s) => Ok(s),
                    None => open(),
                }
                .and_then(|s| {
                    s.send(b"hello")?;
                    let mut buf = [0u8; 512];
                    let n = s.recv(&mut buf)?;
                    Ok((s, String::from_utf8_lossy(&buf[..n]).trim().to_string()))
                });
                match r {
                    Ok((s, body)) => {
                        sock = Some(s);
                        println!("ok {body}");
                    }
                    Err(e) => println!("err {}", error_kind(&e)),
                }
                out.lock().flush()?;
            }
            return Ok(());
        }
        for _ in 0..count {
            let any = if addr.is_ipv6() { "::" } else { "0.0.0.0" };
            let r = UdpSocket::bind((any, sport)).and_then(|s| {
                s.set_read_timeout(Some(timeout))?;
                // Connected, so an ICMP port unreachable surfaces as ECONNREFUSED.
                s.connect(addr)?;
                s.send(b"hello")?;
                let mut buf = [0u8; 512];
                let (n, from) = s.recv_from(&mut buf)?;
                if from != addr {
                    return Ok(format!("from-mismatch {from}"));
                }
                Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
            });
            match r {
                Ok(body) => println!("ok {body}"),
                Err(e) => println!("err {}", error_kind(&e)),
            }
            out.lock().flush()?;
            std::thread::sleep(interval);
        }
    }
    Ok(())
}
