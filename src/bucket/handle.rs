//! The bucket task and the handle through which everyone else uses its table.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use super::table::{MemoryBudget, Table};
use super::{BucketError, BucketName};
use crate::change::ChangeLog;

/// A number that tells one bucket from every other bucket of the same registry, including
/// earlier buckets of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketId(pub(crate) u64);

/// A failure to inject into a bucket's task, for fault tests and the server's debug commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketFault {
    /// The task panics, as a bug would make it.
    Panic,
    /// The task returns normally, as if told to stop.
    Stop,
}

/// What the bucket task is told through its control slot. A `watch` slot rather than a queue:
/// it holds one value, so telling a bucket to stop never blocks and never grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Run,
    Fail(BucketFault),
}

/// What every handle of one bucket shares. `repr(C)` keeps the order: the name (compared on
/// every registry lookup) sits just before the table's hot bytes (used right after), so a
/// lookup among many buckets reads adjacent cache lines of one block, and
/// [`BucketHandle::prefetch`] asks for all of them.
#[repr(C)]
struct Shared {
    name: BucketName,
    table: Table,
    id: BucketId,
    control: watch::Sender<Control>,
}

/// The bytes of a bucket's block that a request reads: its name and its table's hot bytes.
const HOT_BYTES: usize = std::mem::offset_of!(Shared, table) + Table::HOT_BYTES;

/// The block sits after the `Arc`'s two counts in an allocation aligned to 16 bytes, so its
/// hot bytes start 16, 32, 48 or 0 bytes into a 64-byte cache line. Up to 112 of them take at
/// most three lines wherever they start, and two at half the placements; each line more is a
/// cache miss more per request among many buckets (measured in `docs/performance.md`).
const _: () = assert!(HOT_BYTES <= 112);

/// A reference to one bucket. Cheap to clone; every clone reaches the same table.
///
/// Operations run on the caller's task, directly on the table (see the module docs for why).
/// Once the bucket has ended, every operation returns [`BucketError::Stopped`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use kv::{BucketError, BucketFault, Registry};
///
/// let registry = Registry::start(Default::default());
/// let bucket = registry.create("shopping").await?;
/// bucket.put(b"milk", b"1")?;
/// assert_eq!(bucket.get(b"milk")?.as_deref(), Some(&b"1"[..]));
///
/// bucket.inject_fault(BucketFault::Panic)?;
/// bucket.stopped().await;
/// assert_eq!(bucket.get(b"milk"), Err(BucketError::Stopped));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct BucketHandle {
    shared: Arc<Shared>,
}

impl BucketHandle {
    /// This bucket's identity.
    #[must_use]
    pub fn id(&self) -> BucketId {
        self.shared.id
    }

    /// The name the bucket was created under.
    #[must_use]
    pub fn name(&self) -> &BucketName {
        &self.shared.name
    }

    /// Sets `key` to `value`, replacing any earlier value.
    ///
    /// # Errors
    /// [`BucketError::Stopped`] if the bucket has ended; [`BucketError::OutOfMemory`] if the
    /// memory budget has no room for the entry (the old value, if any, stays).
    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<(), BucketError> {
        self.shared
            .table
            .put(self.shared.name.as_bytes(), key, value)
    }

    /// Sets `key` to `value` without logging it: for restoring a bucket from disk.
    pub(crate) fn restore(&self, key: &[u8], value: &[u8]) -> Result<(), BucketError> {
        self.shared.table.restore(key, value)
    }

    /// A copy of the value of `key`, or `None` if the key is absent.
    ///
    /// # Errors
    /// [`BucketError::Stopped`] if the bucket has ended.
    pub fn get(&self, key: &[u8]) -> Result<Option<Bytes>, BucketError> {
        self.get_with(key, |value| value.map(Bytes::copy_from_slice))
    }

    /// Runs `read` on the value of `key` without copying it out first; the table is locked for
    /// reading meanwhile, so `read` should be short (the server encodes a reply in it).
    ///
    /// # Errors
    /// [`BucketError::Stopped`] if the bucket has ended.
    pub fn get_with<R>(
        &self,
        key: &[u8],
        read: impl FnOnce(Option<&[u8]>) -> R,
    ) -> Result<R, BucketError> {
        self.shared.table.get_with(key, read)
    }

