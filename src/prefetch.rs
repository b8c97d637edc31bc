//! A hint to the processor to start loading memory that will be read soon.
//!
//! Among thousands of buckets, a request's bucket is rarely in cache, and the loads that reach
//! it (its name, its lock, its index, its slab headers) each wait for their cache line in turn.
//! Asking for every line at once, as soon as the address is known, overlaps those misses.
//! Written by hand because the standard library's only portable prefetch is unstable and no
//! well-kept crate offers one; it is a single instruction.

/// Starts loading the cache lines of the first `bytes` bytes of `value`. Has no effect on
/// what the program computes, only on when memory arrives.
#[inline(always)]
pub(crate) fn prefetch<T>(value: &T, bytes: usize) {
    prefetch_range(
        std::ptr::from_ref(value).cast::<u8>(),
        bytes.min(size_of::<T>()),
    );
}

/// Starts loading the cache lines of `bytes`.
#[inline(always)]
pub(crate) fn prefetch_bytes(bytes: &[u8]) {
    prefetch_range(bytes.as_ptr(), bytes.len());
}

#[inline(always)]
fn prefetch_range(start: *const u8, len: usize) {
    const CACHE_LINE: usize = 64;
    if len == 0 {
        return;
    }
    // Every line the range touches, from the one holding its first byte to the one holding
    // its last, whatever the range's alignment.
    let first_line = start.addr() & !(CACHE_LINE - 1);
    let last_line = (start.addr() + (len - 1)) & !(CACHE_LINE - 1);
    let mut line = first_line;
    loop {
        prefetch_line(start.with_addr(line));
        if line >= last_line {
            break;
        }
        line += CACHE_LINE;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
fn prefetch_line(address: *const u8) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    // SAFETY: PREFETCHT0 is a hint: it never faults and writes nothing, whatever the address
    // (and this one is inside a live reference). SSE, which it needs, is part of every
    // x86_64 processor.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(address.cast::<i8>()) }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn prefetch_line(_address: *const u8) {}
