//! Client-side helpers shared by the probe, soak and benchmark binaries: one HTTP exchange
//! with `sy-backend`, how a failure is named, a DNS query, and the cluster's own DNS server
//! (kube-dns's endpoint) as a small script.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

/// A failure as the tests name it.
pub fn error_kind(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "refused",
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "timeout",
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => "reset",
        std::io::ErrorKind::PermissionDenied => "denied",
        _ if e.raw_os_error() == Some(113) => "unreachable",
        // ECONNABORTED, EDESTADDRREQ: the socket was destroyed (sock_diag) and disconnected.
        std::io::ErrorKind::ConnectionAborted => "aborted",
        _ if e.raw_os_error() == Some(89) => "aborted",
        _ => "other",
    }
}

/// One `GET /` on `s`; the body `sy-backend` answers (`NAME CLIENT_IP`).
pub fn http(s: &mut TcpStream, keep: bool) -> std::io::Result<String> {
    let req = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: {}\r\n\r\n",
        if keep { "keep-alive" } else { "close" }
    );
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 1024];
    loop {
        let n = s.read(&mut tmp)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&tmp[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(i) = text.find("\r\n\r\n") {
            let len: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= i + 4 + len {
                return Ok(text[i + 4..i + 4 + len].trim().to_string());
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "short response",
    ))
}

/// One A query for `name` to `server` from a fresh socket, as a stub resolver sends it.
/// `Ok(answers)` when the reply has the query's id and NOERROR.
pub fn dns_a(server: SocketAddr, name: &str, id: u16, timeout: Duration) -> std::io::Result<u16> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len())
            .map_err(|_| std::io::Error::other(format!("label {label:?} too long")))?;
        q.push(len);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let any: SocketAddr = if server.is_ipv6() {
        "[::]:0".parse().map_err(std::io::Error::other)?
    } else {
        "0.0.0.0:0".parse().map_err(std::io::Error::other)?
    };
    let s = UdpSocket::bind(any)?;
    s.set_read_timeout(Some(timeout))?;
    s.connect(server)?;
    s.send(&q)?;
    let mut buf = [0u8; 1500];
    loop {
        let n = s.recv(&mut buf)?;
        if n < 12 || buf[..2] != id.to_be_bytes() {
            continue;
        }
        let rcode = buf[3] & 0x0f;
        if rcode != 0 {
            return Err(std::io::Error::other(format!("rcode {rcode}")));
        }
        return Ok(u16::from_be_bytes([buf[6], buf[7]]));
    }
}

/// The cluster's own DNS (kube-dns's endpoint) for sandbox tests, run with `python3 -c`:
/// `PORT ANSWER COUNTER_FILE`; answers every A query with ANSWER and writes how many queries
/// it has answered to COUNTER_FILE.
pub const CLUSTER_DNS_SERVER: &str = r"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('0.0.0.0', int(sys.argv[1])))
n = 0
while True:
    q, peer = s.recvfrom(4096)
    if len(q) < 17:
        continue
    i = 12
    while q[i] != 0:
        i += q[i] + 1
    qtype = struct.unpack('>H', q[i + 1:i + 3])[0]
    question = q[12:i + 5]
    answer = b''
    if qtype == 1:
        answer = b'\xc0\x0c' + struct.pack('>HHIH', 1, 1, 5, 4) + socket.inet_aton(sys.argv[2])
    s.sendto(q[:2] + b'\x81\x80' + struct.pack('>HHHH', 1, 1 if answer else 0, 0, 0) + question + answer, peer)
    n += 1
    open(sys.argv[3], 'w').write(str(n))
";
