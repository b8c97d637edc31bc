//! Bucket names: arbitrary bytes from clients, owned and freed like any other value.

use std::borrow::Borrow;
use std::fmt;

use bytes::Bytes;
use smallvec::SmallVec;

/// Names up to this many bytes live inside the `BucketName` itself: comparing one during a
/// lookup then reads the bucket's block, which the request reads next anyway, instead of
/// following a pointer to another cache line (the main cost of a lookup among many buckets).
/// Sixteen, not more, so that the name and the table's hot bytes fit the three cache lines
/// that `bucket::handle` asserts.
const INLINE_NAME: usize = 16;

/// The name of a bucket: any byte string a client sends.
///
/// Names are never interned or leaked: dropping a `BucketName` frees its bytes, so creating
/// and dropping millions of distinct buckets leaves memory where it was.
///
/// ```
/// use kv::BucketName;
/// let name = BucketName::from("shopping");
/// assert_eq!(name.as_bytes(), b"shopping");
/// assert_eq!(name.to_string(), "shopping");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketName(SmallVec<[u8; INLINE_NAME]>);

impl BucketName {
    /// The name's bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The name's length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the name is the empty string.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Borrow<[u8]> for BucketName {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl From<&str> for BucketName {
    fn from(name: &str) -> Self {
        Self(SmallVec::from_slice(name.as_bytes()))
    }
}

impl From<&[u8]> for BucketName {
    fn from(name: &[u8]) -> Self {
        Self(SmallVec::from_slice(name))
    }
}

impl From<Vec<u8>> for BucketName {
    fn from(name: Vec<u8>) -> Self {
        Self(SmallVec::from_vec(name))
    }
}

impl From<Bytes> for BucketName {
    /// Copies the bytes: a slice of a larger buffer must not keep that buffer alive.
    fn from(name: Bytes) -> Self {
        Self(SmallVec::from_slice(&name))
    }
}

impl fmt::Display for BucketName {
    /// Shows the name as UTF-8, with invalid bytes escaped, for logs and errors.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.escape_ascii())
    }
}

impl fmt::Debug for BucketName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BucketName(\"{}\")", self.0.escape_ascii())
    }
}
