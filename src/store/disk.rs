//! How the store's writes reach stable storage, and how it avoids trusting pages that did not.
//!
//! **Why `syncfs(2)` and not an fsync per file.** sled 0.34.7 writes more files than its log:
//! items above `segment_size / 4` (and leaf nodes rewritten as they grow) go to files of their
//! own under `blobs/` (`pagecache/blob_io.rs`: `create_new` + `write_all`, never synced), it
//! writes `conf` once and `snap.*` snapshots by rename, and none of the directory entries it
//! creates is ever fsynced. Its `flush` on Linux is `sync_file_range`, which neither records
//! metadata nor empties the device's cache. Following each of those files (which blob was just
//! created, which snapshot renamed) would tie our durability to sled's internals; one
//! `syncfs` on the data directory's file system after sled's `flush` covers every file and
//! every directory entry on it by construction, whatever sled wrote, and ends with the file
//! system's journal commit and the device cache flush. Measured on this machine's ext4, it
//! costs about what the `fdatasync` of the log did (README, performance). The price: it also
//! syncs whatever else is dirty on that file system, so the data directory belongs on a volume
//! of its own (a Kubernetes volume claim, a dedicated mount), which the README says.
//!
//! **Errors.** `syncfs` reports write-back errors only from Linux 5.8 on (before, it always
//! returned 0), so [`check_kernel`] refuses older kernels rather than promise what it cannot
//! see. After a failed sync, Linux may mark the pages that failed as clean while reads still
//! return them: the store then retires the database and reopens it (see the writer), and
//! [`evict_cached_pages`] runs before every open, so that sled recovers from what the disk
//! holds and not from pages that never reached it. What a reopened database holds counts as
//! durable only once the sync after the open succeeded.
//!
//! A power-loss campaign (`scripts/power-loss.sh`) checks all of this on a virtual disk whose
//! unflushed writes are lost, and the test suite traces the system calls before every 2xx.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The data directory, held open for `syncfs`: the file system it lives on is what gets synced.
pub(super) struct DataDir {
    dir: File,
}

impl DataDir {
    pub fn open(path: &Path) -> io::Result<Self> {
        // A directory opens read-only; that is enough for syncfs.
        Ok(Self {
            dir: File::open(path)?,
        })
    }

    /// Makes everything written so far on the data directory's file system durable: every
    /// file's data and size, every directory entry, then the device's cache. Errors that
    /// write-back met since the last call (or since `open`) are returned here.
    pub fn sync(&self) -> io::Result<()> {
        if cfg!(kallina_relay_skip_sync) {
            // The power-loss campaign's control build (`--cfg kallina_relay_skip_sync`, never
            // a setting): it must lose acknowledged events, or the campaign proves nothing.
            return Ok(());
        }
        // SAFETY: syncfs takes a file descriptor that `self.dir` keeps open.
        if unsafe { libc::syncfs(self.dir.as_raw_fd()) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Drops the clean cached pages of every file under `data_dir`, so that what sled reads next
/// comes from the disk. After a failed write-back the kernel may keep pages it could not write,
/// marked clean; reading them back would make an event that never reached the disk look stored,
/// and a retry of it would be answered `duplicate`. Dirty pages are kept (they are still to be
/// written, and the sync after the open writes them or fails). Called before every open; a
/// missing directory is no error (nothing to evict).
pub(super) fn evict_cached_pages(data_dir: &Path) -> io::Result<()> {
    let entries = match std::fs::read_dir(data_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            evict_cached_pages(&entry.path())?;
        } else if kind.is_file() {
            let file = File::open(entry.path())?;
            // SAFETY: the descriptor is open for the duration of the call.
            let rc =
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
        }
    }
    Ok(())
}

/// `syncfs` reports write-back errors from Linux 5.8 on; refuse a kernel that would hide them.
pub(super) fn check_kernel() -> Result<(), String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|e| format!("cannot read the kernel version: {e}"))?;
    check_release(release.trim())
}

fn check_release(release: &str) -> Result<(), String> {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version >= (5, 8) {
        Ok(())
    } else {
        Err(format!(
            "Linux {release} does not report write-back errors from syncfs (5.8 and later do); \
             the store cannot promise that a 2xx is on disk"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_from_5_8_are_accepted() {
        assert!(check_release("6.1.0-57-cloud-amd64").is_ok());
        assert!(check_release("5.8.0").is_ok());
        assert!(check_release("5.10.0-28-amd64").is_ok());
        assert!(check_release("5.7.19").is_err());
        assert!(check_release("4.19.0-26-amd64").is_err());
        assert!(check_release("garbage").is_err());
    }

    #[test]
    fn eviction_walks_nested_files_and_tolerates_a_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        std::fs::write(dir.path().join("db"), b"log").unwrap();
        std::fs::write(dir.path().join("blobs/7"), b"blob").unwrap();
        evict_cached_pages(dir.path()).unwrap();
        // Eviction never changes what a read returns.
        assert_eq!(std::fs::read(dir.path().join("blobs/7")).unwrap(), b"blob");
        evict_cached_pages(&dir.path().join("absent")).unwrap();
        DataDir::open(dir.path()).unwrap().sync().unwrap();
    }
}
