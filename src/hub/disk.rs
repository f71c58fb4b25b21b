//! Free disk space before a download: the cache's filesystem must hold every file still to fetch plus
//! a margin, or wick refuses before writing a byte.

use std::path::Path;

/// Extra room required on top of the files themselves: 10 % plus this many bytes.
pub const DISK_MARGIN_BYTES: u64 = 64 * 1024 * 1024;

/// Where the free-space figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FreeSpace {
    /// `statvfs` of the cache directory (blocks available to unprivileged users).
    #[default]
    Filesystem,
    /// A fixed figure, to rehearse a full disk (tests, dry runs).
    Fixed(u64),
}

impl FreeSpace {
    /// Bytes available at `path`.
    ///
    /// # Errors
    /// I/O errors from `statvfs`.
    pub fn available_bytes(self, path: &Path) -> std::io::Result<u64> {
        match self {
            FreeSpace::Fixed(bytes) => Ok(bytes),
            FreeSpace::Filesystem => statvfs_available(path),
        }
    }
}

/// Bytes needed on disk to store `download_bytes` safely.
pub fn required_with_margin(download_bytes: u64) -> u64 {
    download_bytes
        .saturating_add(download_bytes / 10)
        .saturating_add(DISK_MARGIN_BYTES)
}

fn statvfs_available(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte")
    })?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` points to writable memory of the
    // right type; statvfs initialises it fully when it returns 0.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: rc == 0, so statvfs filled the struct.
    let stat = unsafe { stat.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    let bytes = (stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statvfs_reports_space_for_an_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(FreeSpace::Filesystem.available_bytes(dir.path()).unwrap() > 0);
        assert!(FreeSpace::Filesystem
            .available_bytes(&dir.path().join("missing"))
            .is_err());
        assert_eq!(FreeSpace::Fixed(5).available_bytes(dir.path()).unwrap(), 5);
    }

    #[test]
    fn margin_is_ten_percent_plus_a_constant() {
        assert_eq!(required_with_margin(0), DISK_MARGIN_BYTES);
        assert_eq!(required_with_margin(1000), 1100 + DISK_MARGIN_BYTES);
        assert_eq!(required_with_margin(u64::MAX), u64::MAX);
    }
}
