//! The maps sized by the configuration, checked against their pins at start.
//!
//! A pinned map is reused as it is (that is what keeps connections across a restart), so a
//! changed `maxServices`, `maxBackends`, `maglevTableSize` or `serviceCounters` would
//! otherwise have no effect: the kernel keeps the old size while the writer allocates up to
//! the new one, and the first write past the old size fails every sync. Before loading, a
//! pin of a different size is moved aside; once the new map exists its entries are copied
//! over and the old pin removed. A map that would be too small for what it already holds
//! stops the start, naming the setting and the value it needs, and the old pins are put
//! back: nothing programmed is lost.

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData};
use switchyard_ebpf_common::{
    BackendValue, Frontend4Key, Frontend6Key, FrontendValue, SetValue, SlotKey, maps as m,
};

use super::io::{MapError, MapFault, pinned_at};
use super::writer::Capacity;
use crate::error::DataplaneError;

/// Hash maps past this many entries fail to create (`E2BIG`: the kernel caps the bucket
/// array at `U32_MAX / 16`).
pub const HASH_MAX_ENTRIES: u64 = 1 << 27;

/// One configuration-sized map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizedMap {
    pub name: &'static str,
    pub max_entries: u32,
    /// The setting that sizes it, and entries per unit of that setting.
    pub setting: &'static str,
    pub per_unit: u32,
}

/// The sizes this configuration gives the service maps (`counters`: `serviceCounters`).
pub fn sized_maps(capacity: &Capacity, counters: bool) -> Vec<SizedMap> {
    let s = capacity.services;
    let mk = |name, max_entries, setting, per_unit| SizedMap {
        name,
        max_entries,
        setting,
        per_unit,
    };
    vec![
        mk(m::FRONTENDS4, s.saturating_mul(8), "maxServices", 8),
        mk(m::FRONTENDS6, s.saturating_mul(8), "maxServices", 8),
        mk(m::SETS, s.saturating_mul(3), "maxServices", 3),
        mk(m::SLOTS, capacity.slots, "maxBackends", 1),
        mk(m::BACKENDS, capacity.backends, "maxBackends", 1),
        // Per-CPU and preallocated: only as large as it is used.
        mk(
            m::COUNTERS,
            if counters { s } else { 1 },
            "serviceCounters",
            1,
        ),
    ]
}

/// A map whose pin had another size: its old pin, moved aside.
#[derive(Debug)]
pub struct Resize {
    pub map: SizedMap,
    pub from: u32,
    pin: PathBuf,
    aside: PathBuf,
}

fn fs_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DataplaneError {
    let path = path.to_path_buf();
    move |source| DataplaneError::Filesystem {
        backend: "ebpf",
        action,
        path,
        source,
    }
}

/// Move aside every pin under `pin_dir` whose size differs from `wanted`, so the loader
/// creates the map anew. A leftover from an interrupted start is put back first.
pub fn set_aside(pin_dir: &Path, wanted: &[SizedMap]) -> Result<Vec<Resize>, DataplaneError> {
    let mut moved = Vec::new();
    for w in wanted {
        let pin = pin_dir.join(w.name);
        // bpffs refuses names with a dot; no `SY_` prefix, so nothing takes it for a live map.
        let aside = pin_dir.join(format!("resizing_{}", w.name));
        if aside.exists() {
            if pin.exists() {
                // The new map of an interrupted resize: the old one is the truth.
                std::fs::remove_file(&pin).map_err(fs_err("removing", &pin))?;
            }
            std::fs::rename(&aside, &pin).map_err(fs_err("restoring", &pin))?;
        }
        let Ok(info) = aya::maps::MapInfo::from_pin(&pin) else {
            continue;
        };
        if info.max_entries() == w.max_entries {
            continue;
        }
        std::fs::rename(&pin, &aside).map_err(fs_err("moving aside", &pin))?;
        moved.push(Resize {
            map: w.clone(),
            from: info.max_entries(),
            pin,
            aside,
        });
    }
    Ok(moved)
}

fn fault(map: &'static str, op: &'static str, e: aya::maps::MapError) -> DataplaneError {
    DataplaneError::Map {
        source: MapError {
            map,
            op,
            cause: MapFault::Aya(e),
        },
    }
}

/// Put the old pins back (the start failed): the maps they hold stay as they were.
pub fn undo(resizes: &[Resize]) {
    for r in resizes {
        let _ = std::fs::remove_file(&r.pin);
        if let Err(e) = std::fs::rename(&r.aside, &r.pin) {
            tracing::error!(map = r.map.name, error = %e, "cannot put the old map's pin back");
        }
    }
}

