//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): each backend fills table positions
//! in its own permutation order, so removing a backend hands only (almost only) its positions
//! to the others.

/// The default table size: a prime, large enough for fair spread over a few hundred backends.
pub const DEFAULT_TABLE_SIZE: u32 = 16_381;

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Final avalanche so nearby names spread.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// Build the lookup table of size `m` (prime) over backends named by `names`; entries are
/// indexes into `names`. Empty when there are no backends.
pub fn table(names: &[Vec<u8>], m: u32) -> Vec<u32> {
    let n = names.len();
    if n == 0 || m == 0 {
        return Vec::new();
    }
    let m64 = u64::from(m);
    let perm: Vec<(u64, u64)> = names
        .iter()
        .map(|name| {
            let offset = fnv1a(0x5bd1_e995, name) % m64;
            let skip = fnv1a(0x1b87_3593, name) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut entry = vec![u32::MAX; m as usize];
    let mut filled = 0u32;
    'outer: loop {
        for (i, (offset, skip)) in perm.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m64;
            while entry[usize::try_from(c).unwrap_or(0)] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m64;
            }
            entry[usize::try_from(c).unwrap_or(0)] = u32::try_from(i).unwrap_or(0);
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'outer;
            }
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("10.244.{}.{}:8080", i / 200, i % 200).into_bytes())
            .collect()
    }

    #[test]
    fn table_is_full_and_fair() {
        let t = table(&names(10), DEFAULT_TABLE_SIZE);
        assert_eq!(t.len(), DEFAULT_TABLE_SIZE as usize);
        let mut counts = [0u32; 10];
        for e in &t {
            counts[*e as usize] += 1;
        }
        let ideal = DEFAULT_TABLE_SIZE / 10;
        for c in counts {
            assert!(c.abs_diff(ideal) * 100 / ideal <= 2, "{counts:?}");
        }
    }

    #[test]
    fn removing_one_backend_moves_only_its_entries() {
        let all = names(10);
        let before = table(&all, DEFAULT_TABLE_SIZE);
        let removed = 4usize;
        let rest: Vec<Vec<u8>> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != removed)
            .map(|(_, n)| n.clone())
            .collect();
        let after = table(&rest, DEFAULT_TABLE_SIZE);
        // Map `after` indexes back to names to compare.
        let mut moved_other = 0;
        for (b, a) in before.iter().zip(&after) {
            let bname = &all[*b as usize];
            let aname = &rest[*a as usize];
            if *b as usize != removed && bname != aname {
                moved_other += 1;
            }
        }
        // Maglev's guarantee is "almost only": well under 1% of the others' entries move.
        assert!(
            moved_other * 100 < before.len(),
            "{moved_other} of {} entries of surviving backends moved",
            before.len()
        );
    }

    #[test]
    fn primes() {
        assert!(is_prime(16_381));
        assert!(is_prime(65_521));
        assert!(!is_prime(16_383));
    }
}