    /// Removes `key`; returns whether it was there.
    ///
    /// # Errors
    /// [`BucketError::Stopped`] if the bucket has ended.
    pub fn delete(&self, key: &[u8]) -> Result<bool, BucketError> {
        self.shared.table.delete(self.shared.name.as_bytes(), key)
    }

    /// How many keys the bucket holds.
    ///
    /// # Errors
    /// [`BucketError::Stopped`] if the bucket has ended.
    pub fn len(&self) -> Result<usize, BucketError> {
        self.shared.table.len()
    }

    /// Whether the bucket holds no keys.
    ///
    /// # Errors
    /// [`BucketError::Stopped`] if the bucket has ended.
    pub fn is_empty(&self) -> Result<bool, BucketError> {
        Ok(self.len()? == 0)
    }

    /// One page of the bucket's keys at a cost of the page: up to `limit` keys from `cursor`
    /// (zero to start), in the order they are stored, and the cursor of the next page (zero
    /// when the listing is done). A key present for the whole listing (its value not changing
    /// size meanwhile) is returned at least once; one added or removed meanwhile may or may
    /// not be.
    ///
    /// # Errors
    /// [`BucketError::Stopped`] if the bucket has ended.
    pub fn scan(&self, cursor: u64, limit: usize) -> Result<(u64, Vec<Bytes>), BucketError> {
        self.shared.table.scan(cursor, limit)
    }

    /// One page of the bucket's entries, in the order [`scan`](Self::scan) lists keys: `visit`
    /// gets each key and value from `cursor` (zero to start) until they add up to `bytes` (at
    /// least one entry); returns the cursor of the next page (zero when done). Writers wait
    /// for the page only. An entry that stays unchanged for the whole walk is visited at least
    /// once; one changed meanwhile may be visited with its old value, its new one, both or
    /// neither (a snapshot copied this way is made whole by the changes made meanwhile).
    ///
    /// # Errors
    /// [`BucketError::Stopped`] if the bucket has ended.
    pub fn scan_entries(
        &self,
        cursor: u64,
        bytes: usize,
        visit: impl FnMut(&[u8], &[u8]),
    ) -> Result<u64, BucketError> {
        self.shared.table.scan_entries(cursor, bytes, visit)
    }

    /// How many keys the bucket holds, and the bytes it takes of the memory budget.
    ///
    /// # Errors
    /// [`BucketError::Stopped`] if the bucket has ended.
    pub fn size(&self) -> Result<(usize, usize), BucketError> {
        self.shared.table.size()
    }

    /// Reads, writes and deletes clients have made of the bucket since it (re)started,
    /// modulo 2^32.
    #[must_use]
    pub fn operations(&self) -> u32 {
        self.shared.table.operations()
    }

    /// One page of the bucket's keys in byte order: up to `limit` keys greater than `after`.
    /// Pass the last key of a page as `after` to get the next one. Each page reads the whole
    /// bucket: for small buckets and tests; [`scan`](Self::scan) costs only the page.
    ///
    /// # Errors
    /// [`BucketError::Stopped`] if the bucket has ended.
    pub fn keys(&self, after: Option<&[u8]>, limit: usize) -> Result<Vec<Bytes>, BucketError> {
        self.shared.table.keys_after(after, limit)
    }

    /// Calls `visit` with every key and value, under the bucket's read lock: a consistent copy
    /// (writers to this bucket wait meanwhile).
    ///
    /// # Errors
    /// [`BucketError::Stopped`] if the bucket has ended.
    pub fn for_each_entry(&self, visit: impl FnMut(&[u8], &[u8])) -> Result<(), BucketError> {
        self.shared.table.for_each_entry(visit)
    }

    /// Starts loading the bucket's name and table header into cache, all lines at once,
    /// without reading them (the first stage of `ReadNames::resolve` in the registry).
    pub(crate) fn prefetch(&self) {
        crate::prefetch::prefetch(&*self.shared, HOT_BYTES);
    }

