//! Just enough of the Redis protocol (RESP2) for the queue probe: a
//! connection, AUTH and SELECT, and pipelined read-only commands answered
//! with integers, bulk strings or nil.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A bulk reply larger than this is read past and taken as nil (a job
/// payload read for its push time; Laravel's are small).
const MAX_BULK: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Status(String),
}

pub struct Connection {
    stream: BufReader<TcpStream>,
}

impl Connection {
    /// Connects to `addr` ("HOST:PORT"), authenticates and selects `db`.
    pub async fn open(
        addr: &str,
        password: Option<&str>,
        db: u32,
        timeout: Duration,
    ) -> Result<Self, String> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connecting to redis at {addr} timed out"))?
            .map_err(|e| format!("cannot connect to redis at {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let mut connection = Self {
            stream: BufReader::new(stream),
        };
        let mut setup: Vec<Vec<&[u8]>> = Vec::new();
        if let Some(password) = password {
            setup.push(vec![b"AUTH", password.as_bytes()]);
        }
        let db = db.to_string();
        if db != "0" {
            setup.push(vec![b"SELECT", db.as_bytes()]);
        }
        if !setup.is_empty() {
            connection.pipeline(&setup).await?;
        }
        Ok(connection)
    }

    /// Sends `commands` at once and reads their replies in order; a Redis
    /// error fails the whole batch with its message.
    pub async fn pipeline(&mut self, commands: &[Vec<&[u8]>]) -> Result<Vec<Reply>, String> {
        let mut out = Vec::new();
        for command in commands {
            out.extend_from_slice(format!("*{}\r\n", command.len()).as_bytes());
            for arg in command {
                out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
                out.extend_from_slice(arg);
                out.extend_from_slice(b"\r\n");
            }
        }
        self.stream
            .get_mut()
            .write_all(&out)
            .await
            .map_err(|e| format!("writing to redis: {e}"))?;
        let mut replies = Vec::with_capacity(commands.len());
        for _ in commands {
            replies.push(self.read().await?);
        }
        Ok(replies)
    }

    async fn read(&mut self) -> Result<Reply, String> {
        let mut line = String::new();
        self.stream
            .read_line(&mut line)
            .await
            .map_err(|e| format!("reading from redis: {e}"))?;
        let line = line.trim_end_matches(['\r', '\n']);
        let (kind, rest) = line
            .split_at_checked(1)
            .ok_or("redis closed the connection")?;
        match kind {
            ":" => rest
                .parse()
                .map(Reply::Integer)
                .map_err(|_| format!("redis sent a bad integer {rest:?}")),
            "+" => Ok(Reply::Status(rest.to_string())),
            "-" => Err(format!("redis: {rest}")),
            "$" => {
                let len: i64 = rest
                    .parse()
                    .map_err(|_| format!("redis sent a bad length {rest:?}"))?;
                if len < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                if len > MAX_BULK {
                    // Read past it: the replies after it stay in step.
                    let skip = u64::try_from(len).unwrap_or(u64::MAX).saturating_add(2);
                    let skipped =
                        tokio::io::copy(&mut (&mut self.stream).take(skip), &mut tokio::io::sink())
                            .await
                            .map_err(|e| format!("reading from redis: {e}"))?;
                    if skipped < skip {
                        return Err("redis closed the connection".into());
                    }
                    return Ok(Reply::Bulk(None));
                }
                let mut data = vec![0; len + 2];
                self.stream
                    .read_exact(&mut data)
                    .await
                    .map_err(|e| format!("reading from redis: {e}"))?;
                data.truncate(len);
                Ok(Reply::Bulk(Some(data)))
            }
            other => Err(format!("redis sent an unexpected reply type {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A server that answers whatever it is sent with `replies`, written in
    /// pieces of 3 bytes (replies split across reads), but for a run of
    /// more than 64 KiB, written at once.
    async fn server(replies: Vec<u8>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let (small, large) = replies.split_at(replies.len().min(64));
            let pieces = small.chunks(3).chain(std::iter::once(large));
            for piece in pieces {
                stream.write_all(piece).await.unwrap();
                stream.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // Keep the connection until the client is done.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        addr
    }

    #[tokio::test]
    async fn replies_in_pieces_nil_and_a_value_too_large_keep_their_order() {
        let mut replies = b":12\r\n$-1\r\n$5\r\nhello\r\n".to_vec();
        replies.extend(format!("${}\r\n", MAX_BULK + 1).as_bytes());
        replies.extend(vec![b'x'; MAX_BULK + 1]);
        replies.extend(b"\r\n:7\r\n");
        let addr = server(replies).await;
        let mut redis = Connection::open(&addr, None, 0, Duration::from_secs(5))
            .await
            .unwrap();
        let commands: Vec<Vec<&[u8]>> = vec![vec![b"LLEN", b"k"]; 5];
        let got = redis.pipeline(&commands).await.unwrap();
        assert_eq!(
            got,
            [
                Reply::Integer(12),
                Reply::Bulk(None),
                Reply::Bulk(Some(b"hello".to_vec())),
                Reply::Bulk(None),
                Reply::Integer(7),
            ]
        );
    }

    #[tokio::test]
    async fn an_error_reply_names_what_redis_said() {
        let addr = server(b"-NOAUTH Authentication required.\r\n".to_vec()).await;
        let error = Connection::open(&addr, Some("wrong"), 0, Duration::from_secs(5))
            .await
            .err()
            .unwrap();
        assert_eq!(error, "redis: NOAUTH Authentication required.");
    }
}
