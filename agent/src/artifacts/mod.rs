//! Release artifacts: fetched once, verified against their pinned sha256
//! digest, cached by digest, unpacked into the release's own directory
//! (`unpack`).
//!
//! Every step writes to a temp name first and renames into place, so a crash
//! or a bad artifact leaves nothing half-done behind: a cached file always
//! matches its digest and a release dir is always completely unpacked.

mod unpack;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cutover_common::digest::Digest;
use cutover_common::digest::{DigestError, Hasher};
use cutover_common::fetch::{Download, HttpFetcher};
use cutover_proto::v1::agent_service_client::AgentServiceClient;
use cutover_proto::v1::{ArtifactChunk, FetchArtifactRequest};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

pub use self::unpack::unpack;
use cutover_common::modes;

const FETCH_TIMEOUT: Duration = Duration::from_secs(600);

/// The artifact URL that means "the coordinator's artifact store".
pub const COORDINATOR_URL: &str = "coordinator:";

/// Where a half-written download goes before it is verified.
const FETCH_TEMP_PREFIX: &str = ".fetch-";

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error("unsupported artifact url {0:?}: use https://, http://, file:// or coordinator:")]
    UnsupportedScheme(String),
    #[error("cannot fetch {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("artifact file {path} is outside the dirs this agent reads file:// artifacts from ({}); add its dir to `file_artifact_dirs` in the agent config, or deploy the file from the coordinator (`cutover artifact push`)", describe_dirs(.allowed))]
    FileRefused { path: String, allowed: Vec<PathBuf> },
    #[error("digest mismatch for {url}: expected {expected}, got {actual}; nothing was changed")]
    Mismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("cannot unpack {archive}: {reason}; is it a .tar.gz?")]
    Unpack { archive: PathBuf, reason: String },
    #[error("archive {archive} is refused: entry {entry} {reason}; nothing was unpacked, rebuild the archive without it")]
    Refused {
        archive: PathBuf,
        entry: PathBuf,
        reason: String,
    },
    #[error("{}: {}", .path.display(), cutover_common::fsutil::explain_io(.path, .source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn describe_dirs(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        return "none: file:// artifacts are off".to_string();
    }
    let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    dirs.join(", ")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The name of the artifact with `digest` in the cache.
pub fn cache_file_name(digest: &Digest) -> String {
    format!("sha256-{}.tar.gz", digest.hex())
}

/// The digest-addressed artifact cache of one agent.
pub struct ArtifactCache {
    dir: PathBuf,
    http: HttpFetcher,
    /// The only dirs `file://` artifacts may come from; none turns them off.
    file_dirs: Vec<PathBuf>,
}

/// An artifact's bytes, opened and ready to stream.
enum Source {
    File(tokio::fs::File),
    Http(Download),
    Coordinator(tonic::Streaming<ArtifactChunk>),
}