    /// Where this bucket's block is: two live buckets never share it, and it is known without
    /// reading the block. An ended bucket's address may be reused by a later one.
    pub(crate) fn address(&self) -> usize {
        Arc::as_ptr(&self.shared).addr()
    }

    /// Starts loading into cache the entries of `keys`, for requests that will read them soon.
    pub(crate) fn prefetch_entries<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) {
        self.shared.table.prefetch(keys);
    }

    /// Whether the bucket has ended. Once true, it stays true.
    #[must_use]
    pub fn is_stopped(&self) -> bool {
        self.shared.table.is_closed()
    }

    /// Waits until the bucket's task has ended and its table is closed.
    pub async fn stopped(&self) {
        self.shared.control.closed().await;
    }

    /// Makes the bucket's task fail on purpose: the way fault tests crash a bucket.
    ///
    /// # Errors
    /// [`BucketError::Stopped`] if the bucket has already ended.
    pub fn inject_fault(&self, fault: BucketFault) -> Result<(), BucketError> {
        self.shared
            .control
            .send(Control::Fail(fault))
            .map_err(|_| BucketError::Stopped)
    }

    /// Closes the table now, before the task has been told to stop, so that no operation can
    /// succeed once the registry has decided the bucket is gone.
    pub(crate) fn close(&self) {
        self.shared.table.close();
        // The task may already have ended; then there is nobody to tell.
        let _ = self.shared.control.send(Control::Fail(BucketFault::Stop));
    }
}

impl std::fmt::Debug for BucketHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketHandle")
            .field("id", &self.shared.id)
            .field("name", &self.shared.name)
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

/// Closes the table when the task ends, however it ends. The control receiver is a field so it
/// is dropped *after* `drop` has closed the table: `BucketHandle::stopped` (which waits for that
/// receiver to go) therefore never returns while the table is still open.
struct CloseOnExit {
    shared: Arc<Shared>,
    control: watch::Receiver<Control>,
}

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        self.shared.table.close();
    }
}

/// Creates a bucket and returns its handle with the future of its task, for a supervisor to
/// spawn. Until the future is polled the bucket is already usable: the table exists.
/// `charged` is what the caller reserved of `budget` for the bucket itself (see [`cost`]); the
/// bucket gives it back when it ends.
pub(crate) fn start(
    id: BucketId,
    name: BucketName,
    budget: Arc<MemoryBudget>,
    charged: usize,
    log: Option<Arc<dyn ChangeLog>>,
) -> (BucketHandle, impl Future<Output = ()> + Send + 'static) {
    let (control, receiver) = watch::channel(Control::Run);
    let shared = Arc::new(Shared {
        id,
        name,
        table: Table::new(budget, log, charged),
        control,
    });
    let guard = CloseOnExit {
        shared: Arc::clone(&shared),
        control: receiver,
    };
    (BucketHandle { shared }, run(guard))
}

/// What a bucket costs before it holds a key, for the memory budget: its block, its task, its
/// control channel and its places in the registry (the monitor, the read view, the sorted
/// names), 1,131 bytes as `tests/registry_memory.rs` measures it; and its name, held by the
/// bucket and by the sorted names.
#[must_use]
pub(crate) fn cost(name: &BucketName) -> usize {
    EMPTY_BUCKET_COST + 2 * name.len()
}

/// See [`cost`].
pub(crate) const EMPTY_BUCKET_COST: usize = 1152;

async fn run(mut bucket: CloseOnExit) {
    loop {
        let control = *bucket.control.borrow_and_update();
        match control {
            Control::Run => {}
            Control::Fail(BucketFault::Stop) => return,
            Control::Fail(BucketFault::Panic) => {
                panic!("fault injected into bucket {}", bucket.shared.name)
            }
        }
        // The sender lives in `Shared`, which this task holds, so this cannot fail while the
        // task runs; ending here if it somehow did is still the safe choice.
        if bucket.control.changed().await.is_err() {
            return;
        }
    }
}
