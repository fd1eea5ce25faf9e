//! The coordinator's artifact store: files kept by their sha256 digest in
//! `data_dir/artifacts`, pushed by operators (`cutover artifact push`) and
//! fetched by agents over their mTLS connection, so a small shop needs no
//! artifact server.

use std::path::PathBuf;

use cutover_common::digest::{Digest, Hasher};
use cutover_proto::v1::ArtifactChunk;
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::Status;

const CHUNK: usize = 256 << 10;

pub struct ArtifactStore {
    dir: PathBuf,
    max_bytes: u64,
}

/// A push in progress: bytes go to a temp file while they are hashed.
pub struct Upload {
    tmp: PathBuf,
    file: tokio::fs::File,
    hasher: Hasher,
    size: u64,
    max_bytes: u64,
}

impl ArtifactStore {
    pub fn open(dir: PathBuf, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        // Uploads cut short by a crash leave temp files; none is in use now.
        for entry in std::fs::read_dir(&dir)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".upload-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self { dir, max_bytes })
    }

    /// Whether the store holds the artifact with this digest text.
    pub fn contains(&self, digest: &str) -> bool {
        Digest::parse(digest).is_ok_and(|d| self.path(&d).is_file())
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("sha256-{}", digest.hex()))
    }

    pub async fn begin(&self) -> Result<Upload, Status> {
        let nonce: u64 = rand::random();
        let tmp = self.dir.join(format!(".upload-{nonce:016x}"));
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| Status::internal(format!("cannot create {}: {e}", tmp.display())))?;
        Ok(Upload {
            tmp,
            file,
            hasher: Hasher::new(),
            size: 0,
            max_bytes: self.max_bytes,
        })
    }

    /// Stores a finished upload under its digest; returns the digest, the
    /// size and whether the store had it already. `expect` refuses a
    /// mismatch (and stores nothing).
    pub async fn commit(
        &self,
        upload: Upload,
        expect: Option<Digest>,
    ) -> Result<(Digest, u64, bool), Status> {
        let fail = |tmp: &PathBuf, status: Status| {
            let _ = std::fs::remove_file(tmp);
            status
        };
        if let Err(e) = upload.file.sync_all().await {
            return Err(fail(
                &upload.tmp,
                Status::internal(format!("cannot write the artifact: {e}")),
            ));
        }
        let digest = Digest::from_hasher(upload.hasher);
        if let Some(expect) = expect.filter(|e| *e != digest) {
            return Err(fail(
                &upload.tmp,
                Status::failed_precondition(format!(
                    "digest mismatch: expected {expect}, the upload is {digest}; nothing was stored"
                )),
            ));
        }
        let path = self.path(&digest);
        if path.exists() {
            let _ = std::fs::remove_file(&upload.tmp);
            return Ok((digest, upload.size, true));
        }
        std::fs::rename(&upload.tmp, &path).map_err(|e| {
            fail(
                &upload.tmp,
                Status::internal(format!("cannot store the artifact: {e}")),
            )
        })?;
        Ok((digest, upload.size, false))
    }

    /// Streams a stored artifact in chunks; NOT_FOUND when it is not here.
    pub async fn open_stream(
        &self,
        digest: &Digest,
    ) -> Result<mpsc::Receiver<Result<ArtifactChunk, Status>>, Status> {
        let path = self.path(digest);
        let mut file = tokio::fs::File::open(&path).await.map_err(|_| {
            Status::not_found(format!(
                "the coordinator has no artifact {digest}; push it with `cutover artifact push FILE`"
            ))
        })?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match file.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx
                            .send(Ok(ArtifactChunk {
                                data: buf[..n].to_vec(),
                            }))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("reading the artifact: {e}"))))
                            .await;
                        break;
                    }
                }
            }
        });
        Ok(rx)
    }
}

impl Upload {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), Status> {
        self.size += data.len() as u64;
        if self.size > self.max_bytes {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(Status::resource_exhausted(format!(
                "artifact larger than limits.max_artifact_bytes ({} bytes)",
                self.max_bytes
            )));
        }
        self.hasher.update(data);
        self.file
            .write_all(data)
            .await
            .map_err(|e| Status::internal(format!("cannot write the artifact: {e}")))
    }

    /// Throws a failed upload away.
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}
