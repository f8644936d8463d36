//! What the eBPF backend needs from the host before it loads anything: a BPF filesystem
//! where pins go, and the cgroup v2 hierarchy the socket load balancer attaches to.

use std::path::{Path, PathBuf};

use crate::error::DataplaneError;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn fs_error(action: &'static str, path: &Path, source: std::io::Error) -> DataplaneError {
    DataplaneError::Filesystem {
        backend: "ebpf",
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Whether `path` is on a BPF filesystem.
pub fn on_bpffs(path: &Path) -> bool {
    #[allow(clippy::cast_lossless, clippy::useless_conversion)]
    nix::sys::statfs::statfs(path).is_ok_and(|s| i64::from(s.filesystem_type().0) == BPF_FS_MAGIC)
}

/// Make sure a BPF filesystem is mounted where pins go (the host may not mount one).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), DataplaneError> {
    let root = Path::new("/sys/fs/bpf");
    let target = if pin_dir.starts_with(root) {
        root
    } else {
        pin_dir.parent().unwrap_or(root)
    };
    if on_bpffs(target) {
        return Ok(());
    }
    std::fs::create_dir_all(target).map_err(|e| fs_error("creating", target, e))?;
    nix::mount::mount(
        Some("bpf"),
        target,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| {
        if e == nix::errno::Errno::EPERM {
            // The DaemonSet has no CAP_SYS_ADMIN: the host must provide the mount.
            fs_error(
                "finding no BPF filesystem (mount one on the host, as systemd does at boot: \
                 `mount -t bpf bpf /sys/fs/bpf`; mounting it here needs CAP_SYS_ADMIN) at",
                target,
                e.into(),
            )
        } else {
            fs_error("mounting bpffs on", target, e.into())
        }
    })
}

/// Create a directory for pins.
pub fn create_dir(path: &Path) -> Result<(), DataplaneError> {
    std::fs::create_dir_all(path).map_err(|e| fs_error("creating", path, e))
}

/// The default cgroup v2 root: where cgroup2 is mounted (the unified hierarchy).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// Open the cgroup the socket load balancer attaches to.
pub fn open_cgroup(path: &Path) -> Result<std::fs::File, DataplaneError> {
    std::fs::File::open(path).map_err(|e| fs_error("opening cgroup", path, e))
}

/// Remove every link and map Switchyard pinned: programs detach, maps go away.
pub fn cleanup_pins(pin_dir: &Path) -> Result<(), DataplaneError> {
    use aya::programs::links::PinnedLink;
    if !pin_dir.exists() {
        return Ok(());
    }
    let links = pin_dir.join("links");
    if let Ok(entries) = std::fs::read_dir(&links) {
        for e in entries.flatten() {
            match PinnedLink::from_pin(e.path()) {
                Ok(l) => drop(l.unpin()),
                Err(_) => {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    std::fs::remove_dir_all(pin_dir).map_err(|e| fs_error("removing", pin_dir, e))
}
