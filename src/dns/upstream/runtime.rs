//! A hickory runtime whose sockets carry tproxyd's `SO_MARK`.
//!
//! hickory opens its own UDP and TCP sockets to upstream resolvers. On a
//! gateway running the redirect in local mode, an unmarked query to
//! 198.51.100.53:53 would be captured and handed straight back to tproxyd;
//! the mark is what lets the rules skip it.

use hickory_net::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_net::runtime::{RuntimeProvider, TokioHandle, TokioTime};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use crate::net::sockets;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Default)]
pub struct MarkedRuntime {
    handle: TokioHandle,
    mark: u32,
}

impl MarkedRuntime {
    pub fn new(mark: u32) -> Self {
        MarkedRuntime {
            handle: TokioHandle::default(),
            mark,
        }
    }
}

impl RuntimeProvider for MarkedRuntime {
    type Handle = TokioHandle;
    type Timer = TokioTime;
    type Udp = UdpSocket;
    type Tcp = AsyncIoTokioAsStd<TcpStream>;

    fn create_handle(&self) -> Self::Handle {
        self.handle.clone()
    }

    fn connect_tcp(
        &self,
        server: SocketAddr,
        bind: Option<SocketAddr>,
        wait_for: Option<Duration>,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Self::Tcp>>>> {
        let mark = self.mark;
        Box::pin(async move {
            let sock = TcpSocket::from_std_stream(sockets::marked_tcp(server, mark)?);
            if let Some(bind) = bind {
                sock.bind(bind)?;
            }
            match tokio::time::timeout(wait_for.unwrap_or(CONNECT_TIMEOUT), sock.connect(server)).await {
                Ok(stream) => stream.map(AsyncIoTokioAsStd),
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "TCP connect timed out")),
            }
        })
    }

    fn bind_udp(
        &self,
        local: SocketAddr,
        _server: SocketAddr,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Self::Udp>>>> {
        let mark = self.mark;
        Box::pin(async move { UdpSocket::from_std(sockets::marked_udp(local, mark)?) })
    }
}
