//! Content digests: every artifact is pinned to its `sha256:<hex>`.

use std::io::Read;
use std::path::Path;

use sha2::{Digest as _, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {0:?}: expected sha256: followed by 64 hex digits")]
pub struct DigestError(pub String);

/// A pinned `sha256:<hex>` digest (lower-case hex).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest(String);

impl Digest {
    pub fn parse(text: &str) -> Result<Self, DigestError> {
        let hex = text
            .strip_prefix("sha256:")
            .ok_or_else(|| DigestError(text.to_string()))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DigestError(text.to_string()));
        }
        Ok(Self(format!("sha256:{}", hex.to_ascii_lowercase())))
    }

    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The digest of everything a hasher saw.
    pub fn from_hasher(hasher: Sha256) -> Self {
        Self(format!("sha256:{:x}", hasher.finalize()))
    }

    /// The digest of a local file.
    pub fn of_file(path: &Path) -> std::io::Result<Self> {
        let mut file = std::fs::File::open(path)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(Self::from_hasher(hasher))
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub use sha2::Sha256 as Hasher;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_strictly() {
        assert!(Digest::parse("sha256:abc").is_err());
        assert!(Digest::parse(&"a".repeat(64)).is_err());
        let upper = Digest::parse(&format!("sha256:{}", "AB".repeat(32))).unwrap();
        assert_eq!(upper.hex(), "ab".repeat(32));
    }

    #[test]
    fn file_digest_matches_the_known_empty_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        std::fs::write(&path, b"").unwrap();
        assert_eq!(
            Digest::of_file(&path).unwrap().to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
