//! A minimal HTTP/1.1 pass-through loop, written for two I/O models: on
//! tokio's epoll reactor (`--io epoll`) and on io_uring (`--io uring`,
//! tokio-uring, built with the `io-uring-probe` feature). Not the node
//! proxy: the same bytes moved with the least logic around them (one
//! upstream connection per client connection, heads found with httparse,
//! Content-Length bodies only), so `bench/proxy.sh` can show what io_uring
//! saves in the socket loop alone, before building the node proxy on it.
//!
//!   io-probe --io epoll|uring --listen 127.0.0.1:18089 --upstream 127.0.0.1:18081

use std::net::SocketAddr;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| usage(&format!("{flag} is missing")))
    };
    let parse = |flag: &str| -> SocketAddr {
        value(flag)
            .parse()
            .unwrap_or_else(|e| usage(&format!("{flag}: {e}")))
    };
    let (listen, upstream) = (parse("--listen"), parse("--upstream"));
    match value("--io").as_str() {
        "epoll" => epoll::run(listen, upstream),
        "uring" => uring::run(listen, upstream),
        other => usage(&format!("--io {other}: expected epoll or uring")),
    }
}

fn usage(problem: &str) -> ! {
    eprintln!("io-probe: {problem}\nusage: io-probe --io epoll|uring --listen ADDR:PORT --upstream ADDR:PORT");
    std::process::exit(2)
}

/// Logs a connection's error, but for the resets and broken pipes of a
/// load generator closing its connections at the end of a run.
fn report(error: &std::io::Error) {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
    if !matches!(error.kind(), ConnectionReset | BrokenPipe) {
        eprintln!("io-probe: {error}");
    }
}

/// The length of the request head at the start of `buf`, once whole
/// (the benchmark's requests have no body).
fn request_end(buf: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    match httparse::Request::new(&mut headers).parse(buf) {
        Ok(httparse::Status::Complete(len)) => Some(len),
        _ => None,
    }
}

/// The length of the response at the start of `buf` (its head and its
/// Content-Length body), once whole.
fn response_end(buf: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(head)) = response.parse(buf) else {
        return None;
    };
    let length: usize = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
        .unwrap_or(0);
    (buf.len() >= head + length).then_some(head + length)
}

const READ_SIZE: usize = 8 << 10;

mod epoll {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::{request_end, response_end, READ_SIZE};

    pub fn run(listen: SocketAddr, upstream: SocketAddr) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let listener = TcpListener::bind(listen).await.expect("listen");
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    if let Err(error) = serve(client, upstream).await {
                        super::report(&error);
                    }
                });
            }
        })
    }

    async fn serve(mut client: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
        client.set_nodelay(true)?;
        let mut release = TcpStream::connect(upstream).await?;
        release.set_nodelay(true)?;
        let (mut from_client, mut from_release) = (Vec::new(), Vec::new());
        loop {
            let end = loop {
                if let Some(end) = request_end(&from_client) {
                    break end;
                }
                from_client.reserve(READ_SIZE);
                if client.read_buf(&mut from_client).await? == 0 {
                    return Ok(());
                }
            };
            release.write_all(&from_client[..end]).await?;
            from_client.drain(..end);
            let end = loop {
                if let Some(end) = response_end(&from_release) {
                    break end;
                }
                from_release.reserve(READ_SIZE);
                if release.read_buf(&mut from_release).await? == 0 {
                    return Ok(());
                }
            };
            client.write_all(&from_release[..end]).await?;
            from_release.drain(..end);
        }
    }
}

#[cfg(feature = "io-uring-probe")]
mod uring {
    use std::net::SocketAddr;

    use tokio_uring::buf::BoundedBuf;
    use tokio_uring::net::{TcpListener, TcpStream};

    use super::{request_end, response_end, READ_SIZE};

    pub fn run(listen: SocketAddr, upstream: SocketAddr) {
        tokio_uring::start(async move {
            let listener = TcpListener::bind(listen).expect("listen");
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                tokio_uring::spawn(async move {
                    if let Err(error) = serve(client, upstream).await {
                        super::report(&error);
                    }
                });
            }
        })
    }

    /// Reads more into `buf` (after what it holds); the bytes read.
    async fn read_more(tcp: &TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        buf.reserve(READ_SIZE);
        let len = buf.len();
        let (read, slice) = tcp.read(std::mem::take(buf).slice(len..)).await;
        *buf = slice.into_inner();
        read
    }

    /// Writes the first `end` bytes of `buf` whole, then drops them.
    async fn write_front(tcp: &TcpStream, buf: &mut Vec<u8>, end: usize) -> std::io::Result<()> {
        let (written, slice) = tcp.write_all(std::mem::take(buf).slice(..end)).await;
        *buf = slice.into_inner();
        buf.drain(..end);
        written
    }

    async fn serve(client: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
        client.set_nodelay(true)?;
        let release = TcpStream::connect(upstream).await?;
        release.set_nodelay(true)?;
        let (mut from_client, mut from_release) = (Vec::new(), Vec::new());
        loop {
            let end = loop {
                if let Some(end) = request_end(&from_client) {
                    break end;
                }
                if read_more(&client, &mut from_client).await? == 0 {
                    return Ok(());
                }
            };
            write_front(&release, &mut from_client, end).await?;
            let end = loop {
                if let Some(end) = response_end(&from_release) {
                    break end;
                }
                if read_more(&release, &mut from_release).await? == 0 {
                    return Ok(());
                }
            };
            write_front(&client, &mut from_release, end).await?;
        }
    }
}

#[cfg(not(feature = "io-uring-probe"))]
mod uring {
    use std::net::SocketAddr;

    pub fn run(_: SocketAddr, _: SocketAddr) {
        super::usage("built without io_uring: build with --features io-uring-probe")
    }
}
