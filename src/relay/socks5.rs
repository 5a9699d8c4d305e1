//! SOCKS5 UDP ASSOCIATE (RFC 1928), with optional username/password
//! authentication (RFC 1929).
//!
//! An association is a TCP control connection plus a UDP socket: datagrams
//! go to the server's relay address wrapped in a small header naming their
//! destination, and come back wrapped with the remote they came from. The
//! association lives exactly as long as the control connection.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use crate::net::sockets;

/// A SOCKS5 server and the credentials to use with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socks5Server {
    pub addr: SocketAddr,
    pub auth: Option<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum Socks5Error {
    #[error("SOCKS5 server unreachable: {0}")]
    Io(#[from] io::Error),
    #[error("SOCKS5 handshake timed out")]
    Timeout,
    #[error("SOCKS5 protocol error: {0}")]
    Protocol(&'static str),
    #[error("SOCKS5 server accepts none of our authentication methods")]
    NoAcceptableMethod,
    #[error("SOCKS5 server rejected the username/password")]
    AuthRejected,
    #[error("SOCKS5 server refused UDP ASSOCIATE (reply code {0})")]
    Refused(u8),
}

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0x00;
const USER_PASS: u8 = 0x02;
const NO_ACCEPTABLE: u8 = 0xff;
const CMD_UDP_ASSOCIATE: u8 = 3;
const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;

/// A live association.
#[derive(Debug)]
pub struct Association {
    /// Closing it ends the association; EOF on it means the server did.
    pub control: TcpStream,
    /// Connected to the relay address: the kernel drops anything else.
    pub udp: UdpSocket,
    pub relay: SocketAddr,
}

/// Opens an association through `server`, from sockets marked `mark`.
pub async fn associate(server: &Socks5Server, mark: u32, timeout: Duration) -> Result<Association, Socks5Error> {
    tokio::time::timeout(timeout, handshake(server, mark))
        .await
        .map_err(|_| Socks5Error::Timeout)?
}

async fn handshake(server: &Socks5Server, mark: u32) -> Result<Association, Socks5Error> {
    let mut control = connect_marked(server.addr, mark).await?;
    let methods: &[u8] = if server.auth.is_some() {
        &[NO_AUTH, USER_PASS]
    } else {
        &[NO_AUTH]
    };
    let mut hello = vec![VERSION, methods.len() as u8];
    hello.extend_from_slice(methods);
    control.write_all(&hello).await?;
    let mut choice = [0u8; 2];
    control.read_exact(&mut choice).await?;
    if choice[0] != VERSION {
        return Err(Socks5Error::Protocol("not a SOCKS5 server"));
    }
    match (choice[1], &server.auth) {
        (NO_AUTH, _) => {}
        (USER_PASS, Some((user, pass))) => {
            control.write_all(&auth_request(user, pass)).await?;
            let mut status = [0u8; 2];
            control.read_exact(&mut status).await?;
            if status[1] != 0 {
                return Err(Socks5Error::AuthRejected);
            }
        }
        (NO_ACCEPTABLE, _) => return Err(Socks5Error::NoAcceptableMethod),
        _ => {
            return Err(Socks5Error::Protocol("server chose a method we did not offer"));
        }
    }
    let udp = UdpSocket::from_std(sockets::marked_udp(sockets::unspecified(server.addr), mark)?)?;
    // Tell the server where our datagrams will come from, so it relays
    // for this socket only.
    let local = SocketAddr::new(control.local_addr()?.ip(), udp.local_addr()?.port());
    let mut request = vec![VERSION, CMD_UDP_ASSOCIATE, 0];
    put_addr(&mut request, local);
    control.write_all(&request).await?;
    let mut head = [0u8; 4];
    control.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(Socks5Error::Protocol("bad reply version"));
    }
    if head[1] != 0 {
        return Err(Socks5Error::Refused(head[1]));
    }
    let bound = read_addr(&mut control, head[3]).await?;
    // "0.0.0.0" means "the address you reached me at".
    let relay = match bound {
        Some(a) if !a.ip().is_unspecified() => a,
        Some(a) => SocketAddr::new(server.addr.ip(), a.port()),
        None => return Err(Socks5Error::Protocol("relay address is a domain name")),
    };
    udp.connect(relay).await?;
    Ok(Association { control, udp, relay })
}

async fn connect_marked(addr: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    TcpSocket::from_std_stream(sockets::marked_tcp(addr, mark)?)
        .connect(addr)
        .await
}

fn auth_request(user: &str, pass: &str) -> Vec<u8> {
    // Lengths are checked (1..=255) when the config is loaded.
    let mut r = vec![1, user.len() as u8];
    r.extend_from_slice(user.as_bytes());
    r.push(pass.len() as u8);
    r.extend_from_slice(pass.as_bytes());
    r
}

fn put_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(v4) => {
            out.push(ATYP_V4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(ATYP_V6);
            out.extend_from_slice(&v6.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// Reads an address of type `atyp` from the control connection; `None`
/// for a domain name (read and discarded).
async fn read_addr(r: &mut TcpStream, atyp: u8) -> Result<Option<SocketAddr>, Socks5Error> {
    let ip = match atyp {
        ATYP_V4 => {
            let mut b = [0u8; 4];
            r.read_exact(&mut b).await?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        ATYP_V6 => {
            let mut b = [0u8; 16];
            r.read_exact(&mut b).await?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        ATYP_DOMAIN => {
            let len = r.read_u8().await?;
            let mut name = vec![0u8; usize::from(len)];
            r.read_exact(&mut name).await?;
            None
        }
        _ => return Err(Socks5Error::Protocol("unknown address type")),
    };
    let port = r.read_u16().await?;
    Ok(ip.map(|ip| SocketAddr::new(ip, port)))
}

/// Wraps a datagram for `dst` in the SOCKS5 UDP header (RFC 1928 s. 7).
pub fn encode_udp(dst: SocketAddr, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[0, 0, 0]); // RSV, FRAG
    put_addr(out, dst);
    out.extend_from_slice(payload);
}

/// Unwraps a datagram from the relay: the remote it came from, and its
/// payload. Fragments and domain-name sources are refused.
pub fn decode_udp(buf: &[u8]) -> Result<(SocketAddr, &[u8]), Socks5Error> {
    let Some((&[_, _, frag, atyp], rest)) = buf.split_first_chunk::<4>() else {
        return Err(Socks5Error::Protocol("short UDP header"));
    };
    if frag != 0 {
        return Err(Socks5Error::Protocol("fragmented datagram"));
    }
    let (ip, rest) = match atyp {
        ATYP_V4 => {
            let (a, r) = rest
                .split_first_chunk::<4>()
                .ok_or(Socks5Error::Protocol("short address"))?;
            (IpAddr::V4(Ipv4Addr::from(*a)), r)
        }
        ATYP_V6 => {
            let (a, r) = rest
                .split_first_chunk::<16>()
                .ok_or(Socks5Error::Protocol("short address"))?;
            (IpAddr::V6(Ipv6Addr::from(*a)), r)
        }
        _ => return Err(Socks5Error::Protocol("unsupported address type")),
    };
    let (p, payload) = rest
        .split_first_chunk::<2>()
        .ok_or(Socks5Error::Protocol("short port"))?;
    Ok((SocketAddr::new(ip, u16::from_be_bytes(*p)), payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_header_round_trip() {
        let mut buf = Vec::new();
        for dst in ["198.51.100.7:3478", "[2001:db8::7]:27015"] {
            let dst: SocketAddr = dst.parse().unwrap();
            encode_udp(dst, b"payload", &mut buf);
            assert_eq!(&buf[..3], &[0, 0, 0]);
            assert_eq!(decode_udp(&buf).unwrap(), (dst, &b"payload"[..]));
        }
    }

    #[test]
    fn bad_udp_headers_are_refused_not_panicked_on() {
        assert!(decode_udp(&[]).is_err());
        assert!(decode_udp(&[0, 0, 1, 1, 198, 51]).is_err());
        assert!(decode_udp(&[0, 0, 0, 3, 4, b'a', b'b', b'c', b'd', 0, 53]).is_err());
        assert!(decode_udp(&[0, 0, 0, 9]).is_err());
        for len in 0..12 {
            let _ = decode_udp(&[0, 0, 0, 1, 198, 51, 100, 7, 0, 9, 1, 2][..len]);
        }
    }

    #[test]
    fn auth_request_layout() {
        assert_eq!(auth_request("ab", "xyz"), vec![1, 2, b'a', b'b', 3, b'x', b'y', b'z']);
    }
}
