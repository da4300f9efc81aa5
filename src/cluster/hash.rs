//! Which partition a stream name falls in, and which live node should own a partition.
//! Both are fixed functions of their inputs, the same on every node and every build.

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64's finaliser: spreads FNV's low-entropy high bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The partition of a stream name, `0..partitions`.
pub fn partition(name: &str, partitions: u32) -> u32 {
    (mix(fnv1a(name.as_bytes())) % u64::from(partitions.max(1))) as u32
}

/// Rendezvous (highest random weight) hashing: the node that should own `partition` among
/// `nodes`. When a node joins, only the partitions it now wins move (about 1/n of them); when
/// one leaves, only its own move.
pub fn owner_of<'a>(partition: u32, nodes: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    nodes
        .into_iter()
        .max_by_key(|n| (mix(fnv1a(n.as_bytes()) ^ mix(u64::from(partition) + 1)), *n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_spread_names_evenly() {
        let mut counts = [0usize; 16];
        for i in 0..16_000 {
            counts[partition(&format!("stream-{i}"), 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn a_joining_node_takes_only_partitions_it_wins() {
        let three = ["a", "b", "c"];
        let four = ["a", "b", "c", "d"];
        let mut moved = 0;
        for p in 0..256 {
            let before = owner_of(p, three).unwrap();
            let after = owner_of(p, four).unwrap();
            if before != after {
                assert_eq!(after, "d", "partition {p} moved between old nodes");
                moved += 1;
            }
        }
        // About a quarter moves, to the new node only.
        assert!((40..90).contains(&moved), "{moved}");
    }

    #[test]
    fn owner_does_not_depend_on_the_order_of_nodes() {
        for p in 0..64 {
            assert_eq!(owner_of(p, ["x", "y", "z"]), owner_of(p, ["z", "x", "y"]));
        }
    }
}
