//! Size-capped, rotating log files for a release's stdout and stderr.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Writes to `<base>`; past `max_bytes` it is renamed `<base>.1` (older
/// files shift up to `<base>.<keep>`, the oldest is dropped) and a new file
/// starts. A release can therefore never fill the disk with output.
pub struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: tokio::fs::File,
    written: u64,
}

impl RotatingLog {
    pub async fn open(path: PathBuf, max_bytes: u64, keep: u32) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await?;
        let written = file.metadata().await?.len();
        Ok(Self {
            path,
            max_bytes: max_bytes.max(1024),
            keep,
            file,
            written,
        })
    }

    pub async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.written + data.len() as u64 > self.max_bytes && self.written > 0 {
            self.rotate().await?;
        }
        self.file.write_all(data).await?;
        self.written += data.len() as u64;
        Ok(())
    }

    async fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush().await?;
        for n in (1..self.keep).rev() {
            let from = numbered(&self.path, n);
            if tokio::fs::try_exists(&from).await.unwrap_or(false) {
                tokio::fs::rename(&from, numbered(&self.path, n + 1)).await?;
            }
        }
        if self.keep > 0 {
            tokio::fs::rename(&self.path, numbered(&self.path, 1)).await?;
        }
        self.file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.path)
            .await?;
        self.written = 0;
        Ok(())
    }
}

fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Copies a child's pipe into a rotating log until the pipe closes. Output
/// is never lost to a full pipe: the child would block on it otherwise.
pub async fn pump(mut pipe: impl AsyncRead + Unpin, mut log: RotatingLog) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Err(error) = log.write(&buf[..n]).await {
                    tracing::warn!(%error, log = %log.path.display(), "cannot write release log");
                }
            }
        }
    }
    let _ = log.file.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rotation_caps_size_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        let mut log = RotatingLog::open(path.clone(), 1024, 2).await.unwrap();
        for i in 0..100 {
            log.write(format!("line {i:04} {}\n", "x".repeat(40)).as_bytes())
                .await
                .unwrap();
        }
        log.file.flush().await.unwrap();
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(&path) <= 1024 && size(&path) > 0);
        assert!(size(&numbered(&path, 1)) > 0 && size(&numbered(&path, 2)) > 0);
        assert!(!numbered(&path, 3).exists(), "only `keep` old files");
        let newest = std::fs::read_to_string(&path).unwrap();
        assert!(newest.contains("line 0099"));
    }
}
