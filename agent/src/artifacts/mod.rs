//! Release artifacts: fetched once, verified against their pinned sha256
//! digest, cached by digest, unpacked into the release's own directory.
//!
//! Every step writes to a temp name first and renames into place, so a crash
//! or a bad artifact leaves nothing half-done behind: a cached file always
//! matches its digest and a release dir is always completely unpacked.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cutover_common::digest::Digest;
use cutover_common::digest::{DigestError, Hasher};
use cutover_common::fetch::HttpFetcher;
use cutover_proto::v1::agent_service_client::AgentServiceClient;
use cutover_proto::v1::FetchArtifactRequest;
use sha2::Digest as _;
use tokio::io::AsyncWriteExt;
use tonic::transport::Channel;

const FETCH_TIMEOUT: Duration = Duration::from_secs(600);

/// The artifact URL that means "the coordinator's artifact store".
pub const COORDINATOR_URL: &str = "coordinator:";

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error("unsupported artifact url {0:?}: use https://, http://, file:// or coordinator:")]
    UnsupportedScheme(String),
    #[error("cannot fetch {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("digest mismatch for {url}: expected {expected}, got {actual}; nothing was changed")]
    Mismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("cannot unpack {archive}: {reason}; is it a .tar.gz?")]
    Unpack { archive: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The digest-addressed artifact cache of one agent.
pub struct ArtifactCache {
    dir: PathBuf,
    http: HttpFetcher,
}

impl ArtifactCache {
    /// `extra_ca` adds a PEM CA to the public web roots, for artifact
    /// servers behind a private CA.
    pub fn open(dir: PathBuf, extra_ca: Option<&Path>) -> Result<Self, ArtifactError> {
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let http = HttpFetcher::new(extra_ca).map_err(|e| ArtifactError::Io {
            path: extra_ca.map(Path::to_path_buf).unwrap_or_default(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(Self { dir, http })
    }

    pub fn path_for(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("sha256-{}.tar.gz", digest.hex()))
    }

    /// The cached artifact for `digest`, fetched from `url` and verified
    /// first if it is not cached yet. A mismatch leaves the cache untouched.
    /// `coordinator` is the agent's connection, for `coordinator:` URLs.
    pub async fn fetch(
        &self,
        url: &str,
        digest: &Digest,
        coordinator: Option<Channel>,
    ) -> Result<PathBuf, ArtifactError> {
        let path = self.path_for(digest);
        if path.exists() {
            return Ok(path);
        }
        let nonce: u64 = rand::random();
        let tmp = self.dir.join(format!(".fetch-{nonce:016x}"));
        let result =
            tokio::time::timeout(FETCH_TIMEOUT, self.download(url, digest, coordinator, &tmp))
                .await
                .unwrap_or_else(|_| {
                    Err(ArtifactError::Fetch {
                        url: url.to_string(),
                        reason: format!(
                            "not complete within {}",
                            humantime::format_duration(FETCH_TIMEOUT)
                        ),
                    })
                });
        let actual = match result {
            Ok(actual) => actual,
            Err(error) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(error);
            }
        };
        if actual != *digest {
            let _ = std::fs::remove_file(&tmp);
            return Err(ArtifactError::Mismatch {
                url: url.to_string(),
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(path)
    }

    /// Streams `url` into `dest` and returns the digest of what arrived.
    async fn download(
        &self,
        url: &str,
        digest: &Digest,
        coordinator: Option<Channel>,
        dest: &Path,
    ) -> Result<Digest, ArtifactError> {
        let fetch_error = |reason: String| ArtifactError::Fetch {
            url: url.to_string(),
            reason,
        };
        let mut file = tokio::fs::File::create(dest).await.map_err(io(dest))?;
        let mut hasher = Hasher::new();
        if let Some(source) = url.strip_prefix("file://") {
            let mut input = tokio::fs::File::open(source)
                .await
                .map_err(|e| fetch_error(e.to_string()))?;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = tokio::io::AsyncReadExt::read(&mut input, &mut buf)
                    .await
                    .map_err(|e| fetch_error(e.to_string()))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).await.map_err(io(dest))?;
            }
        } else if url.starts_with("http://") || url.starts_with("https://") {
            let mut download = self
                .http
                .get(url)
                .await
                .map_err(|e| fetch_error(e.to_string()))?;
            while let Some(data) = download
                .chunk()
                .await
                .map_err(|e| fetch_error(e.to_string()))?
            {
                hasher.update(&data);
                file.write_all(&data).await.map_err(io(dest))?;
            }
        } else if url == COORDINATOR_URL {
            let channel = coordinator
                .ok_or_else(|| fetch_error("not connected to the coordinator".into()))?;
            let mut chunks = AgentServiceClient::new(channel)
                .max_decoding_message_size(8 << 20)
                .fetch_artifact(FetchArtifactRequest {
                    digest: digest.to_string(),
                })
                .await
                .map_err(|status| fetch_error(status.message().to_string()))?
                .into_inner();
            while let Some(chunk) = chunks
                .message()
                .await
                .map_err(|status| fetch_error(status.message().to_string()))?
            {
                hasher.update(&chunk.data);
                file.write_all(&chunk.data).await.map_err(io(dest))?;
            }
        } else {
            return Err(ArtifactError::UnsupportedScheme(url.to_string()));
        }
        file.sync_all().await.map_err(io(dest))?;
        Ok(Digest::from_hasher(hasher))
    }
}

/// Unpacks a `.tar.gz` into `dest`, which must not exist yet; an existing
/// `dest` is a release unpacked before and is left as it is. Entries that
/// would land outside `dest` (absolute paths, `..`) are refused.
pub fn unpack(archive: &Path, dest: &Path) -> Result<(), ArtifactError> {
    if dest.exists() {
        return Ok(());
    }
    let parent = dest.parent().expect("release dirs have a parent");
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let nonce: u64 = rand::random();
    let tmp = parent.join(format!(".unpack-{nonce:016x}"));
    let unpacked = (|| -> Result<(), String> {
        let file = std::fs::File::open(archive).map_err(|e| e.to_string())?;
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
        tar.set_preserve_permissions(true);
        std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
        for entry in tar.entries().map_err(|e| e.to_string())? {
            let mut entry = entry.map_err(|e| e.to_string())?;
            let path = entry.path().map_err(|e| e.to_string())?.into_owned();
            // unpack_in refuses to write outside the directory; a refusal is
            // an attack or a broken archive, never something to skip.
            if !entry.unpack_in(&tmp).map_err(|e| e.to_string())? {
                return Err(format!(
                    "entry {} points outside the release dir",
                    path.display()
                ));
            }
        }
        Ok(())
    })();
    if let Err(reason) = unpacked {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(ArtifactError::Unpack {
            archive: archive.to_path_buf(),
            reason,
        });
    }
    std::fs::rename(&tmp, dest).map_err(io(dest))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
        let path = dir.join("app.tar.gz");
        let file = std::fs::File::create(&path).unwrap();
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            file,
            flate2::Compression::fast(),
        ));
        for (name, body) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(body.len() as u64);
            header.set_mode(0o755);
            header.set_cksum();
            builder
                .append_data(&mut header, name, body.as_bytes())
                .unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap();
        path
    }

    #[tokio::test]
    async fn fetch_verifies_caches_and_unpacks() {
        let dir = tempfile::tempdir().unwrap();
        let archive = tarball(
            dir.path(),
            &[("app.py", "print('hi')"), ("bin/run", "#!/bin/sh\n")],
        );
        let digest = Digest::of_file(&archive).unwrap();
        let cache = ArtifactCache::open(dir.path().join("cache"), None).unwrap();
        let url = format!("file://{}", archive.display());

        let cached = cache.fetch(&url, &digest, None).await.unwrap();
        assert_eq!(Digest::of_file(&cached).unwrap(), digest);
        // Cached: the source can go away.
        std::fs::remove_file(&archive).unwrap();
        assert_eq!(cache.fetch(&url, &digest, None).await.unwrap(), cached);

        let dest = dir.path().join("releases/web-v1");
        unpack(&cached, &dest).unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.join("app.py")).unwrap(),
            "print('hi')"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dest.join("bin/run"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "executable bits survive");
    }

    #[tokio::test]
    async fn a_digest_mismatch_names_both_digests_and_caches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let archive = tarball(dir.path(), &[("a", "1")]);
        let wrong = Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap();
        let cache = ArtifactCache::open(dir.path().join("cache"), None).unwrap();
        let error = cache
            .fetch(&format!("file://{}", archive.display()), &wrong, None)
            .await
            .unwrap_err();
        let text = error.to_string();
        assert!(text.contains(&wrong.to_string()), "{text}");
        assert!(
            text.contains(&Digest::of_file(&archive).unwrap().to_string()),
            "{text}"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("cache")).unwrap().count(),
            0
        );
    }

    #[test]
    fn malformed_and_escaping_archives_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.tar.gz");
        std::fs::write(&garbage, b"this is not gzip").unwrap();
        let dest = dir.path().join("releases/r1");
        assert!(matches!(
            unpack(&garbage, &dest),
            Err(ArtifactError::Unpack { .. })
        ));
        assert!(!dest.exists());

        // A hand-made archive whose entry climbs out with "..".
        let evil = dir.path().join("evil.tar.gz");
        let file = std::fs::File::create(&evil).unwrap();
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            file,
            flate2::Compression::fast(),
        ));
        let mut header = tar::Header::new_gnu();
        header.set_size(1);
        header.set_mode(0o644);
        header.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
        header.set_cksum();
        builder.append(&header, &b"x"[..]).unwrap();
        builder.into_inner().unwrap().finish().unwrap();
        assert!(unpack(&evil, &dest).is_err());
        assert!(!dest.exists());
        assert!(!dir.path().join("releases/escape").exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("releases"))
            .unwrap()
            .collect();
        assert!(leftovers.is_empty(), "temp dirs cleaned up: {leftovers:?}");
    }

    /// Serves `body` once per connection over plain HTTP, or a 404 for any
    /// path but /app.tar.gz.
    async fn http_server(body: Vec<u8>) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut request = [0u8; 2048];
                let n = tcp.read(&mut request).await.unwrap_or(0);
                let found = String::from_utf8_lossy(&request[..n]).starts_with("GET /app.tar.gz ");
                let (status, payload) = if found {
                    ("200 OK", body.clone())
                } else {
                    ("404 Not Found", Vec::new())
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    payload.len()
                );
                let _ = tcp.write_all(head.as_bytes()).await;
                let _ = tcp.write_all(&payload).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn fetch_over_http_and_refuse_errors() {
        let dir = tempfile::tempdir().unwrap();
        let archive = tarball(dir.path(), &[("app.py", "print('hi')")]);
        let digest = Digest::of_file(&archive).unwrap();
        let addr = http_server(std::fs::read(&archive).unwrap()).await;
        let cache = ArtifactCache::open(dir.path().join("cache"), None).unwrap();
        let fetched = cache
            .fetch(&format!("http://{addr}/app.tar.gz"), &digest, None)
            .await
            .unwrap();
        assert_eq!(Digest::of_file(&fetched).unwrap(), digest);

        let other = Digest::parse(&format!("sha256:{}", "cd".repeat(32))).unwrap();
        let missing = cache
            .fetch(&format!("http://{addr}/nope.tar.gz"), &other, None)
            .await
            .unwrap_err();
        assert!(missing.to_string().contains("404"), "{missing}");
        let scheme = cache
            .fetch("ftp://example/app.tar.gz", &other, None)
            .await
            .unwrap_err();
        assert!(matches!(scheme, ArtifactError::UnsupportedScheme(_)));
    }
}
