//! Keeping the NodePort range out of the node's ephemeral ports
//! (`net.ipv4.ip_local_reserved_ports`), and giving back exactly what we reserved.

use std::path::Path;

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The ranges of a `ip_local_reserved_ports` value (`a,b-c,...`).
fn port_ranges(v: &str) -> Vec<(u16, u16)> {
    v.trim()
        .split(',')
        .filter_map(|t| {
            let (a, b) = t.trim().split_once('-').unwrap_or((t.trim(), t.trim()));
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect()
}

/// `value` with `range` added, or `None` when it is already covered.
pub fn with_reserved(value: &str, range: (u16, u16)) -> Option<String> {
    let have = port_ranges(value);
    let covered = (range.0..=range.1).all(|p| have.iter().any(|(a, b)| (*a..=*b).contains(&p)));
    if covered {
        return None;
    }
    let v = value.trim();
    let token = format!("{}-{}", range.0, range.1);
    Some(if v.is_empty() {
        token
    } else {
        format!("{v},{token}")
    })
}

/// `value` without the exact `range` token (what `with_reserved` added).
pub fn without_reserved(value: &str, range: (u16, u16)) -> String {
    value
        .trim()
        .split(',')
        .filter(|t| port_ranges(t).first() != Some(&range))
        .collect::<Vec<_>>()
        .join(",")
}

/// Keep the NodePort range out of this namespace's ephemeral ports. Cilium does the same:
/// otherwise a node's own connection may get a NodePort as its source port, and the replies
/// would be taken for NodePort traffic. `Ok(true)` when the sysctl changed; then a note in
/// the pin directory (a directory named after the range: bpffs holds no regular files) lets
/// `cleanup` take back exactly what we added.
pub fn reserve_ports(range: (u16, u16), pin_dir: &Path) -> std::io::Result<bool> {
    let cur = std::fs::read_to_string(RESERVED_PORTS)?;
    match with_reserved(&cur, range) {
        Some(v) => {
            std::fs::write(RESERVED_PORTS, v)?;
            std::fs::create_dir_all(
                pin_dir.join(format!("{RESERVED_NOTE}{}-{}", range.0, range.1)),
            )?;
            Ok(true)
        }
        None => Ok(false),
    }
}

const RESERVED_NOTE: &str = "reserved-ports-";

/// Undo `reserve_ports`, if we reserved the range (cleanup; before the pins go).
pub fn unreserve_ports(pin_dir: &Path) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(&range) = name
            .strip_prefix(RESERVED_NOTE)
            .and_then(|r| port_ranges(r).first().copied())
            .as_ref()
        {
            release(range)?;
            let _ = std::fs::remove_dir(e.path());
        }
    }
    Ok(())
}

fn release(range: (u16, u16)) -> std::io::Result<()> {
    let cur = std::fs::read_to_string(RESERVED_PORTS)?;
    let new = without_reserved(&cur, range);
    if new.trim() != cur.trim() {
        // An empty write is refused; a lone newline clears the list.
        std::fs::write(
            RESERVED_PORTS,
            if new.is_empty() { "\n".into() } else { new },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_are_added_once_and_removed_exactly() {
        let r = (30000, 32767);
        assert_eq!(with_reserved("\n", r).as_deref(), Some("30000-32767"));
        assert_eq!(
            with_reserved("8080,9000-9100\n", r).as_deref(),
            Some("8080,9000-9100,30000-32767")
        );
        // Already covered (by one range or a wider one): left alone.
        assert_eq!(with_reserved("30000-32767\n", r), None);
        assert_eq!(with_reserved("20000-40000", r), None);
        // Partly covered: added.
        assert!(with_reserved("30000-31000", r).is_some());
        assert_eq!(without_reserved("8080,30000-32767,9000", r), "8080,9000");
        assert_eq!(without_reserved("30000-32767\n", r), "");
        assert_eq!(without_reserved("20000-40000", r), "20000-40000");
    }
}
