//! Linux capabilities: what each part of the daemon needs, checked at start so that a
//! DaemonSet that grants too few fails naming the missing one (instead of an EPERM from deep
//! inside a syscall). The DaemonSet grants exactly these; `tests/tests/capabilities.rs` runs
//! the daemon with that set and no more.

/// A capability and why we need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub bit: u8,
    pub name: &'static str,
    pub why: &'static str,
}

pub const NET_ADMIN: Need = Need {
    bit: 12,
    name: "CAP_NET_ADMIN",
    why: "load and attach cgroup and tc programs, write rules, conntrack and addresses",
};
pub const NET_RAW: Need = Need {
    bit: 13,
    name: "CAP_NET_RAW",
    why: "iptables-legacy talks to the kernel through a raw socket",
};
pub const BPF: Need = Need {
    bit: 39,
    name: "CAP_BPF",
    why: "create maps and load programs",
};
pub const PERFMON: Need = Need {
    bit: 38,
    name: "CAP_PERFMON",
    why: "the verifier accepts the programs' pointer arithmetic only with it",
};
pub const NET_BIND_SERVICE: Need = Need {
    bit: 10,
    name: "CAP_NET_BIND_SERVICE",
    why: "serve DNS on a port below 1024",
};

/// The effective capability set of this process (`CapEff` of /proc/self/status).
pub fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// The capabilities of `needs` this process does not have (none when it cannot tell).
pub fn missing(needs: &[Need]) -> Vec<Need> {
    let Some(eff) = effective() else {
        return Vec::new();
    };
    needs
        .iter()
        .filter(|n| eff & (1u64 << n.bit) == 0)
        .copied()
        .collect()
}

/// `CAP_X (why), CAP_Y (why)`.
pub fn describe(missing: &[Need]) -> String {
    missing
        .iter()
        .map(|n| format!("{} ({})", n.name, n.why))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_or_lacks_what_proc_says() {
        let eff = effective().expect("CapEff in /proc/self/status");
        let has_bpf = eff & (1 << 39) != 0;
        assert_eq!(missing(&[BPF]).is_empty(), has_bpf);
        assert_eq!(
            describe(&[BPF, PERFMON]),
            "CAP_BPF (create maps and load programs), CAP_PERFMON (the verifier accepts the programs' pointer arithmetic only with it)"
        );
    }
}