fn copy<K: aya::Pod, V: aya::Pod>(r: &Resize) -> Result<usize, DataplaneError> {
    let name = r.map.name;
    let old: HashMap<MapData, K, V> = pinned_at(&r.aside, name, Map::HashMap)?;
    let mut new: HashMap<MapData, K, V> = pinned_at(&r.pin, name, Map::HashMap)?;
    let entries = old
        .iter()
        .collect::<Result<Vec<(K, V)>, _>>()
        .map_err(|e| fault(name, "read while resizing", e))?;
    if entries.len() > r.map.max_entries as usize {
        let per = u64::from(r.map.per_unit);
        return Err(DataplaneError::MapTooSmall {
            map: r.map.name,
            setting: r.map.setting,
            entries: entries.len(),
            to: r.map.max_entries,
            needed: (entries.len() as u64).div_ceil(per),
        });
    }
    for (k, v) in &entries {
        new.insert(k, v, 0)
            .map_err(|e| fault(name, "copy while resizing", e))?;
    }
    Ok(entries.len())
}

/// Copy each moved-aside map into the new one of the same name, then drop the old pins.
/// On an error the new pins are removed and the old ones put back.
pub fn carry_over(resizes: &[Resize]) -> Result<(), DataplaneError> {
    for r in resizes {
        let copied = match r.map.name {
            n if n == m::FRONTENDS4 => copy::<Frontend4Key, FrontendValue>(r),
            n if n == m::FRONTENDS6 => copy::<Frontend6Key, FrontendValue>(r),
            n if n == m::SETS => copy::<u32, SetValue>(r),
            n if n == m::SLOTS => copy::<SlotKey, u32>(r),
            n if n == m::BACKENDS => copy::<u32, BackendValue>(r),
            // Traffic counters restart from zero (a counter reset, as after a reboot).
            _ => Ok(0),
        };
        match copied {
            Ok(n) => tracing::info!(
                map = r.map.name,
                from = r.from,
                to = r.map.max_entries,
                setting = r.map.setting,
                entries = n,
                "map resized to the configured size; entries carried over"
            ),
            Err(e) => {
                undo(resizes);
                return Err(e);
            }
        }
    }
    for r in resizes {
        if let Err(e) = std::fs::remove_file(&r.aside) {
            tracing::warn!(map = r.map.name, error = %e, path = %r.aside.display(), "removing the old map's pin");
        }
    }
    Ok(())
}

/// Settings past what the kernel can create, or past the memory the kernel would charge to
/// this process's memory cgroup for the preallocated per-CPU counters, named before
/// anything is loaded. (The other sized maps allocate as entries arrive.)
pub fn check_limits(wanted: &[SizedMap]) -> Result<(), DataplaneError> {
    for w in wanted {
        if u64::from(w.max_entries) > HASH_MAX_ENTRIES {
            return Err(DataplaneError::MapTooLarge {
                map: w.name,
                setting: w.setting,
                entries: w.max_entries,
                limit: HASH_MAX_ENTRIES,
                max_setting: HASH_MAX_ENTRIES / u64::from(w.per_unit),
            });
        }
    }
    let Some(counters) = wanted.iter().find(|w| w.name == m::COUNTERS) else {
        return Ok(());
    };
    let cpus = aya::util::nr_cpus().unwrap_or(1);
    let per = size_of::<switchyard_ebpf_common::Counters>().next_multiple_of(8) as u64;
    let need = u64::from(counters.max_entries) * cpus as u64 * per;
    if let Some((cgroup, free)) = memcg_free() {
        // Half of what is left: the daemon itself and the other maps need the rest.
        if need > free / 2 {
            return Err(DataplaneError::MapMemory {
                map: counters.name,
                setting: "serviceCounters (or maxServices)",
                entries: counters.max_entries,
                cpus,
                need_mib: need.div_ceil(1 << 20),
                free_mib: free >> 20,
                cgroup,
            });
        }
    }
    Ok(())
}

/// This process's cgroup v2 path and the bytes left under its `memory.max` (None: no
/// limit, or not readable).
fn memcg_free() -> Option<(String, u64)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let root = super::cgroup2_root()?;
    let dir = root.join(rel.trim_start_matches('/'));
    let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
    let max: u64 = max.trim().parse().ok()?;
    let current: u64 = std::fs::read_to_string(dir.join("memory.current"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some((rel.to_string(), max.saturating_sub(current)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_settings_and_the_kernel_limit_names_the_setting() {
        let cap = Capacity {
            services: 100_000,
            backends: 1_000_000,
            slots: 1_000_000,
        };
        let w = sized_maps(&cap, false);
        let get = |n: &str| w.iter().find(|s| s.name == n).unwrap().max_entries;
        assert_eq!(get(m::FRONTENDS4), 800_000);
        assert_eq!(get(m::SETS), 300_000);
        assert_eq!(get(m::COUNTERS), 1, "no per-CPU counters unless asked for");
        assert_eq!(get(m::COUNTERS), 1);
        assert_eq!(sized_maps(&cap, true).last().unwrap().max_entries, 100_000);
        check_limits(&w).unwrap();
        let too_big = Capacity {
            services: 20_000_000,
            ..cap
        };
        let e = check_limits(&sized_maps(&too_big, false))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SY_FRONTENDS4") && e.contains("maxServices can be at most 16777216"),
            "{e}"
        );
    }
}