impl ArtifactCache {
    /// `extra_ca` adds a PEM CA to the public web roots, for artifact
    /// servers behind a private CA; `file_dirs` are the dirs `file://`
    /// artifacts may be read from. Downloads a crash cut short are removed.
    pub fn open(
        dir: PathBuf,
        extra_ca: Option<&Path>,
        file_dirs: &[PathBuf],
    ) -> Result<Self, ArtifactError> {
        modes::restrict_tree(&dir)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => modes::private_dir(&dir),
                _ => Err(e),
            })
            .map_err(io(&dir))?;
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(FETCH_TEMP_PREFIX)
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let http = HttpFetcher::new(extra_ca).map_err(|e| ArtifactError::Io {
            path: extra_ca.map(Path::to_path_buf).unwrap_or_default(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(Self {
            dir,
            http,
            file_dirs: file_dirs.to_vec(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_for(&self, digest: &Digest) -> PathBuf {
        self.dir.join(cache_file_name(digest))
    }

    /// The cached artifact for `digest`, fetched from `url` and verified
    /// first if it is not cached yet. A failure of any kind leaves the cache
    /// as it was. `coordinator` is the agent's connection, for
    /// `coordinator:` URLs.
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
        let tmp = self.dir.join(format!("{FETCH_TEMP_PREFIX}{nonce:016x}"));
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
                })
                .and_then(|actual| {
                    if actual == *digest {
                        Ok(())
                    } else {
                        Err(ArtifactError::Mismatch {
                            url: url.to_string(),
                            expected: digest.to_string(),
                            actual: actual.to_string(),
                        })
                    }
                })
                .and_then(|()| std::fs::rename(&tmp, &path).map_err(io(&path)));
        if let Err(error) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(error);
        }
        Ok(path)
    }

    /// Opens what `url` names, before anything is written to the cache: a
    /// source refused or missing leaves no trace.
    async fn open_source(
        &self,
        url: &str,
        digest: &Digest,
        coordinator: Option<Channel>,
    ) -> Result<Source, ArtifactError> {
        let fetch_error = |reason: String| ArtifactError::Fetch {
            url: url.to_string(),
            reason,
        };
        if let Some(path) = url.strip_prefix("file://") {
            let file = self.open_file(url, path)?;
            return Ok(Source::File(tokio::fs::File::from_std(file)));
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            let download = self
                .http
                .get(url)
                .await
                .map_err(|e| fetch_error(e.to_string()))?;
            return Ok(Source::Http(download));
        }
        if url == COORDINATOR_URL {
            let channel = coordinator
                .ok_or_else(|| fetch_error("not connected to the coordinator".into()))?;
            let chunks = AgentServiceClient::new(channel)
                .max_decoding_message_size(8 << 20)
                .fetch_artifact(FetchArtifactRequest {
                    digest: digest.to_string(),
                })
                .await
                .map_err(|status| fetch_error(status.message().to_string()))?
                .into_inner();
            return Ok(Source::Coordinator(chunks));
        }
        Err(ArtifactError::UnsupportedScheme(url.to_string()))
    }

    /// Opens a `file://` artifact if it really lies in one of `file_dirs`:
    /// symlinks are resolved before the check, and the opened file is
    /// checked again where the kernel says it is, so a link swapped in
    /// between cannot lead outside. Only a regular file is read (never a
    /// fifo or device, which are not even opened outside the dirs).
    fn open_file(&self, url: &str, path: &str) -> Result<std::fs::File, ArtifactError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let fetch_error = |reason: String| ArtifactError::Fetch {
            url: url.to_string(),
            reason,
        };
        let refused = || ArtifactError::FileRefused {
            path: path.to_string(),
            allowed: self.file_dirs.clone(),
        };
        let allowed: Vec<PathBuf> = self
            .file_dirs
            .iter()
            .filter_map(|dir| dir.canonicalize().ok())
            .collect();
        let inside = |real: &Path| allowed.iter().any(|dir| real.starts_with(dir));
        if allowed.is_empty() {
            return Err(refused());
        }
        let real = std::fs::canonicalize(path).map_err(|e| fetch_error(e.to_string()))?;
        if !inside(&real) {
            return Err(refused());
        }
        let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags.bits())
            .open(&real)
            .map_err(|e| fetch_error(e.to_string()))?;
        let opened = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|e| fetch_error(format!("cannot tell where the opened file is: {e}")))?;
        if !inside(&opened) {
            return Err(refused());
        }
        let regular = file
            .metadata()
            .map_err(|e| fetch_error(e.to_string()))?
            .is_file();
        if !regular {
            return Err(fetch_error("not a regular file".into()));
        }
        Ok(file)
    }

    /// Streams `url` into `dest` (a new 0600 file) and returns the digest
    /// of what arrived.
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
        let source = self.open_source(url, digest, coordinator).await?;
        let mut file =
            tokio::fs::File::from_std(modes::create_private_file(dest).map_err(io(dest))?);
        let mut hasher = Hasher::new();
        match source {
            Source::File(mut input) => {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = input
                        .read(&mut buf)
                        .await
                        .map_err(|e| fetch_error(e.to_string()))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    file.write_all(&buf[..n]).await.map_err(io(dest))?;
                }
            }
            Source::Http(mut download) => {
                while let Some(data) = download
                    .chunk()
                    .await
                    .map_err(|e| fetch_error(e.to_string()))?
                {
                    hasher.update(&data);
                    file.write_all(&data).await.map_err(io(dest))?;
                }
            }
            Source::Coordinator(mut chunks) => {
                while let Some(chunk) = chunks
                    .message()
                    .await
                    .map_err(|status| fetch_error(status.message().to_string()))?
                {
                    hasher.update(&chunk.data);
                    file.write_all(&chunk.data).await.map_err(io(dest))?;
                }
            }
        }
        file.sync_all().await.map_err(io(dest))?;
        Ok(Digest::from_hasher(hasher))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn tarball(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
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

    /// What the cache dir holds, temp files included.
    fn cached(cache: &ArtifactCache) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn fetch_verifies_caches_and_unpacks() {
        let dir = tempfile::tempdir().unwrap();
        let archive = tarball(
            dir.path(),
            &[("app.py", "print('hi')"), ("bin/run", "#!/bin/sh\n")],
        );
        let digest = Digest::of_file(&archive).unwrap();
        let cache =
            ArtifactCache::open(dir.path().join("cache"), None, &[dir.path().into()]).unwrap();
        let url = format!("file://{}", archive.display());

        let cached = cache.fetch(&url, &digest, None).await.unwrap();
        assert_eq!(Digest::of_file(&cached).unwrap(), digest);
        assert_eq!(modes::mode_of(&cached).unwrap(), modes::PRIVATE_FILE);
        // Cached: the source can go away.
        std::fs::remove_file(&archive).unwrap();
        assert_eq!(cache.fetch(&url, &digest, None).await.unwrap(), cached);

        let dest = dir.path().join("releases/web-v1");
        unpack(&cached, &dest).unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.join("app.py")).unwrap(),
            "print('hi')"
        );
        let mode = modes::mode_of(&dest.join("bin/run")).unwrap();
        assert_eq!(mode & 0o111, 0o111, "executable bits survive");
    }

    #[tokio::test]
    async fn a_digest_mismatch_names_both_digests_and_caches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let archive = tarball(dir.path(), &[("a", "1")]);
        let wrong = Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap();
        let cache =
            ArtifactCache::open(dir.path().join("cache"), None, &[dir.path().into()]).unwrap();
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
        assert!(cached(&cache).is_empty(), "{:?}", cached(&cache));
    }

    #[tokio::test]
    async fn file_artifacts_are_read_only_inside_the_allowed_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("artifacts");
        let private = dir.path().join("pki");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&private).unwrap();
        let key = private.join("ca.key");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----").unwrap();
        let key_digest = Digest::of_file(&key).unwrap();
        let url = |path: &Path| format!("file://{}", path.display());

        // Off unless configured, even with the right digest.
        let off = ArtifactCache::open(dir.path().join("off"), None, &[]).unwrap();
        let error = off.fetch(&url(&key), &key_digest, None).await.unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains(&key.display().to_string())
                && text.contains("file_artifact_dirs")
                && text.contains("file:// artifacts are off"),
            "{text}"
        );
        assert!(cached(&off).is_empty());

        let cache = ArtifactCache::open(
            dir.path().join("cache"),
            None,
            std::slice::from_ref(&allowed),
        )
        .unwrap();
        // Outside the allowed dir, directly, by "..", or by a symlink in it.
        let climbing = format!("{}/../pki/ca.key", allowed.display());
        let link = allowed.join("innocent.tar.gz");
        std::os::unix::fs::symlink(&key, &link).unwrap();
        for source in [url(&key), format!("file://{climbing}"), url(&link)] {
            let error = cache.fetch(&source, &key_digest, None).await.unwrap_err();
            assert!(
                matches!(error, ArtifactError::FileRefused { .. }),
                "{source}: {error}"
            );
            let text = error.to_string();
            assert!(
                text.contains(&allowed.display().to_string())
                    && text.contains("file_artifact_dirs"),
                "{text}"
            );
        }
        // A fifo inside is not read (nor waited on).
        let fifo = allowed.join("pipe.tar.gz");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let error = cache
            .fetch(&url(&fifo), &key_digest, None)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("not a regular file"), "{error}");
        assert!(cached(&cache).is_empty(), "{:?}", cached(&cache));

        // Inside: fine.
        let archive = tarball(&allowed, &[("app.py", "print('hi')")]);
        let digest = Digest::of_file(&archive).unwrap();
        cache.fetch(&url(&archive), &digest, None).await.unwrap();
        assert_eq!(cached(&cache), [format!("sha256-{}.tar.gz", digest.hex())]);
    }

    #[test]
    fn opening_the_cache_removes_cut_short_downloads_and_narrows_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cache_dir = dir.path().join("cache");
        std::fs::create_dir_all(&cache_dir).unwrap();
        std::fs::write(cache_dir.join(".fetch-0123456789abcdef"), "half").unwrap();
        let old = cache_dir.join(format!("sha256-{}.tar.gz", "ab".repeat(32)));
        std::fs::write(&old, "cached by an older agent").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&cache_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cache = ArtifactCache::open(cache_dir.clone(), None, &[]).unwrap();
        assert_eq!(cached(&cache), [old.file_name().unwrap().to_str().unwrap()]);
        assert_eq!(modes::mode_of(&old).unwrap(), modes::PRIVATE_FILE);
        assert_eq!(modes::mode_of(&cache_dir).unwrap(), modes::PRIVATE_DIR);
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
        let cache = ArtifactCache::open(dir.path().join("cache"), None, &[]).unwrap();
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
        assert_eq!(
            cached(&cache),
            [format!("sha256-{}.tar.gz", digest.hex())],
            "failed fetches leave nothing behind"
        );
    }
}
